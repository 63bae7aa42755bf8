//! WIT-SVIDs on the Workload API (the SPIFFE WIT-SVID standard): streamed like X.509-SVIDs,
//! verified with a JOSE implementation we did not write (jsonwebtoken), refreshed, and
//! withdrawn when the lease ends.

use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use mayfly::proto::workload as pb;
use mayfly::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use serde_json::Value;
use tonic::transport::Channel;

use crate::common::*;

const HOUR: Duration = Duration::from_secs(3600);

async fn client(t: &TestAgent) -> SpiffeWorkloadApiClient<Channel> {
    SpiffeWorkloadApiClient::new(mayfly::cli::connect::unix_channel(&t.socket).await.unwrap())
}

fn request<T>(m: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(m);
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    req
}

fn claims_of(token: &str) -> serde_json::Map<String, Value> {
    let part = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

/// Verifies `token` as a relying party would: the WIT bundle's key named by `kid`, `typ`,
/// `exp` and `sub`, and no `aud`. Returns the claims.
fn verify(token: &str, bundle: &JwkSet) -> Value {
    let header = decode_header(token).unwrap();
    assert_eq!(header.typ.as_deref(), Some("wit+jwt"));
    assert_eq!(header.alg, Algorithm::ES256);
    let key = bundle
        .find(header.kid.as_deref().unwrap())
        .expect("kid in the bundle");
    assert_eq!(serde_json::to_value(key).unwrap()["use"], "wit-svid");
    let mut validation = Validation::new(Algorithm::ES256);
    validation.set_required_spec_claims(&["exp", "sub"]);
    decode::<Value>(token, &DecodingKey::from_jwk(key).unwrap(), &validation)
        .unwrap()
        .claims
}

#[tokio::test]
async fn a_leased_workload_streams_wit_svids_that_verify_and_end_with_the_lease() {
    let t = start().await;
    let lease = t.grant_me("wit", HOUR, Some(Duration::from_secs(4))).await;
    let mut raw = client(&t).await;

    let mut bundles = raw
        .fetch_wit_bundles(request(pb::WitBundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let first = bundles.message().await.unwrap().unwrap();
    let jwks = &first.bundles["spiffe://example.org"];
    let bundle: JwkSet = serde_json::from_str(jwks).unwrap();
    // Keys of their own: none of the JWT-SVID bundle's.
    let jwt_bundles = t.workload().await.fetch_jwt_bundles().await.unwrap();
    let jwt_bundle = jwt_bundles.get(&trust_domain()).unwrap();
    assert!(!bundle.keys.is_empty());
    for key in &bundle.keys {
        let kid = key.common.key_id.as_deref().unwrap();
        assert!(jwt_bundle.find_jwt_authority(kid).is_none());
    }

    let mut stream = raw
        .fetch_witsvid(request(pb::WitsvidRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let got = stream.message().await.unwrap().unwrap();
    assert_eq!(got.svids.len(), 1);
    let wit = &got.svids[0];
    assert_eq!(wit.spiffe_id, lease.spiffe_id);
    let claims = verify(&wit.wit_svid, &bundle);
    assert_eq!(claims["sub"], lease.spiffe_id);
    assert!(claims.get("aud").is_none());
    assert_eq!(claims[mayfly::svid::CLAIM_LEASE_ID], lease.lease_id);
    let exp = claims["exp"].as_u64().unwrap();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(exp <= now + 5, "exp follows the lease's svid_ttl");

    // The key handed over is the private half of cnf.jwk.
    let private: Value = serde_json::from_str(&wit.wit_svid_key).unwrap();
    let cnf: Jwk = serde_json::from_value(claims["cnf"]["jwk"].clone()).unwrap();
    let cnf_json = serde_json::to_value(&cnf).unwrap();
    for k in ["kty", "crv", "x", "y"] {
        assert_eq!(private[k], cnf_json[k], "{k}");
    }
    assert!(private["d"].is_string());
    // A proof signed with that key verifies against the token's cnf.jwk, as a server would
    // check it; one signed by any other key does not.
    let key = p256::SecretKey::from_jwk_str(&wit.wit_svid_key).unwrap();
    let proof_claims =
        serde_json::json!({"aud": "https://api.example.org/x", "exp": now + 60, "jti": "p1"});
    let mut pv = Validation::new(Algorithm::ES256);
    pv.set_audience(&["https://api.example.org/x"]);
    let cnf_key = DecodingKey::from_jwk(&cnf).unwrap();
    decode::<Value>(&sign_es256(&key, &proof_claims), &cnf_key, &pv).unwrap();
    let stranger = p256::SecretKey::from_slice(&[7u8; 32]).unwrap();
    assert!(decode::<Value>(&sign_es256(&stranger, &proof_claims), &cnf_key, &pv).is_err());

    // Audited before it was handed out, with the key's thumbprint.
    let records = audit_events(&t.data_dir(), "wit_issued");
    let record = records
        .iter()
        .find(|r| r["jti"] == claims["jti"])
        .expect("wit_issued recorded");
    assert_eq!(record["lease_id"], lease.lease_id.as_str());
    assert!(record["key_thumbprint"]
        .as_str()
        .is_some_and(|t| t.len() == 43));

    // Half way through its life a new one comes, bound to a new key.
    let next = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a refreshed WIT")
        .unwrap()
        .unwrap();
    let renewed = claims_of(&next.svids[0].wit_svid);
    assert_ne!(renewed["jti"], claims["jti"]);
    assert_ne!(renewed["cnf"], claims["cnf"]);
    verify(&next.svids[0].wit_svid, &bundle);

    // The lease ends: the stream is told at once.
    t.revoke(&lease.lease_id, "done").await;
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("told of the end");
    assert_eq!(end.unwrap_err().code(), tonic::Code::PermissionDenied);

    // And nothing more is issued.
    let after = raw
        .fetch_witsvid(request(pb::WitsvidRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(after.code(), tonic::Code::PermissionDenied);
}

#[tokio::test]
async fn a_caller_without_a_lease_gets_no_wit() {
    let t = start().await;
    let mut raw = client(&t).await;
    let err = raw
        .fetch_witsvid(request(pb::WitsvidRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let bundles = raw
        .fetch_wit_bundles(request(pb::WitBundlesRequest {}))
        .await
        .unwrap_err();
    assert_eq!(bundles.code(), tonic::Code::PermissionDenied);
    let missing_header = raw
        .fetch_witsvid(tonic::Request::new(pb::WitsvidRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(missing_header.code(), tonic::Code::InvalidArgument);
}

/// A JWS (ES256, `typ: wpt+jwt`) signed with `key`.
fn sign_es256(key: &p256::SecretKey, claims: &Value) -> String {
    use p256::ecdsa::signature::Signer as _;
    let header = serde_json::json!({"alg": "ES256", "typ": "wpt+jwt"});
    let mut token = URL_SAFE_NO_PAD.encode(header.to_string());
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(claims.to_string()));
    let signature: p256::ecdsa::Signature =
        p256::ecdsa::SigningKey::from(key).sign(token.as_bytes());
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(signature.to_bytes()));
    token
}
