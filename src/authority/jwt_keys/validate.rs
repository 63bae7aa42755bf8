//! Checking a presented JWT-SVID against the published keys: header and
//! signature first, claims only once they are authenticated.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};
use serde_json::{Map, Value};
use spiffe::SpiffeId;

use super::{JwtError, JwtKeys, ALG, CLOCK_SKEW};

/// Upper bound for a presented token. JWT-SVIDs are small; refusing huge input
/// early bounds the work an unauthenticated peer can make us do.
const MAX_TOKEN_LEN: usize = 64 * 1024;
/// Length of a P-256 signature in the fixed (r||s) JWS encoding.
const SIGNATURE_LEN: usize = 64;

impl JwtKeys {
    /// Validates a token and returns its claims.
    ///
    /// Checks, in order: size and 3-part structure; header is a JSON object
    /// with `alg == "ES256"` (refusing "none" and everything else), `typ`
    /// absent/"JWT"/"JOSE", no `crit`, `kid` naming a published key; the
    /// ECDSA signature over the first two parts; only then the claims: a JSON
    /// object, `sub` a workload SPIFFE ID of our trust domain, `aud` (string
    /// or array) containing `audience`, `exp` a number > `now`, and `nbf` /
    /// `iat`, when present, numbers not beyond `now + 60 s`.
    pub fn validate(
        &self,
        token: &str,
        audience: &str,
        now: SystemTime,
    ) -> Result<Map<String, Value>, JwtError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(JwtError::BadToken("token too large".into()));
        }
        let mut parts = token.split('.');
        let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::BadToken(
                "expected 3 dot-separated parts (JWS compact)".into(),
            ));
        };

        // --- Header: decide which key (if any) may have signed this. ---
        let header = decode_json_object(header_b64, "header")?;
        match header.get("alg") {
            Some(Value::String(alg)) if alg == ALG => {}
            Some(Value::String(alg)) => return Err(JwtError::UnsupportedAlgorithm(alg.clone())),
            Some(other) => return Err(JwtError::UnsupportedAlgorithm(other.to_string())),
            None => return Err(JwtError::BadToken("header has no alg".into())),
        }
        match header.get("typ") {
            None => {}
            Some(Value::String(typ)) if typ == "JWT" || typ == "JOSE" => {}
            Some(_) => return Err(JwtError::BadToken("header typ must be JWT or JOSE".into())),
        }
        // RFC 7515 §4.1.11: extensions listed in crit must be understood; we understand none.
        if header.contains_key("crit") {
            return Err(JwtError::BadToken("unsupported crit header".into()));
        }
        let kid = match header.get("kid") {
            Some(Value::String(kid)) => kid.as_str(),
            Some(_) => return Err(JwtError::BadToken("header kid is not a string".into())),
            None => return Err(JwtError::BadToken("header has no kid".into())),
        };

        // --- Signature, before looking at any claim. ---
        let signature = URL_SAFE_NO_PAD
            .decode(signature_b64)
            .map_err(|_| JwtError::BadToken("signature is not base64url".into()))?;
        // A high-S signature verifies too (s and n - s are both valid), so a token could be
        // re-encoded into a second valid form; only the low-S form is accepted.
        if signature.len() != SIGNATURE_LEN || !super::sign::is_low_s(&signature) {
            return Err(JwtError::BadSignature);
        }
        {
            let state = self.read();
            let slot = state
                .find(kid)
                .ok_or_else(|| JwtError::UnknownKey(truncate(kid, 64)))?;
            let signing_input_len = header_b64.len() + 1 + payload_b64.len();
            UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, slot.key.public_point())
                .verify(&token.as_bytes()[..signing_input_len], &signature)
                .map_err(|_| JwtError::BadSignature)?;
        }

        // --- Claims (authenticated from here on). ---
        let claims = decode_json_object(payload_b64, "payload")?;
        let now_f = unix_secs_f64(now)?;

        let sub = match claims.get("sub") {
            Some(Value::String(sub)) => sub,
            Some(_) => return Err(JwtError::BadSubject("sub is not a string".into())),
            None => return Err(JwtError::BadSubject("sub missing".into())),
        };
        self.check_subject(sub)?;

        if !audience_contains(claims.get("aud"), audience)? {
            return Err(JwtError::AudienceMismatch);
        }

        let exp = numeric_claim(&claims, "exp")?
            .ok_or_else(|| JwtError::BadToken("exp missing".into()))?;
        if exp <= now_f {
            return Err(JwtError::Expired);
        }
        let latest = now_f + CLOCK_SKEW.as_secs_f64();
        if let Some(nbf) = numeric_claim(&claims, "nbf")? {
            if nbf > latest {
                return Err(JwtError::NotYetValid("nbf is in the future".into()));
            }
        }
        if let Some(iat) = numeric_claim(&claims, "iat")? {
            if iat > latest {
                return Err(JwtError::NotYetValid("iat is in the future".into()));
            }
        }
        Ok(claims)
    }

    pub(super) fn check_subject(&self, sub: &str) -> Result<(), JwtError> {
        let id = SpiffeId::new(sub)
            .map_err(|e| JwtError::BadSubject(format!("not a SPIFFE ID: {e}")))?;
        // The spiffe crate lowercases the scheme and trust domain, so `spiffe://Example.org/w`
        // parses; but the SPIFFE ID spec (§2.1) allows lowercase only, go-spiffe refuses it,
        // and ValidateJWTSVID reports `sub` as it is. Only the canonical form is an ID.
        if id.to_string() != sub {
            return Err(JwtError::BadSubject(
                "not a SPIFFE ID in canonical (lowercase) form".into(),
            ));
        }
        if !id.is_member_of(&self.trust_domain) {
            return Err(JwtError::BadSubject(format!(
                "trust domain {} is not {}",
                id.trust_domain(),
                self.trust_domain
            )));
        }
        // The bare trust domain ID names no workload.
        if id.path().is_empty() {
            return Err(JwtError::BadSubject(
                "sub names no workload (empty path)".into(),
            ));
        }
        Ok(())
    }
}

