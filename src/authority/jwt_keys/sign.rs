//! Minting a JWT-SVID: signing caller-built claims with the active key, after
//! refusing claims no validator would accept or that outlive the drop schedule.

use std::time::SystemTime;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::{Map, Value};

use super::{ceil_secs, unix_secs, JwtError, JwtKeys, TokenProfile, ALG, CLOCK_SKEW};

/// An ECDSA P-256 signature (r || s) with `s` in the lower half of the group order. Both
/// `s` and `n - s` verify; validators that accept only low-S (ours does) need this form.
pub(super) fn low_s(signature: &[u8]) -> Result<Vec<u8>, JwtError> {
    let sig = p256::ecdsa::Signature::from_slice(signature)
        .map_err(|_| JwtError::Crypto("ECDSA signing gave a malformed signature".into()))?;
    Ok(sig.normalize_s().unwrap_or(sig).to_bytes().to_vec())
}

/// Whether an (r || s) signature is in low-S form, the only form a JWT-SVID of ours has.
pub(super) fn is_low_s(signature: &[u8]) -> bool {
    p256::ecdsa::Signature::from_slice(signature).is_ok_and(|s| s.normalize_s().is_none())
}

impl JwtKeys {
    /// Signs `claims` as a JWS compact token with header
    /// `{"alg":"ES256","kid":<active kid>,"typ":"JWT"}` (`typ` as the key set's
    /// [`TokenProfile`] says: `wit+jwt` for WIT-SVIDs).
    ///
    /// The claims must be ones a validator of the profile accepts (`sub` a workload
    /// SPIFFE ID of our trust domain, `exp` an integer; for a JWT-SVID `aud` a non-empty
    /// string or array of strings; for a WIT-SVID no `aud`, and `cnf.jwk` an ES256 public
    /// key), and `exp` must not exceed the wall clock
    /// plus `max_token_ttl` (plus 60 s slack): the retired-key drop schedule
    /// depends on that bound.
    pub fn sign(&self, claims: &Map<String, Value>) -> Result<String, JwtError> {
        self.sign_with_kid(claims).map(|(token, _)| token)
    }

    /// [`JwtKeys::sign`], and the `kid` of the key that signed (the active key may change
    /// right after).
    pub fn sign_with_kid(&self, claims: &Map<String, Value>) -> Result<(String, String), JwtError> {
        self.check_signable(claims)?;

        let state = self.read();
        let key = &state.active().key;
        let header = serde_json::json!({ "alg": ALG, "kid": key.kid, "typ": self.profile.typ() });
        let header = serde_json::to_vec(&header).map_err(|e| JwtError::BadClaims(e.to_string()))?;
        let payload = serde_json::to_vec(claims).map_err(|e| JwtError::BadClaims(e.to_string()))?;

        let mut token = URL_SAFE_NO_PAD.encode(header);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(payload, &mut token);
        let signature = key
            .pair
            .sign(&self.rng, token.as_bytes())
            .map_err(|_| JwtError::Crypto("ECDSA signing failed".into()))?;
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(low_s(signature.as_ref())?, &mut token);
        Ok((token, key.kid.clone()))
    }

    /// Refuses claims that validators (ours and the spiffe crate's) would
    /// reject, so that we never mint unusable tokens, and enforces the TTL cap
    /// the key drop schedule relies on.
    fn check_signable(&self, claims: &Map<String, Value>) -> Result<(), JwtError> {
        match claims.get("sub") {
            Some(Value::String(sub)) => self
                .check_subject(sub)
                .map_err(|e| JwtError::BadClaims(e.to_string()))?,
            _ => return Err(JwtError::BadClaims("sub must be a string".into())),
        }
        match self.profile {
            TokenProfile::JwtSvid => {
                let aud_ok = match claims.get("aud") {
                    Some(Value::String(_)) => true,
                    Some(Value::Array(items)) => {
                        !items.is_empty() && items.iter().all(Value::is_string)
                    }
                    _ => false,
                };
                if !aud_ok {
                    return Err(JwtError::BadClaims(
                        "aud must be a string or a non-empty array of strings".into(),
                    ));
                }
            }
            TokenProfile::WitSvid => {
                if claims.contains_key("aud") {
                    return Err(JwtError::BadClaims("a WIT-SVID has no aud".into()));
                }
                let jwk = claims
                    .get("cnf")
                    .and_then(|c| c.get("jwk"))
                    .and_then(Value::as_object)
                    .ok_or_else(|| JwtError::BadClaims("cnf.jwk must be a JWK".into()))?;
                let public = ["kty", "crv", "x", "y", "alg"]
                    .iter()
                    .all(|k| jwk.get(*k).is_some_and(Value::is_string));
                if !public || jwk.contains_key("d") || jwk.get("alg") != Some(&Value::from(ALG)) {
                    return Err(JwtError::BadClaims(
                        "cnf.jwk must be a public EC key with alg ES256".into(),
                    ));
                }
            }
        }
        // The spiffe crate (and SPIRE) decode exp as an integer.
        let exp = claims
            .get("exp")
            .and_then(Value::as_i64)
            .ok_or_else(|| JwtError::BadClaims("exp must be an integer".into()))?;
        let cap = unix_secs(SystemTime::now())?
            .saturating_add(ceil_secs(self.policy.max_token_ttl))
            .saturating_add(CLOCK_SKEW.as_secs());
        if exp > i64::try_from(cap).unwrap_or(i64::MAX) {
            return Err(JwtError::BadClaims(format!(
                "exp is more than max_token_ttl ({} s) in the future",
                self.policy.max_token_ttl.as_secs()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::jwt_keys::test_support::*;
    use crate::authority::jwt_keys::validate::decode_json_object;
    use serde_json::json;

    #[test]
    fn sign_validate_round_trip_and_header() {
        let (_tmp, keys) = setup();
        let c = claims();
        let token = keys.sign(&c).unwrap();
        let got = keys.validate(&token, AUD, SystemTime::now()).unwrap();
        assert_eq!(got, c);

        let header = decode_json_object(token.split('.').next().unwrap(), "header").unwrap();
        assert_eq!(
            Value::Object(header),
            json!({"alg": "ES256", "kid": keys.active_kid(), "typ": "JWT"})
        );

        // aud as a plain string works too.
        let mut c2 = claims();
        c2.insert("aud".into(), json!(AUD));
        let token = keys.sign(&c2).unwrap();
        keys.validate(&token, AUD, SystemTime::now()).unwrap();
    }

    #[test]
    fn sign_refuses_unusable_claims() {
        let (_tmp, keys) = setup();
        let now = SystemTime::now();
        let mut c = claims();
        c.insert("exp".into(), json!(unix(now) as f64 + 0.5));
        assert!(matches!(keys.sign(&c), Err(JwtError::BadClaims(_))));
        let mut c = claims();
        c.remove("aud");
        assert!(matches!(keys.sign(&c), Err(JwtError::BadClaims(_))));
        let mut c = claims();
        c.insert("aud".into(), json!([]));
        assert!(matches!(keys.sign(&c), Err(JwtError::BadClaims(_))));
        // Longer than max_token_ttl.
        let c = claims_at(now, 2 * 3600, "spiffe://example.org/web");
        assert!(matches!(keys.sign(&c), Err(JwtError::BadClaims(_))));
        // Bare trust domain ID.
        let c = claims_at(now, 300, "spiffe://example.org");
        assert!(matches!(keys.sign(&c), Err(JwtError::BadClaims(_))));
    }
}
