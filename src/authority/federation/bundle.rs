//! A foreign trust domain's SPIFFE bundle: the JWK Set of the SPIFFE Trust Domain and Bundle
//! standard (§4), read into the X.509 roots and JWT keys the Workload API hands to workloads.
//!
//! The standard's consumer rules are applied exactly: an element whose `use` is missing or
//! unknown, or whose `kty` is missing or unknown, is ignored (§4.1.3, §4.2.1, §4.2.2); an
//! `x509-svid` element without certificates is ignored and only its first certificate counts
//! (X509-SVID §6.2); an empty `keys` array is a valid bundle that revokes every key (§4.1.3).
//! What is malformed rather than unknown (a certificate that does not parse, a JWT key without
//! `kid` or with a point off its curve, a `spiffe_sequence` that is no integer) makes the whole
//! document invalid: serving the rest would silently drop a root or a key.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use ring::agreement;
use ring::rand::SystemRandom;
use serde_json::{Map, Value};
use spiffe::TrustDomain;

/// The largest bundle document read from a file or an endpoint. Real bundles are a few KiB;
/// the bound keeps a hostile or broken source from costing more than this much memory.
pub const MAX_BUNDLE_BYTES: usize = 1024 * 1024;

/// JWK members that only a private key has (RFC 7518 §6.2.2, §6.3.2, §6.4): a bundle that
/// carries them leaks a key, and the agent does not pass it on.
const PRIVATE_MEMBERS: [&str; 8] = ["d", "p", "q", "dp", "dq", "qi", "oth", "k"];

/// One foreign trust domain's bundle as the agent serves it.
#[derive(Clone, PartialEq, Eq)]
pub struct FederatedBundle {
    pub trust_domain: TrustDomain,
    /// The `x509-svid` CA certificates, DER, in document order.
    pub x509_roots_der: Vec<Vec<u8>>,
    /// The `jwt-svid` JWKs as the document gave them (`use` and `kid` included).
    pub jwt_keys: Vec<Value>,
    /// `spiffe_sequence`, if set.
    pub sequence: Option<u64>,
    /// `spiffe_refresh_hint`, if set.
    pub refresh_hint: Option<Duration>,
}

impl fmt::Debug for FederatedBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FederatedBundle")
            .field("trust_domain", &self.trust_domain.as_str())
            .field("x509_roots", &self.x509_roots_der.len())
            .field("jwt_keys", &self.jwt_keys.len())
            .field("sequence", &self.sequence)
            .field("refresh_hint", &self.refresh_hint)
            .finish()
    }
}

/// Why a bundle document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("larger than {} bytes", MAX_BUNDLE_BYTES)]
    TooLarge,
    #[error("not a SPIFFE bundle (JSON JWK Set): {0}")]
    Json(String),
    #[error("keys[{index}]: {problem}")]
    Key { index: usize, problem: String },
    #[error("two jwt-svid keys have kid {0:?}; a token's key would be ambiguous")]
    DuplicateKid(String),
    #[error("not PEM: {0}")]
    Pem(String),
    #[error("PEM without any CERTIFICATE block")]
    NoCertificates,
    #[error("PEM certificate {index}: {problem}")]
    PemCertificate { index: usize, problem: String },
    #[error("neither a SPIFFE bundle (JSON) nor PEM certificates")]
    UnknownFormat,
}

/// The top level of the document; a derived struct so that a member given twice is refused
/// rather than one of the two silently chosen.
#[derive(serde::Deserialize)]
struct Document {
    keys: Vec<Value>,
    spiffe_sequence: Option<u64>,
    spiffe_refresh_hint: Option<u64>,
}

/// The same document again, to refuse a JWK whose members we read are given twice. Its fields
/// are there for serde's duplicate-member check, never read.
#[derive(serde::Deserialize)]
#[allow(dead_code)]
struct DocumentFields {
    keys: Vec<JwkFields>,
}

#[derive(serde::Deserialize)]
#[allow(dead_code)]
struct JwkFields {
    #[serde(rename = "use")]
    use_: Option<Value>,
    kty: Option<Value>,
    kid: Option<Value>,
    x5c: Option<Value>,
    crv: Option<Value>,
    x: Option<Value>,
    y: Option<Value>,
    n: Option<Value>,
    e: Option<Value>,
}

