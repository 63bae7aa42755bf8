//! Federation, read-only: another trust domain's bundle, from a SPIFFE bundle file, served on
//! every bundle path beside this trust domain's (the X.509 stream's `federated_bundles`,
//! FetchX509Bundles, FetchJWTBundles, SDS `ALL` and the trust domain's own name), and pushed
//! when the file changes. py-spiffe reads the same (`python_clients.rs`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use futures::StreamExt;
use mayfly::authority::federation::FederationEntry;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose, SanType};

use crate::common::*;

pub const PARTNER: &str = "partner.example";

/// A partner trust domain's bundle as its own server would publish it.
pub struct PartnerBundle {
    pub path: PathBuf,
    pub roots: Vec<Vec<u8>>,
    pub kids: Vec<String>,
}

fn b64url(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn ec_members(key: &KeyPair) -> (String, String) {
    let raw = key.public_key_raw();
    (b64url(&raw[1..33]), b64url(&raw[33..65]))
}

impl PartnerBundle {
    /// Writes a SPIFFE bundle with `roots` fresh X.509 roots and one JWT key to `dir`.
    pub fn write(dir: &Path, roots: usize, sequence: u64) -> PartnerBundle {
        let mut keys = Vec::new();
        let mut ders = Vec::new();
        for i in 0..roots {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.distinguished_name
                .push(rcgen::DnType::CommonName, format!("partner root {i}"));
            p.subject_alt_names = vec![SanType::URI(
                format!("spiffe://{PARTNER}").try_into().unwrap(),
            )];
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let der = p.self_signed(&key).unwrap().der().to_vec();
            let (x, y) = ec_members(&key);
            keys.push(serde_json::json!({
                "use": "x509-svid", "kty": "EC", "crv": "P-256", "x": x, "y": y,
                "x5c": [base64::engine::general_purpose::STANDARD.encode(&der)],
            }));
            ders.push(der);
        }
        let jwt = KeyPair::generate().unwrap();
        let (x, y) = ec_members(&jwt);
        let kid = format!("partner-{sequence}");
        keys.push(serde_json::json!({
            "use": "jwt-svid", "kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": kid,
        }));
        let doc = serde_json::json!({
            "keys": keys, "spiffe_sequence": sequence, "spiffe_refresh_hint": 300,
        });
        let path = dir.join("partner.bundle.json");
        // Replaced whole, as an operator's tooling would.
        let tmp = dir.join("partner.bundle.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        PartnerBundle {
            path,
            roots: ders,
            kids: vec![kid],
        }
    }

    pub fn entry(&self) -> FederationEntry {
        FederationEntry {
            trust_domain: Some(PARTNER.into()),
            bundle_file: Some(self.path.clone()),
            ..Default::default()
        }
    }
}

fn partner() -> spiffe::TrustDomain {
    spiffe::TrustDomain::new(PARTNER).unwrap()
}

fn roots_of(set: &spiffe::X509BundleSet) -> Option<Vec<Vec<u8>>> {
    let b = set.get(&partner())?;
    Some(
        b.authorities()
            .iter()
            .map(|c| c.as_bytes().to_vec())
            .collect(),
    )
}

#[tokio::test]
async fn a_federated_bundle_is_served_on_every_path_and_follows_its_file() {
    let files = tempfile::tempdir().unwrap();
    let first = PartnerBundle::write(files.path(), 1, 1);
    let entry = first.entry();
    let t = start_with(|f| f.federation = vec![entry]).await;
    t.grant_me("federated", HOUR, None).await;
    let client = t.workload().await;

    let mut x509 = client.stream_x509_contexts().await.unwrap();
    let mut bundles = t.workload().await.stream_x509_bundles().await.unwrap();
    let mut jwt = t.workload().await.stream_jwt_bundles().await.unwrap();
    let next = Duration::from_secs(10);

    let ctx = x509.next().await.unwrap().unwrap();
    assert_eq!(roots_of(ctx.bundle_set()), Some(first.roots.clone()));
    assert!(
        ctx.bundle_set().get(&trust_domain()).is_some(),
        "own bundle too"
    );
    let set = bundles.next().await.unwrap().unwrap();
    assert_eq!(roots_of(&set), Some(first.roots.clone()));
    let jwts = jwt.next().await.unwrap().unwrap();
    let partner_jwt = jwts.get(&partner()).expect("the partner's JWT bundle");
    assert!(partner_jwt.find_jwt_authority(&first.kids[0]).is_some());
    assert!(jwts.get(&trust_domain()).is_some());

    // The operator replaces the file: every open stream gets the new bundle.
    let second = PartnerBundle::write(files.path(), 2, 2);
    let ctx = tokio::time::timeout(next, x509.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(roots_of(ctx.bundle_set()), Some(second.roots.clone()));
    let set = tokio::time::timeout(next, bundles.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(roots_of(&set), Some(second.roots.clone()));
    let jwts = tokio::time::timeout(next, jwt.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let partner_jwt = jwts.get(&partner()).unwrap();
    assert!(partner_jwt.find_jwt_authority(&second.kids[0]).is_some());
    assert!(partner_jwt.find_jwt_authority(&first.kids[0]).is_none());

    // A stream opened after the change gets it once, not again: identical material is not
    // resent.
    let mut fresh = t.workload().await.stream_x509_contexts().await.unwrap();
    let ctx = fresh.next().await.unwrap().unwrap();
    assert_eq!(roots_of(ctx.bundle_set()), Some(second.roots.clone()));
    let again = tokio::time::timeout(Duration::from_millis(1500), fresh.next()).await;
    assert!(again.is_err(), "the same context sent twice");

    // A broken replacement is refused: the last good bundle stays.
    std::fs::write(&second.path, b"{ not a bundle").unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ctx = t.workload().await.fetch_x509_context().await.unwrap();
    assert_eq!(roots_of(ctx.bundle_set()), Some(second.roots.clone()));
    t.stop().await;
}

#[test]
fn a_federation_entry_naming_the_own_trust_domain_is_refused() {
    let file = mayfly::config::FileConfig {
        trust_domain: Some("example.org".into()),
        federation: vec![FederationEntry {
            trust_domain: Some("example.org".into()),
            bundle_file: Some("/nonexistent".into()),
            ..Default::default()
        }],
        ..Default::default()
    };
    let err = mayfly::config::Config::resolve(file, Default::default()).unwrap_err();
    assert!(err.to_string().contains("federation[0]"), "{err}");
}
