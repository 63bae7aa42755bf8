//! The signing CA as the rest of the agent holds it: one that can be swapped while the agent
//! runs (a renewed operator CA, a rotated embedded one), and subscribed to, so that bundle
//! streams and the SVID cache follow the CA that signs now.

use std::sync::{Arc, RwLock};

use tokio::sync::watch;

use super::SigningCa;

pub struct CaHandle {
    current: RwLock<Arc<SigningCa>>,
    /// Bumped on every swap.
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
        Arc::new(CaHandle {
            current: RwLock::new(Arc::new(ca)),
            changed: watch::channel(0).0,
        })
    }

    /// The CA that signs now. Hold it for one issuance, not longer: a swap does not wait.
    pub fn current(&self) -> Arc<SigningCa> {
        self.current.read().expect("CA lock poisoned").clone()
    }

    /// Makes `ca` the signing CA and tells every subscriber. The caller has validated it.
    pub fn swap(&self, ca: SigningCa) -> Result<(), WrongTrustDomain> {
        {
            let mut current = self.current.write().expect("CA lock poisoned");
            if current.trust_domain() != ca.trust_domain() {
                return Err(WrongTrustDomain {
                    current: current.trust_domain().to_string(),
                    new: ca.trust_domain().to_string(),
                });
            }
            *current = Arc::new(ca);
        }
        self.changed.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Changes when the CA is swapped.
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
        let before = handle.current().bundle_der().to_vec();
        let mut changes = handle.subscribe();
        handle.swap(embedded(b.path())).unwrap();
        assert!(changes.has_changed().unwrap());
        changes.borrow_and_update();
        assert_ne!(handle.current().bundle_der(), &before[..]);
        let leaf = handle
            .current()
            .issue_x509_svid(&id("/w"), in_an_hour())
            .unwrap();
        assert_eq!(leaf.spiffe_id, id("/w"));

        let other = spiffe::TrustDomain::new("other.org").unwrap();
        let c = tempfile::tempdir().unwrap();
        let foreign =
            SigningCa::load_or_create(c.path(), &other, &CaSource::default(), TTL).unwrap();
        let err = handle.swap(foreign).unwrap_err();
        assert!(err.to_string().contains("other.org"), "{err}");
        assert!(
            !changes.has_changed().unwrap(),
            "a refused swap tells nobody"
        );
    }
}
