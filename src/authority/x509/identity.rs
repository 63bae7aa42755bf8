//! The identity a certificate names, as the agent's mutual-TLS servers and clients read a peer:
//! an X509-SVID's one SPIFFE ID, or a common name for an operator-CA certificate without any.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use spiffe::SpiffeId;

/// Who a verified certificate names, and until when.
pub struct CertIdentity {
    /// Its one SPIFFE ID, or else `cn:` and its subject's common name.
    pub identity: String,
    pub not_after: SystemTime,
}

/// The identity a verified certificate names: its one SPIFFE ID, or else `cn:` and its
/// subject's common name.
pub fn identity_of(der: &[u8]) -> Result<String, String> {
    cert_identity(der).map(|c| c.identity)
}

/// A certificate with a SPIFFE ID must be an X509-SVID: exactly one URI SAN, that SPIFFE ID
/// in canonical form (a URI of scheme `spiffe`, in any case, is taken for one). Only a
/// certificate without any is known by its common name.
pub fn cert_identity(der: &[u8]) -> Result<CertIdentity, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let mut uris = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = name {
                uris.push(*uri);
            }
        }
    }
    let spiffe = uris
        .iter()
        .filter(|uri| {
            uri.get(..9)
                .is_some_and(|s| s.eq_ignore_ascii_case("spiffe://"))
        })
        .count();
    let identity = match (spiffe, uris.as_slice()) {
        (0, _) => {
            let cn = cert
                .subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .filter(|cn| !cn.is_empty())
                .ok_or("neither a SPIFFE ID nor a common name")?;
            format!("cn:{cn}")
        }
        // In canonical form only: what the allowlist and the policies compare is what the
        // certificate says.
        (1, [id]) => match SpiffeId::new(*id) {
            Ok(parsed) if parsed.to_string() == *id => parsed.to_string(),
            Ok(parsed) => {
                return Err(format!(
                    "SPIFFE ID {id:?} is not in canonical form ({parsed})"
                ))
            }
            Err(e) => return Err(format!("SPIFFE ID {id:?}: {e}")),
        },
        _ => {
            return Err(format!(
                "a SPIFFE ID among {} URI SANs (an X509-SVID has exactly one)",
                uris.len()
            ))
        }
    };
    let not_after = UNIX_EPOCH
        + Duration::from_secs(u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0));
    Ok(CertIdentity {
        identity,
        not_after,
    })
}
