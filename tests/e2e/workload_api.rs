//! End to end through real sockets, with the `spiffe` crate as the client.

use std::time::{Duration, SystemTime};

use crate::common::*;
use futures::StreamExt;
use mayfly::proto::admin as pb;
use mayfly::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use mayfly::proto::workload::X509svidRequest;
use spiffe::WorkloadApiError;
use tokio::io::AsyncWriteExt;

/// Generous bound for "promptly": failing it means the push did not happen at all.
const PROMPT: Duration = Duration::from_secs(3);

fn spiffe_ids(ctx: &spiffe::X509Context) -> Vec<String> {
    ctx.svids()
        .iter()
        .map(|s| s.spiffe_id().to_string())
        .collect()
}

#[tokio::test]
async fn fetch_after_grant_gives_a_verifiable_task_svid() {
    let t = start().await;
    let lease = t.grant_me("report-42", HOUR / 2, None).await;
    let ctx = t.workload().await.fetch_x509_context().await.unwrap();
    assert_eq!(ctx.svids().len(), 1);
    let svid = &ctx.svids()[0];

    let chain: Vec<u8> = svid
        .cert_chain()
        .iter()
        .flat_map(|c| c.as_bytes().to_vec())
        .collect();
    let parsed = spiffe::X509Svid::parse_from_der(&chain, svid.private_key().as_bytes()).unwrap();
    let id = parsed.spiffe_id().to_string();
    assert_eq!(id, lease.spiffe_id);
    assert_eq!(
        id,
        "spiffe://example.org/agent/reporter/task/report-42/delegator/user/alice"
    );

    verify_chain(&ders(svid.cert_chain()), &bundle_roots(&ctx)).expect("chain verifies");
    assert!(not_after(svid.leaf().as_bytes()) <= expires_at(&lease));
}

#[tokio::test]
async fn svid_never_outlives_a_short_lease() {
    let t = start().await;
    let lease = t
        .grant_me("short", Duration::from_secs(5), Some(HOUR))
        .await;
    let svid = t.workload().await.fetch_x509_svid().await.unwrap();
    let na = not_after(svid.leaf().as_bytes());
    assert!(na <= expires_at(&lease), "notAfter past the lease end");
    assert!(na > SystemTime::now());
}

#[tokio::test]
async fn missing_security_header_is_invalid_argument() {
    let t = start().await;
    t.grant_me("hdr", HOUR, None).await;
    let channel = mayfly::cli::connect::unix_channel(&t.socket).await.unwrap();
    let mut raw = SpiffeWorkloadApiClient::new(channel);
    let err = raw.fetch_x509svid(X509svidRequest {}).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn caller_without_a_lease_gets_permission_denied() {
    let t = start().await;
    t.grant("other", &["unix:uid:4242".into()], HOUR, None)
        .await;
    let err = t.workload().await.fetch_x509_svid().await.unwrap_err();
    assert!(matches!(err, WorkloadApiError::NoIdentityIssued), "{err:?}");
    let err = t.workload().await.fetch_x509_bundles().await.unwrap_err();
    assert!(matches!(err, WorkloadApiError::NoIdentityIssued), "{err:?}");
}

#[tokio::test]
async fn another_uid_gets_only_its_own_lease() {
    let t = start().await;
    t.grant("root-task", &["unix:uid:0".into()], HOUR, None)
        .await;
    let socket = t.socket.display().to_string();
    let args = [
        "svid",
        "fetch",
        "--socket",
        socket.as_str(),
        "--output",
        "json",
    ];
    let Some(out) = run_as(65534, &args).await else {
        return;
    };
    assert!(!out.status.success(), "uid 65534 got a uid 0 lease");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no identity issued"), "{stderr}");

    let lease = t
        .grant("nobody-task", &["unix:uid:65534".into()], HOUR, None)
        .await;
    let svids = json(run_as(65534, &args).await.unwrap());
    assert_eq!(svids.as_array().unwrap().len(), 1);
    assert_eq!(svids[0]["spiffe_id"], lease.spiffe_id.as_str());
}

#[tokio::test]
async fn revoke_reaches_an_open_stream_at_once() {
    let t = start().await;
    let keep = t.grant_me("keep", HOUR, None).await;
    let gone = t.grant_me("gone", HOUR, None).await;
    let client = t.workload().await;
    let mut stream = client.stream_x509_contexts().await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.svids().len(), 2);

    t.revoke(&gone.lease_id, "").await;
    let next = tokio::time::timeout(PROMPT, stream.next())
        .await
        .expect("update pushed")
        .unwrap()
        .unwrap();
    assert_eq!(spiffe_ids(&next), vec![keep.spiffe_id.clone()]);

    t.revoke(&keep.lease_id, "").await;
    let end = tokio::time::timeout(PROMPT, stream.next())
        .await
        .expect("teardown pushed")
        .unwrap();
    assert!(
        matches!(end, Err(WorkloadApiError::NoIdentityIssued)),
        "{end:?}"
    );
    let err = client.fetch_x509_svid().await.unwrap_err();
    assert!(matches!(err, WorkloadApiError::NoIdentityIssued));
}

