//! Where the signing CA comes from: the operator's CA files, or the embedded
//! root that is created on first start and reused from the data dir after.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use spiffe::TrustDomain;

use super::embedded::{EmbeddedCa, RotationPolicy};
use super::files::{read_certs_pem, read_key_pem, warn_if_key_readable_by_others};
use super::{CaError, CaSource, SigningCa};

impl SigningCa {
    /// The operator's CA when `source.cert_file`/`key_file` are set; else the embedded CA's
    /// active root (see [`EmbeddedCa`], which the agent uses to rotate it), created on first
    /// start as a self-signed ECDSA P-256 root valid for `ca_ttl`.
    pub fn load_or_create(
        data_dir: &Path,
        trust_domain: &TrustDomain,
        source: &CaSource,
        ca_ttl: Duration,
    ) -> Result<SigningCa, CaError> {
        Self::check_source(source)?;
        match (&source.cert_file, &source.key_file) {
            (Some(cert), Some(key)) => Self::load_operator(trust_domain, source, cert, key),
            _ => {
                let embedded = EmbeddedCa::load_or_create(
                    data_dir,
                    trust_domain,
                    RotationPolicy::with_ttl(ca_ttl),
                )?;
                Arc::try_unwrap(embedded.into_signer())
                    .map_err(|_| CaError::Create("the embedded CA is shared".into()))
            }
        }
    }

    /// Refuses a source that names some of the operator's files but not the ones it needs.
    pub(super) fn check_source(source: &CaSource) -> Result<(), CaError> {
        match (&source.cert_file, &source.key_file) {
            (Some(_), Some(_)) => Ok(()),
            (Some(_), None) => Err(CaError::IncompleteSource {
                missing: "key_file",
                present: "cert_file",
            }),
            (None, Some(_)) => Err(CaError::IncompleteSource {
                missing: "cert_file",
                present: "key_file",
            }),
            (None, None) if source.chain_file.is_some() => Err(CaError::IncompleteSource {
                missing: "cert_file",
                present: "chain_file",
            }),
            (None, None) if source.bundle_file.is_some() => Err(CaError::IncompleteSource {
                missing: "cert_file",
                present: "bundle_file",
            }),
            (None, None) => Ok(()),
        }
    }

    pub(super) fn load_operator(
        trust_domain: &TrustDomain,
        source: &CaSource,
        cert_path: &Path,
        key_path: &Path,
    ) -> Result<SigningCa, CaError> {
        let mut certs = read_certs_pem(cert_path)?;
        if certs.len() != 1 {
            return Err(CaError::BadFile {
                path: cert_path.to_path_buf(),
                problem: format!(
                    "expected exactly one CERTIFICATE block, found {} (put intermediates in \
                     `chain_file`)",
                    certs.len()
                ),
            });
        }
        let cert = certs.remove(0);
        warn_if_key_readable_by_others(key_path);
        let key = read_key_pem(key_path)?;
        let chain = match &source.chain_file {
            Some(p) => read_certs_pem(p)?,
            None => Vec::new(),
        };
        let bundle = match &source.bundle_file {
            Some(p) => Some(read_certs_pem(p)?),
            None => None,
        };
        Self::assemble(trust_domain, cert, key_path, key, chain, bundle)
    }
}
