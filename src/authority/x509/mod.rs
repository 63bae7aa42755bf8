//! The trust domain's signing CA and X.509-SVID issuance.
//!
//! `mayfly` is its own (node-local) SPIFFE issuer: it holds one signing CA for
//! the trust domain, serves the CA's root(s) as the X.509 bundle on the
//! Workload API and mints a short-lived X509-SVID (fresh key, one URI SAN) per
//! workload. The signing CA is either an embedded self-signed root that is
//! created on first start and persisted under `<data_dir>/ca/`, or an
//! operator-provided CA (root or intermediate) loaded from PEM files.
//!
//! Section numbers in comments refer to the SPIFFE X509-SVID standard
//! (<https://github.com/spiffe/spiffe/blob/main/standards/X509-SVID.md>).

mod authorities;
mod chain;
mod embedded;
mod files;
mod handle;
mod identity;
mod issue;
mod load;
mod operator;

pub use authorities::{Authorities, FILE_CHECK};
pub use embedded::{EmbeddedCa, RotationPolicy};
pub use handle::{Bundle, CaHandle, WrongTrustDomain};
pub use identity::{cert_identity, identity_of, CertIdentity};
pub use issue::{serial_hex, HostName};
pub use operator::OperatorCa;

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{Issuer, KeyPair};
use spiffe::{SpiffeId, TrustDomain};
use time::OffsetDateTime;
use zeroize::Zeroizing;

/// Certificates are back-dated so that peers whose clocks lag ours slightly
/// still accept a freshly issued SVID.
const BACKDATE: Duration = Duration::from_secs(10);

/// Organisation in every subject we issue: RFC 5280 §4.1.2.6 lets a
/// certificate with an empty subject exist only with a critical SAN, and some
/// TLS stacks still choke on empty subjects, so we always set one.
const SUBJECT_ORG: &str = "mayfly";

/// Where the signing CA comes from (configuration). All `None` selects the
/// embedded self-signed CA.
#[derive(Clone, Debug, Default)]
pub struct CaSource {
    /// PEM: the signing CA certificate.
    pub cert_file: Option<PathBuf>,
    /// PEM: its private key, unencrypted PKCS#8 (`BEGIN PRIVATE KEY`).
    pub key_file: Option<PathBuf>,
    /// PEM: intermediates between the signing CA and the root, signing CA's
    /// issuer first; never the root itself.
    pub chain_file: Option<PathBuf>,
    /// PEM: the trust domain root(s) served as the X.509 bundle. Defaults to
    /// the signing certificate when that is self-signed; required otherwise.
    pub bundle_file: Option<PathBuf>,
}

/// Errors of the CA module. Every variant that involves a file names it.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot {op} {}: {cause}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        cause: io::Error,
    },
    #[error("{}: {problem}", path.display())]
    BadFile { path: PathBuf, problem: String },
    #[error("{}: unsupported private key: {problem}", path.display())]
    UnsupportedKey { path: PathBuf, problem: String },
    #[error("{}: unusable CA certificate: {problem}", path.display())]
    InvalidCa { path: PathBuf, problem: String },
    #[error("private key {} does not belong to CA certificate {}", key.display(), cert.display())]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("CA configuration: `{missing}` must be set when `{present}` is set")]
    IncompleteSource {
        missing: &'static str,
        present: &'static str,
    },
    #[error(
        "{}: the signing CA certificate is not self-signed, so `bundle_file` (the trust domain \
         root certificate(s)) must be configured",
        path.display()
    )]
    BundleRequired { path: PathBuf },
    #[error("{}: broken CA chain: {problem}", path.display())]
    Chain { path: PathBuf, problem: String },
    #[error("cannot create the embedded CA: {0}")]
    Create(String),
    #[error("cannot issue an X509-SVID for {spiffe_id}: {problem}")]
    Issue { spiffe_id: String, problem: String },
    #[error("cannot issue an X509-SVID for {spiffe_id}: not in trust domain {trust_domain}")]
    ForeignTrustDomain {
        spiffe_id: String,
        trust_domain: String,
    },
    #[error(
        "cannot issue an X509-SVID for {spiffe_id}: notAfter (unix {not_after_unix}s, capped by \
         the caller and by the CA's notAfter) is not after now"
    )]
    NoLifetime {
        spiffe_id: String,
        not_after_unix: u64,
    },
}

