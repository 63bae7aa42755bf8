//! Admin request validation: a `GrantRequest` and a `RenewRequest` from their protobuf bytes,
//! converted as the admin server converts them, then validated and applied by the real lease
//! registry (on the in-memory store and audit sink), under limits a config file can set.
//!
//! Input: byte 0 picks the limits (the defaults, the tightest, the largest a config file can
//! hold), bytes 1-2 are the grant message's length (big-endian), then the grant message, then
//! the renew message (if any bytes remain; an empty `lease_id` names the lease just granted).
//! Never a panic; a lease that exists never ends past its renewal ceiling or beyond the limits.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use mayfly::audit::MemorySink;
use mayfly::fuzzing::{admin_grant_input, admin_renew_request};
use mayfly::lease::{
    Durable, IdTemplate, Lease, LeaseId, LeaseLimits, Leases, Principal, DEFAULT_TEMPLATE,
};
use mayfly::store::MemoryStore;
use mayfly::telemetry::Metrics;
use spiffe::TrustDomain;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    })
}

fn metrics() -> Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS
        .get_or_init(|| Metrics::new(&mut prometheus_client::registry::Registry::default()))
        .clone()
}

fn limits(pick: u8) -> LeaseLimits {
    let s = Duration::from_secs;
    // The largest duration `leases.*` in the config file can hold (humantime's maximum).
    let max = Duration::new(u64::MAX, 999_999_999);
    let (max_ttl, default_svid, max_svid, default_jwt, max_jwt) = match pick % 3 {
        0 => (s(24 * 3600), s(300), s(3600), s(300), s(3600)),
        1 => (s(1), s(1), s(1), s(1), s(1)),
        _ => (max, max, max, max, max),
    };
    LeaseLimits {
        trust_domain: TrustDomain::new("example.org").unwrap(),
        template: IdTemplate::new(DEFAULT_TEMPLATE).unwrap(),
        max_ttl,
        default_svid_ttl: default_svid,
        max_svid_ttl: max_svid,
        default_jwt_ttl: default_jwt,
        max_jwt_ttl: max_jwt,
        jwt_mint: mayfly::lease::DEFAULT_JWT_MINT,
        delegation: Default::default(),
    }
}

fn check(lease: &Lease, limits: &LeaseLimits) {
    assert!(lease.expires_at <= lease.max_expires_at);
    assert!(lease.created_at <= lease.max_expires_at);
    assert!(lease.svid_ttl <= limits.max_svid_ttl);
    assert!(lease.jwt_ttl <= limits.max_jwt_ttl);
    assert!(!lease.selectors.is_empty());
}

fuzz_target!(|data: &[u8]| {
    let [pick, hi, lo, rest @ ..] = data else {
        return;
    };
    let len = usize::from(u16::from_be_bytes([*hi, *lo]));
    let (grant, renew) = rest.split_at(len.min(rest.len()));
    let Some(Ok(input)) = admin_grant_input(grant) else {
        return;
    };
    let limits = limits(*pick);
    let durable = Durable {
        store: MemoryStore::new(),
        audit: MemorySink::new(),
        metrics: metrics(),
        node: "fuzz".into(),
    };
    let registry = Leases::new(limits.clone(), durable);
    runtime().block_on(async {
        let granted = registry.grant_input(input, Principal::agent()).await;
        if let Ok(lease) = &granted {
            check(lease, &limits);
            if let Some((id, ttl)) = admin_renew_request(renew) {
                let id = if id.is_empty() {
                    Ok(lease.id.clone())
                } else {
                    LeaseId::parse(&id)
                };
                if let (Ok(id), Ok(Some(ttl))) = (id, ttl) {
                    if let Ok(renewed) = registry.renew(&id, ttl).await {
                        check(&renewed, &limits);
                        assert!(renewed.expires_at >= lease.expires_at);
                        assert_eq!(renewed.max_expires_at, lease.max_expires_at);
                    }
                }
            }
        }
        registry.close().await;
    });
});
