//! The signing CA changes while workloads hold streams open: the embedded CA rotating on a
//! short life. Every SVID verifies against the bundle sent with it, a root is in the bundle
//! before it signs anything, the old root stays until its last SVID has expired, open streams
//! get fresh SVIDs at once, and a peer still holding the bundle from before the switch accepts
//! a new SVID in a real TLS handshake.

use std::time::{Duration, Instant, SystemTime};

use crate::common::*;
use crate::mtls::handshake_trusting;
use futures::StreamExt;
use rustls_pki_types::CertificateDer;

/// One message of the X.509 stream, as a workload saw it.
struct Seen {
    at: SystemTime,
    svid: std::sync::Arc<spiffe::X509Svid>,
    roots: Vec<CertificateDer<'static>>,
    /// The root whose key signed the SVID, found when it arrived.
    signer: CertificateDer<'static>,
}

impl Seen {
    fn new(svid: std::sync::Arc<spiffe::X509Svid>, roots: Vec<CertificateDer<'static>>) -> Seen {
        let mut seen = Seen {
            at: SystemTime::now(),
            svid,
            roots,
            signer: CertificateDer::from(Vec::new()),
        };
        seen.signer = seen.find_signer();
        seen
    }

    /// The root whose key signed the SVID (the embedded roots sign leaves directly).
    fn find_signer(&self) -> CertificateDer<'static> {
        let chain = ders(self.svid.cert_chain());
        self.roots
            .iter()
            .find(|r| verify_chain(&chain, std::slice::from_ref(*r)).is_ok())
            .cloned()
            .unwrap_or_else(|| {
                let errors: Vec<_> = self
                    .roots
                    .iter()
                    .map(|r| verify_chain(&chain, std::slice::from_ref(r)).unwrap_err())
                    .collect();
                panic!(
                    "the SVID (notAfter {:?}, at {:?}) verifies against no root of the bundle \
                     sent with it: {errors:?}",
                    not_after(self.svid.leaf().as_bytes()),
                    self.at
                )
            })
    }
}

