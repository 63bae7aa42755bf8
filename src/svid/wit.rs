//! WIT-SVIDs (the SPIFFE WIT-SVID standard, a profile of the WIMSE workload identity token): a
//! JWT bound to a key pair made for it. The token names the key's public half in `cnf.jwk`;
//! the workload gets the private half with it, and proves possession on every use, so a
//! stolen token alone is worth nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::rand::{SecureRandom, SystemRandom};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::jwt::{chain_claim, CLAIM_CHAIN, CLAIM_DELEGATOR, CLAIM_LEASE_ID, CLAIM_TASK_ID};
use super::{AuditUnavailable, Requester};
use crate::audit::{event, Audit, Event};
use crate::authority::jwt_keys::{JwtError, JwtKeys};
use crate::lease::{ActiveLease, Lease, LeaseId};

/// The one algorithm of the tokens and of the keys they are bound to (the one WIMSE requires
/// every implementation to support).
const ALG: &str = "ES256";

/// A minted WIT-SVID and the private key it is bound to.
pub struct WitSvid {
    pub spiffe_id: String,
    /// The token, JWS compact serialization.
    pub token: String,
    /// The private half of the `cnf` key as a JWK (JSON text), as `WITSVID.wit_svid_key`
    /// carries it. Wiped when dropped.
    pub private_jwk: Zeroizing<String>,
    /// The RFC 7638 thumbprint (SHA-256, base64url) of the `cnf` key: what the audit log
    /// records of it.
    pub thumbprint: String,
    pub jti: String,
    /// The signing key (`kid` of the token's header).
    pub kid: String,
    pub issued_at: SystemTime,
    pub expires_at: SystemTime,
}

impl WitSvid {
    /// When a caller should get a new one: half way through its life.
    pub fn refresh_at(&self) -> SystemTime {
        let life = self
            .expires_at
            .duration_since(self.issued_at)
            .unwrap_or_default();
        self.issued_at + life / 2
    }
}

/// Why no WIT-SVID was handed out.
#[derive(Debug, thiserror::Error)]
pub enum WitError {
    #[error(transparent)]
    Audit(#[from] AuditUnavailable),
    #[error("could not sign a WIT-SVID: {0}")]
    Signing(String),
}

/// Mints WIT-SVIDs for active leases and keeps each lease's current one until half its life
/// (or until the signing key changes); every one is audited before it is handed out.
pub struct WitIssuer {
    keys: Arc<JwtKeys>,
    audit: Audit,
    current: Mutex<HashMap<LeaseId, (Arc<WitSvid>, tokio_util::sync::CancellationToken)>>,
}

impl WitIssuer {
    pub fn new(keys: Arc<JwtKeys>, audit: Audit) -> WitIssuer {
        WitIssuer {
            keys,
            audit,
            current: Mutex::new(HashMap::new()),
        }
    }

    /// The WIT-SVID signing keys (their JWKS is the WIT bundle).
    pub fn keys(&self) -> &Arc<JwtKeys> {
        &self.keys
    }

