//! The operator's CA, from files that something else renews (cert-manager, Vault Agent): read
//! again whenever their content changes, and swapped in only once the new material has passed
//! every check a start-up would make. A bad update is refused and the CA that signed before
//! keeps signing; the agent is never left without a signer.
//!
//! Files are compared by content, not by time stamp, so an in-place rewrite and the atomic
//! symlink swap of a Kubernetes Secret volume (`..data` pointing at a new directory) are both
//! seen, and a touch that changes nothing does nothing.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use spiffe::TrustDomain;

use super::embedded::retire_until;
use super::{CaError, CaEvent, CaInfo, CaSource, SigningCa};

/// A root that was in the bundle but is not in the new one: kept until the SVIDs signed by the
/// CA that chained to it have expired.
struct Retired {
    root_der: Vec<u8>,
    info: CaInfo,
    keep_until: SystemTime,
}

pub struct OperatorCa {
    trust_domain: TrustDomain,
    source: CaSource,
    max_svid_ttl: Duration,
    signer: Arc<SigningCa>,
    /// Digest of the files' content the signer was built from, or last refused.
    seen: [u8; 32],
    retired: Vec<Retired>,
    /// Why the files as they are now were refused.
    refused: Option<String>,
}

impl OperatorCa {
    /// Loads the CA from the operator's files (every check of a start-up applies).
    pub fn load(
        trust_domain: &TrustDomain,
        source: CaSource,
        max_svid_ttl: Duration,
    ) -> Result<OperatorCa, CaError> {
        let seen = digest(&source);
        let signer = Arc::new(load(trust_domain, &source)?);
        Ok(OperatorCa {
            trust_domain: trust_domain.clone(),
            source,
            max_svid_ttl,
            signer,
            seen,
            retired: Vec::new(),
            refused: None,
        })
    }

    pub fn signer(&self) -> Arc<SigningCa> {
        self.signer.clone()
    }

    /// Roots served beside the signer's: those of the CA it replaced, until its SVIDs expire.
    pub fn also_trusted(&self) -> Vec<Vec<u8>> {
        self.retired.iter().map(|r| r.root_der.clone()).collect()
    }

    /// The files it is read from.
    pub fn files(&self) -> impl Iterator<Item = &std::path::Path> {
        [
            &self.source.cert_file,
            &self.source.key_file,
            &self.source.chain_file,
            &self.source.bundle_file,
        ]
        .into_iter()
        .flatten()
        .map(PathBuf::as_path)
    }

    /// Why the files as they are now were refused, while they are.
    pub fn refused(&self) -> Option<&str> {
        self.refused.as_deref()
    }

    /// When the bundle next changes by itself (a retired root leaves).
    pub fn next_due(&self) -> Option<SystemTime> {
        self.retired.iter().map(|r| r.keep_until).min()
    }

    /// Reads the files again; swaps in a CA that changed and passes every check, refuses one
    /// that does not (once per content), and drops retired roots whose SVIDs have expired.
    pub fn maintain(&mut self, now: SystemTime) -> Vec<CaEvent> {
        let mut events = Vec::new();
        self.retired.retain(|r| {
            let keep = r.keep_until > now;
            if !keep {
                events.push(CaEvent::Removed(r.info.clone()));
            }
            keep
        });
        let seen = digest(&self.source);
        if seen == self.seen {
            return events;
        }
        self.seen = seen;
        let new = match load(&self.trust_domain, &self.source) {
            Ok(ca) => ca,
            Err(e) => {
                let reason = e.to_string();
                tracing::error!(event = "ca_reload_refused", error = %reason,
                    "the CA files changed but were refused; the previous CA keeps signing");
                self.refused = Some(reason.clone());
                events.push(CaEvent::ReloadRefused { reason });
                return events;
            }
        };
        self.refused = None;
        if new.signing_cert_der() == self.signer.signing_cert_der()
            && new.intermediates_der() == self.signer.intermediates_der()
            && new.roots_der() == self.signer.roots_der()
        {
            // Rewritten with the same content in another form (say, other PEM line breaks).
            return events;
        }
        let old = std::mem::replace(&mut self.signer, Arc::new(new));
        let keep_until = retire_until(&old, now, self.max_svid_ttl);
        for root in old.roots_der() {
            let known = self.signer.roots_der().contains(root)
                || self.retired.iter().any(|r| &r.root_der == root);
            if !known {
                self.retired.push(Retired {
                    root_der: root.clone(),
                    info: CaInfo::of_cert(root),
                    keep_until,
                });
            }
        }
        // Roots the bundle file brought back are served as the signer's own again.
        let signer = self.signer.clone();
        self.retired
            .retain(|r| !signer.roots_der().contains(&r.root_der));
        for root in self.signer.roots_der() {
            if !old.roots_der().contains(root) {
                events.push(CaEvent::Published(CaInfo::of_cert(root)));
            }
        }
        if old.signing_cert_der() != self.signer.signing_cert_der() {
            events.push(CaEvent::Activated(CaInfo::of(&self.signer)));
            events.push(CaEvent::Retired {
                ca: CaInfo::of(&old),
                in_bundle_until: keep_until,
            });
        }
        events
    }
}

