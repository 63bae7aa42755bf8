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

use std::fmt;
use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use ring::rand::{SecureRandom, SystemRandom};
use spiffe::{SpiffeId, TrustDomain};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::pem::Pem;
use zeroize::Zeroizing;

/// Sub-directory of the data dir that holds the embedded CA.
const CA_DIR: &str = "ca";
const CA_CERT_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca.key";

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
    /// Embedded default: if `<data_dir>/ca/ca.pem` + `<data_dir>/ca/ca.key`
    /// exist, load and reuse them; else create a self-signed ECDSA P-256 root
    /// valid for `ca_ttl` and persist it (key 0600, dir 0700, atomic writes).
    /// With `source.cert_file`/`key_file` set, load the operator CA instead.
    pub fn load_or_create(
        data_dir: &Path,
        trust_domain: &TrustDomain,
        source: &CaSource,
        ca_ttl: Duration,
    ) -> Result<SigningCa, CaError> {
        match (&source.cert_file, &source.key_file) {
            (Some(cert), Some(key)) => Self::load_operator(trust_domain, source, cert, key),
            (Some(_), None) => Err(CaError::IncompleteSource {
                missing: "key_file",
                present: "cert_file",
            }),
            (None, Some(_)) => Err(CaError::IncompleteSource {
                missing: "cert_file",
                present: "key_file",
            }),
            (None, None) => {
                if source.chain_file.is_some() || source.bundle_file.is_some() {
                    return Err(CaError::IncompleteSource {
                        missing: "cert_file",
                        present: if source.chain_file.is_some() {
                            "chain_file"
                        } else {
                            "bundle_file"
                        },
                    });
                }
                Self::load_or_create_embedded(data_dir, trust_domain, ca_ttl)
            }
        }
    }

    fn load_operator(
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

    fn load_or_create_embedded(
        data_dir: &Path,
        trust_domain: &TrustDomain,
        ca_ttl: Duration,
    ) -> Result<SigningCa, CaError> {
        let dir = data_dir.join(CA_DIR);
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);

        // The certificate is written last, so its presence marks a complete
        // CA. A key without a certificate is debris of an interrupted first
        // start and gets replaced; a certificate without its key is a lost CA
        // that must not be silently replaced (it would rotate the root).
        if exists(&cert_path)? {
            if !exists(&key_path)? {
                return Err(CaError::BadFile {
                    path: key_path,
                    problem: format!(
                        "missing, but CA certificate {} exists; restore the key or remove the \
                         certificate to create a new CA",
                        cert_path.display()
                    ),
                });
            }
            let mut certs = read_certs_pem(&cert_path)?;
            if certs.len() != 1 {
                return Err(CaError::BadFile {
                    path: cert_path,
                    problem: format!("expected one CERTIFICATE block, found {}", certs.len()),
                });
            }
            warn_if_key_readable_by_others(&key_path);
            let key = read_key_pem(&key_path)?;
            let ca = Self::assemble(trust_domain, certs.remove(0), &key_path, key, vec![], None)?;
            tracing::info!(cert = %cert_path.display(), "loaded embedded CA");
            return Ok(ca);
        }

        let (cert_der, cert_pem, key, key_pem) = create_root(trust_domain, ca_ttl)?;
        create_private_dir(&dir)?;
        write_atomic(&key_path, key_pem.as_bytes(), 0o600)?;
        write_atomic(&cert_path, cert_pem.as_bytes(), 0o644)?;
        let ca = Self::assemble(
            trust_domain,
            CertFile {
                path: cert_path.clone(),
                der: cert_der,
            },
            &key_path,
            key,
            vec![],
            None,
        )?;
        tracing::info!(cert = %cert_path.display(), "created embedded CA");
        Ok(ca)
    }

    /// Validates a signing cert + key + intermediates + roots as a whole and
    /// builds the CA from them.
    fn assemble(
        trust_domain: &TrustDomain,
        cert: CertFile,
        key_path: &Path,
        key: KeyPair,
        chain: Vec<CertFile>,
        bundle: Option<Vec<CertFile>>,
    ) -> Result<SigningCa, CaError> {
        let now = unix_now();
        let sx = parse_cert(&cert)?;
        // §4.1/§4.3: a signing certificate must have cA=true and keyCertSign.
        check_ca_cert(&sx, trust_domain, now, true).map_err(|problem| CaError::InvalidCa {
            path: cert.path.clone(),
            problem,
        })?;
        if sx.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CaError::KeyMismatch {
                key: key_path.to_path_buf(),
                cert: cert.path.clone(),
            });
        }
        let self_signed = is_self_signed(&sx);
        let mut not_before = sx.validity().not_before.timestamp();
        let mut not_after = sx.validity().not_after.timestamp();

        if self_signed && !chain.is_empty() {
            return Err(CaError::Chain {
                path: chain[0].path.clone(),
                problem: format!(
                    "the signing certificate {} is self-signed, so there can be no intermediates",
                    cert.path.display()
                ),
            });
        }
        // Check that the files form one path by name: signing cert, then each
        // intermediate issued the previous one, and a bundle root issued the
        // last one. (Signatures are checked by the relying parties; this
        // catches operator mix-ups with a clear message at start-up.)
        let mut top_issuer = sx.issuer().to_string();
        let mut top_issuer_raw = sx.issuer().as_raw().to_vec();
        let mut top_path = cert.path.clone();
        for c in &chain {
            let x = parse_cert(c)?;
            check_ca_cert(&x, trust_domain, now, true).map_err(|problem| CaError::InvalidCa {
                path: c.path.clone(),
                problem,
            })?;
            if is_self_signed(&x) {
                return Err(CaError::Chain {
                    path: c.path.clone(),
                    problem: format!(
                        "contains the self-signed root {}; the root belongs in `bundle_file` only",
                        x.subject()
                    ),
                });
            }
            if x.subject().as_raw() != top_issuer_raw.as_slice() {
                return Err(CaError::Chain {
                    path: c.path.clone(),
                    problem: format!(
                        "certificate {} is not the issuer ({top_issuer}) of the previous \
                         certificate from {}",
                        x.subject(),
                        top_path.display()
                    ),
                });
            }
            not_before = not_before.max(x.validity().not_before.timestamp());
            not_after = not_after.min(x.validity().not_after.timestamp());
            top_issuer = x.issuer().to_string();
            top_issuer_raw = x.issuer().as_raw().to_vec();
            top_path = c.path.clone();
        }

        let roots = match bundle {
            Some(roots) => roots,
            None if self_signed => vec![cert.clone()],
            None => return Err(CaError::BundleRequired { path: cert.path }),
        };
        let mut anchored = false;
        for r in &roots {
            let x = parse_cert(r)?;
            check_ca_cert(&x, trust_domain, now, false).map_err(|problem| CaError::InvalidCa {
                path: r.path.clone(),
                problem,
            })?;
            anchored |= x.subject().as_raw() == top_issuer_raw.as_slice();
        }
        if !anchored {
            return Err(CaError::Chain {
                path: roots[0].path.clone(),
                problem: format!(
                    "no root certificate in the bundle is the issuer ({top_issuer}) of the \
                     certificate from {}",
                    top_path.display()
                ),
            });
        }

        let subject_raw = sx.subject().as_raw().to_vec();
        let ski = subject_key_id(&sx);
        drop(sx);
        let issuer = Issuer::from_ca_cert_der(&cert.der.as_slice().into(), key).map_err(|e| {
            CaError::InvalidCa {
                path: cert.path.clone(),
                problem: format!("cannot be used as an issuer: {e}"),
            }
        })?;

        let mut intermediates_der = Vec::new();
        if !self_signed {
            intermediates_der.extend_from_slice(&cert.der);
        }
        for c in &chain {
            intermediates_der.extend_from_slice(&c.der);
        }
        let bundle_der = roots.iter().flat_map(|r| r.der.iter().copied()).collect();
        let ca = SigningCa {
            trust_domain: trust_domain.clone(),
            issuer,
            signing_cert_der: cert.der,
            intermediates_der,
            roots_der: roots.into_iter().map(|r| r.der).collect(),
            bundle_der,
            not_before: from_unix(not_before),
            not_after: from_unix(not_after),
        };

        // rcgen re-encodes the issuer name from its parsed form; if that does
        // not reproduce the CA's subject bytes exactly, relying parties could
        // not chain our leaves (RFC 5280 §7.1 name matching is bytewise in
        // practice). Prove it once now instead of failing every handshake.
        let probe_id = SpiffeId::new(format!("{}/mayfly/ca-self-check", trust_domain.id_string()))
            .map_err(|e| CaError::Create(format!("self-check SPIFFE ID: {e}")))?;
        let probe = ca.issue_x509_svid(&probe_id, SystemTime::now() + Duration::from_secs(60))?;
        let (_, px) = x509_parser::parse_x509_certificate(&probe.leaf_der).map_err(|e| {
            CaError::InvalidCa {
                path: cert.path.clone(),
                problem: format!("self-check leaf does not parse: {e}"),
            }
        })?;
        if px.issuer().as_raw() != subject_raw.as_slice() {
            return Err(CaError::InvalidCa {
                path: cert.path,
                problem: "its subject name cannot be reproduced exactly in issued certificates \
                          (unsupported name encoding, e.g. multi-valued or repeated attributes)"
                    .into(),
            });
        }
        if ski.is_some() && authority_key_id(&px) != ski {
            return Err(CaError::InvalidCa {
                path: cert.path,
                problem: "issued certificates' AuthorityKeyIdentifier would not match its \
                          SubjectKeyIdentifier"
                    .into(),
            });
        }
        Ok(ca)
    }

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

    /// No SVID is issued past this instant (earliest notAfter of the signing
    /// certificate and its intermediates).
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// Issue a leaf. `not_after` is the caller's cap; the leaf's notAfter is
    /// min(`not_after`, CA notAfter) rounded down to whole seconds. Error if
    /// that is not after now.
    pub fn issue_x509_svid(
        &self,
        spiffe_id: &SpiffeId,
        not_after: SystemTime,
    ) -> Result<IssuedX509, CaError> {
        let id = spiffe_id.to_string();
        let issue_err = |problem: String| CaError::Issue {
            spiffe_id: id.clone(),
            problem,
        };
        if spiffe_id.trust_domain_name() != self.trust_domain.as_str() {
            return Err(CaError::ForeignTrustDomain {
                spiffe_id: id.clone(),
                trust_domain: self.trust_domain.to_string(),
            });
        }
        // §3 (leaf certificates): the SPIFFE ID of a leaf SVID has a non-root
        // path; the bare trust domain ID names the trust domain itself.
        if spiffe_id.path().is_empty() {
            return Err(issue_err(
                "a leaf SVID needs a SPIFFE ID with a path".into(),
            ));
        }

        let now = SystemTime::now();
        // X.509 times have second precision (RFC 5280 §4.1.2.5); round down
        // so the leaf never outlives the caller's cap (e.g. the lease end).
        let na_secs = unix_secs(not_after.min(self.not_after));
        let leaf_not_after = from_unix_u(na_secs);
        if leaf_not_after <= now {
            return Err(CaError::NoLifetime {
                spiffe_id: id.clone(),
                not_after_unix: na_secs,
            });
        }
        let nb_secs = unix_secs(
            now.checked_sub(BACKDATE)
                .unwrap_or(UNIX_EPOCH)
                .max(self.not_before),
        );

        let mut params = CertificateParams::default();
        params.not_before = odt(nb_secs).map_err(&issue_err)?;
        params.not_after = odt(na_secs).map_err(&issue_err)?;
        let serial = random_serial().map_err(&issue_err)?;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, SUBJECT_ORG);
        params.distinguished_name = dn;
        // §2: exactly one URI SAN, the SPIFFE ID, and no other SAN types.
        let uri = Ia5String::try_from(id.clone()).map_err(|e| issue_err(e.to_string()))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        // §4.1: leaf SVIDs have cA=false. ExplicitNoCa writes the (critical)
        // BasicConstraints extension and makes rcgen add the SKI.
        params.is_ca = IsCa::ExplicitNoCa;
        // §4.3: leaf SVIDs must set digitalSignature and must not set
        // keyCertSign or cRLSign; rcgen marks KeyUsage critical.
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // §4.4: SVIDs are used for both ends of mTLS.
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;

        // A fresh key per SVID: it exists only in this struct and in the
        // Workload API response, never on disk.
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| issue_err(format!("key generation: {e}")))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| issue_err(format!("signing: {e}")))?;
        let leaf_der = cert.der().to_vec();
        let mut chain_der = Vec::with_capacity(leaf_der.len() + self.intermediates_der.len());
        chain_der.extend_from_slice(&leaf_der);
        chain_der.extend_from_slice(&self.intermediates_der);

        Ok(IssuedX509 {
            spiffe_id: spiffe_id.clone(),
            chain_der,
            leaf_der,
            key_pkcs8: Zeroizing::new(key.serialize_der()),
            serial_hex: serial_hex(&serial),
            not_before: from_unix_u(nb_secs),
            not_after: leaf_not_after,
        })
    }
}

