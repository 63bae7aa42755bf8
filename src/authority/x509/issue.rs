//! Minting one X509-SVID: a fresh key, the leaf profile of the SPIFFE standard,
//! and a random serial, signed by the CA.

use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::string::Ia5String;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use ring::rand::{SecureRandom, SystemRandom};
use spiffe::SpiffeId;
use zeroize::Zeroizing;

use super::{from_unix_u, odt, unix_secs, CaError, IssuedX509, SigningCa, BACKDATE, SUBJECT_ORG};

/// A host name a server's SVID carries beside its SPIFFE ID, for TLS clients that check the
/// host they dialled (gRPC C-core, browsers) rather than a SPIFFE ID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostName {
    Dns(String),
    Ip(IpAddr),
}

impl std::str::FromStr for HostName {
    type Err = String;

    /// An IP address, or a DNS name as TLS clients match it: letters, digits and hyphens in
    /// dot-separated labels, no wildcard; kept in lower case.
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(HostName::Ip(ip));
        }
        let valid = !s.is_empty()
            && s.len() <= 253
            && s.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if valid {
            Ok(HostName::Dns(s.to_ascii_lowercase()))
        } else {
            Err(
                "not an IP address or a DNS name (letters, digits, hyphens and dots; no wildcard)"
                    .into(),
            )
        }
    }
}

impl SigningCa {
    /// Issue a workload's leaf. `not_after` is the caller's cap; the leaf's notAfter is
    /// min(`not_after`, CA notAfter) rounded down to whole seconds. Error if
    /// that is not after now.
    pub fn issue_x509_svid(
        &self,
        spiffe_id: &SpiffeId,
        not_after: SystemTime,
    ) -> Result<IssuedX509, CaError> {
        self.issue_leaf(spiffe_id, not_after, &[])
    }

    /// Issue a leaf for one of the agent's own servers: a workload's leaf that also names
    /// `hosts`, so that clients checking host names accept it. Workload SVIDs never carry a
    /// host name, so no workload can pose as such a server to those clients.
    pub fn issue_server_svid(
        &self,
        spiffe_id: &SpiffeId,
        not_after: SystemTime,
        hosts: &[HostName],
    ) -> Result<IssuedX509, CaError> {
        self.issue_leaf(spiffe_id, not_after, hosts)
    }

    fn issue_leaf(
        &self,
        spiffe_id: &SpiffeId,
        not_after: SystemTime,
        hosts: &[HostName],
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
        // §2: exactly one URI SAN, the SPIFFE ID. Other SAN types are allowed; only the
        // agent's own servers get any (host names).
        let uri = Ia5String::try_from(id.clone()).map_err(|e| issue_err(e.to_string()))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        for host in hosts {
            params.subject_alt_names.push(match host {
                HostName::Dns(name) => SanType::DnsName(
                    Ia5String::try_from(name.as_str()).map_err(|e| issue_err(e.to_string()))?,
                ),
                HostName::Ip(ip) => SanType::IpAddress(*ip),
            });
        }
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

        self.latest_leaf_not_after
            .fetch_max(na_secs, std::sync::atomic::Ordering::AcqRel);
        Ok(IssuedX509 {
            spiffe_id: spiffe_id.clone(),
            chain_der,
            leaf_der,
            key_pkcs8: Zeroizing::new(key.serialize_der()),
            serial_hex: serial_hex(&serial),
            not_before: from_unix_u(nb_secs),
            not_after: leaf_not_after,
            signed_by: self.fingerprint,
        })
    }
}

/// 128 random bits with the top bit cleared: RFC 5280 §4.1.2.2 wants a
/// positive serial of at most 20 octets, and CA/B Forum practice wants at
/// least 64 unpredictable bits. Never zero.
pub(super) fn random_serial() -> Result<[u8; 16], String> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::x509::chain::{authority_key_id, subject_key_id};
    use crate::authority::x509::test_support::*;
    use crate::authority::x509::CaError;
    use std::time::Duration;
    use x509_parser::extensions::GeneralName;

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

    #[test]
    fn a_server_svid_names_its_hosts_beside_its_one_spiffe_id() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = embedded(tmp.path());
        let hosts: Vec<HostName> = ["Mayfly-Admin.mayfly-system.svc", "10.0.0.7", "::1"]
            .iter()
            .map(|h| h.parse().unwrap())
            .collect();
        let svid = ca
            .issue_server_svid(&id("/mayfly/agent/node-a"), in_an_hour(), &hosts)
            .unwrap();
        let (_, x) = x509_parser::parse_x509_certificate(&svid.leaf_der).unwrap();
        let san = x.subject_alternative_name().unwrap().unwrap();
        let v4: &[u8] = &[10, 0, 0, 7];
        let v6: &[u8] = &std::net::Ipv6Addr::LOCALHOST.octets();
        assert_eq!(
            san.value.general_names,
            vec![
                GeneralName::URI("spiffe://example.org/mayfly/agent/node-a"),
                GeneralName::DNSName("mayfly-admin.mayfly-system.svc"),
                GeneralName::IPAddress(v4),
                GeneralName::IPAddress(v6),
            ]
        );
        // Still an X509-SVID to SPIFFE validators (one URI SAN), and a server certificate for
        // its host names to WebPKI ones.
        let parsed = spiffe::X509Svid::parse_from_der(&svid.chain_der, &svid.key_pkcs8).unwrap();
        assert_eq!(parsed.spiffe_id(), &id("/mayfly/agent/node-a"));
        let leaf = rustls::pki_types::CertificateDer::from(svid.leaf_der.as_slice());
        let cert = webpki::EndEntityCert::try_from(&leaf).unwrap();
        for name in ["mayfly-admin.mayfly-system.svc", "10.0.0.7"] {
            let name = rustls::pki_types::ServerName::try_from(name).unwrap();
            cert.verify_is_valid_for_subject_name(&name).unwrap();
        }
        let other = rustls::pki_types::ServerName::try_from("mayfly-admin").unwrap();
        assert!(cert.verify_is_valid_for_subject_name(&other).is_err());
        // A workload's SVID names no host.
        let workload = ca.issue_x509_svid(&id("/w"), in_an_hour()).unwrap();
        let leaf = rustls::pki_types::CertificateDer::from(workload.leaf_der.as_slice());
        let cert = webpki::EndEntityCert::try_from(&leaf).unwrap();
        let name =
            rustls::pki_types::ServerName::try_from("mayfly-admin.mayfly-system.svc").unwrap();
        assert!(cert.verify_is_valid_for_subject_name(&name).is_err());
    }

    #[test]
    fn host_names_are_ip_addresses_or_plain_dns_names() {
        assert_eq!(
            "Node-A.Example.org".parse(),
            Ok(HostName::Dns("node-a.example.org".into()))
        );
        assert_eq!(
            "127.0.0.1".parse(),
            Ok(HostName::Ip(std::net::Ipv4Addr::LOCALHOST.into()))
        );
        for bad in [
            "",
            "*.example.org",
            "a..b",
            "-a.b",
            "a-.b",
            "a b",
            "spiffe://x/y",
            "é.org",
        ] {
            assert!(bad.parse::<HostName>().is_err(), "{bad:?} accepted");
        }
        assert!(format!("{}.org", "a".repeat(64))
            .parse::<HostName>()
            .is_err());
    }
}
