//! Checks that the configured certificates form one usable path to the
//! bundle roots, so that operator mix-ups fail at start-up with a clear message
//! instead of in every handshake.

use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use sha2::Digest;

use rcgen::{Issuer, KeyPair};
use spiffe::{SpiffeId, TrustDomain};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};

use super::{from_unix, unix_now, CaError, CertFile, SigningCa};

impl SigningCa {
    /// Validates a signing cert + key + intermediates + roots as a whole and
    /// builds the CA from them.
    pub(super) fn assemble(
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
        let roots_path = roots[0].path.clone();
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
        let fingerprint = sha2::Sha256::digest(&cert.der).into();
        let ca = SigningCa {
            trust_domain: trust_domain.clone(),
            issuer,
            signing_cert_der: cert.der,
            intermediates_der,
            roots_der: roots.into_iter().map(|r| r.der).collect(),
            bundle_der,
            not_before: from_unix(not_before),
            not_after: from_unix(not_after),
            fingerprint,
            latest_leaf_not_after: AtomicU64::new(0),
        };

        // rcgen re-encodes the issuer name from its parsed form; if that does
        // not reproduce the CA's subject bytes exactly, relying parties could
        // not chain our leaves (RFC 5280 §7.1 name matching is bytewise in
        // practice). Prove it once now instead of failing every handshake.
        let probe_id = SpiffeId::new(format!("{}/mayfly/ca-self-check", trust_domain.id_string()))
            .map_err(|e| CaError::Create(format!("self-check SPIFFE ID: {e}")))?;
        let probe = ca.issue_x509_svid(&probe_id, SystemTime::now() + Duration::from_secs(60))?;
        // The probe is never handed out: it keeps no root in the bundle.
        ca.latest_leaf_not_after
            .store(0, std::sync::atomic::Ordering::Release);
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
        // The names chain; now prove the signatures do, from a leaf to a bundle root, as a
        // relying party will check them.
        verify_to_roots(&probe.chain_der, &ca.roots_der).map_err(|problem| CaError::Chain {
            path: roots_path,
            problem: format!(
                "an SVID signed by {} does not verify to the bundle: {problem}",
                cert.path.display()
            ),
        })?;
        Ok(ca)
    }
}

/// Verifies a leaf's chain (leaf first, concatenated DER) to `roots` for TLS client use.
fn verify_to_roots(chain_der: &[u8], roots: &[Vec<u8>]) -> Result<(), String> {
    use rustls_pki_types::{CertificateDer, UnixTime};
    let mut certs = Vec::new();
    let mut rest = chain_der;
    while !rest.is_empty() {
        let (after, _) = x509_parser::parse_x509_certificate(rest).map_err(|e| e.to_string())?;
        certs.push(CertificateDer::from(&rest[..rest.len() - after.len()]));
        rest = after;
    }
    let anchors = roots
        .iter()
        .map(|r| {
            webpki::anchor_from_trusted_cert(&CertificateDer::from(r.as_slice()))
                .map(|a| a.to_owned())
                .map_err(|e| format!("a bundle root is no trust anchor: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let (leaf, intermediates) = certs.split_first().ok_or("empty chain")?;
    let ee = webpki::EndEntityCert::try_from(leaf).map_err(|e| e.to_string())?;
    let algs = rustls::crypto::ring::default_provider()
        .signature_verification_algorithms
        .all;
    ee.verify_for_usage(
        algs,
        &anchors,
        intermediates,
        UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map(|_| ())
    .map_err(|e| format!("{e:?}"))
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

pub(super) fn subject_key_id(x: &X509Certificate<'_>) -> Option<Vec<u8>> {
    x.iter_extensions()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        })
}

pub(super) fn authority_key_id(x: &X509Certificate<'_>) -> Option<Vec<u8>> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::x509::test_support::*;
    use crate::authority::x509::CaSource;
    use rcgen::{IsCa, PKCS_ECDSA_P384_SHA384};
    use time::OffsetDateTime;

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