#[tokio::test]
async fn the_embedded_ca_rotates_with_overlap_under_open_streams() {
    // Roots live 8 s: the next is published at 2.4 s and signs from 4.8 s.
    let t = start_with(|f| {
        f.ca.ttl = Some("8s".into());
        f.ca.prepare_at = Some(0.3);
        f.ca.activate_at = Some(0.6);
        f.leases.max_svid_ttl = Some("6s".into());
        f.leases.default_svid_ttl = Some("6s".into());
    })
    .await;
    let lease = t
        .grant_me("rotating", HOUR, Some(Duration::from_secs(6)))
        .await;
    let started = Instant::now();
    let mut stream = t.workload().await.stream_x509_contexts().await.unwrap();
    let mut bundles = t.workload().await.stream_x509_bundles().await.unwrap();
    let sizes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let bundle_stream = tokio::spawn({
        let sizes = sizes.clone();
        async move {
            while let Some(Ok(set)) = bundles.next().await {
                let own = set.get(&trust_domain()).expect("own bundle");
                sizes.lock().unwrap().push(own.authorities().len());
            }
        }
    });

    let mut seen: Vec<Seen> = Vec::new();
    let mut handshook = false;
    loop {
        let ctx = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("an update within 10 s")
            .expect("stream open")
            .expect("an update, not an error");
        let svid = ctx
            .svids()
            .iter()
            .find(|s| s.spiffe_id().to_string() == lease.spiffe_id)
            .expect("the lease's SVID")
            .clone();
        // Every SVID verifies against the bundle served with it.
        let now = Seen::new(svid, bundle_roots(&ctx));
        let signer = now.signer.clone();
        seen.push(now);
        let first_root = seen[0].signer.clone();
        let latest = seen.last().unwrap();

        // The first SVID of a new root meets a client that still holds a bundle from before
        // the switch (old and new root, while the old one signed) and an SVID of the old root.
        if !handshook && signer != first_root {
            let before = seen
                .iter()
                .rev()
                .find(|s| s.signer.clone() == first_root && s.roots.len() >= 2)
                .expect("the new root was served before it signed");
            handshake_trusting(
                &latest.svid,
                &before.svid,
                [latest.roots.clone(), before.roots.clone()],
                &lease.spiffe_id,
                &lease.spiffe_id,
            )
            .await
            .expect("a peer holding the overlap bundle accepts the new SVID, and back");
            handshook = true;
        }
        if !latest.roots.contains(&first_root) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the first root never left the bundle"
        );
    }
    let first_root = seen[0].signer.clone();
    assert!(handshook, "an SVID of the new root arrived");

    // A root is served before the first SVID it signed.
    for (i, s) in seen.iter().enumerate() {
        let root = s.signer.clone();
        let served_since = seen.iter().position(|e| e.roots.contains(&root)).unwrap();
        let signs_since = seen.iter().position(|e| e.signer.clone() == root).unwrap();
        if root != first_root {
            assert!(
                served_since < signs_since,
                "message {i}: a root signed before it was published"
            );
        }
    }
    // The first root left only once every SVID it signed had expired.
    let gone = seen.last().unwrap().at;
    for s in seen.iter().filter(|s| s.signer.clone() == first_root) {
        let na = not_after(s.svid.leaf().as_bytes());
        assert!(
            na <= gone + Duration::from_secs(1),
            "the old root left at {gone:?}, before its SVID expired at {na:?}"
        );
    }

    bundle_stream.abort();
    let sizes = sizes.lock().unwrap().clone();
    assert!(
        sizes.contains(&2) && sizes[0] == 1,
        "FetchX509Bundles followed the rotation: {sizes:?}"
    );

    let data = t.data_dir();
    for what in [
        "ca_prepared",
        "ca_published",
        "ca_activated",
        "ca_retired",
        "ca_removed",
    ] {
        let records = audit_events(&data, what);
        assert!(!records.is_empty(), "{what} audited");
        let r = &records[0];
        assert!(
            r["serial"].is_string() && r["fingerprint_sha256"].is_string(),
            "{r:?}"
        );
    }
    let retired = &audit_events(&data, "ca_retired")[0];
    assert!(retired["in_bundle_until"].is_string(), "{retired:?}");
    let reissued = audit_events(&data, "svid_issued")
        .into_iter()
        .filter(|r| r["trigger"] == "ca_change")
        .count();
    assert!(
        reissued >= 1,
        "the open stream's SVID was replaced when the CA changed"
    );
    let metrics = t.metrics().await;
    assert!(
        metrics.contains("mayfly_ca_next_rotation_timestamp_seconds "),
        "{metrics}"
    );
    t.stop().await;
}

/// The CA files as a Kubernetes Secret volume holds them: `NAME -> ..data/NAME`, and `..data`
/// a symlink swapped atomically to each new version's directory.
struct SecretVolume {
    dir: std::path::PathBuf,
    version: u32,
}

impl SecretVolume {
    fn new(dir: &std::path::Path) -> SecretVolume {
        for name in ["tls.crt", "tls.key", "ca.crt"] {
            std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name)).unwrap();
        }
        SecretVolume {
            dir: dir.to_path_buf(),
            version: 0,
        }
    }

    fn publish(&mut self, cert: &str, key: &str, root: &str) {
        self.version += 1;
        let version = format!("..v{}", self.version);
        let d = self.dir.join(&version);
        std::fs::create_dir(&d).unwrap();
        for (name, text) in [("tls.crt", cert), ("tls.key", key), ("ca.crt", root)] {
            std::fs::write(d.join(name), text).unwrap();
        }
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&version, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }
}

/// The intermediate in an SVID's chain (the certificate after the leaf).
fn intermediate_of(svid: &spiffe::X509Svid) -> Vec<u8> {
    svid.cert_chain()[1].as_bytes().to_vec()
}

