//! JWT-SVIDs end to end with the `spiffe` crate: fetch, validate through the agent, validate
//! offline against the fetched bundles, audience scoping, lease-bound expiry, key rotation.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::common::*;
use mayfly::proto::admin as pb;
use spiffe::WorkloadApiError;

async fn grant_with(
    t: &TestAgent,
    task: &str,
    ttl: Duration,
    audiences: &[&str],
    jwt_ttl: Option<Duration>,
) -> pb::Lease {
    t.admin()
        .await
        .grant(pb::GrantRequest {
            agent: "caller".into(),
            jwt_ttl: jwt_ttl.map(mayfly::time::to_duration),
            audiences: audiences.iter().map(|a| a.to_string()).collect(),
            ..grant_request(task, "user/alice", ttl)
        })
        .await
        .unwrap()
        .into_inner()
}

/// Part `index` of a compact JWT (0 the header, 1 the payload), decoded.
fn jwt_part(token: &str, index: usize) -> serde_json::Value {
    use base64::Engine;
    let part = token.split('.').nth(index).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn header(token: &str) -> serde_json::Value {
    jwt_part(token, 0)
}

fn payload(token: &str) -> serde_json::Value {
    jwt_part(token, 1)
}

#[tokio::test]
async fn fetch_then_validate_online_and_offline() {
    let t = start().await;
    let lease = grant_with(&t, "jwt-1", HOUR, &[], None).await;
    let client = t.workload().await;
    let svid = client.fetch_jwt_svid(["api.example"], None).await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), lease.spiffe_id);

    let h = header(svid.token());
    assert_eq!(h["alg"], "ES256");
    assert_eq!(h["typ"], "JWT");
    assert!(h["kid"].as_str().is_some_and(|k| !k.is_empty()));
    let p = payload(svid.token());
    assert_eq!(p["sub"], lease.spiffe_id.as_str());
    assert_eq!(p["aud"], serde_json::json!(["api.example"]));
    assert!(p["jti"].as_str().is_some_and(|j| j.len() >= 16));
    assert!(p["iat"].as_u64().is_some());
    assert_eq!(p[mayfly::svid::CLAIM_TASK_ID], "jwt-1");
    assert_eq!(p[mayfly::svid::CLAIM_DELEGATOR], "user/alice");
    assert_eq!(p[mayfly::svid::CLAIM_LEASE_ID], lease.lease_id.as_str());

    // Through the agent.
    let validated = client
        .validate_jwt_token("api.example", svid.token())
        .await
        .unwrap();
    assert_eq!(validated.spiffe_id().to_string(), lease.spiffe_id);

    // Offline, as a relying party: against the JWT bundles fetched from the agent.
    let bundles = client.fetch_jwt_bundles().await.unwrap();
    let offline =
        spiffe::JwtSvid::parse_and_validate(svid.token(), &bundles, &["api.example"]).unwrap();
    assert_eq!(offline.spiffe_id().to_string(), lease.spiffe_id);
    assert!(spiffe::JwtSvid::parse_and_validate(svid.token(), &bundles, &["other"]).is_err());
}

#[tokio::test]
async fn the_validate_response_carries_all_claims() {
    let t = start().await;
    grant_with(&t, "claims", HOUR, &[], None).await;
    let client = t.workload().await;
    let token = client.fetch_jwt_token(["svc"], None).await.unwrap();
    let channel = mayfly::cli::connect::unix_channel(&t.socket).await.unwrap();
    let mut raw =
        mayfly::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(channel);
    let mut req = tonic::Request::new(mayfly::proto::workload::ValidateJwtsvidRequest {
        audience: "svc".into(),
        svid: token,
    });
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let resp = raw.validate_jwtsvid(req).await.unwrap().into_inner();
    assert!(resp.spiffe_id.contains("/task/claims/"));
    let claims = resp.claims.unwrap().fields;
    for key in [
        "sub",
        "aud",
        "exp",
        "iat",
        "jti",
        mayfly::svid::CLAIM_TASK_ID,
    ] {
        assert!(claims.contains_key(key), "missing {key}");
    }
}