#[tokio::test]
async fn a_lease_granted_later_reaches_an_open_stream() {
    let t = start().await;
    let first_lease = t.grant_me("first", HOUR, None).await;
    let client = t.workload().await;
    let mut stream = client.stream_x509_contexts().await.unwrap();
    assert_eq!(stream.next().await.unwrap().unwrap().svids().len(), 1);
    let second = t.grant_me("second", HOUR, None).await;
    let next = tokio::time::timeout(PROMPT, stream.next())
        .await
        .expect("the new lease's SVID was pushed")
        .unwrap()
        .unwrap();
    assert_eq!(
        spiffe_ids(&next),
        vec![first_lease.spiffe_id, second.spiffe_id]
    );
}

#[tokio::test]
async fn expiry_ends_the_stream_without_any_call() {
    let t = start().await;
    let lease = t.grant_me("brief", Duration::from_secs(2), None).await;
    let client = t.workload().await;
    let mut stream = client.stream_x509_contexts().await.unwrap();
    stream.next().await.unwrap().unwrap();
    let end = tokio::time::timeout(Duration::from_secs(2) + PROMPT, stream.next())
        .await
        .expect("expiry pushed")
        .unwrap();
    assert!(
        matches!(end, Err(WorkloadApiError::NoIdentityIssued)),
        "{end:?}"
    );
    assert!(SystemTime::now() >= expires_at(&lease));
    assert_eq!(t.lease(&lease.lease_id).await.state, "expired");
}

#[tokio::test]
async fn rotation_delivers_a_new_serial_before_the_old_one_expires() {
    let t = start().await;
    t.grant_me("rotating", HOUR, Some(Duration::from_secs(4)))
        .await;
    let client = t.workload().await;
    let mut stream = client.stream_x509_svids().await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    let old_serial = serial(first.leaf().as_bytes());
    let old_not_after = not_after(first.leaf().as_bytes());
    let second = tokio::time::timeout(Duration::from_secs(4) + PROMPT, stream.next())
        .await
        .expect("rotation pushed")
        .unwrap()
        .unwrap();
    let received = SystemTime::now();
    assert_ne!(serial(second.leaf().as_bytes()), old_serial);
    assert!(
        received < old_not_after,
        "new SVID arrived only after the old one expired"
    );
    assert!(not_after(second.leaf().as_bytes()) > old_not_after);
}

#[tokio::test]
async fn bad_grant_input_names_the_field_and_grants_nothing() {
    let t = start().await;
    let mut admin = t.admin().await;
    let base = || pb::GrantRequest {
        selectors: vec!["unix:uid:1000".into()],
        ..grant_request("ok", "user/alice", Duration::from_secs(60))
    };
    let cases: Vec<(&str, pb::GrantRequest)> = vec![
        (
            "task_id",
            pb::GrantRequest {
                task_id: "has space".into(),
                ..base()
            },
        ),
        (
            "task_id",
            pb::GrantRequest {
                task_id: "..".into(),
                ..base()
            },
        ),
        (
            "delegator",
            pb::GrantRequest {
                delegator: "user/../x".into(),
                ..base()
            },
        ),
        (
            "ttl",
            pb::GrantRequest {
                ttl: None,
                ..base()
            },
        ),
        (
            "ttl",
            pb::GrantRequest {
                ttl: Some(mayfly::time::to_duration(Duration::from_secs(
                    400 * 24 * 3600,
                ))),
                ..base()
            },
        ),
        (
            "selectors",
            pb::GrantRequest {
                selectors: vec!["unix:uid:me".into()],
                ..base()
            },
        ),
        (
            "selectors",
            pb::GrantRequest {
                selectors: vec![],
                ..base()
            },
        ),
        (
            "reason",
            pb::GrantRequest {
                reason: "x".repeat(5000),
                ..base()
            },
        ),
        (
            "task_id",
            pb::GrantRequest {
                task_id: "t".repeat(300),
                ..base()
            },
        ),
    ];
    for (field, req) in cases {
        let err = admin.grant(req).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message().starts_with(field),
            "{field}: {}",
            err.message()
        );
    }
    assert!(t.all_leases().await.is_empty());
}