fn load(trust_domain: &TrustDomain, source: &CaSource) -> Result<SigningCa, CaError> {
    match (&source.cert_file, &source.key_file) {
        (Some(cert), Some(key)) => SigningCa::load_operator(trust_domain, source, cert, key),
        _ => Err(CaError::IncompleteSource {
            missing: "key_file",
            present: "cert_file",
        }),
    }
}

/// One digest over every file's content (a file that cannot be read counts as empty: reading
/// it again for real reports why).
fn digest(source: &CaSource) -> [u8; 32] {
    let mut h = Sha256::new();
    let files: [&Option<PathBuf>; 4] = [
        &source.cert_file,
        &source.key_file,
        &source.chain_file,
        &source.bundle_file,
    ];
    for file in files {
        let data = file
            .as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .map(zeroize::Zeroizing::new)
            .unwrap_or_default();
        h.update((data.len() as u64).to_be_bytes());
        h.update(&data[..]);
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;
    use rcgen::{Issuer, KeyPair};
    use std::fs;
    use std::path::Path;

    const MAX_SVID_TTL: Duration = Duration::from_secs(300);

    /// The CA files as a Kubernetes Secret volume holds them: `NAME -> ..data/NAME`, and
    /// `..data` a symlink to the directory of the current version.
    struct SecretVolume {
        dir: PathBuf,
        version: u32,
    }

    impl SecretVolume {
        fn new(dir: &Path, cert: &TestCa, root: &TestCa) -> SecretVolume {
            let mut v = SecretVolume {
                dir: dir.to_path_buf(),
                version: 0,
            };
            v.publish(&cert.pem, &cert.key.serialize_pem(), &root.pem);
            for name in ["tls.crt", "tls.key", "ca.crt"] {
                std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name)).unwrap();
            }
            v
        }

        /// Writes a new version and swaps `..data` to it atomically, as the kubelet does.
        fn publish(&mut self, cert: &str, key: &str, root: &str) {
            self.version += 1;
            let version = format!("..v{}", self.version);
            let d = self.dir.join(&version);
            fs::create_dir(&d).unwrap();
            write(&d, "tls.crt", cert);
            write(&d, "tls.key", key);
            write(&d, "ca.crt", root);
            let tmp = self.dir.join("..data_tmp");
            std::os::unix::fs::symlink(&version, &tmp).unwrap();
            fs::rename(&tmp, self.dir.join("..data")).unwrap();
        }

        fn source(&self) -> CaSource {
            CaSource {
                cert_file: Some(self.dir.join("tls.crt")),
                key_file: Some(self.dir.join("tls.key")),
                chain_file: None,
                bundle_file: Some(self.dir.join("ca.crt")),
            }
        }
    }

    fn files(dir: &Path, cert: &TestCa, root: &TestCa) -> CaSource {
        CaSource {
            cert_file: Some(write(dir, "int.pem", &cert.pem)),
            key_file: Some(write(dir, "int.key", &cert.key.serialize_pem())),
            chain_file: None,
            bundle_file: Some(write(dir, "root.pem", &root.pem)),
        }
    }

    fn renew(root: &TestCa, cn: &str) -> TestCa {
        intermediate(root, cn, "example.org", KeyPair::generate().unwrap())
    }

    fn kinds(events: &[CaEvent]) -> Vec<&'static str> {
        events.iter().map(CaEvent::name).collect()
    }

    #[test]
    fn a_renewal_written_in_place_is_swapped_in_and_nothing_else_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let root = make_root("example.org");
        let source = files(tmp.path(), &renew(&root, "int 1"), &root);
        let mut ca = OperatorCa::load(&td(), source, MAX_SVID_TTL).unwrap();
        let first = ca.signer();
        assert!(ca.maintain(SystemTime::now()).is_empty(), "unchanged files");
        // Touched without a change: nothing.
        let cert = fs::read(tmp.path().join("int.pem")).unwrap();
        fs::write(tmp.path().join("int.pem"), &cert).unwrap();
        assert!(ca.maintain(SystemTime::now()).is_empty());

        let next = renew(&root, "int 2");
        files(tmp.path(), &next, &root);
        let events = ca.maintain(SystemTime::now());
        assert_eq!(kinds(&events), ["activated", "retired"]);
        assert_ne!(ca.signer().signing_cert_der(), first.signing_cert_der());
        assert!(
            ca.also_trusted().is_empty(),
            "the same root: nothing to keep"
        );
        let leaf = ca
            .signer()
            .issue_x509_svid(&id("/w"), in_an_hour())
            .unwrap();
        webpki_verify(&leaf.chain_der, ca.signer().roots_der());
        assert!(ca.maintain(SystemTime::now()).is_empty());
    }

    #[test]
    fn a_secret_volume_symlink_swap_is_seen() {
        let tmp = tempfile::tempdir().unwrap();
        let root = make_root("example.org");
        let mut volume = SecretVolume::new(tmp.path(), &renew(&root, "int 1"), &root);
        let mut ca = OperatorCa::load(&td(), volume.source(), MAX_SVID_TTL).unwrap();
        let first = ca.signer();
        let next = renew(&root, "int 2");
        volume.publish(&next.pem, &next.key.serialize_pem(), &root.pem);
        assert_eq!(
            kinds(&ca.maintain(SystemTime::now())),
            ["activated", "retired"]
        );
        assert_ne!(ca.signer().signing_cert_der(), first.signing_cert_der());
    }

    #[test]
    fn broken_replacements_are_refused_once_each_and_the_old_ca_keeps_signing() {
        let tmp = tempfile::tempdir().unwrap();
        let root = make_root("example.org");
        let good = renew(&root, "int 1");
        let mut volume = SecretVolume::new(tmp.path(), &good, &root);
        let mut ca = OperatorCa::load(&td(), volume.source(), MAX_SVID_TTL).unwrap();
        let signer = ca.signer();

        let next = renew(&root, "int 2");
        let stranger = KeyPair::generate().unwrap().serialize_pem();
        let mut expired = ca_params("int 3", "example.org", Some(1));
        expired.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(2);
        expired.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
        let expired_key = KeyPair::generate().unwrap();
        let expired_pem = expired
            .signed_by(&expired_key, &Issuer::from_params(&root.params, &root.key))
            .unwrap()
            .pem();
        // Signed by a root with the very same name but another key: the names chain, the
        // signatures do not.
        let impostor = make_root("example.org");
        let forged = renew(&impostor, "int 4");
        let cases: [(&str, String, String, &str); 4] = [
            ("wrong key", next.pem.clone(), stranger, "does not belong"),
            (
                "expired",
                expired_pem,
                expired_key.serialize_pem(),
                "expired",
            ),
            (
                "unknown root",
                forged.pem.clone(),
                forged.key.serialize_pem(),
                "does not verify to the bundle",
            ),
            ("garbage", "garbage".into(), "garbage".into(), "CERTIFICATE"),
        ];
        for (what, cert, key, says) in cases {
            volume.publish(&cert, &key, &root.pem);
            let events = ca.maintain(SystemTime::now());
            assert_eq!(kinds(&events), ["reload_refused"], "{what}");
            let CaEvent::ReloadRefused { reason } = &events[0] else {
                unreachable!()
            };
            assert!(reason.contains(says), "{what}: {reason}");
            assert_eq!(ca.refused(), Some(reason.as_str()));
            assert!(Arc::ptr_eq(&ca.signer(), &signer), "{what}: old CA kept");
            assert!(
                ca.maintain(SystemTime::now()).is_empty(),
                "{what}: said once"
            );
            ca.signer()
                .issue_x509_svid(&id("/w"), in_an_hour())
                .unwrap();
        }

        volume.publish(&next.pem, &next.key.serialize_pem(), &root.pem);
        assert_eq!(
            kinds(&ca.maintain(SystemTime::now())),
            ["activated", "retired"]
        );
        assert_eq!(ca.refused(), None);
    }

    #[test]
    fn a_new_root_is_published_and_the_old_one_kept_until_its_svids_expire() {
        let tmp = tempfile::tempdir().unwrap();
        let old_root = make_root("example.org");
        let mut volume = SecretVolume::new(tmp.path(), &renew(&old_root, "int 1"), &old_root);
        let mut ca = OperatorCa::load(&td(), volume.source(), MAX_SVID_TTL).unwrap();
        let leaf = ca
            .signer()
            .issue_x509_svid(&id("/w"), in_an_hour())
            .unwrap();

        let new_root = make_root("example.org");
        let int = renew(&new_root, "int 2");
        volume.publish(&int.pem, &int.key.serialize_pem(), &new_root.pem);
        let now = SystemTime::now();
        let events = ca.maintain(now);
        assert_eq!(kinds(&events), ["published", "activated", "retired"]);
        let CaEvent::Retired {
            in_bundle_until, ..
        } = events[2]
        else {
            unreachable!()
        };
        assert!(in_bundle_until >= leaf.not_after, "kept past its last SVID");
        let old_der = ca.also_trusted();
        assert_eq!(old_der.len(), 1);
        webpki_verify(&leaf.chain_der, &old_der);
        assert_eq!(ca.next_due(), Some(in_bundle_until));

        assert!(ca
            .maintain(in_bundle_until - Duration::from_secs(1))
            .is_empty());
        assert_eq!(kinds(&ca.maintain(in_bundle_until)), ["removed"]);
        assert!(ca.also_trusted().is_empty());
    }
}