#[tokio::test]
async fn audiences_are_scoped_to_the_lease() {
    let t = start().await;
    grant_with(&t, "scoped", HOUR, &["tool.search", "tool.mail"], None).await;
    let client = t.workload().await;
    client.fetch_jwt_svid(["tool.search"], None).await.unwrap();
    client
        .fetch_jwt_svid(["tool.search", "tool.mail"], None)
        .await
        .unwrap();
    let err = client
        .fetch_jwt_svid(["tool.payments"], None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, WorkloadApiError::PermissionDenied(m) if m.contains("tool.payments")),
        "{err:?}"
    );
    let err = client
        .fetch_jwt_svid(["tool.search", "tool.payments"], None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, WorkloadApiError::PermissionDenied(_)),
        "{err:?}"
    );
}

#[tokio::test]
async fn empty_audience_is_invalid_and_foreign_ids_are_denied() {
    let t = start().await;
    grant_with(&t, "aud", HOUR, &[], None).await;
    let client = t.workload().await;
    let err = client
        .fetch_jwt_svid(Vec::<String>::new(), None)
        .await
        .unwrap_err();
    assert!(err.is_invalid_argument(), "{err:?}");
    let other = spiffe::SpiffeId::new("spiffe://example.org/agent/x/task/y/delegator/z").unwrap();
    let err = client
        .fetch_jwt_svid(["a"], Some(&other))
        .await
        .unwrap_err();
    assert!(
        matches!(err, WorkloadApiError::PermissionDenied(_)),
        "{err:?}"
    );
}

#[tokio::test]
async fn no_lease_means_no_token() {
    let t = start().await;
    let err = t
        .workload()
        .await
        .fetch_jwt_svid(["a"], None)
        .await
        .unwrap_err();
    assert!(matches!(err, WorkloadApiError::NoIdentityIssued), "{err:?}");
}

#[tokio::test]
async fn a_token_of_a_revoked_lease_is_refused_before_it_expires() {
    let t = start().await;
    let lease = grant_with(&t, "revocable", HOUR, &[], None).await;
    let client = t.workload().await;
    let token = client.fetch_jwt_token(["svc"], None).await.unwrap();
    client.validate_jwt_token("svc", &token).await.unwrap();
    t.revoke(&lease.lease_id, "").await;
    assert!(
        payload(&token)["exp"].as_u64().unwrap()
            > SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs()
    );
    let err = client.validate_jwt_token("svc", &token).await.unwrap_err();
    let text = format!("{err:?}");
    assert!(text.contains("ended"), "{text}");
}

#[tokio::test]
async fn exp_never_passes_the_lease_end_and_tokens_are_cached() {
    let t = start().await;
    let lease = grant_with(&t, "short", Duration::from_secs(20), &[], Some(HOUR)).await;
    let client = t.workload().await;
    let a = client.fetch_jwt_token(["svc"], None).await.unwrap();
    let exp = payload(&a)["exp"].as_u64().unwrap();
    let end = expires_at(&lease)
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(exp <= end, "exp {exp} past the lease end {end}");
    // Cached per (lease, audience set) until half its life.
    let b = client.fetch_jwt_token(["svc"], None).await.unwrap();
    assert_eq!(a, b);
    let c = client.fetch_jwt_token(["other"], None).await.unwrap();
    assert_ne!(a, c);
}

#[tokio::test]
async fn after_a_key_rotation_older_tokens_still_validate() {
    let t = start_with(|f| f.jwt.key_rotation = Some("1s".into())).await;
    grant_with(&t, "rotating", HOUR, &[], None).await;
    let client = t.workload().await;
    let old = client.fetch_jwt_token(["svc"], None).await.unwrap();
    let old_kid = header(&old)["kid"].as_str().unwrap().to_owned();
    // The agent's own maintenance rotates the key (no call forces it); the bundle stream
    // pushes the new key set.
    let td = trust_domain();
    let mut stream = client.stream_jwt_bundles().await.unwrap();
    let first = futures::StreamExt::next(&mut stream)
        .await
        .unwrap()
        .unwrap();
    let keys = |set: &spiffe::JwtBundleSet| set.get(&td).unwrap().jwt_authorities().count();
    let mut seen = keys(&first);
    while seen < 2 {
        let update = tokio::time::timeout(
            Duration::from_secs(10),
            futures::StreamExt::next(&mut stream),
        )
        .await
        .expect("the key rotated and the bundle was pushed")
        .unwrap()
        .unwrap();
        seen = keys(&update);
    }
    client.validate_jwt_token("svc", &old).await.unwrap();
    let bundles = client.fetch_jwt_bundles().await.unwrap();
    spiffe::JwtSvid::parse_and_validate(&old, &bundles, &["svc"]).unwrap();
    let new = client.fetch_jwt_token(["fresh"], None).await.unwrap();
    assert_ne!(header(&new)["kid"].as_str().unwrap(), old_kid);
}