    /// The lease's current WIT-SVID, minted (and audited) if it has none fresh; `None` when
    /// the lease has no time left for one.
    pub async fn for_lease(
        &self,
        lease: &ActiveLease,
        who: &Requester,
    ) -> Result<Option<Arc<WitSvid>>, WitError> {
        let now = SystemTime::now();
        let active_kid = self.keys.active_kid();
        let id = &lease.lease.id;
        {
            let current = self.current.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((wit, _)) = current.get(id) {
                if now < wit.refresh_at() && wit.kid == active_kid {
                    return Ok(Some(wit.clone()));
                }
            }
        }
        let l = &lease.lease;
        let end = *lease.expires_at.borrow();
        let expires_at = now.checked_add(l.svid_ttl).map_or(end, |t| t.min(end));
        if unix(expires_at) <= unix(now) {
            return Ok(None);
        }
        let wit = match mint(&self.keys, l, now, expires_at) {
            Ok(wit) => wit,
            Err(e) => return Err(WitError::Signing(e.to_string())),
        };
        let record = Event::WitIssued(event::WitIssued {
            jti: &wit.jti,
            key_thumbprint: &wit.thumbprint,
            spiffe_id: &wit.spiffe_id,
            expires_at: crate::time::rfc3339(wit.expires_at),
            lease_id: l.id.as_str(),
            task_id: &l.task_id,
            delegator: &l.delegator,
            kid: &wit.kid,
            pid: who.pid,
            uid: who.uid,
            exe_sha256: who.exe_sha256.as_deref(),
            chain: l.audit_chain(),
        });
        // Fail closed: an unaudited WIT and its key are dropped (and wiped) unused.
        self.audit
            .record(&record)
            .await
            .map_err(|e| AuditUnavailable(e.to_string()))?;
        tracing::info!(
            event = "wit_issued",
            jti = %wit.jti,
            spiffe_id = %wit.spiffe_id,
            lease_id = %l.id,
            "wit-svid issued"
        );
        let wit = Arc::new(wit);
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        // Leases that ended take their WITs (and keys) with them.
        current.retain(|_, (_, ended)| !ended.is_cancelled());
        if !lease.ended.is_cancelled() {
            current.insert(id.clone(), (wit.clone(), lease.ended.clone()));
        }
        Ok(Some(wit))
    }
}

/// Mints a WIT-SVID for `lease`, valid from `now` until `expires_at` (whole seconds), signed
/// with the active key of `keys` (a WIT-SVID key set), bound to a key pair made for it.
pub fn mint(
    keys: &JwtKeys,
    lease: &Lease,
    now: SystemTime,
    expires_at: SystemTime,
) -> Result<WitSvid, JwtError> {
    let (iat, exp) = (unix(now), unix(expires_at));
    if exp <= iat {
        return Err(JwtError::BadClaims("the token would be expired".into()));
    }
    let secret = new_key()?;
    let public = secret.public_key().to_jwk();
    let thumbprint = thumbprint(&public.to_string())?;
    let mut cnf_jwk: Map<String, Value> = serde_json::from_str(&public.to_string())
        .map_err(|e| JwtError::Crypto(format!("public JWK: {e}")))?;
    cnf_jwk.insert("alg".into(), ALG.into());
    // The private JWK as SPIRE's minting writes it: the key's own members, no `alg` (the
    // standard names none, and strict JWK parsers refuse members they do not expect).
    let private_jwk = secret.to_jwk_string();

    let jti = hex::encode(random::<16>()?);
    let mut claims = Map::new();
    claims.insert("sub".into(), lease.spiffe_id.to_string().into());
    claims.insert("iat".into(), iat.into());
    claims.insert("exp".into(), exp.into());
    claims.insert("jti".into(), jti.clone().into());
    claims.insert("cnf".into(), json!({ "jwk": cnf_jwk }));
    claims.insert(CLAIM_TASK_ID.into(), lease.task_id.clone().into());
    claims.insert(CLAIM_DELEGATOR.into(), lease.delegator.clone().into());
    claims.insert(CLAIM_LEASE_ID.into(), lease.id.as_str().into());
    // The ancestors of a delegated lease, flat and root first. Not RFC 8693's `act`: a WIT
    // names one workload (WIMSE: no second workload identifier in the token).
    if !lease.chain.is_empty() {
        claims.insert(CLAIM_CHAIN.into(), chain_claim(lease));
    }
    let (token, kid) = keys.sign_with_kid(&claims)?;
    Ok(WitSvid {
        kid,
        spiffe_id: lease.spiffe_id.to_string(),
        token,
        private_jwk,
        thumbprint,
        jti,
        issued_at: UNIX_EPOCH + Duration::from_secs(iat),
        expires_at: UNIX_EPOCH + Duration::from_secs(exp),
    })
}

/// A fresh P-256 private key, from the system's random source.
fn new_key() -> Result<p256::SecretKey, JwtError> {
    // A random 32-byte string is a valid scalar unless it is zero or not below the group
    // order (a chance of about 2^-32): draw again then.
    for _ in 0..8 {
        let bytes = Zeroizing::new(random::<32>()?);
        if let Ok(key) = p256::SecretKey::from_slice(&bytes[..]) {
            return Ok(key);
        }
    }
    Err(JwtError::Crypto("no valid P-256 key in 8 draws".into()))
}

fn random<const N: usize>() -> Result<[u8; N], JwtError> {
    let mut bytes = [0u8; N];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| JwtError::Crypto("the system's random source failed".into()))?;
    Ok(bytes)
}