/// The signing CA of the trust domain.
pub struct SigningCa {
    trust_domain: TrustDomain,
    /// Built from the signing certificate's DER so that the leaves' issuer
    /// name and AKI are exactly those of the real certificate.
    issuer: Issuer<'static, KeyPair>,
    signing_cert_der: Vec<u8>,
    /// Concatenated DER of what a leaf's chain carries after the leaf: the
    /// signing cert when it is not self-signed, then `chain_file`.
    intermediates_der: Vec<u8>,
    roots_der: Vec<Vec<u8>>,
    bundle_der: Vec<u8>,
    not_before: SystemTime,
    /// Earliest notAfter of the signing cert and the intermediates: a leaf
    /// must not outlive any certificate of its path.
    not_after: SystemTime,
    /// SHA-256 of the signing certificate: what names this signer in SVIDs it signed, logs
    /// and audit records.
    fingerprint: [u8; 32],
    /// The latest notAfter of any leaf it signed (unix seconds): its root must stay in the
    /// bundle until then.
    latest_leaf_not_after: AtomicU64,
}

impl fmt::Debug for SigningCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningCa")
            .field("trust_domain", &self.trust_domain.to_string())
            .field("roots", &self.roots_der.len())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// A CA certificate as logs and audit records name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaInfo {
    /// Serial, lowercase hex.
    pub serial: String,
    /// SHA-256 of the certificate's DER, lowercase hex.
    pub fingerprint: String,
    pub subject: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl CaInfo {
    /// The signing certificate of `ca`.
    pub fn of(ca: &SigningCa) -> CaInfo {
        CaInfo::of_cert(ca.signing_cert_der())
    }

    /// A certificate, DER.
    pub fn of_cert(der: &[u8]) -> CaInfo {
        use sha2::Digest;
        let fingerprint = hex::encode(sha2::Sha256::digest(der));
        match x509_parser::parse_x509_certificate(der) {
            Ok((_, x)) => CaInfo {
                serial: serial_hex(x.raw_serial()),
                fingerprint,
                subject: x.subject().to_string(),
                not_before: from_unix(x.validity().not_before.timestamp()),
                not_after: from_unix(x.validity().not_after.timestamp()),
            },
            // Only certificates that parsed before get here.
            Err(_) => CaInfo {
                serial: String::new(),
                fingerprint,
                subject: String::new(),
                not_before: UNIX_EPOCH,
                not_after: UNIX_EPOCH,
            },
        }
    }
}

/// What changed about the trust domain's CAs: each is audited.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaEvent {
    /// A new CA was made (the embedded CA's next root), persisted, not yet served.
    Prepared(CaInfo),
    /// Its root is in the bundle now; it signs nothing yet.
    Published(CaInfo),
    /// It signs every SVID from now on.
    Activated(CaInfo),
    /// It signs nothing more; its root stays in the bundle until then.
    Retired {
        ca: CaInfo,
        in_bundle_until: SystemTime,
    },
    /// Its root left the bundle: every SVID it signed has expired.
    Removed(CaInfo),
    /// Changed CA files were refused; the CA that signed before still signs.
    ReloadRefused { reason: String },
}

impl CaEvent {
    /// What happened, in one word (`ca_<name>` in the audit log).
    pub fn name(&self) -> &'static str {
        match self {
            CaEvent::Prepared(_) => "prepared",
            CaEvent::Published(_) => "published",
            CaEvent::Activated(_) => "activated",
            CaEvent::Retired { .. } => "retired",
            CaEvent::Removed(_) => "removed",
            CaEvent::ReloadRefused { .. } => "reload_refused",
        }
    }
}