#[tokio::test]
async fn garbage_and_idle_connections_do_not_stop_service() {
    let t = start().await;
    t.grant_me("busy", HOUR, None).await;
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(tokio::net::UnixStream::connect(&t.socket).await.unwrap());
    }
    for _ in 0..20 {
        let mut s = tokio::net::UnixStream::connect(&t.socket).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n\r\n\x00\xff garbage \x16\x03\x01")
            .await
            .unwrap();
        let _ = s.shutdown().await;
    }
    let svid = tokio::time::timeout(PROMPT, t.workload().await.fetch_x509_svid())
        .await
        .expect("served despite idle and garbage connections")
        .unwrap();
    assert!(svid.spiffe_id().to_string().contains("/task/busy/"));
    drop(idle);
}

#[tokio::test]
async fn admin_socket_refuses_callers_outside_the_allowlist() {
    let t = start_with(|f| f.admin.allowed_uids = Some(vec![12345])).await;
    let err = t
        .admin()
        .await
        .list(pb::ListRequest { all: false })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().contains("not allowed"), "{}", err.message());
}

#[tokio::test]
async fn grant_records_the_grantor() {
    let t = start().await;
    let lease = t.grant_me("who", HOUR, None).await;
    let by = lease.granted_by.unwrap();
    assert_eq!(by.uid, my_uid());
    assert_eq!(by.pid, std::process::id() as i32);
    assert_eq!(lease.state, "active");
}

#[tokio::test]
async fn unrelated_changes_are_not_resent() {
    let t = start().await;
    t.grant_me("mine", HOUR, None).await;
    let client = t.workload().await;
    let mut stream = client.stream_x509_contexts().await.unwrap();
    stream.next().await.unwrap().unwrap();
    // A lease for someone else: this caller's material is unchanged, so nothing is sent.
    let other = t
        .grant("theirs", &["unix:uid:4242".into()], HOUR, None)
        .await;
    t.revoke(&other.lease_id, "").await;
    let quiet = tokio::time::timeout(Duration::from_millis(500), stream.next()).await;
    assert!(quiet.is_err(), "identical material was resent: {quiet:?}");
}

#[tokio::test]
async fn processes_matching_one_lease_share_its_svid() {
    let t = start().await;
    t.grant("shared", &[format!("unix:uid:{}", my_uid())], HOUR, None)
        .await;
    let svid = t.workload().await.fetch_x509_svid().await.unwrap();
    let socket = t.socket.display().to_string();
    let other =
        json(mayfly_async(&["svid", "fetch", "--socket", &socket, "--output", "json"]).await);
    let mine = serial(svid.leaf().as_bytes());
    assert_eq!(other[0]["serial"].as_str().unwrap(), mine);
}