/// Creates the embedded self-signed root. Returns (cert DER, cert PEM, key,
/// key PEM).
fn create_root(
    trust_domain: &TrustDomain,
    ca_ttl: Duration,
) -> Result<(Vec<u8>, String, KeyPair, Zeroizing<String>), CaError> {
    let err = |e: String| CaError::Create(e);
    let now = SystemTime::now();
    let nb = unix_secs(now.checked_sub(BACKDATE).unwrap_or(UNIX_EPOCH));
    let na = unix_secs(now)
        .checked_add(ca_ttl.as_secs())
        .ok_or_else(|| err(format!("ca_ttl {ca_ttl:?} is too large")))?;
    let mut params = CertificateParams::default();
    params.not_before = odt(nb).map_err(err)?;
    params.not_after = odt(na).map_err(|e| err(format!("ca_ttl {ca_ttl:?}: {e}")))?;
    params.serial_number = Some(SerialNumber::from_slice(&random_serial().map_err(err)?));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, SUBJECT_ORG);
    dn.push(DnType::CommonName, format!("mayfly {trust_domain} root"));
    params.distinguished_name = dn;
    // §3 (signing certificates) allows a signing certificate to carry the
    // trust domain's SPIFFE ID (no path); it tells operators what it signs.
    let uri = Ia5String::try_from(trust_domain.id_string()).map_err(|e| err(e.to_string()))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    // §4.1: signing certificates have cA=true. The root signs leaves only,
    // so pathLen 0 forbids anyone from hanging intermediates off it.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    // §4.3: signing certificates must set keyCertSign and may set cRLSign.
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key =
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| err(format!("key: {e}")))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| err(format!("self-signing: {e}")))?;
    let key_pem = Zeroizing::new(key.serialize_pem());
    Ok((cert.der().to_vec(), cert.pem(), key, key_pem))
}