/// What one JWK element is to us.
enum Element {
    Root(Vec<u8>),
    JwtKey { kid: String, jwk: Value },
    Ignored(String),
}

impl FederatedBundle {
    /// Parses a SPIFFE bundle document (JSON) for `trust_domain`.
    pub fn parse(trust_domain: &TrustDomain, doc: &[u8]) -> Result<Self, BundleError> {
        if doc.len() > MAX_BUNDLE_BYTES {
            return Err(BundleError::TooLarge);
        }
        // §5.2.1.3 of the Federation standard: UTF-8. serde_json does not check the strings it
        // skips, so the whole document is checked here.
        std::str::from_utf8(doc).map_err(|e| BundleError::Json(format!("not UTF-8: {e}")))?;
        let json = |e: serde_json::Error| BundleError::Json(e.to_string());
        let parsed: Document = serde_json::from_slice(doc).map_err(json)?;
        let mut bundle = FederatedBundle {
            trust_domain: trust_domain.clone(),
            x509_roots_der: Vec::new(),
            jwt_keys: Vec::new(),
            sequence: parsed.spiffe_sequence,
            refresh_hint: parsed.spiffe_refresh_hint.map(Duration::from_secs),
        };
        let mut kids = BTreeSet::new();
        for (index, key) in parsed.keys.into_iter().enumerate() {
            let element = element(key).map_err(|problem| BundleError::Key { index, problem })?;
            match element {
                Element::Root(der) => bundle.x509_roots_der.push(der),
                Element::JwtKey { kid, jwk } => {
                    if !kids.insert(kid.clone()) {
                        return Err(BundleError::DuplicateKid(kid));
                    }
                    bundle.jwt_keys.push(jwk);
                }
                Element::Ignored(why) => tracing::debug!(
                    event = "federated_bundle_key_ignored",
                    trust_domain = %trust_domain,
                    index,
                    reason = %why,
                ),
            }
        }
        // Every element is an object by now, so this only finds members given twice.
        serde_json::from_slice::<DocumentFields>(doc).map_err(json)?;
        Ok(bundle)
    }

    /// Parses a bundle file: a SPIFFE bundle document, or PEM certificates that are the
    /// trust domain's X.509 roots (the standard allows PEM for a bootstrap bundle, §5.2.2.2 of
    /// the Federation standard).
    pub fn parse_file(trust_domain: &TrustDomain, contents: &[u8]) -> Result<Self, BundleError> {
        if contents.len() > MAX_BUNDLE_BYTES {
            return Err(BundleError::TooLarge);
        }
        let start = contents
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .map_or(&[][..], |i| &contents[i..]);
        if start.starts_with(b"{") {
            Self::parse(trust_domain, contents)
        } else if start.starts_with(b"-----BEGIN") {
            Self::parse_pem(trust_domain, contents)
        } else {
            Err(BundleError::UnknownFormat)
        }
    }

    fn parse_pem(trust_domain: &TrustDomain, contents: &[u8]) -> Result<Self, BundleError> {
        Ok(FederatedBundle {
            trust_domain: trust_domain.clone(),
            x509_roots_der: pem_certificates(contents)?,
            jwt_keys: Vec::new(),
            sequence: None,
            refresh_hint: None,
        })
    }

    /// The JWT keys as a JWK Set, `{"keys":[...]}`: what the Workload API's JWT bundle map
    /// carries for this trust domain.
    pub fn jwks_document(&self) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({ "keys": self.jwt_keys }))
            .expect("serializing a JSON value cannot fail")
    }

    /// The X.509 roots as concatenated DER: what the Workload API's federated bundle map
    /// carries for this trust domain.
    pub fn x509_bundle_der(&self) -> Vec<u8> {
        self.x509_roots_der.concat()
    }

    /// Whether a workload would see the same keys in both (order and the sequence number
    /// aside).
    pub fn same_keys(&self, other: &FederatedBundle) -> bool {
        let roots = |b: &FederatedBundle| b.x509_roots_der.iter().cloned().collect::<BTreeSet<_>>();
        let jwks = |b: &FederatedBundle| {
            b.jwt_keys
                .iter()
                .map(Value::to_string)
                .collect::<BTreeSet<_>>()
        };
        self.trust_domain == other.trust_domain
            && roots(self) == roots(other)
            && jwks(self) == jwks(other)
    }
}