/// One freshly issued X509-SVID.
pub struct IssuedX509 {
    pub spiffe_id: SpiffeId,
    /// Leaf DER, then the intermediates' DER, concatenated; never the root.
    pub chain_der: Vec<u8>,
    pub leaf_der: Vec<u8>,
    /// Unencrypted PKCS#8 DER of the leaf key; zeroized on drop.
    pub key_pkcs8: Zeroizing<Vec<u8>>,
    /// Serial as lowercase hex (no leading 00 sign byte).
    pub serial_hex: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The fingerprint of the CA that signed it.
    pub signed_by: [u8; 32],
}

impl IssuedX509 {
    /// The chain's certificates, one DER each: the leaf first.
    pub fn chain_certs(&self) -> Vec<&[u8]> {
        let mut der = &self.chain_der[..];
        let mut out = Vec::new();
        while !der.is_empty() {
            match x509_parser::parse_x509_certificate(der) {
                Ok((rest, _)) => {
                    out.push(&der[..der.len() - rest.len()]);
                    der = rest;
                }
                // Our own issuer wrote it; a chain that does not parse is a bug, not input.
                Err(_) => {
                    out.push(der);
                    break;
                }
            }
        }
        out
    }
}

impl fmt::Debug for IssuedX509 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedX509")
            .field("spiffe_id", &self.spiffe_id.to_string())
            .field("serial_hex", &self.serial_hex)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("chain_der_len", &self.chain_der.len())
            .field("key_pkcs8", &"[redacted]")
            .finish()
    }
}

/// A certificate as read from a file, remembered with its file for errors.
#[derive(Clone)]
struct CertFile {
    path: PathBuf,
    der: Vec<u8>,
}

impl SigningCa {
    /// Concatenated DER of the root certificate(s): the X.509 bundle served on
    /// the Workload API.
    pub fn bundle_der(&self) -> &[u8] {
        &self.bundle_der
    }

    /// The root certificate(s), one DER each.
    pub fn roots_der(&self) -> &[Vec<u8>] {
        &self.roots_der
    }

    /// DER of the certificate whose key signs the SVIDs.
    pub fn signing_cert_der(&self) -> &[u8] {
        &self.signing_cert_der
    }

    /// What a leaf's chain carries after the leaf, concatenated DER.
    pub fn intermediates_der(&self) -> &[u8] {
        &self.intermediates_der
    }

    /// SHA-256 of the signing certificate.
    pub fn fingerprint(&self) -> &[u8; 32] {
        &self.fingerprint
    }

    /// The latest notAfter of a leaf this CA signed since it was loaded.
    pub fn latest_leaf_not_after(&self) -> Option<SystemTime> {
        match self.latest_leaf_not_after.load(Ordering::Acquire) {
            0 => None,
            secs => Some(from_unix_u(secs)),
        }
    }

    /// No SVID is issued past this instant (earliest notAfter of the signing
    /// certificate and its intermediates).
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn unix_now() -> i64 {
    i64::try_from(unix_secs(SystemTime::now())).unwrap_or(i64::MAX)
}

fn from_unix_u(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn from_unix(secs: i64) -> SystemTime {
    from_unix_u(u64::try_from(secs).unwrap_or(0))
}

fn odt(secs: u64) -> Result<OffsetDateTime, String> {
    i64::try_from(secs)
        .ok()
        .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
        .ok_or_else(|| format!("time {secs}s after the epoch is out of range"))
}

#[cfg(test)]
mod test_support {
    use super::*;
    use rcgen::string::Ia5String;
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyUsagePurpose,
        SanType,
    };
    use rustls_pki_types::{CertificateDer, UnixTime};
    use std::fs;
    use std::path::Path;

    pub(super) struct TestCa {
        pub(super) params: CertificateParams,
        pub(super) key: KeyPair,
        pub(super) pem: String,
    }

    pub(super) fn ca_params(cn: &str, td: &str, path_len: Option<u8>) -> CertificateParams {
        let mut p = CertificateParams::default();
        let now = OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::hours(1);
        p.not_after = now + time::Duration::days(30);
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "test");
        dn.push(DnType::CommonName, cn);
        p.distinguished_name = dn;
        p.subject_alt_names = vec![SanType::URI(
            Ia5String::try_from(format!("spiffe://{td}")).unwrap(),
        )];
        p.is_ca = IsCa::Ca(match path_len {
            Some(n) => BasicConstraints::Constrained(n),
            None => BasicConstraints::Unconstrained,
        });
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.use_authority_key_identifier_extension = true;
        p
    }