#[tokio::test]
async fn renewal_extends_up_to_the_ceiling_and_the_next_svid_uses_it() {
    let t = start().await;
    let mut admin = t.admin().await;
    let lease = admin
        .grant(pb::GrantRequest {
            max_ttl: Some(mayfly::time::to_duration(Duration::from_secs(60))),
            svid_ttl: Some(mayfly::time::to_duration(HOUR)),
            ..grant_request("renewable", "user/alice", Duration::from_secs(3))
        })
        .await
        .unwrap()
        .into_inner();
    let client = t.workload().await;
    let mut stream = client.stream_x509_svids().await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    assert!(not_after(first.leaf().as_bytes()) <= expires_at(&lease));

    let too_far = admin
        .renew(pb::RenewRequest {
            lease_id: lease.lease_id.clone(),
            ttl: Some(mayfly::time::to_duration(Duration::from_secs(120))),
        })
        .await
        .unwrap_err();
    assert_eq!(too_far.code(), tonic::Code::InvalidArgument);
    assert!(
        too_far.message().contains("max_expires_at"),
        "{}",
        too_far.message()
    );

    let renewed = admin
        .renew(pb::RenewRequest {
            lease_id: lease.lease_id.clone(),
            ttl: Some(mayfly::time::to_duration(Duration::from_secs(30))),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(expires_at(&renewed) > expires_at(&lease));
    let next = tokio::time::timeout(Duration::from_secs(3), stream.next())
        .await
        .expect("rotation after renewal")
        .unwrap()
        .unwrap();
    let na = not_after(next.leaf().as_bytes());
    assert!(na > not_after(first.leaf().as_bytes()));
    assert!(na <= expires_at(&renewed));
}

/// An SVID nobody watches is not rotated; the next fetch of a stale one gets a fresh one.
#[tokio::test]
async fn nobody_listening_means_no_rotation() {
    let t = start().await;
    t.grant_me("quiet", HOUR, Some(Duration::from_secs(2)))
        .await;
    let first = t.workload().await.fetch_x509_svid().await.unwrap();
    // Two half-lives: a watched SVID would have rotated at least twice by now.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let issued = |trigger: &str| {
        audit_events(&t.data_dir(), "svid_issued")
            .into_iter()
            .filter(|r| r["trigger"] == trigger)
            .count()
    };
    assert_eq!(issued("rotation"), 0);
    assert_eq!(issued("fetch"), 1);
    // Past its half-life, a one-shot fetch mints a fresh SVID rather than the stale one.
    let second = t.workload().await.fetch_x509_svid().await.unwrap();
    assert_ne!(
        serial(second.leaf().as_bytes()),
        serial(first.leaf().as_bytes())
    );
    assert_eq!(issued("fetch"), 2);
    assert_eq!(issued("rotation"), 0);
}

/// The deadline a lease shows is the one it keeps: whole seconds, stored as shown, and the
/// lease ends (its stream told) no earlier than that instant.
#[tokio::test]
async fn the_shown_deadline_is_the_kept_deadline() {
    let t = start().await;
    let lease = t.grant_me("deadline", Duration::from_secs(2), None).await;
    let shown = lease.expires_at.unwrap();
    assert_eq!(shown.nanos, 0, "{shown:?}");
    assert_eq!(lease.max_expires_at.as_ref().unwrap().nanos, 0);
    let client = t.workload().await;
    let mut stream = client.stream_x509_contexts().await.unwrap();
    stream.next().await.unwrap().unwrap();
    let end = tokio::time::timeout(Duration::from_secs(10), stream.next()).await;
    let ended = SystemTime::now();
    assert!(matches!(end, Ok(Some(Err(_))) | Ok(None)), "{end:?}");
    assert!(ended >= expires_at(&lease));
    let got = t.lease(&lease.lease_id).await;
    assert_eq!(got.state, "expired");
    assert_eq!(got.expires_at.unwrap(), shown);
    let ended_at = mayfly::time::from_timestamp(got.ended_at.as_ref().unwrap()).unwrap();
    assert!(ended_at >= expires_at(&lease));
}

/// Issue 14, hole 12: a selector with a newline printed as two selectors in `task get`, and a
/// zero-padded uid was accepted but never matched anyone.
#[tokio::test]
async fn selectors_with_control_characters_are_refused_and_padded_numbers_match() {
    let t = start().await;
    let me = rustix::process::geteuid().as_raw();
    for forged in [
        format!("unix:path:/bin/sh\nunix:uid:{me}"),
        "unix:user:alice\u{1b}[2J".to_string(),
    ] {
        let mut req = grant_request("forged", "user/alice", HOUR);
        req.selectors = vec![forged.clone()];
        let err = t.admin().await.grant(req).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{forged:?}");
        assert!(
            err.message().contains("control characters"),
            "{}",
            err.message()
        );
    }
    let padded = t
        .grant("padded", &[format!("unix:uid:000{me}")], HOUR, None)
        .await;
    assert_eq!(padded.selectors, vec![format!("unix:uid:{me}")]);
    let svid = t.workload().await.fetch_x509_svid().await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), padded.spiffe_id);
}
