//! The trust domain's CAs over time, whichever kind: the embedded one rotating on its own
//! schedule, or the operator's reloaded from its files. `maintain` does what is due, and
//! `install` puts the result in the [`CaHandle`] every server reads.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use spiffe::TrustDomain;

use super::{CaError, CaEvent, CaHandle, CaSource, EmbeddedCa, OperatorCa, RotationPolicy};

/// How often the operator's files are read again: a renewal is in use within this long.
pub const FILE_CHECK: Duration = Duration::from_secs(2);

pub enum Authorities {
    Embedded(EmbeddedCa),
    Operator(OperatorCa),
}

impl Authorities {
    /// The operator's CA when `source` names its files; else the embedded CA under `data_dir`.
    pub fn load(
        data_dir: &Path,
        trust_domain: &TrustDomain,
        source: &CaSource,
        policy: RotationPolicy,
    ) -> Result<Authorities, CaError> {
        if source.cert_file.is_some() || source.key_file.is_some() {
            // The same checks (and errors) as a one-off load.
            super::SigningCa::check_source(source)?;
            return OperatorCa::load(trust_domain, source.clone(), policy.max_svid_ttl)
                .map(Authorities::Operator);
        }
        super::SigningCa::check_source(source)?;
        EmbeddedCa::load_or_create(data_dir, trust_domain, policy).map(Authorities::Embedded)
    }

    /// A handle serving what is current now.
    pub fn handle(&self) -> Arc<CaHandle> {
        let handle = CaHandle::new_shared(self.signer());
        self.install(&handle);
        handle
    }

    fn signer(&self) -> Arc<super::SigningCa> {
        match self {
            Authorities::Embedded(e) => e.signer(),
            Authorities::Operator(o) => o.signer(),
        }
    }

    fn also_trusted(&self) -> Vec<Vec<u8>> {
        match self {
            Authorities::Embedded(e) => e.also_trusted(),
            Authorities::Operator(o) => o.also_trusted(),
        }
    }

    /// Serves what is current in `handle`.
    pub fn install(&self, handle: &CaHandle) {
        // Both kinds only ever load CAs of the configured trust domain.
        if let Err(e) = handle.install(self.signer(), &self.also_trusted()) {
            tracing::error!(error = %e, "CA of another trust domain not installed");
        }
    }

    /// Does what is due at `now`; the events say what changed. Nothing is served until
    /// `install`, so that the caller can record the events first.
    pub fn maintain(&mut self, now: SystemTime) -> Result<Vec<CaEvent>, CaError> {
        match self {
            Authorities::Embedded(e) => e.maintain(now),
            Authorities::Operator(o) => Ok(o.maintain(now)),
        }
    }

    /// When `maintain` should run next.
    pub fn next_check(&self, now: SystemTime) -> SystemTime {
        match self {
            Authorities::Embedded(e) => e.next_due(),
            Authorities::Operator(o) => o
                .next_due()
                .map_or(now + FILE_CHECK, |t| t.min(now + FILE_CHECK)),
        }
    }

    /// When the signer is next replaced: the embedded CA's next activation, or the operator
    /// CA's end, by which its files must have been renewed.
    pub fn next_rotation(&self) -> SystemTime {
        match self {
            Authorities::Embedded(e) => e.next_activation(),
            Authorities::Operator(o) => o.signer().not_after(),
        }
    }

    /// Why the operator's files as they are now were refused.
    pub fn refused(&self) -> Option<&str> {
        match self {
            Authorities::Embedded(_) => None,
            Authorities::Operator(o) => o.refused(),
        }
    }
}
