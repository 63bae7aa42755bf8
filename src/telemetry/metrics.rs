//! Every metric the agent exports, in Prometheus families named `mayfly_*`.

use std::sync::atomic::AtomicI64;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry as PromRegistry;

/// Label values are the variant names, so they are spelled as they should read.
#[allow(non_camel_case_types)]
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum SvidKind {
    x509,
    jwt,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: SvidKind,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabel {
    /// `workload` or `admin`.
    pub socket: String,
    /// `per_uid`, `total` or `descriptors`.
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

/// Every metric the agent exports. Cloning shares the same series.
#[derive(Clone)]
pub struct Metrics {
    pub leases: Family<StateLabel, Gauge>,
    pub lease_ends: Family<StateLabel, Counter>,
    pub lease_ends_unrecorded: Gauge,
    pub svids_issued: Family<KindLabel, Counter>,
    pub issuance_seconds: Family<KindLabel, Histogram>,
    pub attestations: Family<ResultLabel, Counter>,
    pub open_streams: Gauge,
    pub sds_streams: Gauge,
    pub sds_pushes: Counter,
    pub sds_nacks: Counter,
    pub connections_refused: Family<RefusedLabel, Counter>,
    pub mints_refused: Counter,
    pub teardown_seconds: Histogram,
    pub audit_write_seconds: Histogram,
    pub ca_not_after: Gauge<i64, AtomicI64>,
    /// When the signing CA is next replaced (Unix time).
    pub ca_next_rotation: Gauge<i64, AtomicI64>,
    /// 1 while the operator's CA files, as they are now, are refused.
    pub ca_reload_refused: Gauge,
    /// Changed CA files refused since start.
    pub ca_reloads_refused: Counter,
    pub svid_not_after: Gauge<i64, AtomicI64>,
    /// 1 while the lease store answers (always, for the embedded store).
    pub store_reachable: Gauge,
    /// 1 while this agent has not heard its shared store for `store.max_staleness`.
    pub store_stale: Gauge,
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~1.6 s
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

impl Metrics {
    pub fn new(registry: &mut PromRegistry) -> Metrics {
        let m = Metrics {
            leases: Family::default(),
            lease_ends: Family::default(),
            lease_ends_unrecorded: Gauge::default(),
            svids_issued: Family::default(),
            issuance_seconds: Family::new_with_constructor(latency_histogram),
            attestations: Family::default(),
            open_streams: Gauge::default(),
            sds_streams: Gauge::default(),
            sds_pushes: Counter::default(),
            sds_nacks: Counter::default(),
            connections_refused: Family::default(),
            mints_refused: Counter::default(),
            teardown_seconds: latency_histogram(),
            audit_write_seconds: latency_histogram(),
            ca_not_after: Gauge::default(),
            ca_next_rotation: Gauge::default(),
            ca_reload_refused: Gauge::default(),
            ca_reloads_refused: Counter::default(),
            svid_not_after: Gauge::default(),
            store_reachable: Gauge::default(),
            store_stale: Gauge::default(),
        };
        m.store_reachable.set(1);
        let r = registry;
        r.register("mayfly_leases", "Task leases by state", m.leases.clone());
        r.register(
            "mayfly_lease_ends",
            "Task leases ended, by final state",
            m.lease_ends.clone(),
        );
        r.register(
            "mayfly_lease_ends_unrecorded",
            "Lease ends in effect but not yet recorded in the lease store or the audit log \
             (retried until they are)",
            m.lease_ends_unrecorded.clone(),
        );
        r.register(
            "mayfly_store_reachable",
            "1 while the lease store answers (0: grants and renewals are refused)",
            m.store_reachable.clone(),
        );
        r.register(
            "mayfly_store_stale",
            "1 while this agent's view of its shared lease store has not been confirmed current \
             for store.max_staleness (it issues nothing and has ended its streams)",
            m.store_stale.clone(),
        );
        r.register(
            "mayfly_svids_issued",
            "SVIDs issued, by kind",
            m.svids_issued.clone(),
        );
        r.register(
            "mayfly_svid_issuance_seconds",
            "Time to issue one SVID (key generation, signing, audit)",
            m.issuance_seconds.clone(),
        );
        r.register(
            "mayfly_attestations",
            "Workload attestations, by result",
            m.attestations.clone(),
        );
        r.register(
            "mayfly_open_streams",
            "Open identity streams (Workload API and SDS)",
            m.open_streams.clone(),
        );
        r.register(
            "mayfly_sds_streams",
            "Open SDS StreamSecrets streams (also counted in mayfly_open_streams)",
            m.sds_streams.clone(),
        );
        r.register(
            "mayfly_sds_pushes",
            "SDS responses sent on StreamSecrets streams",
            m.sds_pushes.clone(),
        );
        r.register(
            "mayfly_sds_nacks",
            "SDS responses a client rejected (a request with error_detail)",
            m.sds_nacks.clone(),
        );
        r.register(
            "mayfly_connections_refused",
            "Connections closed at accept, over the caps per uid, in all, or of file descriptors",
            m.connections_refused.clone(),
        );
        r.register(
            "mayfly_jwt_mints_refused",
            "JWT-SVIDs not minted because their lease was over its mint rate",
            m.mints_refused.clone(),
        );
        r.register(
            "mayfly_teardown_seconds",
            "From a lease's end to its identity being withdrawn from open streams",
            m.teardown_seconds.clone(),
        );
        r.register(
            "mayfly_audit_write_seconds",
            "Time for an audit record to become durable",
            m.audit_write_seconds.clone(),
        );
        r.register(
            "mayfly_ca_not_after_timestamp_seconds",
            "Expiry of the signing CA, the one that signs now (Unix time)",
            m.ca_not_after.clone(),
        );
        r.register(
            "mayfly_ca_next_rotation_timestamp_seconds",
            "When the signing CA is next replaced (Unix time): the embedded CA's next \
             activation, or the operator CA's expiry, by which its files must be renewed",
            m.ca_next_rotation.clone(),
        );
        r.register(
            "mayfly_ca_reload_refused",
            "1 while the operator's CA files, as they are now, are refused (the previous CA \
             keeps signing)",
            m.ca_reload_refused.clone(),
        );
        r.register(
            "mayfly_ca_reloads_refused",
            "Changed CA files refused since start",
            m.ca_reloads_refused.clone(),
        );
        r.register(
            "mayfly_svid_not_after_timestamp_seconds",
            "Expiry of the most recently issued X.509-SVID (Unix time)",
            m.svid_not_after.clone(),
        );
        m
    }

    /// Metrics that are not exported anywhere (tests of single components).
    pub fn unregistered() -> Metrics {
        Metrics::new(&mut PromRegistry::default())
    }

    pub fn set_ca_not_after(&self, t: SystemTime) {
        self.ca_not_after.set(unix(t));
    }

    pub fn set_ca_next_rotation(&self, t: SystemTime) {
        self.ca_next_rotation.set(unix(t));
    }

    pub fn set_svid_not_after(&self, t: SystemTime) {
        self.svid_not_after.set(unix(t));
    }
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Times a future into a histogram.
pub async fn timed<T>(h: &Histogram, f: impl std::future::Future<Output = T>) -> T {
    let start = Instant::now();
    let out = f.await;
    h.observe(start.elapsed().as_secs_f64());
    out
}

/// Counts a stream as open for as long as it lives.
pub struct StreamGuard(Gauge);

impl StreamGuard {
    pub fn new(g: &Gauge) -> StreamGuard {
        g.inc();
        StreamGuard(g.clone())
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