    pub(super) fn make_root(td: &str) -> TestCa {
        let key = KeyPair::generate().unwrap();
        let mut params = ca_params("test root", td, None);
        params.use_authority_key_identifier_extension = false;
        let pem = params.self_signed(&key).unwrap().pem();
        TestCa { params, key, pem }
    }

    pub(super) fn intermediate(parent: &TestCa, cn: &str, td: &str, key: KeyPair) -> TestCa {
        let params = ca_params(cn, td, Some(1));
        let issuer = Issuer::from_params(&parent.params, &parent.key);
        let pem = params.signed_by(&key, &issuer).unwrap().pem();
        TestCa { params, key, pem }
    }

    pub(super) fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
        let p = dir.join(name);
        fs::write(&p, contents).unwrap();
        p
    }

    pub(super) const TTL: Duration = Duration::from_secs(24 * 3600);

    pub(super) fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    pub(super) fn id(path: &str) -> SpiffeId {
        SpiffeId::new(format!("spiffe://example.org{path}")).unwrap()
    }

    pub(super) fn embedded(dir: &Path) -> SigningCa {
        SigningCa::load_or_create(dir, &td(), &CaSource::default(), TTL).unwrap()
    }

    pub(super) fn in_an_hour() -> SystemTime {
        SystemTime::now() + Duration::from_secs(3600)
    }

    pub(super) fn split_ders(mut b: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while !b.is_empty() {
            let (rest, _) = x509_parser::parse_x509_certificate(b).unwrap();
            out.push(b[..b.len() - rest.len()].to_vec());
            b = rest;
        }
        out
    }

    /// Verifies `chain_der` (leaf first) to `roots` with rustls-webpki for
    /// both TLS client and server use.
    pub(super) fn webpki_verify(chain_der: &[u8], roots: &[Vec<u8>]) {
        let certs = split_ders(chain_der);
        let root_ders: Vec<CertificateDer<'_>> = roots
            .iter()
            .map(|r| CertificateDer::from(r.as_slice()))
            .collect();
        let anchors: Vec<_> = root_ders
            .iter()
            .map(|r| webpki::anchor_from_trusted_cert(r).unwrap())
            .collect();
        let leaf = CertificateDer::from(certs[0].as_slice());
        let intermediates: Vec<CertificateDer<'_>> = certs[1..]
            .iter()
            .map(|c| CertificateDer::from(c.as_slice()))
            .collect();
        let ee = webpki::EndEntityCert::try_from(&leaf).unwrap();
        let algs = [
            webpki::ring::ECDSA_P256_SHA256,
            webpki::ring::ECDSA_P256_SHA384,
            webpki::ring::ECDSA_P384_SHA256,
            webpki::ring::ECDSA_P384_SHA384,
        ];
        let now = UnixTime::now();
        for usage in [
            webpki::KeyUsage::client_auth(),
            webpki::KeyUsage::server_auth(),
        ] {
            ee.verify_for_usage(&algs, &anchors, &intermediates, now, usage, None, None)
                .unwrap();
        }
    }

    pub(super) fn secs(t: SystemTime) -> i64 {
        t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signing_ca_is_send_and_sync() {
        fn assert<T: Send + Sync>() {}
        assert::<SigningCa>();
        assert::<IssuedX509>();
    }
}