fn unix_secs_f64(t: SystemTime) -> Result<f64, JwtError> {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .map_err(|_| JwtError::Clock("time is before the Unix epoch".into()))
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

pub(super) fn decode_json_object(part: &str, what: &str) -> Result<Map<String, Value>, JwtError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| JwtError::BadToken(format!("{what} is not base64url")))?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(JwtError::BadToken(format!("{what} is not a JSON object"))),
        Err(_) => Err(JwtError::BadToken(format!("{what} is not valid JSON"))),
    }
}

fn numeric_claim(claims: &Map<String, Value>, name: &str) -> Result<Option<f64>, JwtError> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|f| f.is_finite())
            .map(Some)
            .ok_or_else(|| JwtError::BadToken(format!("{name} is not a number"))),
    }
}

fn audience_contains(aud: Option<&Value>, audience: &str) -> Result<bool, JwtError> {
    match aud {
        Some(Value::String(a)) => Ok(a == audience),
        Some(Value::Array(items)) => {
            let mut found = false;
            for item in items {
                match item {
                    Value::String(a) => found |= a == audience,
                    _ => return Err(JwtError::BadToken("aud entries must be strings".into())),
                }
            }
            Ok(found)
        }
        Some(_) => Err(JwtError::BadToken("aud must be a string or array".into())),
        None => Err(JwtError::AudienceMismatch),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::jwt_keys::test_support::*;
    use serde_json::json;
    use std::time::Duration;

    fn b64json(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
    }

    /// Issue 14, hole 13: a token whose signature was malleated to (r, n - s) still verified.
    #[test]
    fn a_malleated_high_s_signature_is_refused() {
        let (_tmp, keys) = setup();
        let now = SystemTime::now();
        for i in 0..16 {
            let token = keys
                .sign(&claims_at(now, 300, &format!("spiffe://example.org/w{i}")))
                .unwrap();
            let (signed, sig) = token.rsplit_once('.').unwrap();
            let sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
            assert!(super::super::sign::is_low_s(&sig), "we sign low-S only");
            keys.validate(&token, AUD, now).unwrap();
            // (r, n - s): the same signature, malleated.
            let parsed = p256::ecdsa::Signature::from_slice(&sig).unwrap();
            let (r, s) = parsed.split_scalars();
            let flipped = p256::ecdsa::Signature::from_scalars(r, -*s).unwrap();
            let forged = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(flipped.to_bytes()));
            assert_eq!(
                keys.validate(&forged, AUD, now),
                Err(JwtError::BadSignature)
            );
        }
    }

    #[test]
    fn validation_failures() {
        let (_tmp, keys) = setup();
        let now = SystemTime::now();
        let token = keys
            .sign(&claims_at(now, 300, "spiffe://example.org/web"))
            .unwrap();

        assert_eq!(
            keys.validate(&token, "spiffe://example.org/other", now),
            Err(JwtError::AudienceMismatch)
        );
        assert_eq!(
            keys.validate(&token, AUD, now + Duration::from_secs(301)),
            Err(JwtError::Expired)
        );
        // exp == now is expired (exp must be strictly after now).
        let exp_exact = UNIX_EPOCH + Duration::from_secs(unix(now) as u64 + 300);
        assert_eq!(
            keys.validate(&token, AUD, exp_exact),
            Err(JwtError::Expired)
        );

        // iat far in the future relative to `now`.
        assert!(matches!(
            keys.validate(&token, AUD, now - Duration::from_secs(120)),
            Err(JwtError::NotYetValid(_))
        ));

        // Tampered payload (different sub), original signature kept.
        let parts: Vec<&str> = token.split('.').collect();
        let mut evil = claims();
        evil.insert("sub".into(), json!("spiffe://example.org/admin"));
        let tampered = format!(
            "{}.{}.{}",
            parts[0],
            b64json(&Value::Object(evil)),
            parts[2]
        );
        assert_eq!(
            keys.validate(&tampered, AUD, now),
            Err(JwtError::BadSignature)
        );

        // Tampered signature.
        let mut sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        sig[10] ^= 1;
        let bad_sig = format!("{}.{}.{}", parts[0], parts[1], URL_SAFE_NO_PAD.encode(&sig));
        assert_eq!(
            keys.validate(&bad_sig, AUD, now),
            Err(JwtError::BadSignature)
        );

        // alg "none" with an empty signature, and HS256 keyed with the public JWK.
        let kid = keys.active_kid();
        for alg in ["none", "HS256", "RS256", "ES384"] {
            let h = b64json(&json!({"alg": alg, "kid": kid, "typ": "JWT"}));
            for sig in ["", parts[2]] {
                let t = format!("{h}.{}.{sig}", parts[1]);
                assert_eq!(
                    keys.validate(&t, AUD, now),
                    Err(JwtError::UnsupportedAlgorithm(alg.into())),
                    "alg {alg}"
                );
            }
        }

        // Unknown kid (signature irrelevant: refused before verification).
        let h = b64json(&json!({"alg": "ES256", "kid": "nope", "typ": "JWT"}));
        let t = format!("{h}.{}.{}", parts[1], parts[2]);
        assert_eq!(
            keys.validate(&t, AUD, now),
            Err(JwtError::UnknownKey("nope".into()))
        );

        // Missing kid, bad typ, crit.
        for header in [
            json!({"alg": "ES256"}),
            json!({"alg": "ES256", "kid": kid, "typ": "at+jwt"}),
            json!({"alg": "ES256", "kid": kid, "crit": ["b64"], "b64": false}),
        ] {
            let t = format!("{}.{}.{}", b64json(&header), parts[1], parts[2]);
            assert!(matches!(
                keys.validate(&t, AUD, now),
                Err(JwtError::BadToken(_))
            ));
        }

        // Structure.
        for t in ["", "a.b", "a.b.c.d", "!!.!!.!!", &format!("{token}.x")] {
            assert!(
                matches!(keys.validate(t, AUD, now), Err(JwtError::BadToken(_))),
                "{t:?}"
            );
        }
    }

    /// Found by the `jwt` fuzz target: a subject with an uppercase trust domain, signed by our
    /// key, validated, and ValidateJWTSVID answered with that non-canonical `spiffe_id`.
    #[test]
    fn non_canonical_subject_refused() {
        let (_tmp, keys) = setup();
        // The minimised fuzz input: header, payload and audience, as the harness signs them.
        const INPUT: &[u8] = b"{\"alg\":\"ES256\",\"kid\":\"$kid\"}\0{\"aud\":\"x\",\"exp\":4102444800,\"sub\":\"spiffe://Example.org/w\"}\0x";
        let text = std::str::from_utf8(INPUT).unwrap();
        let [header, payload, audience] = text.split('\0').collect::<Vec<_>>()[..] else {
            unreachable!()
        };
        let token = {
            let state = keys.read();
            let key = &state.active().key;
            let h = URL_SAFE_NO_PAD.encode(header.replace("$kid", &key.kid));
            let input = format!("{h}.{}", URL_SAFE_NO_PAD.encode(payload));
            let sig = key.pair.sign(&keys.rng, input.as_bytes()).unwrap();
            let sig = super::super::sign::low_s(sig.as_ref()).unwrap();
            format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
        };
        assert!(matches!(
            keys.validate(&token, audience, SystemTime::now()),
            Err(JwtError::BadSubject(_))
        ));
        // Nor is such a token minted.
        let upper = claims_at(SystemTime::now(), 300, "spiffe://Example.org/w");
        assert!(matches!(keys.sign(&upper), Err(JwtError::BadClaims(_))));
    }

    #[test]
    fn foreign_trust_domain_subject_refused() {
        let (_tmp, keys) = setup();
        let now = SystemTime::now();

        // sign refuses to mint it...
        let foreign = claims_at(now, 300, "spiffe://evil.org/web");
        assert!(matches!(keys.sign(&foreign), Err(JwtError::BadClaims(_))));

        // ...and validate refuses one signed by our key anyway (e.g. by an older
        // build): construct it by hand with the active key.
        let token = {
            let state = keys.read();
            let key = &state.active().key;
            let h = b64json(&json!({"alg": "ES256", "kid": key.kid, "typ": "JWT"}));
            let p = b64json(&Value::Object(foreign));
            let input = format!("{h}.{p}");
            let sig = key.pair.sign(&keys.rng, input.as_bytes()).unwrap();
            // In the one form validation accepts, so that only the subject is wrong.
            let sig = super::super::sign::low_s(sig.as_ref()).unwrap();
            format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
        };
        assert!(matches!(
            keys.validate(&token, AUD, now),
            Err(JwtError::BadSubject(_))
        ));
    }
}