/// The CERTIFICATE blocks of a PEM file, each a usable CA certificate; at least one.
pub fn pem_certificates(contents: &[u8]) -> Result<Vec<Vec<u8>>, BundleError> {
    if contents.len() > MAX_BUNDLE_BYTES {
        return Err(BundleError::TooLarge);
    }
    let blocks = pem::parse_many(contents).map_err(|e| BundleError::Pem(e.to_string()))?;
    let mut certs = Vec::new();
    for block in blocks.into_iter().filter(|b| b.tag() == "CERTIFICATE") {
        let der = block.into_contents();
        check_certificate(&der).map_err(|problem| BundleError::PemCertificate {
            index: certs.len(),
            problem,
        })?;
        certs.push(der);
    }
    if certs.is_empty() {
        return Err(BundleError::NoCertificates);
    }
    Ok(certs)
}

fn element(key: Value) -> Result<Element, String> {
    let Value::Object(members) = key else {
        return Err("not a JSON object (a JWK)".into());
    };
    // §4.2.2: a missing or unknown `use` means the element is not for us.
    let use_ = match members.get("use") {
        Some(Value::String(u)) => u.clone(),
        Some(_) => return Ok(Element::Ignored("`use` is not a string".into())),
        None => return Ok(Element::Ignored("no `use`".into())),
    };
    // §4.2.1: `kty` must be set; an element of an unknown key type is ignored.
    let kty = match members.get("kty") {
        Some(Value::String(k)) => k.clone(),
        _ => return Ok(Element::Ignored("no `kty`".into())),
    };
    match use_.as_str() {
        "x509-svid" => x509_svid(&members, &kty),
        "jwt-svid" => jwt_svid(members, &kty),
        other => Ok(Element::Ignored(format!("unknown use {other:?}"))),
    }
}

/// X509-SVID §6.2.
fn x509_svid(members: &Map<String, Value>, kty: &str) -> Result<Element, String> {
    // The asymmetric key types of the JOSE registry; a CA certificate has one of them.
    if !matches!(kty, "EC" | "RSA" | "OKP") {
        return Ok(Element::Ignored(format!("unknown kty {kty:?}")));
    }
    let first = match members.get("x5c") {
        Some(Value::Array(certs)) => match certs.first() {
            Some(first) => first,
            None => return Ok(Element::Ignored("x509-svid without certificates".into())),
        },
        None => return Ok(Element::Ignored("x509-svid without x5c".into())),
        Some(_) => return Err("x5c: not an array".into()),
    };
    // RFC 7517 §4.7: standard base64 (not base64url) of the DER certificate.
    let Value::String(b64) = first else {
        return Err("x5c[0]: not a string".into());
    };
    let der = STANDARD
        .decode(b64)
        .map_err(|e| format!("x5c[0]: not base64: {e}"))?;
    check_certificate(&der).map_err(|e| format!("x5c[0]: {e}"))?;
    Ok(Element::Root(der))
}

/// A CA certificate both the TLS stack (as a trust anchor) and X.509 parsing accept.
fn check_certificate(der: &[u8]) -> Result<(), String> {
    let (rest, _) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    if !rest.is_empty() {
        return Err("trailing bytes after the certificate".into());
    }
    let cert = rustls_pki_types::CertificateDer::from(der);
    webpki::anchor_from_trusted_cert(&cert)
        .map_err(|e| format!("not usable as a trust anchor: {e}"))?;
    Ok(())
}

