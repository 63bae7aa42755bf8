//! TLS server authentication as SPIFFE peers do it: the server's certificate must be an
//! X509-SVID that chains to given roots, and its SPIFFE ID must be one the caller accepts. No
//! host name is checked: under SPIFFE authentication the identity is the SPIFFE ID, not the
//! network address (SPIFFE Federation §5.2.2.4: the server certificate "is a valid X509-SVID
//! for the bundle endpoint SPIFFE ID"). The leaf rules are X509-SVID §5.2's.

use std::fmt;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};

/// Decides whether a verified server's SPIFFE ID is the one expected; `Err` says why not.
type Accept = dyn Fn(&str) -> Result<(), String> + Send + Sync;

/// A rustls server certificate verifier for X509-SVIDs.
pub struct SpiffeServerVerifier {
    roots: Vec<TrustAnchor<'static>>,
    accept: Box<Accept>,
    algs: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeServerVerifier")
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

impl SpiffeServerVerifier {
    /// Trusts `roots` (DER certificates); `accept` judges the server's SPIFFE ID once its chain
    /// is verified.
    pub fn new(
        roots: &[CertificateDer<'_>],
        accept: impl Fn(&str) -> Result<(), String> + Send + Sync + 'static,
    ) -> Result<Self, String> {
        let roots = roots
            .iter()
            .map(|r| {
                webpki::anchor_from_trusted_cert(r)
                    .map(|a| a.to_owned())
                    .map_err(|e| format!("a root certificate: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            roots,
            accept: Box::new(accept),
            algs: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        })
    }

    /// Trusts `roots` for a server that must be exactly `id`.
    pub fn exactly(roots: &[CertificateDer<'_>], id: String) -> Result<Self, String> {
        Self::new(roots, move |got| {
            if got == id {
                Ok(())
            } else {
                Err(format!("the server is {got}, not {id}"))
            }
        })
    }

    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), String> {
        let ee = webpki::EndEntityCert::try_from(end_entity).map_err(|e| e.to_string())?;
        // webpki refuses an end entity with cA=true (X509-SVID §5.2's first rule).
        ee.verify_for_usage(
            self.algs.all,
            &self.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| e.to_string())?;
        leaf_may_not_sign(end_entity.as_ref())?;
        let id = crate::authority::x509::identity_of(end_entity.as_ref())?;
        (self.accept)(&id)
    }
}

/// X509-SVID §5.2: a leaf SVID has neither keyCertSign nor cRLSign.
fn leaf_may_not_sign(der: &[u8]) -> Result<(), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    match cert.key_usage() {
        Ok(Some(ku)) if ku.value.key_cert_sign() || ku.value.crl_sign() => {
            Err("not an X509-SVID leaf: its key usage allows signing certificates or CRLs".into())
        }
        Ok(_) => Ok(()),
        Err(e) => Err(format!("key usage: {e}")),
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verify(end_entity, intermediates, now)
            .map(|()| ServerCertVerified::assertion())
            .map_err(|e| rustls::Error::General(format!("server certificate: {e}")))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::federation::testing::{issue, root, server_params};
    use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose};

    fn leaf(
        issuer: &rcgen::CertifiedIssuer<'static, KeyPair>,
        uris: &[&str],
        tweak: impl FnOnce(&mut CertificateParams),
    ) -> Vec<u8> {
        let mut params = server_params(uris, &[]);
        tweak(&mut params);
        issue(issuer, params).chain[0].to_vec()
    }

    const ID: &str = "spiffe://bob.example/bundle-endpoint";

    fn check(roots: &[Vec<u8>], leaf: &[u8]) -> Result<(), String> {
        let roots: Vec<_> = roots
            .iter()
            .map(|r| CertificateDer::from(r.as_slice()))
            .collect();
        SpiffeServerVerifier::exactly(&roots, ID.into())
            .unwrap()
            .verify(&CertificateDer::from(leaf), &[], UnixTime::now())
    }

    #[test]
    fn an_x509_svid_with_the_expected_id_from_a_trusted_root_passes() {
        let (r, issuer) = root("bob.example");
        check(&[r], &leaf(&issuer, &[ID], |_| {})).unwrap();
    }

    #[test]
    fn anything_else_is_refused() {
        let (r, issuer) = root("bob.example");
        let (_, other) = root("bob.example");
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                leaf(&issuer, &["spiffe://bob.example/other"], |_| {}),
                "the server is spiffe://bob.example/other, not",
            ),
            // Same issuer name, another key.
            (leaf(&other, &[ID], |_| {}), "InvalidSignatureForPublicKey"),
            (
                leaf(&issuer, &[ID, "spiffe://bob.example/b"], |_| {}),
                "URI SANs",
            ),
            (
                leaf(&issuer, &[ID], |p| {
                    p.key_usages.push(KeyUsagePurpose::KeyCertSign);
                }),
                "not an X509-SVID leaf",
            ),
            (
                leaf(&issuer, &[ID], |p| {
                    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
                }),
                "RequiredEkuNotFound",
            ),
            (
                leaf(&issuer, &[], |p| {
                    p.distinguished_name.push(rcgen::DnType::CommonName, ID);
                }),
                "the server is cn:",
            ),
        ];
        for (cert, expect) in cases {
            let err = check(std::slice::from_ref(&r), &cert).unwrap_err();
            assert!(err.contains(expect), "{expect}: {err}");
        }
        // No roots, no trust.
        let err = check(&[], &leaf(&issuer, &[ID], |_| {})).unwrap_err();
        assert!(err.contains("UnknownIssuer"), "{err}");
    }
}