/// The RFC 7638 thumbprint of an EC public JWK: SHA-256 over its required members (`crv`,
/// `kty`, `x`, `y`) in that order, without whitespace, base64url without padding.
pub fn thumbprint(public_jwk: &str) -> Result<String, JwtError> {
    let jwk: Map<String, Value> =
        serde_json::from_str(public_jwk).map_err(|e| JwtError::BadToken(format!("JWK: {e}")))?;
    let member = |name: &str| {
        jwk.get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| JwtError::BadToken(format!("JWK without {name}")))
    };
    // serde_json writes these strings exactly as RFC 7638 needs (they are base64url and fixed
    // names, with nothing to escape).
    let canonical = format!(
        r#"{{"crv":{},"kty":{},"x":{},"y":{}}}"#,
        Value::from(member("crv")?),
        Value::from(member("kty")?),
        Value::from(member("x")?),
        Value::from(member("y")?),
    );
    Ok(URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes())))
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::jwt_keys::{KeyPolicy, TokenProfile};
    use crate::lease::{LeaseId, LeaseState, Principal};
    use p256::ecdsa::signature::Signer as _;
    use spiffe::{SpiffeId, TrustDomain};

    fn keys(dir: &std::path::Path) -> JwtKeys {
        JwtKeys::load_or_create_for(
            TokenProfile::WitSvid,
            dir,
            &TrustDomain::new("example.org").unwrap(),
            KeyPolicy {
                rotate_after: Duration::from_secs(24 * 3600),
                max_token_ttl: Duration::from_secs(3600),
            },
        )
        .unwrap()
    }

    fn lease() -> Lease {
        let now = SystemTime::now();
        let principal = Principal {
            uid: 0,
            gid: 0,
            pid: None,
            user: None,
            spiffe_id: None,
        };
        Lease {
            id: LeaseId::random(),
            task_id: "t1".into(),
            delegator: "user/alice".into(),
            agent: "reporter".into(),
            spiffe_id: SpiffeId::new(
                "spiffe://example.org/agent/reporter/task/t1/delegator/user/alice",
            )
            .unwrap(),
            selectors: ["unix:uid:1000"]
                .into_iter()
                .map(|s| crate::selector::Selector::parse(s).unwrap())
                .collect(),
            created_at: now,
            expires_at: now + Duration::from_secs(600),
            max_expires_at: now + Duration::from_secs(600),
            svid_ttl: Duration::from_secs(300),
            jwt_ttl: Duration::from_secs(300),
            audiences: Vec::new(),
            reason: String::new(),
            granted_by: principal,
            state: LeaseState::Active,
            ended_at: None,
            ended_by: None,
            approval_deadline: None,
            approved_at: None,
            approved_by: None,
            end_reason: String::new(),
            chain: Vec::new(),
            may_delegate: 0,
            end_on_violation: false,
            node: None,
            revision: 0,
        }
    }

    fn part(token: &str, i: usize) -> Map<String, Value> {
        let bytes = URL_SAFE_NO_PAD
            .decode(token.split('.').nth(i).unwrap())
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[test]
    fn a_wit_follows_the_standard_s_profile() {
        let dir = tempfile::tempdir().unwrap();
        let keys = keys(dir.path());
        let l = lease();
        let now = SystemTime::now();
        let wit = mint(&keys, &l, now, now + Duration::from_secs(300)).unwrap();

        let header = part(&wit.token, 0);
        assert_eq!(
            Value::Object(header),
            json!({"alg": "ES256", "kid": keys.active_kid(), "typ": "wit+jwt"})
        );
        let claims = part(&wit.token, 1);
        assert_eq!(claims["sub"], l.spiffe_id.to_string());
        assert_eq!(claims["exp"], unix(now) + 300);
        assert_eq!(claims["iat"], unix(now));
        assert_eq!(claims["jti"], wit.jti);
        assert!(!claims.contains_key("aud"), "a WIT-SVID has no aud");
        assert!(!claims.contains_key("iss"));
        assert_eq!(claims[CLAIM_TASK_ID], "t1");
        assert_eq!(claims[CLAIM_DELEGATOR], "user/alice");
        assert_eq!(claims[CLAIM_LEASE_ID], l.id.as_str());
        let cnf = claims["cnf"]["jwk"].as_object().unwrap();
        assert_eq!(cnf["kty"], "EC");
        assert_eq!(cnf["crv"], "P-256");
        assert_eq!(cnf["alg"], "ES256");
        assert!(!cnf.contains_key("d"), "only the public half in the token");

        // The private JWK is the other half of cnf.jwk.
        let private: Map<String, Value> = serde_json::from_str(&wit.private_jwk).unwrap();
        for k in ["kty", "crv", "x", "y"] {
            assert_eq!(private[k], cnf[k], "{k}");
        }
        assert_eq!(
            URL_SAFE_NO_PAD
                .decode(private["d"].as_str().unwrap())
                .unwrap()
                .len(),
            32
        );
        assert_eq!(
            wit.thumbprint,
            thumbprint(&Value::Object(cnf.clone()).to_string()).unwrap()
        );

        // Every WIT has a key of its own.
        let again = mint(&keys, &l, now, now + Duration::from_secs(300)).unwrap();
        assert_ne!(part(&again.token, 1)["cnf"], claims["cnf"]);
        assert_ne!(again.thumbprint, wit.thumbprint);
    }

    /// Verified with an implementation we did not write: jsonwebtoken checks the WIT against
    /// the WIT bundle, and a proof signed with the private JWK against the WIT's `cnf.jwk`.
    #[test]
    fn an_independent_jose_library_verifies_the_wit_and_its_key_binding() {
        use jsonwebtoken::jwk::{Jwk, JwkSet};
        use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};

        let dir = tempfile::tempdir().unwrap();
        let keys = keys(dir.path());
        let now = SystemTime::now();
        let wit = mint(&keys, &lease(), now, now + Duration::from_secs(300)).unwrap();

        let bundle: JwkSet = serde_json::from_slice(&keys.jwks()).unwrap();
        let header = decode_header(&wit.token).unwrap();
        assert_eq!(header.typ.as_deref(), Some("wit+jwt"));
        let signer = bundle.find(header.kid.as_deref().unwrap()).unwrap();
        let bundle_json = serde_json::to_value(signer).unwrap();
        assert_eq!(bundle_json["use"], "wit-svid");
        let mut validation = Validation::new(Algorithm::ES256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        let claims = decode::<Value>(
            &wit.token,
            &DecodingKey::from_jwk(signer).unwrap(),
            &validation,
        )
        .unwrap()
        .claims;

        // A proof of possession signed with the private JWK verifies with cnf.jwk.
        let cnf: Jwk = serde_json::from_value(claims["cnf"]["jwk"].clone()).unwrap();
        let private = p256::SecretKey::from_jwk_str(&wit.private_jwk).unwrap();
        let proof = sign_es256(
            &private,
            &json!({"typ": "wpt+jwt", "alg": "ES256"}),
            &json!({
                "aud": "https://api.example.org/x", "exp": unix(now) + 60, "jti": "1",
            }),
        );
        let mut pv = Validation::new(Algorithm::ES256);
        pv.set_audience(&["https://api.example.org/x"]);
        pv.set_required_spec_claims(&["exp", "aud"]);
        decode::<Value>(&proof, &DecodingKey::from_jwk(&cnf).unwrap(), &pv).unwrap();

        // One signed by another key does not.
        let other = p256::SecretKey::from_slice(&random::<32>().unwrap()).unwrap();
        let forged = sign_es256(
            &other,
            &json!({"typ": "wpt+jwt", "alg": "ES256"}),
            &json!({
                "aud": "https://api.example.org/x", "exp": unix(now) + 60, "jti": "2",
            }),
        );
        assert!(decode::<Value>(&forged, &DecodingKey::from_jwk(&cnf).unwrap(), &pv).is_err());

        // A WIT whose cnf was swapped for the forger's key no longer verifies against the bundle.
        let mut tampered = claims.clone();
        let other_jwk: Value =
            serde_json::from_str(&other.public_key().to_jwk().to_string()).unwrap();
        tampered["cnf"]["jwk"] = other_jwk;
        let mut parts: Vec<String> = wit.token.split('.').map(str::to_owned).collect();
        parts[1] = URL_SAFE_NO_PAD.encode(tampered.to_string());
        let tampered = parts.join(".");
        assert!(decode::<Value>(
            &tampered,
            &DecodingKey::from_jwk(signer).unwrap(),
            &validation
        )
        .is_err());
    }

    #[test]
    fn the_wit_key_set_refuses_what_a_wit_must_not_carry() {
        let dir = tempfile::tempdir().unwrap();
        let keys = keys(dir.path());
        let now = unix(SystemTime::now());
        let base = json!({
            "sub": "spiffe://example.org/w", "exp": now + 60,
            "cnf": {"jwk": {"kty": "EC", "crv": "P-256", "x": "a", "y": "b", "alg": "ES256"}},
        });
        let Value::Object(ok) = base.clone() else {
            unreachable!()
        };
        keys.sign(&ok).unwrap();
        for (what, change) in [
            ("aud", json!({"aud": "spiffe://example.org/db"})),
            ("no cnf", json!({"cnf": null})),
            (
                "private cnf",
                json!({"cnf": {"jwk": {"kty": "EC", "crv": "P-256", "x": "a", "y": "b", "alg": "ES256", "d": "c"}}}),
            ),
            (
                "other alg",
                json!({"cnf": {"jwk": {"kty": "EC", "crv": "P-256", "x": "a", "y": "b", "alg": "ES384"}}}),
            ),
        ] {
            let Value::Object(mut claims) = base.clone() else {
                unreachable!()
            };
            for (k, v) in change.as_object().unwrap() {
                if v.is_null() {
                    claims.remove(k);
                } else {
                    claims.insert(k.clone(), v.clone());
                }
            }
            assert!(keys.sign(&claims).is_err(), "{what} refused");
        }
        // And its JWKS says what its keys are for.
        let jwks: Value = serde_json::from_slice(&keys.jwks()).unwrap();
        assert_eq!(jwks["keys"][0]["use"], "wit-svid");
    }

    fn sign_es256(key: &p256::SecretKey, header: &Value, claims: &Value) -> String {
        let mut token = URL_SAFE_NO_PAD.encode(header.to_string());
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(claims.to_string()));
        let signature: p256::ecdsa::Signature =
            p256::ecdsa::SigningKey::from(key).sign(token.as_bytes());
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(signature.to_bytes()));
        token
    }
}
