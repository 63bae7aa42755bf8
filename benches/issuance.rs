//! X.509-SVID issuance throughput on one core, in-process through the library API.
//!
//! Run: `cargo bench --bench issuance` (about a minute). Each benchmark counts one SVID (or one
//! raw keygen+sign) as one element, so criterion's `thrpt` line is SVIDs per second.
//!
//! - `ring_p256_keygen_sign`: the floor set by the crypto library: ring's ECDSA P-256
//!   `generate_pkcs8` + `from_pkcs8` + `sign` of a 300-byte message (what issuance does at
//!   least: a fresh leaf key, and one signature by the CA).
//! - `issue_x509_svid`: `SigningCa::issue_x509_svid` (keygen + TBS encoding + signing + DER).
//! - `audit_append_sequential`: one `svid_issued`-sized audit record appended and fsync'd at a
//!   time (the fsync latency of the disk under the temp dir).
//! - `issue_plus_audit_sequential`: issue, then append its audit record and wait until durable,
//!   one SVID at a time (what one fetch that triggers issuance costs).
//! - `issue_plus_audit_16_tasks`: the same with 16 concurrent tasks on a single-threaded
//!   runtime, so signing overlaps the fsync and concurrent records share one fsync (group
//!   commit).
//!
//! The data dir (CA, audit log) is a temp dir under `$TMPDIR` (default `/tmp`): the audit
//! variants measure that file system's fsync.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mayfly::audit::{AuditLog, AuditOptions};
use mayfly::authority::x509::{CaSource, SigningCa};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
use serde_json::{Map, Value};
use spiffe::{SpiffeId, TrustDomain};

const CONCURRENT_TASKS: u64 = 16;

fn svid_fields(serial: &str, id: &SpiffeId, not_after: SystemTime) -> Map<String, Value> {
    let v = serde_json::json!({
        "serial": serial,
        "spiffe_id": id.to_string(),
        "not_before": mayfly::time::rfc3339(SystemTime::now()),
        "not_after": mayfly::time::rfc3339(not_after),
        "lease_id": "0192f0c5-7a0e-7b6e-9d1e-3f0a2b4c5d6e",
        "task_id": "report-42",
        "delegator": "user/bench",
        "pid": 4242,
        "uid": 1000,
        "exe_sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "trigger": "fetch",
    });
    match v {
        Value::Object(m) => m,
        _ => unreachable!(),
    }
}

fn issue(ca: &SigningCa, id: &SpiffeId) -> mayfly::authority::x509::IssuedX509 {
    ca.issue_x509_svid(id, SystemTime::now() + Duration::from_secs(300))
        .expect("issue")
}

fn bench_issuance(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let td = TrustDomain::new("example.org").unwrap();
    let ca = Arc::new(
        SigningCa::load_or_create(
            dir.path(),
            &td,
            &CaSource::default(),
            Duration::from_secs(365 * 24 * 3600),
        )
        .expect("CA"),
    );
    let id = Arc::new(
        SpiffeId::new("spiffe://example.org/agent/bench/task/report-42/delegator/user/bench")
            .unwrap(),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let audit = rt
        .block_on(async { AuditLog::open(&dir.path().join("audit"), AuditOptions::default()) })
        .expect("audit log");

    let mut g = c.benchmark_group("issuance");
    g.throughput(Throughput::Elements(1));
    g.sample_size(10);
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(3));

    let rng = SystemRandom::new();
    let msg = [0x5au8; 300];
    g.bench_function("ring_p256_keygen_sign", |b| {
        b.iter(|| {
            let pkcs8 =
                EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
            let key =
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
                    .unwrap();
            black_box(key.sign(&rng, black_box(&msg)).unwrap());
        })
    });

    g.bench_function("issue_x509_svid", |b| b.iter(|| black_box(issue(&ca, &id))));

    let sample = issue(&ca, &id);
    g.bench_function("audit_append_sequential", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let f = svid_fields(&sample.serial_hex, &id, sample.not_after);
                    audit.append("svid_issued", f).await.expect("append");
                }
                start.elapsed()
            })
        })
    });

    g.bench_function("issue_plus_audit_sequential", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let s = issue(&ca, &id);
                    let f = svid_fields(&s.serial_hex, &id, s.not_after);
                    audit.append("svid_issued", f).await.expect("append");
                    black_box(s);
                }
                start.elapsed()
            })
        })
    });

    let syncs_before = audit.syncs();
    let mut appended = 0u64;
    g.bench_function("issue_plus_audit_16_tasks", |b| {
        b.iter_custom(|iters| {
            appended += iters;
            rt.block_on(async {
                let start = Instant::now();
                let mut tasks = tokio::task::JoinSet::new();
                for t in 0..CONCURRENT_TASKS {
                    // Spread `iters` SVIDs over the tasks.
                    let n = iters / CONCURRENT_TASKS + u64::from(t < iters % CONCURRENT_TASKS);
                    let (ca, id, audit) = (ca.clone(), id.clone(), audit.clone());
                    tasks.spawn(async move {
                        for _ in 0..n {
                            let s = issue(&ca, &id);
                            let f = svid_fields(&s.serial_hex, &id, s.not_after);
                            audit.append("svid_issued", f).await.expect("append");
                            black_box(s);
                        }
                    });
                }
                while let Some(r) = tasks.join_next().await {
                    r.expect("task");
                }
                start.elapsed()
            })
        })
    });
    let syncs = audit.syncs() - syncs_before;
    if syncs > 0 {
        eprintln!(
            "issuance/issue_plus_audit_16_tasks: {appended} records in {syncs} fsyncs \
             ({:.1} records per fsync, group commit)",
            appended as f64 / syncs as f64
        );
    }
    g.finish();
    rt.block_on(audit.close());
}

criterion_group!(benches, bench_issuance);
criterion_main!(benches);
