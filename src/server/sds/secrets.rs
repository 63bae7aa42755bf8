//! Envoy's `Secret` messages, built from the caller's SVIDs and the agent's bundles.
//!
//! Certificates and keys go inline as PEM, leaf first. Bundles go as the SPIFFE certificate
//! validator (`envoy.tls.cert_validator.spiffe`, Envoy 1.18 and later), which checks each peer
//! against its own trust domain's roots; or, for older Envoys and when turned off, as a plain
//! `trusted_ca`.

use base64::Engine as _;
use envoy_types::pb::envoy::config::core::v3::{
    data_source::Specifier, node::UserAgentVersionType, DataSource, Node, TypedExtensionConfig,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    secret, spiffe_cert_validator_config::TrustDomain, CertificateValidationContext, Secret,
    SpiffeCertValidatorConfig, TlsCertificate,
};
use envoy_types::pb::google::protobuf::{value::Kind, Any};
use prost::{Message, Name};
use zeroize::Zeroizing;

use crate::identity::TrustBundle;
use crate::svid::X509Svid;

/// The name Envoy knows the SPIFFE certificate validator by.
const SPIFFE_VALIDATOR: &str = "envoy.tls.cert_validator.spiffe";
/// The node metadata key (and `[sds]` setting) that asks for `trusted_ca` instead.
pub const DISABLE_SPIFFE_VALIDATION: &str = "disable_spiffe_cert_validation";

/// The type URL of every resource SDS serves.
pub fn secret_type_url() -> String {
    Secret::type_url()
}

/// How bundles are handed to a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Validation {
    /// `custom_validator_config` with the SPIFFE certificate validator.
    Spiffe,
    /// `trusted_ca`: the roots, concatenated PEM.
    TrustedCa,
}

/// The SPIFFE validator for an Envoy that has it (1.18 and later, from the node's structured
/// build version) unless the node's metadata or the config turns it off. A node that does not
/// say which Envoy it is gets `trusted_ca`, as SPIRE does.
pub fn validation_for(node: Option<&Node>, disabled_by_config: bool) -> Validation {
    let mut disabled = disabled_by_config;
    if let Some(v) = node
        .and_then(|n| n.metadata.as_ref())
        .and_then(|m| m.fields.get(DISABLE_SPIFFE_VALIDATION))
        .and_then(|v| v.kind.as_ref())
    {
        // A value of another type, or a string that is no boolean, is ignored.
        match v {
            Kind::BoolValue(b) => disabled = *b,
            Kind::StringValue(s) => match s.to_ascii_lowercase().as_str() {
                "true" | "1" | "t" => disabled = true,
                "false" | "0" | "f" => disabled = false,
                _ => {}
            },
            _ => {}
        }
    }
    let version = node
        .and_then(|n| n.user_agent_version_type.as_ref())
        .and_then(|v| match v {
            UserAgentVersionType::UserAgentBuildVersion(b) => b.version.as_ref(),
            UserAgentVersionType::UserAgentVersion(_) => None,
        });
    let supported = version
        .is_some_and(|v| v.major_number > 1 || (v.major_number == 1 && v.minor_number >= 18));
    if supported && !disabled {
        Validation::Spiffe
    } else {
        Validation::TrustedCa
    }
}

fn inline(bytes: Vec<u8>) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(Specifier::InlineBytes(bytes)),
        ..DataSource::default()
    })
}

fn pem_certs<'a>(ders: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = String::new();
    for der in ders {
        out.push_str(&pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec())));
    }
    out.into_bytes()
}

/// PKCS#8 DER as PEM, in a buffer that is wiped when dropped.
fn pem_key(pkcs8: &[u8]) -> Zeroizing<Vec<u8>> {
    let b64 = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(pkcs8));
    let mut out = Zeroizing::new(Vec::with_capacity(b64.len() + b64.len() / 64 + 64));
    out.extend_from_slice(b"-----BEGIN PRIVATE KEY-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    out.extend_from_slice(b"-----END PRIVATE KEY-----\n");
    out
}

/// An SVID as a `TlsCertificate` secret named `name`.
pub fn tls_certificate(name: &str, svid: &X509Svid) -> Secret {
    let chain = pem_certs(svid.issued.chain_certs());
    let key = pem_key(&svid.issued.key_pkcs8);
    Secret {
        name: name.to_owned(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(chain),
            // The message is encoded and dropped by the server; this copy is the one that
            // leaves, as the Workload API's key does.
            private_key: inline(key.to_vec()),
            ..TlsCertificate::default()
        })),
    }
}