/// Checks one CA certificate of the path or bundle; returns the problem.
fn check_ca_cert(
    x: &X509Certificate<'_>,
    trust_domain: &TrustDomain,
    now: i64,
    signing: bool,
) -> Result<(), String> {
    match x.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        Ok(_) => return Err("not a CA certificate (BasicConstraints cA is not true)".into()),
        Err(e) => return Err(format!("malformed BasicConstraints: {e}")),
    }
    if signing {
        match x.key_usage() {
            Ok(Some(ku)) if ku.value.key_cert_sign() => {}
            Ok(Some(_)) => return Err("KeyUsage lacks keyCertSign (X509-SVID §4.3)".into()),
            Ok(None) => {
                return Err("no KeyUsage extension; X509-SVID §4.3 requires keyCertSign".into())
            }
            Err(e) => return Err(format!("malformed KeyUsage: {e}")),
        }
    }
    let validity = x.validity();
    if validity.not_after.timestamp() <= now {
        return Err(format!("expired at {}", validity.not_after));
    }
    if validity.not_before.timestamp() > now {
        tracing::warn!(subject = %x.subject(), not_before = %validity.not_before,
            "CA certificate is not valid yet; SVIDs will not verify until then");
    }
    match x.subject_alternative_name() {
        Ok(Some(san)) => {
            for gn in &san.value.general_names {
                let GeneralName::URI(uri) = gn else { continue };
                if !uri
                    .get(..9)
                    .is_some_and(|s| s.eq_ignore_ascii_case("spiffe://"))
                {
                    continue;
                }
                match TrustDomain::new(uri) {
                    Ok(td) if td == *trust_domain => {}
                    Ok(td) => {
                        return Err(format!(
                            "belongs to trust domain {td} (URI SAN {uri}), not {trust_domain}"
                        ))
                    }
                    Err(e) => return Err(format!("malformed SPIFFE ID URI SAN {uri}: {e}")),
                }
            }
        }
        Ok(None) => {}
        Err(e) => return Err(format!("malformed SubjectAlternativeName: {e}")),
    }
    Ok(())
}