fn pem_der(pem: &str) -> Vec<u8> {
    ::pem::parse(pem).unwrap().into_contents()
}

#[tokio::test]
async fn renewed_operator_ca_files_are_used_at_once_and_a_broken_renewal_is_refused() {
    let pki = Pki::new();
    let secrets = tempfile::tempdir().unwrap();
    let mut volume = SecretVolume::new(secrets.path());
    let (cert1, key1) = pki.intermediate("first");
    volume.publish(&cert1, &key1, &pki.root_pem);
    let dir = secrets.path().to_path_buf();
    let t = start_with(|f| {
        f.ca.cert_file = Some(dir.join("tls.crt"));
        f.ca.key_file = Some(dir.join("tls.key"));
        f.ca.bundle_file = Some(dir.join("ca.crt"));
    })
    .await;
    let lease = t.grant_me("renewed", HOUR, None).await;
    let mut stream = t.workload().await.stream_x509_contexts().await.unwrap();
    let mut next = async || {
        let ctx = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("an update within 10 s")
            .unwrap()
            .unwrap();
        let svid = ctx.svids()[0].clone();
        assert_eq!(svid.spiffe_id().to_string(), lease.spiffe_id);
        let roots = bundle_roots(&ctx);
        verify_chain(&ders(svid.cert_chain()), &roots).expect("verifies to its bundle");
        (svid, roots)
    };
    let (svid, roots) = next().await;
    assert_eq!(intermediate_of(&svid), pem_der(&cert1));
    let root = vec![CertificateDer::from(pem_der(&pki.root_pem))];
    assert_eq!(roots, root);

    // Renewed (a symlink swap, as the kubelet does it): the open stream gets an SVID of the
    // new intermediate at once, under the same root.
    let (cert2, key2) = pki.intermediate("second");
    volume.publish(&cert2, &key2, &pki.root_pem);
    let (svid, roots) = next().await;
    assert_eq!(intermediate_of(&svid), pem_der(&cert2));
    assert_eq!(roots, root);

    // A renewal whose key is not the certificate's is refused: the agent says so and keeps
    // signing with the CA it has.
    let (cert3, _) = pki.intermediate("third");
    volume.publish(&cert3, &key2, &pki.root_pem);
    let addr = t.agent.as_ref().unwrap().health_addr.tcp().unwrap();
    eventually(Duration::from_secs(10), async || {
        let (code, body) = http_get(addr, "/healthz/ready").await;
        match code == 503 && body.contains("CA files changed but were refused") {
            true => Ok(()),
            false => Err(format!("{code} {body}")),
        }
    })
    .await;
    assert!(t.metrics().await.contains("mayfly_ca_reload_refused 1"));
    let refused = audit_events(&t.data_dir(), "ca_reload_refused");
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(
        refused[0]["reason"]
            .as_str()
            .unwrap()
            .contains("does not belong"),
        "{refused:?}"
    );
    let ctx = t.workload().await.fetch_x509_context().await.unwrap();
    assert_eq!(intermediate_of(&ctx.svids()[0]), pem_der(&cert2));

    // Written again in place, whole: taken, and the agent is ready again.
    let (cert4, key4) = pki.intermediate("fourth");
    std::fs::write(secrets.path().join("..data/tls.key"), &key4).unwrap();
    std::fs::write(secrets.path().join("..data/tls.crt"), &cert4).unwrap();
    let (svid, _) = next().await;
    assert_eq!(intermediate_of(&svid), pem_der(&cert4));
    eventually(Duration::from_secs(10), async || {
        let (code, body) = http_get(addr, "/healthz/ready").await;
        match code {
            200 => Ok(()),
            _ => Err(format!("{code} {body}")),
        }
    })
    .await;
    assert!(t.metrics().await.contains("mayfly_ca_reload_refused 0"));
    let activated = audit_events(&t.data_dir(), "ca_activated");
    assert_eq!(activated.len(), 2, "{activated:?}");
    t.stop().await;
}
