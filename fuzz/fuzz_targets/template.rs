//! The SPIFFE ID template (`IdTemplate::new`, checked at start-up) and its rendering in
//! `validate_grant`. Input: template, agent, task ID and delegator, separated by NUL bytes.
//! Never a panic; a template that is accepted renders, for names that pass the grant checks,
//! either an error naming `spiffe_id` or an ID in the agent's trust domain within 2048 bytes.
#![no_main]

use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use mayfly::lease::{validate_grant, GrantInput, IdTemplate, LeaseError, LeaseLimits, Principal};
use spiffe::TrustDomain;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = text.split('\0');
    let template = parts.next().unwrap_or_default();
    let Ok(template) = IdTemplate::new(template) else {
        return;
    };
    let mut name = |default: &str| parts.next().unwrap_or(default).to_owned();
    let (agent, task_id, delegator) = (name("agent"), name("task"), name("user/alice"));
    let td = TrustDomain::new("example.org").unwrap();
    let limits = LeaseLimits {
        trust_domain: td.clone(),
        template,
        max_ttl: Duration::from_secs(3600),
        default_svid_ttl: Duration::from_secs(300),
        max_svid_ttl: Duration::from_secs(3600),
        default_jwt_ttl: Duration::from_secs(300),
        max_jwt_ttl: Duration::from_secs(3600),
        jwt_mint: mayfly::lease::DEFAULT_JWT_MINT,
        delegation: Default::default(),
    };
    let input = GrantInput {
        task_id,
        delegator,
        agent,
        ttl: Some(Duration::from_secs(60)),
        selectors: vec!["unix:uid:1000".into()],
        ..Default::default()
    };
    match validate_grant(input, &limits, SystemTime::now(), Principal::agent()) {
        Ok(lease) => {
            assert_eq!(lease.spiffe_id.trust_domain(), &td);
            assert!(lease.spiffe_id.to_string().len() <= mayfly::lease::MAX_SPIFFE_ID_LEN);
        }
        Err(LeaseError::InvalidField { field, .. }) => assert!(
            matches!(field, "task_id" | "delegator" | "agent" | "spiffe_id"),
            "{field}"
        ),
        Err(e) => panic!("unexpected error {e}"),
    }
});
