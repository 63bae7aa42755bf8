//! One `StreamSecrets` stream's protocol state (xDS state of the world): which names the client
//! asks for, the node it said it is, the version and nonce of the last response, and what that
//! response held, so that identical content is never sent twice.
//!
//! The rules are SPIRE agent's: a request whose nonce is not the last one sent is stale and
//! ignored; a NACK (`error_detail`) is logged and still processed, since it may also change the
//! names; the node from the first request is kept when later ones omit it.

use std::collections::BTreeSet;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::protobuf::Any;

use super::names::requested;
use super::secrets::{secret_type_url, Validation};
use super::Refusal;

/// Names one request may carry, and how long each may be.
const MAX_NAMES: usize = 1024;
const MAX_NAME_BYTES: usize = 2048;

/// What a response holds, without its bytes (which carry keys): each secret's name and the
/// identity of its content (an SVID's serial, a digest of the bundles), and how bundles were
/// given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fingerprint {
    pub validation: Option<Validation>,
    pub items: Vec<(String, String)>,
}

/// What a request did to the session.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// Stale (its nonce is not the last one sent): nothing changed.
    Stale,
    /// Applied; `nack` holds the client's reason when it rejected the last response.
    Applied { nack: Option<String> },
}

#[derive(Default)]
pub struct Session {
    node: Option<Node>,
    names: Option<BTreeSet<String>>,
    version: u64,
    nonce: Option<String>,
    sent: Option<(BTreeSet<String>, Fingerprint)>,
    /// Every secret name a response has carried: aliases, trust domains and the SPIFFE IDs the
    /// caller has held, so a few.
    ever_sent: BTreeSet<String>,
}

/// Checks the bounds of a request's names and type; shared with `FetchSecrets`.
pub fn check_request(req: &DiscoveryRequest) -> Result<BTreeSet<String>, Refusal> {
    if !req.type_url.is_empty() && req.type_url != secret_type_url() {
        return Err(Refusal::BadRequest(format!(
            "type_url: this server serves {}, not {}",
            secret_type_url(),
            req.type_url
        )));
    }
    if req.resource_names.len() > MAX_NAMES {
        return Err(Refusal::BadRequest(format!(
            "resource_names: {} names, at most {MAX_NAMES}",
            req.resource_names.len()
        )));
    }
    if let Some(n) = req.resource_names.iter().find(|n| n.len() > MAX_NAME_BYTES) {
        return Err(Refusal::BadRequest(format!(
            "resource_names: a name of {} bytes, at most {MAX_NAME_BYTES}",
            n.len()
        )));
    }
    Ok(requested(&req.resource_names))
}

impl Session {
    /// Takes a request from the client.
    pub fn receive(&mut self, req: DiscoveryRequest) -> Result<Received, Refusal> {
        if let Some(last) = &self.nonce {
            if &req.response_nonce != last {
                tracing::debug!(
                    nonce = %req.response_nonce,
                    expected = %last,
                    "SDS request with a stale nonce ignored"
                );
                return Ok(Received::Stale);
            }
        }
        let names = check_request(&req)?;
        let nack = req.error_detail.map(|e| e.message);
        if self.node.is_none() {
            self.node = req.node;
        }
        self.names = Some(names);
        Ok(Received::Applied { nack })
    }

    /// The names asked for, once the client has asked.
    pub fn names(&self) -> Option<&BTreeSet<String>> {
        self.names.as_ref()
    }

    /// Whether a response on this stream has carried a secret named `name`.
    pub fn has_sent(&self, name: &str) -> bool {
        self.ever_sent.contains(name)
    }

    pub fn node(&self) -> Option<&Node> {
        self.node.as_ref()
    }

    /// The version of the last response sent ("" before any).
    pub fn version(&self) -> String {
        if self.version == 0 {
            String::new()
        } else {
            self.version.to_string()
        }
    }

