//! What relying parties get to verify tokens with: the published public keys
//! as a JWKS document, active key first.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::Value;

use super::{JwtKeys, KeyMaterial, ALG};

/// Length of an uncompressed P-256 point: 0x04 || X(32) || Y(32).
const PUBLIC_POINT_LEN: usize = 65;

impl JwtKeys {
    /// The JWKS document (JSON bytes): `{"keys":[{"kty":"EC","crv":"P-256",
    /// "x":..,"y":..,"kid":..,"use":"jwt-svid","alg":"ES256"}, ...]}` (`use` as the key set's
    /// [`TokenProfile`] says) with
    /// base64url (unpadded) coordinates; the active key comes first.
    pub fn jwks(&self) -> Vec<u8> {
        let state = self.read();
        let key_use = self.profile.key_use();
        let keys: Vec<Value> = state.slots.iter().map(|s| jwk(&s.key, key_use)).collect();
        serde_json::to_vec(&serde_json::json!({ "keys": keys }))
            .expect("serializing a JSON value cannot fail")
    }

    /// The kid of the active key.
    pub fn active_kid(&self) -> String {
        self.read().active().key.kid.clone()
    }
}

fn jwk(key: &KeyMaterial, key_use: &str) -> Value {
    let point = key.public_point();
    debug_assert_eq!(point.len(), PUBLIC_POINT_LEN);
    serde_json::json!({
        "kty": "EC",
        "crv": "P-256",
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
        "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        "kid": key.kid,
        "use": key_use,
        "alg": ALG,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::jwt_keys::test_support::*;
    use std::time::SystemTime;

    #[test]
    fn spiffe_crate_accepts_jwks_and_tokens() {
        use spiffe::{JwtBundle, JwtBundleSet, JwtSvid};

        let (_tmp, keys) = setup();
        keys.rotate(SystemTime::now()).unwrap(); // two keys in the JWKS
        let token = keys.sign(&claims()).unwrap();

        let bundle = JwtBundle::from_jwt_authorities(td(), &keys.jwks()).unwrap();
        assert_eq!(bundle.jwt_authorities().count(), 2);
        let mut set = JwtBundleSet::new();
        set.add_bundle(bundle);

        let svid = JwtSvid::parse_and_validate(&token, &set, &[AUD]).unwrap();
        assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/web");
        assert_eq!(svid.key_id(), keys.active_kid());

        // And the crate rejects the same token for another audience.
        assert!(JwtSvid::parse_and_validate(&token, &set, &["nope"]).is_err());
    }

    #[test]
    fn jwks_shape() {
        let (_tmp, keys) = setup();
        let jwks: Value = serde_json::from_slice(&keys.jwks()).unwrap();
        let list = jwks["keys"].as_array().unwrap();
        assert_eq!(list.len(), 1);
        let k = &list[0];
        assert_eq!(k["kty"], "EC");
        assert_eq!(k["crv"], "P-256");
        assert_eq!(k["use"], "jwt-svid");
        assert_eq!(k["alg"], "ES256");
        assert_eq!(k["kid"], keys.active_kid());
        for c in ["x", "y"] {
            let s = k[c].as_str().unwrap();
            assert!(!s.contains('=') && !s.contains('+') && !s.contains('/'));
            assert_eq!(URL_SAFE_NO_PAD.decode(s).unwrap().len(), 32);
        }
        // No private material in the JWKS.
        assert!(k.get("d").is_none());
    }
}
