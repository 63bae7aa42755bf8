//! Delegation's narrowing rules: a `DelegateRequest` from its protobuf bytes, converted as the
//! Delegation server converts it, then checked against a parent by `validate_delegation`.
//!
//! Input: byte 0 picks the parent (audiences or none, bound to this process or not, depth 1 or
//! 3), the rest is the request. Never a panic; a child that is built only ever narrows its
//! parent: it ends no later, its TTLs are no longer, its audiences are a non-empty subset, it
//! keeps every selector of the parent but its process bindings and adds one, it delegates
//! fewer levels, and its chain is the parent's plus the parent.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use mayfly::fuzzing::delegate_input;
use mayfly::lease::{
    validate_delegation, validate_grant, GrantInput, IdTemplate, Lease, LeaseLimits, Principal,
    DEFAULT_TEMPLATE,
};
use spiffe::TrustDomain;

fn limits() -> &'static LeaseLimits {
    static LIMITS: OnceLock<LeaseLimits> = OnceLock::new();
    LIMITS.get_or_init(|| LeaseLimits {
        trust_domain: TrustDomain::new("example.org").unwrap(),
        template: IdTemplate::new(DEFAULT_TEMPLATE).unwrap(),
        max_ttl: Duration::from_secs(24 * 3600),
        default_svid_ttl: Duration::from_secs(300),
        max_svid_ttl: Duration::from_secs(3600),
        default_jwt_ttl: Duration::from_secs(300),
        max_jwt_ttl: Duration::from_secs(3600),
        jwt_mint: mayfly::lease::DEFAULT_JWT_MINT,
        delegation: Default::default(),
    })
}

fn parent(pick: u8) -> Lease {
    let mut selectors = vec!["unix:uid:1000".to_owned(), "unix:gid:5".to_owned()];
    if pick & 2 != 0 {
        selectors.push(format!("unix:pid:{}", std::process::id()));
    }
    let input = GrantInput {
        task_id: "plan".into(),
        delegator: "user/alice".into(),
        agent: "planner".into(),
        ttl: Some(Duration::from_secs(600)),
        max_ttl: Some(Duration::from_secs(1200)),
        svid_ttl: Some(Duration::from_secs(120)),
        jwt_ttl: Some(Duration::from_secs(60)),
        selectors,
        audiences: if pick & 1 != 0 {
            vec!["db".into(), "search".into()]
        } else {
            Vec::new()
        },
        max_delegation_depth: if pick & 4 != 0 { 3 } else { 1 },
        ..Default::default()
    };
    validate_grant(input, limits(), SystemTime::now(), Principal::agent()).unwrap()
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, request)) = data.split_first() else {
        return;
    };
    let Some((_, Ok(input))) = delegate_input(request) else {
        return;
    };
    let p = parent(pick);
    let Ok(c) = validate_delegation(&p, input, limits(), p.created_at, Principal::agent()) else {
        return;
    };
    assert!(c.expires_at <= p.expires_at && c.max_expires_at <= p.max_expires_at);
    assert!(c.expires_at <= c.max_expires_at);
    assert!(c.svid_ttl <= p.svid_ttl && c.jwt_ttl <= p.jwt_ttl);
    assert!(!c.audiences.is_empty());
    assert!(p.audiences.is_empty() || c.audiences.iter().all(|a| p.audiences.contains(a)));
    assert!(p
        .selectors
        .iter()
        .filter(|s| s.bound_process().is_none())
        .all(|s| c.selectors.contains(s.as_str())));
    assert!(c.selectors.iter().any(|s| !p.selectors.contains(s.as_str())));
    if p.selectors.processes().next().is_some() {
        assert!(c.selectors.processes().next().is_some());
    }
    assert!(c.may_delegate < p.may_delegate);
    assert_eq!(c.delegator, p.delegator);
    assert_eq!(c.chain.len(), p.chain.len() + 1);
    assert_eq!(c.parent(), Some(&p.id));
    assert_ne!(c.spiffe_id, p.spiffe_id);
});