#[tokio::test]
async fn jwt_issuance_is_audited() {
    let t = start().await;
    let lease = grant_with(&t, "audited-jwt", HOUR, &[], None).await;
    let token = t
        .workload()
        .await
        .fetch_jwt_token(["svc"], None)
        .await
        .unwrap();
    let jti = payload(&token)["jti"].as_str().unwrap().to_owned();
    let records = audit_events(&t.data_dir(), "jwt_issued");
    let r = records.first().expect("jwt issuance audited");
    assert_eq!(r["jti"], jti.as_str());
    assert_eq!(r["lease_id"], lease.lease_id.as_str());
    assert_eq!(r["audiences"], serde_json::json!(["svc"]));
    assert!(r["expires_at"].as_str().is_some());
}

#[tokio::test]
async fn the_cli_fetches_and_validates() {
    let t = start().await;
    t.grant("cli-jwt", &[format!("unix:uid:{}", my_uid())], HOUR, None)
        .await;
    let socket = t.socket.display().to_string();
    let out = mayfly_async(&["jwt", "fetch", "--audience", "svc", "--socket", &socket]).await;
    let token = ok(out).trim().to_owned();
    let v = json(
        mayfly_async(&[
            "jwt",
            "validate",
            "--audience",
            "svc",
            &token,
            "--socket",
            &socket,
        ])
        .await,
    );
    assert!(v["spiffe_id"].as_str().unwrap().contains("/task/cli-jwt/"));
    assert_eq!(v["claims"][mayfly::svid::CLAIM_TASK_ID], "cli-jwt");
    let bad = mayfly_async(&[
        "jwt",
        "validate",
        "--audience",
        "other",
        &token,
        "--socket",
        &socket,
    ])
    .await;
    assert!(!bad.status.success());
}

/// Issue 14, hole 5: FetchJWTSVID took any number of audiences of any size, and minted,
/// cached and audited a token for them.
#[tokio::test]
async fn requested_audiences_have_the_bounds_granted_ones_have() {
    let t = start().await;
    t.grant_me("bounded", HOUR, None).await;
    let client = t.workload().await;
    let huge = "a".repeat(300);
    let err = client
        .fetch_jwt_svid(&[huge.as_str()], None)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("audience") && err.contains("256"), "{err}");
    let many: Vec<String> = (0..33).map(|i| format!("aud-{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let err = client
        .fetch_jwt_svid(&many, None)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("at most 32"), "{err}");
    assert!(audit_events(&t.data_dir(), "jwt_issued").is_empty());
    let ok: Vec<&str> = many[..32].to_vec();
    client.fetch_jwt_svid(&ok, None).await.unwrap();
}

/// Issue 14, hole 5: one workload's flood of new audiences was minted and audited without
/// bound until the disk filled and issuance failed for everyone. It is held to its lease's
/// mint rate (`ResourceExhausted`), and another workload keeps getting tokens.
#[tokio::test]
async fn one_workloads_audience_flood_is_rate_limited_and_others_are_served() {
    let t = start_with(|c| {
        c.leases.jwt_mint_per_second = Some(1);
        c.leases.jwt_mint_burst = Some(5);
    })
    .await;
    t.grant_me("flooder", HOUR, None).await;
    let client = t.workload().await;
    let mut limited = None;
    for i in 0..50 {
        match client.fetch_jwt_svid([format!("aud-{i}")], None).await {
            Ok(_) => {}
            Err(e) => {
                limited = Some((i, e.to_string()));
                break;
            }
        }
    }
    let (after, why) = limited.expect("50 new audiences at once were all minted");
    assert!((5..=7).contains(&after), "refused after {after}");
    assert!(
        why.contains("ResourceExhausted") || why.contains("at most"),
        "{why}"
    );
    let minted = audit_events(&t.data_dir(), "jwt_issued").len();
    assert!(minted <= 7, "{minted} tokens audited");

    // Another workload (another uid, its own lease) is served meanwhile.
    t.grant("other", &["unix:uid:65534".to_string()], HOUR, None)
        .await;
    let socket = t.socket.display().to_string();
    let Some(out) = run_as(
        65534,
        &["jwt", "fetch", "--audience", "aud-0", "--socket", &socket],
    )
    .await
    else {
        return;
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