fn is_self_signed(x: &X509Certificate<'_>) -> bool {
    x.subject().as_raw() == x.issuer().as_raw()
}

fn subject_key_id(x: &X509Certificate<'_>) -> Option<Vec<u8>> {
    x.iter_extensions()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        })
}

fn authority_key_id(x: &X509Certificate<'_>) -> Option<Vec<u8>> {
    x.iter_extensions()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => {
                a.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        })
}

fn parse_cert(c: &CertFile) -> Result<X509Certificate<'_>, CaError> {
    match x509_parser::parse_x509_certificate(&c.der) {
        Ok(([], x)) => Ok(x),
        Ok(_) => Err(CaError::BadFile {
            path: c.path.clone(),
            problem: "trailing data after certificate".into(),
        }),
        Err(e) => Err(CaError::BadFile {
            path: c.path.clone(),
            problem: format!("invalid X.509 certificate: {e}"),
        }),
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, CaError> {
    fs::read(path).map_err(|cause| CaError::Io {
        op: "read",
        path: path.to_path_buf(),
        cause,
    })
}

/// All `CERTIFICATE` blocks of a PEM file, in order; at least one.
fn read_certs_pem(path: &Path) -> Result<Vec<CertFile>, CaError> {
    let data = read_file(path)?;
    let mut out = Vec::new();
    for pem in Pem::iter_from_buffer(&data) {
        let pem = pem.map_err(|e| CaError::BadFile {
            path: path.to_path_buf(),
            problem: format!("invalid PEM: {e}"),
        })?;
        if pem.label == "CERTIFICATE" {
            out.push(CertFile {
                path: path.to_path_buf(),
                der: pem.contents,
            });
        }
    }
    if out.is_empty() {
        return Err(CaError::BadFile {
            path: path.to_path_buf(),
            problem: "no PEM CERTIFICATE block".into(),
        });
    }
    Ok(out)
}

/// The private key of a PEM file. Only unencrypted PKCS#8 is accepted (what
/// ring can load); other formats get an error saying how to convert them.
fn read_key_pem(path: &Path) -> Result<KeyPair, CaError> {
    let data = Zeroizing::new(read_file(path)?);
    let unsupported = |problem: String| CaError::UnsupportedKey {
        path: path.to_path_buf(),
        problem,
    };
    const CONVERT: &str = "convert it with `openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.pk8`";
    for pem in Pem::iter_from_buffer(&data) {
        let mut pem = pem.map_err(|e| CaError::BadFile {
            path: path.to_path_buf(),
            problem: format!("invalid PEM: {e}"),
        })?;
        let contents = Zeroizing::new(std::mem::take(&mut pem.contents));
        match pem.label.as_str() {
            "PRIVATE KEY" => {
                return KeyPair::try_from(contents.as_slice()).map_err(|e| {
                    unsupported(format!(
                        "PKCS#8 key is not an ECDSA P-256/P-384, Ed25519 or RSA key usable for \
                         signing ({e})"
                    ))
                })
            }
            "EC PRIVATE KEY" => {
                return Err(unsupported(format!(
                    "SEC1 `EC PRIVATE KEY`; PKCS#8 (`PRIVATE KEY`) is required, {CONVERT}"
                )))
            }
            "RSA PRIVATE KEY" => {
                return Err(unsupported(format!(
                    "PKCS#1 `RSA PRIVATE KEY`; PKCS#8 (`PRIVATE KEY`) is required, {CONVERT}"
                )))
            }
            "ENCRYPTED PRIVATE KEY" => {
                return Err(unsupported(format!(
                    "encrypted PKCS#8; an unencrypted PKCS#8 key is required, {CONVERT}"
                )))
            }
            _ => {}
        }
    }
    Err(CaError::BadFile {
        path: path.to_path_buf(),
        problem: "no PEM PRIVATE KEY block".into(),
    })
}

fn warn_if_key_readable_by_others(path: &Path) {
    if let Ok(meta) = fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777),
                "CA private key file is accessible by group/others; it should be 0600");
        }
    }
}

fn exists(path: &Path) -> Result<bool, CaError> {
    path.try_exists().map_err(|cause| CaError::Io {
        op: "stat",
        path: path.to_path_buf(),
        cause,
    })
}

/// The CA dir holds the root key: owner-only.
fn create_private_dir(dir: &Path) -> Result<(), CaError> {
    let io_err = |op, cause| CaError::Io {
        op,
        path: dir.to_path_buf(),
        cause,
    };
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io_err("create directory", e))?;
    // `mode` does not apply to a directory that already existed.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|e| io_err("set permissions of", e))
}