/// JWT-SVID §6. The key types JWT-SVID's algorithms use (RS*, PS*: RSA; ES256, ES384: EC on
/// P-256, P-384) are checked so that a workload's JOSE library can load them: one bad key
/// makes go-jose refuse the whole JWK Set, and with it every trust domain's JWT bundle.
fn jwt_svid(members: Map<String, Value>, kty: &str) -> Result<Element, String> {
    let field = |name: &str| match members.get(name) {
        Some(Value::String(s)) => Ok(s.as_str()),
        Some(_) => Err(format!("{name}: not a string")),
        None => Err(format!("no {name}")),
    };
    match kty {
        "EC" => {
            let (len, alg) = match field("crv")? {
                "P-256" => (32, &agreement::ECDH_P256),
                "P-384" => (48, &agreement::ECDH_P384),
                // ES512 has no verifier in ring or in the spiffe crate.
                other => return Ok(Element::Ignored(format!("unsupported EC curve {other:?}"))),
            };
            let mut point = vec![0x04];
            for c in ["x", "y"] {
                let bytes = URL_SAFE_NO_PAD
                    .decode(field(c)?)
                    .map_err(|e| format!("{c}: not base64url: {e}"))?;
                if bytes.len() != len {
                    return Err(format!("{c}: {} bytes, not {len}", bytes.len()));
                }
                point.extend_from_slice(&bytes);
            }
            if !on_curve(alg, &point) {
                return Err("the EC point is not on its curve".into());
            }
        }
        "RSA" => {
            for c in ["n", "e"] {
                let bytes = URL_SAFE_NO_PAD
                    .decode(field(c)?)
                    .map_err(|e| format!("{c}: not base64url: {e}"))?;
                if bytes.iter().all(|b| *b == 0) {
                    return Err(format!("{c}: zero"));
                }
            }
        }
        other => return Ok(Element::Ignored(format!("unknown kty {other:?}"))),
    }
    if let Some(private) = PRIVATE_MEMBERS.iter().find(|m| members.contains_key(**m)) {
        return Err(format!("carries private key member {private:?}"));
    }
    // JWT-SVID §6.1: `kid` must be set; without it no token can name the key.
    let kid = match members.get("kid") {
        Some(Value::String(kid)) if !kid.is_empty() => kid.clone(),
        _ => return Err("a jwt-svid key without kid (JWT-SVID §6.1)".into()),
    };
    Ok(Element::JwtKey {
        kid,
        jwk: Value::Object(members),
    })
}

/// Whether `point` (uncompressed SEC 1) is a valid public key on the curve of `alg`. ring has
/// no call that only validates a public key, but ECDH validates the peer's key before using it
/// (NIST SP 800-56A), so an agreement with a throwaway key answers the question.
fn on_curve(alg: &'static agreement::Algorithm, point: &[u8]) -> bool {
    let rng = SystemRandom::new();
    let Ok(ours) = agreement::EphemeralPrivateKey::generate(alg, &rng) else {
        return false;
    };
    agreement::agree_ephemeral(ours, &agreement::UnparsedPublicKey::new(alg, point), |_| ()).is_ok()
}

