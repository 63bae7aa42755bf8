#!/usr/bin/env bash
# Every fuzz target for a few seconds on its seeds (SECURITY.md, "Fuzzing"): proof that each
# still builds and that neither its seeds nor a short burst of mutations crash it. The long
# runs are not CI's job. Needs only stable Rust: cargo-fuzz passes nightly-only flags to
# rustc, which stable accepts with RUSTC_BOOTSTRAP=1.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
# Unoptimised and without AddressSanitizer (the crate forbids unsafe code): builds in about a
# third of the time of the long runs' release + ASan build, with the same debug assertions
# and overflow checks.
build=(--dev --sanitizer none)
cargo fuzz build "${build[@]}"

scratch=$(mktemp -d)
# The harnesses keep their files in /dev/shm (or /tmp), one set per process.
trap 'rm -rf "$scratch" /dev/shm/mayfly-fuzz-* /tmp/mayfly-fuzz-*' EXIT
for target in $(cargo fuzz list); do
  mkdir "$scratch/$target"
  # New inputs go to the scratch corpus; seeds/ is only read.
  if cargo fuzz run "${build[@]}" "$target" "$scratch/$target" "seeds/$target" -- \
      -max_total_time=5 -timeout=25 -print_final_stats=1 >"$scratch/$target.log" 2>&1; then
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$scratch/$target.log")
    echo "fuzz $target: ${execs:-?} inputs, no crash"
  else
    cat "$scratch/$target.log"
    echo "fuzz $target FAILED; the input is in fuzz/artifacts/$target/" >&2
    exit 1
  fi
done