/// Writes via a temp file in the same directory + rename, so a crash never
/// leaves a truncated file. The temp file is created with its final `mode`
/// so a secret is never readable by others, not even briefly.
fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), CaError> {
    let io_err = |op, p: &Path, cause| CaError::Io {
        op,
        path: p.to_path_buf(),
        cause,
    };
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    // A stale temp file from a crashed run with the same pid would make
    // create_new fail; it holds nothing of value.
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| io_err("create", &tmp, e))?;
        f.write_all(data).map_err(|e| io_err("write", &tmp, e))?;
        f.sync_all().map_err(|e| io_err("sync", &tmp, e))?;
        fs::rename(&tmp, path).map_err(|e| io_err("rename into place", path, e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
        return result;
    }
    if let Some(dir) = path.parent() {
        // Make the rename itself durable.
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err("sync directory", dir, e))?;
    }
    Ok(())
}

/// 128 random bits with the top bit cleared: RFC 5280 §4.1.2.2 wants a
/// positive serial of at most 20 octets, and CA/B Forum practice wants at
/// least 64 unpredictable bits. Never zero.
fn random_serial() -> Result<[u8; 16], String> {
    let rng = SystemRandom::new();
    loop {
        let mut s = [0u8; 16];
        rng.fill(&mut s)
            .map_err(|_| "system random generator failed".to_string())?;
        s[0] &= 0x7f;
        if s.iter().any(|&b| b != 0) {
            return Ok(s);
        }
    }
}

/// A certificate serial as mayfly prints and audits it: lowercase hex of the integer's bytes
/// without leading zero bytes (so without DER's sign byte). `raw` is the DER INTEGER content.
pub fn serial_hex(raw: &[u8]) -> String {
    hex::encode(strip_leading_zeros(raw))
}