#[cfg(test)]
pub(super) mod test_support {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType,
    };
    use serde_json::json;

    /// A self-signed CA of `td`, as a trust domain's root: (certificate DER, its issuer).
    pub(in crate::authority::federation) fn root(
        td: &str,
    ) -> (Vec<u8>, rcgen::CertifiedIssuer<'static, KeyPair>) {
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::OrganizationName, td);
        p.subject_alt_names = vec![SanType::URI(format!("spiffe://{td}").try_into().unwrap())];
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = rcgen::CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap();
        (issuer.der().to_vec(), issuer)
    }

    pub(in crate::authority::federation) fn x509_jwk(der: &[u8]) -> Value {
        json!({"use": "x509-svid", "kty": "EC", "crv": "P-256", "x5c": [STANDARD.encode(der)]})
    }

    /// A real EC public key as a jwt-svid JWK.
    pub(in crate::authority::federation) fn jwt_jwk(kid: &str) -> Value {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let point = key.public_key_raw();
        json!({
            "use": "jwt-svid", "kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        })
    }

    pub(in crate::authority::federation) fn document(
        keys: Vec<Value>,
        sequence: Option<u64>,
    ) -> Vec<u8> {
        let mut doc = json!({"keys": keys, "spiffe_refresh_hint": 300});
        if let Some(seq) = sequence {
            doc["spiffe_sequence"] = json!(seq);
        }
        serde_json::to_vec_pretty(&doc).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;
    use serde_json::json;

    fn td() -> TrustDomain {
        TrustDomain::new("partner.example").unwrap()
    }

    fn parse(doc: &[u8]) -> Result<FederatedBundle, BundleError> {
        FederatedBundle::parse(&td(), doc)
    }

    fn parse_keys(keys: Vec<Value>) -> Result<FederatedBundle, BundleError> {
        parse(&document(keys, Some(1)))
    }

    #[test]
    fn a_bundle_yields_roots_jwt_keys_sequence_and_refresh_hint() {
        let (r1, _) = root("partner.example");
        let (r2, _) = root("partner.example");
        let b = parse(&document(
            vec![x509_jwk(&r1), jwt_jwk("k1"), x509_jwk(&r2)],
            Some(7),
        ))
        .unwrap();
        assert_eq!(b.trust_domain, td());
        assert_eq!(b.x509_roots_der, vec![r1.clone(), r2.clone()]);
        assert_eq!(b.jwt_keys.len(), 1);
        assert_eq!(b.sequence, Some(7));
        assert_eq!(b.refresh_hint, Some(Duration::from_secs(300)));
        assert_eq!(b.x509_bundle_der(), [r1, r2].concat());

        // Without the optional members (§4.1.1, §4.1.2 are SHOULDs).
        let b = parse(br#"{"keys": []}"#).unwrap();
        assert_eq!((b.sequence, b.refresh_hint), (None, None));
    }

    #[test]
    fn the_jwks_document_holds_the_jwt_keys_as_given_and_the_spiffe_crate_reads_it() {
        let (r, _) = root("partner.example");
        let k1 = jwt_jwk("k1");
        let k2 = jwt_jwk("k2");
        let b = parse_keys(vec![x509_jwk(&r), k1.clone(), k2.clone()]).unwrap();
        let jwks: Value = serde_json::from_slice(&b.jwks_document()).unwrap();
        assert_eq!(jwks, json!({"keys": [k1, k2]}));
        assert_eq!(jwks["keys"][0]["use"], "jwt-svid");
        assert_eq!(jwks["keys"][0]["kid"], "k1");
        let bundle = spiffe::JwtBundle::from_jwt_authorities(td(), &b.jwks_document()).unwrap();
        assert!(bundle.find_jwt_authority("k1").is_some());
        assert!(bundle.find_jwt_authority("k2").is_some());
    }

    #[test]
    fn an_empty_key_set_is_a_valid_bundle_that_revokes_everything() {
        // §4.1.3: an empty `keys` array, or one whose elements are all ignored.
        let b = parse_keys(vec![]).unwrap();
        assert!(b.x509_roots_der.is_empty() && b.jwt_keys.is_empty());
        let b = parse_keys(vec![json!({"use": "wit-svid", "kty": "EC"})]).unwrap();
        assert!(b.x509_roots_der.is_empty() && b.jwt_keys.is_empty());
        assert_eq!(b.jwks_document(), br#"{"keys":[]}"#);
    }

    #[test]
    fn a_document_over_one_mebibyte_is_refused() {
        let mut doc = br#"{"keys": [], "padding": ""#.to_vec();
        doc.resize(MAX_BUNDLE_BYTES, b'a');
        doc.extend_from_slice(br#""}"#);
        assert_eq!(parse(&doc).unwrap_err(), BundleError::TooLarge);
        assert_eq!(
            FederatedBundle::parse_file(&td(), &doc).unwrap_err(),
            BundleError::TooLarge
        );
        // Just under the limit is fine: unknown members are allowed (§4.1).
        doc.truncate(MAX_BUNDLE_BYTES - 2);
        doc.extend_from_slice(br#""}"#);
        assert!(parse(&doc).is_ok());
    }

    #[test]
    fn keys_is_required_and_the_document_must_be_a_jwk_set() {
        for doc in [
            &br#"{"spiffe_sequence": 1}"#[..],
            br#"{"keys": {}}"#,
            br#"[]"#,
            b"not json",
            br#"{"keys": [], "keys": []}"#,
            b"{\"keys\": [], \"x\": \"\xff\"}",
        ] {
            let err = parse(doc).unwrap_err();
            assert!(matches!(err, BundleError::Json(_)), "{doc:?}: {err}");
        }
        let err = parse(br#"{"keys": [42]}"#).unwrap_err();
        assert_eq!(err.to_string(), "keys[0]: not a JSON object (a JWK)");
    }

    #[test]
    fn sequence_and_refresh_hint_must_be_integers() {
        for member in ["spiffe_sequence", "spiffe_refresh_hint"] {
            for bad in ["-1", "1.5", "\"7\"", "18446744073709551616"] {
                let doc = format!(r#"{{"keys": [], "{member}": {bad}}}"#);
                let err = parse(doc.as_bytes()).unwrap_err();
                assert!(matches!(err, BundleError::Json(_)), "{doc}: {err}");
            }
        }
        // §4.1.1: at least 64 bits of precision.
        let b = parse(br#"{"keys": [], "spiffe_sequence": 18446744073709551615}"#).unwrap();
        assert_eq!(b.sequence, Some(u64::MAX));
    }

    #[test]
    fn elements_of_unknown_or_missing_use_or_kty_are_ignored() {
        let (r, _) = root("partner.example");
        let mut no_use = x509_jwk(&r);
        no_use.as_object_mut().unwrap().remove("use");
        let mut no_kty = jwt_jwk("a");
        no_kty.as_object_mut().unwrap().remove("kty");
        let mut upper = jwt_jwk("b");
        upper["use"] = json!("JWT-SVID"); // values are case sensitive (§4.2.2)
        let b = parse_keys(vec![
            no_use,
            no_kty,
            upper,
            json!({"use": 7, "kty": "EC"}),
            json!({"use": "x509-svid", "kty": "oct", "x5c": ["garbage"]}),
            json!({"use": "jwt-svid", "kty": "OKP", "crv": "Ed25519", "kid": "c", "x": "AA"}),
            json!({"use": "jwt-svid", "kty": "EC", "crv": "P-521", "kid": "d", "x": "", "y": ""}),
            jwt_jwk("kept"),
        ])
        .unwrap();
        assert!(b.x509_roots_der.is_empty());
        assert_eq!(b.jwt_keys.len(), 1);
        assert_eq!(b.jwt_keys[0]["kid"], "kept");
    }

    #[test]
    fn an_x509_svid_element_counts_its_first_certificate_only() {
        // X509-SVID §6.2: no or empty x5c: ignored; further values: ignored, unread.
        let (r, _) = root("partner.example");
        let mut extra = x509_jwk(&r);
        extra["x5c"] = json!([STANDARD.encode(&r), "not base64 !", 5]);
        let b = parse_keys(vec![
            json!({"use": "x509-svid", "kty": "EC"}),
            json!({"use": "x509-svid", "kty": "EC", "x5c": []}),
            extra,
        ])
        .unwrap();
        assert_eq!(b.x509_roots_der, vec![r]);
    }

    #[test]
    fn an_x509_svid_element_whose_certificate_does_not_parse_is_refused() {
        let (r, _) = root("partner.example");
        let cases = [
            (json!("!!!"), "x5c[0]: not base64"),
            (json!(URL_SAFE_NO_PAD.encode(&r)), "x5c[0]: not base64"),
            (
                json!(STANDARD.encode(b"hello")),
                "x5c[0]: not an X.509 certificate",
            ),
            (
                json!(STANDARD.encode([r.clone(), vec![0]].concat())),
                "trailing bytes",
            ),
            (json!(3), "x5c[0]: not a string"),
        ];
        for (first, expect) in cases {
            let mut k = x509_jwk(&r);
            k["x5c"] = json!([first]);
            let err = parse_keys(vec![x509_jwk(&r), k]).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.starts_with("keys[1]: ") && msg.contains(expect),
                "{msg}"
            );
        }
        let mut k = x509_jwk(&r);
        k["x5c"] = json!(STANDARD.encode(&r));
        let msg = parse_keys(vec![k]).unwrap_err().to_string();
        assert_eq!(msg, "keys[0]: x5c: not an array");
    }

    #[test]
    fn a_jwt_svid_key_needs_a_kid_and_a_unique_one() {
        let mut k = jwt_jwk("x");
        k.as_object_mut().unwrap().remove("kid");
        let msg = parse_keys(vec![k]).unwrap_err().to_string();
        assert!(
            msg.starts_with("keys[0]: a jwt-svid key without kid"),
            "{msg}"
        );
        let mut k = jwt_jwk("x");
        k["kid"] = json!("");
        assert!(parse_keys(vec![k]).is_err());
        let err = parse_keys(vec![jwt_jwk("same"), jwt_jwk("same")]).unwrap_err();
        assert_eq!(err, BundleError::DuplicateKid("same".into()));
    }

    #[test]
    fn a_jwt_svid_key_must_be_loadable() {
        let good = jwt_jwk("k");
        let mut off_curve = good.clone();
        let mut y = URL_SAFE_NO_PAD.decode(good["y"].as_str().unwrap()).unwrap();
        y[31] ^= 1;
        off_curve["y"] = json!(URL_SAFE_NO_PAD.encode(&y));
        let mut short = good.clone();
        short["x"] = json!(URL_SAFE_NO_PAD.encode([1u8; 31]));
        let mut padded = good.clone();
        padded["x"] = json!(format!("{}=", good["x"].as_str().unwrap()));
        let mut no_y = good.clone();
        no_y.as_object_mut().unwrap().remove("y");
        let mut private = good.clone();
        private["d"] = json!(URL_SAFE_NO_PAD.encode([7u8; 32]));
        let rsa_zero = json!({"use": "jwt-svid", "kty": "RSA", "kid": "r", "n": "AA", "e": "AQAB"});
        for (key, expect) in [
            (off_curve, "not on its curve"),
            (short, "x: 31 bytes, not 32"),
            (padded, "x: not base64url"),
            (no_y, "no y"),
            (private, "private key member \"d\""),
            (rsa_zero, "n: zero"),
        ] {
            let msg = parse_keys(vec![key]).unwrap_err().to_string();
            assert!(msg.contains(expect), "{expect}: {msg}");
        }
        let rsa = json!({
            "use": "jwt-svid", "kty": "RSA", "kid": "r", "e": "AQAB",
            "n": URL_SAFE_NO_PAD.encode([0xc5u8; 256]),
        });
        assert_eq!(parse_keys(vec![good, rsa]).unwrap().jwt_keys.len(), 2);
    }

    #[test]
    fn a_member_we_read_given_twice_in_a_jwk_is_refused() {
        let (r, _) = root("partner.example");
        let x5c = STANDARD.encode(&r);
        let doc = format!(
            r#"{{"keys": [{{"use": "jwt-svid", "use": "x509-svid", "kty": "EC", "x5c": ["{x5c}"]}}]}}"#
        );
        let err = parse(doc.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("duplicate field `use`"), "{err}");
    }

    #[test]
    fn a_pem_file_gives_x509_roots_only() {
        let (r1, i1) = root("partner.example");
        let (r2, i2) = root("partner.example");
        let pem = format!("\n{}{}", i1.pem(), i2.pem());
        let b = FederatedBundle::parse_file(&td(), pem.as_bytes()).unwrap();
        assert_eq!(b.x509_roots_der, vec![r1, r2]);
        assert!(b.jwt_keys.is_empty());
        assert_eq!((b.sequence, b.refresh_hint), (None, None));

        let key_only = rcgen::KeyPair::generate().unwrap().serialize_pem();
        assert_eq!(
            FederatedBundle::parse_file(&td(), key_only.as_bytes()).unwrap_err(),
            BundleError::NoCertificates
        );
        let bad = "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n";
        let err = FederatedBundle::parse_file(&td(), bad.as_bytes()).unwrap_err();
        assert!(err.to_string().starts_with("PEM certificate 0: "), "{err}");
        let torn = &i1.pem()[..100];
        assert!(matches!(
            FederatedBundle::parse_file(&td(), torn.as_bytes()).unwrap_err(),
            BundleError::Pem(_) | BundleError::NoCertificates
        ));
        assert_eq!(
            FederatedBundle::parse_file(&td(), b"").unwrap_err(),
            BundleError::UnknownFormat
        );
        // And a bundle file may be a SPIFFE bundle.
        let doc = document(vec![jwt_jwk("k")], Some(3));
        assert_eq!(
            FederatedBundle::parse_file(&td(), &doc).unwrap().sequence,
            Some(3)
        );
    }

    #[test]
    fn same_keys_ignores_order_and_sequence() {
        let (r1, _) = root("partner.example");
        let (r2, _) = root("partner.example");
        let k = jwt_jwk("k");
        let a = parse(&document(
            vec![x509_jwk(&r1), x509_jwk(&r2), k.clone()],
            Some(1),
        ))
        .unwrap();
        let b = parse(&document(
            vec![k.clone(), x509_jwk(&r2), x509_jwk(&r1)],
            Some(2),
        ))
        .unwrap();
        assert!(a.same_keys(&b));
        let c = parse(&document(vec![x509_jwk(&r1), k], Some(3))).unwrap();
        assert!(!a.same_keys(&c));
    }
}