    /// A response with `resources` (whose content `fingerprint` describes) if it differs from
    /// the last one sent, for the same names; `None` if the client has it already.
    pub fn respond(
        &mut self,
        fingerprint: Fingerprint,
        resources: impl FnOnce() -> Vec<Any>,
    ) -> Option<DiscoveryResponse> {
        let names = self.names.clone()?;
        let now = (names, fingerprint);
        if self.sent.as_ref() == Some(&now) {
            return None;
        }
        self.ever_sent
            .extend(now.1.items.iter().map(|(name, _)| name.clone()));
        self.version += 1;
        let nonce = new_nonce();
        self.nonce = Some(nonce.clone());
        self.sent = Some(now);
        Some(DiscoveryResponse {
            version_info: self.version.to_string(),
            resources: resources(),
            type_url: secret_type_url(),
            nonce,
            ..DiscoveryResponse::default()
        })
    }
}

fn new_nonce() -> String {
    hex::encode(rand::random::<[u8; 8]>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::rpc::Status as RpcStatus;

    fn request(names: &[&str], nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            response_nonce: nonce.into(),
            type_url: secret_type_url(),
            ..DiscoveryRequest::default()
        }
    }

    fn print(items: &[(&str, &str)]) -> Fingerprint {
        Fingerprint {
            validation: Some(Validation::Spiffe),
            items: items
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        }
    }

    #[test]
    fn nothing_is_sent_before_a_request_and_the_same_content_is_sent_once() {
        let mut s = Session::default();
        assert!(s.respond(print(&[("default", "1")]), Vec::new).is_none());
        s.receive(request(&["default"], "")).unwrap();
        let first = s.respond(print(&[("default", "1")]), Vec::new).unwrap();
        assert_eq!(first.version_info, "1");
        assert!(!first.nonce.is_empty());
        assert!(s.respond(print(&[("default", "1")]), Vec::new).is_none());
        let second = s.respond(print(&[("default", "2")]), Vec::new).unwrap();
        assert_eq!(second.version_info, "2");
        assert_ne!(second.nonce, first.nonce, "a fresh nonce each time");
    }

    #[test]
    fn a_stale_nonce_changes_nothing() {
        let mut s = Session::default();
        s.receive(request(&["default"], "")).unwrap();
        let sent = s.respond(print(&[("default", "1")]), Vec::new).unwrap();
        assert_eq!(
            s.receive(request(&["ROOTCA"], "old")).unwrap(),
            Received::Stale
        );
        assert_eq!(s.names().unwrap().iter().next().unwrap(), "default");
        let ack = request(&["ROOTCA"], &sent.nonce);
        assert_eq!(s.receive(ack).unwrap(), Received::Applied { nack: None });
        assert_eq!(s.names().unwrap().iter().next().unwrap(), "ROOTCA");
        // New names with the same content are answered (the client waits for them).
        assert!(s.respond(print(&[("default", "1")]), Vec::new).is_some());
    }

    #[test]
    fn a_nack_is_reported_and_still_applied_and_the_node_is_kept() {
        let mut s = Session::default();
        let mut first = request(&["default"], "");
        first.node = Some(Node {
            id: "envoy-1".into(),
            ..Node::default()
        });
        s.receive(first).unwrap();
        let sent = s.respond(print(&[("default", "1")]), Vec::new).unwrap();
        let mut nack = request(&["default", "ROOTCA"], &sent.nonce);
        nack.error_detail = Some(RpcStatus {
            code: 3,
            message: "bad secret".into(),
            details: Vec::new(),
        });
        assert_eq!(
            s.receive(nack).unwrap(),
            Received::Applied {
                nack: Some("bad secret".into())
            }
        );
        assert_eq!(s.names().unwrap().len(), 2);
        assert_eq!(s.node().unwrap().id, "envoy-1");
    }

    #[test]
    fn requests_out_of_bounds_are_refused() {
        let mut wrong = request(&["default"], "");
        wrong.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
        assert!(check_request(&wrong).is_err());
        let many: Vec<String> = (0..=MAX_NAMES).map(|i| i.to_string()).collect();
        let names: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(check_request(&request(&names, "")).is_err());
        let long = "x".repeat(MAX_NAME_BYTES + 1);
        assert!(check_request(&request(&[&long], "")).is_err());
        let mut untyped = request(&["default"], "");
        untyped.type_url.clear();
        assert!(
            check_request(&untyped).is_ok(),
            "an empty type_url is the secret type"
        );
    }
}
