//! The signing CA as the rest of the agent holds it: one that can be swapped while the agent
//! runs (a renewed operator CA, a rotated embedded one), beside the roots served as the trust
//! domain's bundle, and subscribed to, so that bundle streams and the SVID cache follow.
//!
//! The bundle is the signer's own roots plus any other root that must stay trusted: the next
//! CA's root, published before it signs anything, and retired roots, kept until the last SVID
//! they signed has expired.

use std::sync::{Arc, RwLock};

use tokio::sync::watch;

use super::SigningCa;

/// The X.509 roots served as the trust domain's bundle.
#[derive(Debug, PartialEq, Eq)]
pub struct Bundle {
    roots: Vec<Vec<u8>>,
    der: Vec<u8>,
}

impl Bundle {
    /// The roots in order, each once.
    pub fn new(roots: impl IntoIterator<Item = Vec<u8>>) -> Bundle {
        let mut unique: Vec<Vec<u8>> = Vec::new();
        for root in roots {
            if !unique.contains(&root) {
                unique.push(root);
            }
        }
        let der = unique.concat();
        Bundle { roots: unique, der }
    }

    /// Each root certificate, DER.
    pub fn roots_der(&self) -> &[Vec<u8>] {
        &self.roots
    }

    /// The roots as concatenated DER, as the Workload API carries them.
    pub fn der(&self) -> &[u8] {
        &self.der
    }
}

#[derive(Clone)]
struct Served {
    signer: Arc<SigningCa>,
    bundle: Arc<Bundle>,
}

pub struct CaHandle {
    current: RwLock<Served>,
    /// Bumped on every change of the signer or the bundle.
    changed: watch::Sender<u64>,
}

/// A CA of another trust domain cannot take over this one's.
#[derive(Debug, thiserror::Error)]
#[error("the new CA is for trust domain {new}, not {current}")]
pub struct WrongTrustDomain {
    pub current: String,
    pub new: String,
}

impl CaHandle {
    pub fn new(ca: SigningCa) -> Arc<Self> {
        Self::new_shared(Arc::new(ca))
    }

    /// A handle on a CA that is held elsewhere too.
    pub fn new_shared(ca: Arc<SigningCa>) -> Arc<Self> {
        let bundle = Arc::new(Bundle::new(ca.roots_der().iter().cloned()));
        Arc::new(CaHandle {
            current: RwLock::new(Served { signer: ca, bundle }),
            changed: watch::channel(0).0,
        })
    }

    /// The CA that signs now. Hold it for one issuance, not longer: a swap does not wait.
    pub fn current(&self) -> Arc<SigningCa> {
        self.read().signer
    }

    /// The roots served now: the signer's, then those trusted beside them.
    pub fn bundle(&self) -> Arc<Bundle> {
        self.read().bundle
    }

    fn read(&self) -> Served {
        self.current.read().expect("CA lock poisoned").clone()
    }

    /// Makes `signer` the signing CA and serves its roots plus `also_trusted`; tells every
    /// subscriber when either changed. The caller has validated `signer`. Returns whether
    /// anything changed.
    pub fn install(
        &self,
        signer: Arc<SigningCa>,
        also_trusted: &[Vec<u8>],
    ) -> Result<bool, WrongTrustDomain> {
        let bundle = Bundle::new(signer.roots_der().iter().chain(also_trusted).cloned());
        {
            let mut current = self.current.write().expect("CA lock poisoned");
            if current.signer.trust_domain() != signer.trust_domain() {
                return Err(WrongTrustDomain {
                    current: current.signer.trust_domain().to_string(),
                    new: signer.trust_domain().to_string(),
                });
            }
            let same_signer = Arc::ptr_eq(&current.signer, &signer)
                || current.signer.signing_cert_der() == signer.signing_cert_der()
                    && current.signer.intermediates_der() == signer.intermediates_der();
            if same_signer && *current.bundle == bundle {
                return Ok(false);
            }
            if !same_signer {
                current.signer = signer;
            }
            if *current.bundle != bundle {
                current.bundle = Arc::new(bundle);
            }
        }
        self.changed.send_modify(|n| *n += 1);
        Ok(true)
    }

    /// Changes when the signer or the bundle changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::CaSource;
    use super::*;

    #[test]
    fn a_swap_replaces_the_signer_and_tells_subscribers() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let handle = CaHandle::new(embedded(a.path()));
        let before = handle.bundle();
        let mut changes = handle.subscribe();
        handle.install(Arc::new(embedded(b.path())), &[]).unwrap();
        assert!(changes.has_changed().unwrap());
        changes.borrow_and_update();
        assert_ne!(handle.bundle(), before);
        assert_eq!(handle.bundle().der(), handle.current().bundle_der());
        let leaf = handle
            .current()
            .issue_x509_svid(&id("/w"), in_an_hour())
            .unwrap();
        assert_eq!(leaf.spiffe_id, id("/w"));

        let other = spiffe::TrustDomain::new("other.org").unwrap();
        let c = tempfile::tempdir().unwrap();
        let foreign =
            SigningCa::load_or_create(c.path(), &other, &CaSource::default(), TTL).unwrap();
        let err = handle.install(Arc::new(foreign), &[]).unwrap_err();
        assert!(err.to_string().contains("other.org"), "{err}");
        assert!(
            !changes.has_changed().unwrap(),
            "a refused swap tells nobody"
        );
    }

    #[test]
    fn roots_trusted_beside_the_signer_are_served_once_and_only_a_change_is_told() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let signer = Arc::new(embedded(a.path()));
        let next = embedded(b.path());
        let handle = CaHandle::new(embedded(a.path()));
        let mut changes = handle.subscribe();
        let own = signer.roots_der()[0].clone();
        let next_root = next.roots_der()[0].clone();

        assert!(
            !handle.install(signer.clone(), &[]).unwrap(),
            "same CA again"
        );
        assert!(!changes.has_changed().unwrap());

        let extra = [next_root.clone(), own.clone(), next_root.clone()];
        assert!(handle.install(signer.clone(), &extra).unwrap());
        assert!(changes.has_changed().unwrap());
        changes.borrow_and_update();
        assert_eq!(
            handle.bundle().roots_der(),
            &[own.clone(), next_root.clone()]
        );
        assert_eq!(
            handle.bundle().der(),
            [own.clone(), next_root.clone()].concat()
        );
        assert!(!handle.install(signer, &extra).unwrap());
        assert!(!changes.has_changed().unwrap());
    }
}
