#!/usr/bin/env bash
# The planner → executor demo (README, "Delegation"): a private agent in a temp dir, a tool
# server, a planner under `mayfly run` that delegates to two executors with different, narrower
# audiences, and then the planner revoked, which ends both executors' identities.
#
#   bash examples/planner-executor/run.sh
#
# MAYFLY: the mayfly binary (default: mayfly on PATH). PYTHON: a Python with py-spiffe
# (`pip install spiffe`) for the executors (default: python3).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
MAYFLY=$(command -v "${MAYFLY:-mayfly}")
PYTHON=$(command -v "${PYTHON:-python3}")
export MAYFLY PYTHON
work=$(mktemp -d)
export DEMO_WORK=$work
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

export SPIFFE_ENDPOINT_SOCKET="unix://$work/workload.sock"
export MAYFLY_ADMIN_SOCKET="$work/admin.sock"
"$MAYFLY" agent --trust-domain demo.example --socket "$work/workload.sock" \
  --admin-socket "$work/admin.sock" --data-dir "$work/data" \
  --health-addr "unix:$work/health.sock" >"$work/agent.log" 2>&1 &
pids+=($!)
python3 "$here/tool_server.py" "$work/tool.port" &
pids+=($!)
for _ in $(seq 100); do
  [[ -S $work/admin.sock && -s $work/tool.port ]] && break
  sleep 0.1
done

echo "== the planner holds plan-1 (audiences tool.search and tool.db, one level of delegation)"
"$MAYFLY" run --task-id plan-1 --delegator user/alice --agent planner --ttl 10m \
  --audience tool.search --audience tool.db --max-delegation-depth 1 -- "$here/planner.sh" &
planner=$!
pids+=($planner)
for _ in $(seq 300); do
  [[ -e $work/search.ok && -e $work/db.ok ]] && break
  sleep 0.1
done
[[ -e $work/search.ok && -e $work/db.ok ]] || { echo "the executors never reached their tools" >&2; exit 1; }

echo "== the hierarchy"
"$MAYFLY" task list --tree
lease=$("$MAYFLY" task list --output json | python3 -c \
  'import json, sys; print(next(l["lease_id"] for l in json.load(sys.stdin) if l["agent"] == "planner"))')

echo "== revoking the planner"
"$MAYFLY" task revoke "$lease" --reason "demo: the planner is done for" >/dev/null
wait "$planner" || true

echo "== afterwards"
"$MAYFLY" task list --all --tree
ended=$("$MAYFLY" task list --all --output json | python3 -c \
  'import json, sys; print(sum(l["state"] == "parent_ended" for l in json.load(sys.stdin)))')
[[ $ended == 2 ]] || { echo "expected both executors parent_ended, got $ended" >&2; exit 1; }
echo "both executors' identities ended with the planner"