fn strip_leading_zeros(b: &[u8]) -> &[u8] {
    let first = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    &b[first..]
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
mod tests {
    use super::*;
    use rcgen::{KeyPair, PKCS_ECDSA_P384_SHA384};
    use rustls_pki_types::{CertificateDer, UnixTime};

    const TTL: Duration = Duration::from_secs(24 * 3600);

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn id(path: &str) -> SpiffeId {
        SpiffeId::new(format!("spiffe://example.org{path}")).unwrap()
    }

    fn embedded(dir: &Path) -> SigningCa {
        SigningCa::load_or_create(dir, &td(), &CaSource::default(), TTL).unwrap()
    }

    fn in_an_hour() -> SystemTime {
        SystemTime::now() + Duration::from_secs(3600)
    }

    fn split_ders(mut b: &[u8]) -> Vec<Vec<u8>> {
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
    fn webpki_verify(chain_der: &[u8], roots: &[Vec<u8>]) {
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

    fn secs(t: SystemTime) -> i64 {
        t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
    }

    #[test]
    fn signing_ca_is_send_and_sync() {
        fn assert<T: Send + Sync>() {}
        assert::<SigningCa>();
        assert::<IssuedX509>();
    }

    #[test]
    fn embedded_ca_is_created_then_reused() {
        let tmp = tempfile::tempdir().unwrap();
        let ca1 = embedded(tmp.path());
        let ca2 = embedded(tmp.path());
        assert_eq!(ca1.roots_der(), ca2.roots_der());
        assert_eq!(ca1.bundle_der(), ca1.signing_cert_der());
        assert_eq!(ca1.roots_der(), &[ca1.signing_cert_der().to_vec()]);
        assert_eq!(ca1.not_after(), ca2.not_after());
        let key_mode = fs::metadata(tmp.path().join("ca/ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(key_mode & 0o777, 0o600);
        let dir_mode = fs::metadata(tmp.path().join("ca"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        let leftovers: Vec<_> = fs::read_dir(tmp.path().join("ca"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.contains(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");

        // Root profile.
        let (_, x) = x509_parser::parse_x509_certificate(ca1.signing_cert_der()).unwrap();
        let bc = x.basic_constraints().unwrap().unwrap();
        assert!(bc.critical && bc.value.ca);
        let ku = x.key_usage().unwrap().unwrap();
        assert!(ku.critical);
        assert!(ku.value.key_cert_sign() && ku.value.crl_sign() && ku.value.digital_signature());
        assert!(subject_key_id(&x).is_some());
        let san = x.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::URI("spiffe://example.org")]
        );
        let subject = x.subject().to_string();
        assert!(subject.contains("O=mayfly"), "{subject}");
        assert!(subject.contains("CN=mayfly example.org root"), "{subject}");
        let now = secs(SystemTime::now());
        let nb = x.validity().not_before.timestamp();
        let na = x.validity().not_after.timestamp();
        assert!((now - 12..=now - 9).contains(&nb), "{nb} vs {now}");
        assert!((now + TTL.as_secs() as i64 - 2..=now + TTL.as_secs() as i64).contains(&na));
    }

    #[test]
    fn embedded_ca_for_another_trust_domain_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        embedded(tmp.path());
        let other = TrustDomain::new("other.org").unwrap();
        let err =
            SigningCa::load_or_create(tmp.path(), &other, &CaSource::default(), TTL).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, CaError::InvalidCa { .. }), "{msg}");
        assert!(
            msg.contains("ca.pem") && msg.contains("example.org"),
            "{msg}"
        );
    }

    #[test]
    fn embedded_ca_with_foreign_key_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        embedded(tmp.path());
        let other = KeyPair::generate().unwrap();
        fs::write(tmp.path().join("ca/ca.key"), other.serialize_pem()).unwrap();
        let err =
            SigningCa::load_or_create(tmp.path(), &td(), &CaSource::default(), TTL).unwrap_err();
        assert!(matches!(err, CaError::KeyMismatch { .. }), "{err}");
        assert!(err.to_string().contains("ca.key"), "{err}");
    }

    #[test]
    fn embedded_ca_with_lost_key_is_an_error_not_a_new_root() {
        let tmp = tempfile::tempdir().unwrap();
        embedded(tmp.path());
        fs::remove_file(tmp.path().join("ca/ca.key")).unwrap();
        let err =
            SigningCa::load_or_create(tmp.path(), &td(), &CaSource::default(), TTL).unwrap_err();
        assert!(err.to_string().contains("ca.key"), "{err}");
    }

    #[test]
    fn leaf_is_a_valid_spiffe_x509_svid() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = embedded(tmp.path());
        let want = id("/ns/prod/task/web");
        let svid = ca.issue_x509_svid(&want, in_an_hour()).unwrap();
        assert_eq!(svid.spiffe_id, want);
        assert_eq!(
            svid.chain_der, svid.leaf_der,
            "self-signed root: chain is the leaf only"
        );
        let parsed = spiffe::X509Svid::parse_from_der(&svid.chain_der, &svid.key_pkcs8).unwrap();
        assert_eq!(parsed.spiffe_id(), &want);
        webpki_verify(&svid.chain_der, ca.roots_der());
        // The bundle as served (concatenated DER) holds exactly the roots.
        assert_eq!(split_ders(ca.bundle_der()), ca.roots_der());
    }

    #[test]
    fn leaf_profile() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = embedded(tmp.path());
        let svid = ca.issue_x509_svid(&id("/w"), in_an_hour()).unwrap();
        let now = secs(SystemTime::now());
        let (rest, x) = x509_parser::parse_x509_certificate(&svid.leaf_der).unwrap();
        assert!(rest.is_empty());
        let (_, cax) = x509_parser::parse_x509_certificate(ca.signing_cert_der()).unwrap();

        // Exactly one SAN, a URI, the SPIFFE ID.
        let san = x.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::URI("spiffe://example.org/w")]
        );
        // KeyUsage: critical, digitalSignature, no keyCertSign/cRLSign.
        let ku = x.key_usage().unwrap().unwrap();
        assert!(ku.critical);
        assert!(ku.value.digital_signature());
        assert!(!ku.value.key_cert_sign() && !ku.value.crl_sign());
        // BasicConstraints: critical, cA=false.
        let bc = x.basic_constraints().unwrap().unwrap();
        assert!(bc.critical && !bc.value.ca);
        // EKU serverAuth + clientAuth.
        let eku = x.extended_key_usage().unwrap().unwrap();
        assert!(eku.value.server_auth && eku.value.client_auth);
        assert!(!eku.value.any);
        // SKI present; AKI == CA's SKI.
        assert!(subject_key_id(&x).is_some());
        assert_eq!(authority_key_id(&x), subject_key_id(&cax));
        assert!(authority_key_id(&x).is_some());
        // Issuer is the CA's subject, subject is O=mayfly.
        assert_eq!(x.issuer().as_raw(), cax.subject().as_raw());
        assert_eq!(x.subject().to_string(), "O=mayfly");
        // notBefore ~ now - 10 s.
        let nb = x.validity().not_before.timestamp();
        assert!((now - 12..=now - 9).contains(&nb), "{nb} vs {now}");
        assert_eq!(secs(svid.not_before), nb);
        assert_eq!(secs(svid.not_after), x.validity().not_after.timestamp());
        // Serial: positive, non-zero, at most 16 octets, matches serial_hex.
        let raw = x.raw_serial();
        assert!(raw[0] & 0x80 == 0, "negative serial");
        assert!(raw.len() <= 16);
        assert!(raw.iter().any(|&b| b != 0));
        assert_eq!(svid.serial_hex, hex::encode(strip_leading_zeros(raw)));
        assert!(!svid.serial_hex.starts_with("00"));
        // ECDSA P-256 SHA-256 signature, P-256 subject key.
        assert_eq!(
            x.signature_algorithm.algorithm,
            x509_parser::oid_registry::OID_SIG_ECDSA_WITH_SHA256
        );
        assert_eq!(x.public_key().subject_public_key.data.len(), 65);
        // The key is PKCS#8 and belongs to the leaf.
        let kp = KeyPair::try_from(svid.key_pkcs8.as_slice()).unwrap();
        assert_eq!(
            kp.public_key_raw(),
            x.public_key().subject_public_key.data.as_ref()
        );
        assert!(std::ptr::eq(kp.algorithm(), &PKCS_ECDSA_P256_SHA256));
    }

    #[test]
    fn not_after_is_capped_and_rounded_down() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = embedded(tmp.path());
        let before = SystemTime::now();
        let cap = before + Duration::from_millis(3700);
        let svid = ca.issue_x509_svid(&id("/w"), cap).unwrap();
        assert!(svid.not_after <= cap);
        assert!(svid.not_after > before);
        assert_eq!(
            svid.not_after
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .subsec_nanos(),
            0
        );
        let (_, x) = x509_parser::parse_x509_certificate(&svid.leaf_der).unwrap();
        assert_eq!(x.validity().not_after.timestamp(), secs(svid.not_after));

        let far = SystemTime::now() + TTL * 10;
        let svid = ca.issue_x509_svid(&id("/w"), far).unwrap();
        assert_eq!(svid.not_after, ca.not_after());

        let past = SystemTime::now() - Duration::from_secs(1);
        let err = ca.issue_x509_svid(&id("/w"), past).unwrap_err();
        assert!(matches!(err, CaError::NoLifetime { .. }), "{err}");
        // Rounding down can also eat a sub-second cap.
        let err = ca
            .issue_x509_svid(&id("/w"), SystemTime::now())
            .unwrap_err();
        assert!(matches!(err, CaError::NoLifetime { .. }), "{err}");
    }

    #[test]
    fn serials_differ_and_debug_hides_the_key() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = embedded(tmp.path());
        let a = ca.issue_x509_svid(&id("/w"), in_an_hour()).unwrap();
        let b = ca.issue_x509_svid(&id("/w"), in_an_hour()).unwrap();
        assert_ne!(a.serial_hex, b.serial_hex);
        assert_ne!(*a.key_pkcs8, *b.key_pkcs8);
        let dbg = format!("{a:?}");
        assert!(dbg.contains("redacted"), "{dbg}");
        assert!(dbg.contains(&a.serial_hex));
        assert!(!dbg.contains(&hex::encode(&*a.key_pkcs8)));
        assert!(!dbg.contains(&format!("{:?}", &*a.key_pkcs8)));
        assert!(!dbg.contains(&format!("{:?}", &a.key_pkcs8[a.key_pkcs8.len() - 32..])));
        let dbg = format!("{ca:?}");
        assert!(dbg.contains("example.org"), "{dbg}");
    }

    #[test]
    fn refuses_foreign_or_pathless_ids() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = embedded(tmp.path());
        let foreign = SpiffeId::new("spiffe://other.org/w").unwrap();
        let err = ca.issue_x509_svid(&foreign, in_an_hour()).unwrap_err();
        assert!(matches!(err, CaError::ForeignTrustDomain { .. }), "{err}");
        let bare = SpiffeId::new("spiffe://example.org").unwrap();
        let err = ca.issue_x509_svid(&bare, in_an_hour()).unwrap_err();
        assert!(matches!(err, CaError::Issue { .. }), "{err}");
    }

    // ---- operator-provided CA -------------------------------------------

    struct TestCa {
        params: CertificateParams,
        key: KeyPair,
        pem: String,
    }

    fn ca_params(cn: &str, td: &str, path_len: Option<u8>) -> CertificateParams {
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

    fn make_root(td: &str) -> TestCa {
        let key = KeyPair::generate().unwrap();
        let mut params = ca_params("test root", td, None);
        params.use_authority_key_identifier_extension = false;
        let pem = params.self_signed(&key).unwrap().pem();
        TestCa { params, key, pem }
    }

    fn intermediate(parent: &TestCa, cn: &str, td: &str, key: KeyPair) -> TestCa {
        let params = ca_params(cn, td, Some(1));
        let issuer = Issuer::from_params(&parent.params, &parent.key);
        let pem = params.signed_by(&key, &issuer).unwrap().pem();
        TestCa { params, key, pem }
    }

    fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
        let p = dir.join(name);
        fs::write(&p, contents).unwrap();
        p
    }

    fn operator_source(dir: &Path, cert: &TestCa, bundle: Option<&TestCa>) -> CaSource {
        CaSource {
            cert_file: Some(write(dir, "int.pem", &cert.pem)),
            key_file: Some(write(dir, "int.key", &cert.key.serialize_pem())),
            chain_file: None,
            bundle_file: bundle.map(|b| write(dir, "root.pem", &b.pem)),
        }
    }

    #[test]
    fn operator_intermediate_ca_issues_verifiable_chain() {
        let tmp = tempfile::tempdir().unwrap();
        let root = make_root("example.org");
        let int = intermediate(
            &root,
            "test int",
            "example.org",
            KeyPair::generate().unwrap(),
        );
        let source = operator_source(tmp.path(), &int, Some(&root));
        let ca = SigningCa::load_or_create(tmp.path(), &td(), &source, TTL).unwrap();
        assert!(
            !tmp.path().join("ca").exists(),
            "operator CA must not create the embedded one"
        );
        assert_eq!(ca.roots_der().len(), 1);
        let int_der = split_ders(ca.signing_cert_der()).remove(0);

        let svid = ca.issue_x509_svid(&id("/w"), in_an_hour()).unwrap();
        let chain = split_ders(&svid.chain_der);
        assert_eq!(chain, vec![svid.leaf_der.clone(), int_der.clone()]);
        assert!(
            !chain.contains(&ca.roots_der()[0]),
            "root must not be in the chain"
        );
        webpki_verify(&svid.chain_der, ca.roots_der());
        spiffe::X509Svid::parse_from_der(&svid.chain_der, &svid.key_pkcs8).unwrap();

        // AKI matches the real intermediate's SKI.
        let (_, leaf) = x509_parser::parse_x509_certificate(&svid.leaf_der).unwrap();
        let (_, intx) = x509_parser::parse_x509_certificate(&int_der).unwrap();
        assert_eq!(authority_key_id(&leaf), subject_key_id(&intx));
        // The leaf cannot outlive the intermediate.
        let svid = ca
            .issue_x509_svid(&id("/w"), SystemTime::now() + TTL * 365)
            .unwrap();
        assert_eq!(secs(svid.not_after), intx.validity().not_after.timestamp());
    }

    #[test]
    fn operator_two_level_chain_and_p384_key() {
        let tmp = tempfile::tempdir().unwrap();
        let root = make_root("example.org");
        let int1 = intermediate(&root, "int 1", "example.org", KeyPair::generate().unwrap());
        let p384 = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
        let int2 = intermediate(&int1, "int 2", "example.org", p384);
        let mut source = operator_source(tmp.path(), &int2, Some(&root));
        source.chain_file = Some(write(tmp.path(), "chain.pem", &int1.pem));
        let ca = SigningCa::load_or_create(tmp.path(), &td(), &source, TTL).unwrap();
        let svid = ca.issue_x509_svid(&id("/w"), in_an_hour()).unwrap();
        let chain = split_ders(&svid.chain_der);
        assert_eq!(chain.len(), 3);
        let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
        assert_eq!(
            leaf.signature_algorithm.algorithm,
            x509_parser::oid_registry::OID_SIG_ECDSA_WITH_SHA384
        );
        webpki_verify(&svid.chain_der, ca.roots_der());
        spiffe::X509Svid::parse_from_der(&svid.chain_der, &svid.key_pkcs8).unwrap();

        // The chain in the wrong place is caught by name.
        let mut bad = source.clone();
        bad.chain_file = None;
        let err = SigningCa::load_or_create(tmp.path(), &td(), &bad, TTL).unwrap_err();
        assert!(matches!(err, CaError::Chain { .. }), "{err}");
    }

    #[test]
    fn operator_self_signed_root_is_its_own_bundle() {
        let tmp = tempfile::tempdir().unwrap();
        let root = make_root("example.org");
        let source = operator_source(tmp.path(), &root, None);
        let ca = SigningCa::load_or_create(tmp.path(), &td(), &source, TTL).unwrap();
        assert_eq!(ca.bundle_der(), ca.signing_cert_der());
        let svid = ca.issue_x509_svid(&id("/w"), in_an_hour()).unwrap();
        assert_eq!(svid.chain_der, svid.leaf_der);
        webpki_verify(&svid.chain_der, ca.roots_der());
    }

    #[test]
    fn operator_ca_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let root = make_root("example.org");
        let int = intermediate(
            &root,
            "test int",
            "example.org",
            KeyPair::generate().unwrap(),
        );

        // Non-self-signed without bundle.
        let source = operator_source(tmp.path(), &int, None);
        let err = SigningCa::load_or_create(tmp.path(), &td(), &source, TTL).unwrap_err();
        assert!(matches!(err, CaError::BundleRequired { .. }), "{err}");
        assert!(err.to_string().contains("int.pem") && err.to_string().contains("bundle_file"));

        // Mismatched key.
        let mut source = operator_source(tmp.path(), &int, Some(&root));
        source.key_file = Some(write(tmp.path(), "root.key", &root.key.serialize_pem()));
        let err = SigningCa::load_or_create(tmp.path(), &td(), &source, TTL).unwrap_err();
        assert!(matches!(err, CaError::KeyMismatch { .. }), "{err}");

        // Only one of cert/key.
        let mut half = operator_source(tmp.path(), &int, Some(&root));
        half.key_file = None;
        let err = SigningCa::load_or_create(tmp.path(), &td(), &half, TTL).unwrap_err();
        assert!(err.to_string().contains("key_file"), "{err}");

        // Another trust domain.
        let other_root = make_root("other.org");
        let other = intermediate(&other_root, "x", "other.org", KeyPair::generate().unwrap());
        let source = operator_source(tmp.path(), &other, Some(&other_root));
        let err = SigningCa::load_or_create(tmp.path(), &td(), &source, TTL).unwrap_err();
        assert!(matches!(err, CaError::InvalidCa { .. }), "{err}");
        assert!(err.to_string().contains("other.org"), "{err}");

        // Unsupported key formats are named.
        let mut source = operator_source(tmp.path(), &int, Some(&root));
        source.key_file = Some(write(
            tmp.path(),
            "sec1.key",
            "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n",
        ));
        let err = SigningCa::load_or_create(tmp.path(), &td(), &source, TTL).unwrap_err();
        assert!(matches!(err, CaError::UnsupportedKey { .. }), "{err}");
        assert!(err.to_string().contains("PKCS#8") && err.to_string().contains("sec1.key"));

        // A leaf certificate is not a CA.
        let mut leaf_params = ca_params("leaf", "example.org", None);
        leaf_params.is_ca = IsCa::ExplicitNoCa;
        let leaf_key = KeyPair::generate().unwrap();
        let leaf_pem = leaf_params
            .signed_by(&leaf_key, &Issuer::from_params(&root.params, &root.key))
            .unwrap()
            .pem();
        let source = CaSource {
            cert_file: Some(write(tmp.path(), "leaf.pem", &leaf_pem)),
            key_file: Some(write(tmp.path(), "leaf.key", &leaf_key.serialize_pem())),
            chain_file: None,
            bundle_file: Some(write(tmp.path(), "root.pem", &root.pem)),
        };
        let err = SigningCa::load_or_create(tmp.path(), &td(), &source, TTL).unwrap_err();
        assert!(err.to_string().contains("not a CA"), "{err}");

        // Expired CA.
        let mut old = ca_params("old", "example.org", None);
        old.not_after = OffsetDateTime::now_utc() - time::Duration::minutes(1);
        let old_key = KeyPair::generate().unwrap();
        let old_pem = old.self_signed(&old_key).unwrap().pem();
        let source = CaSource {
            cert_file: Some(write(tmp.path(), "old.pem", &old_pem)),
            key_file: Some(write(tmp.path(), "old.key", &old_key.serialize_pem())),
            ..CaSource::default()
        };
        let err = SigningCa::load_or_create(tmp.path(), &td(), &source, TTL).unwrap_err();
        assert!(err.to_string().contains("expired"), "{err}");
    }
}
