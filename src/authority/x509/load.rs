//! Where the signing CA comes from: the operator's CA files, or the embedded
//! root that is created on first start and reused from the data dir after.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use spiffe::TrustDomain;
use zeroize::Zeroizing;

use super::files::{
    create_private_dir, exists, read_certs_pem, read_key_pem, warn_if_key_readable_by_others,
    write_atomic,
};
use super::issue::random_serial;
use super::{odt, unix_secs, CaError, CaSource, CertFile, SigningCa, BACKDATE, SUBJECT_ORG};

/// Sub-directory of the data dir that holds the embedded CA.
const CA_DIR: &str = "ca";
const CA_CERT_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca.key";

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::x509::chain::subject_key_id;
    use crate::authority::x509::test_support::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use x509_parser::extensions::GeneralName;

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
}