/// Bundles as a validation context secret named `name`.
pub fn validation_context(name: &str, bundles: &[&TrustBundle], how: Validation) -> Secret {
    let context = match how {
        Validation::Spiffe => {
            let config = SpiffeCertValidatorConfig {
                trust_domains: bundles
                    .iter()
                    .map(|b| TrustDomain {
                        name: b.trust_domain.clone(),
                        trust_bundle: inline(pem_certs(b.roots_der.iter().map(Vec::as_slice))),
                        ..TrustDomain::default()
                    })
                    .collect(),
                ..SpiffeCertValidatorConfig::default()
            };
            CertificateValidationContext {
                custom_validator_config: Some(TypedExtensionConfig {
                    name: SPIFFE_VALIDATOR.into(),
                    typed_config: Some(any(&config, SpiffeCertValidatorConfig::type_url())),
                }),
                ..CertificateValidationContext::default()
            }
        }
        Validation::TrustedCa => CertificateValidationContext {
            trusted_ca: inline(pem_certs(
                bundles
                    .iter()
                    .flat_map(|b| b.roots_der.iter().map(Vec::as_slice)),
            )),
            ..CertificateValidationContext::default()
        },
    };
    Secret {
        name: name.to_owned(),
        r#type: Some(secret::Type::ValidationContext(context)),
    }
}

fn any(m: &impl Message, type_url: String) -> Any {
    Any {
        type_url,
        value: m.encode_to_vec(),
    }
}

/// A secret as a discovery response resource.
pub fn resource(secret: &Secret) -> Any {
    any(secret, secret_type_url())
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::BuildVersion;
    use envoy_types::pb::envoy::r#type::v3::SemanticVersion;
    use envoy_types::pb::google::protobuf::{Struct, Value};

    fn envoy(major: u32, minor: u32) -> Node {
        Node {
            user_agent_version_type: Some(UserAgentVersionType::UserAgentBuildVersion(
                BuildVersion {
                    version: Some(SemanticVersion {
                        major_number: major,
                        minor_number: minor,
                        patch: 0,
                    }),
                    metadata: None,
                },
            )),
            ..Node::default()
        }
    }

    fn with_metadata(mut n: Node, v: Kind) -> Node {
        n.metadata = Some(Struct {
            fields: [(
                DISABLE_SPIFFE_VALIDATION.to_owned(),
                Value { kind: Some(v) },
            )]
            .into(),
        });
        n
    }

    #[test]
    fn the_spiffe_validator_goes_to_envoy_1_18_and_later_unless_turned_off() {
        assert_eq!(
            validation_for(Some(&envoy(1, 18)), false),
            Validation::Spiffe
        );
        assert_eq!(
            validation_for(Some(&envoy(2, 0)), false),
            Validation::Spiffe
        );
        assert_eq!(
            validation_for(Some(&envoy(1, 17)), false),
            Validation::TrustedCa
        );
        assert_eq!(validation_for(None, false), Validation::TrustedCa);
        assert_eq!(
            validation_for(Some(&envoy(1, 40)), true),
            Validation::TrustedCa
        );
        let off = with_metadata(envoy(1, 40), Kind::BoolValue(true));
        assert_eq!(validation_for(Some(&off), false), Validation::TrustedCa);
        let off = with_metadata(envoy(1, 40), Kind::StringValue("true".into()));
        assert_eq!(validation_for(Some(&off), false), Validation::TrustedCa);
        let on = with_metadata(envoy(1, 40), Kind::StringValue("false".into()));
        assert_eq!(
            validation_for(Some(&on), true),
            Validation::Spiffe,
            "the node overrides"
        );
        let junk = with_metadata(envoy(1, 40), Kind::StringValue("maybe".into()));
        assert_eq!(validation_for(Some(&junk), false), Validation::Spiffe);
    }

    #[test]
    fn keys_are_pem_in_lines_of_64() {
        let pem = pem_key(&[7u8; 100]);
        let text = std::str::from_utf8(&pem).unwrap();
        let parsed = pem::parse(text).unwrap();
        assert_eq!(parsed.tag(), "PRIVATE KEY");
        assert_eq!(parsed.contents(), &[7u8; 100]);
        assert!(text.lines().all(|l| l.len() <= 64));
    }
}
