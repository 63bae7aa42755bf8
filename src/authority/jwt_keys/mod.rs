//! JWT-SVID signing keys of the trust domain.
//!
//! This module owns the keys that sign JWT-SVIDs. They are separate from the
//! X.509 CA: a JWT key only ever signs JWS compact tokens (ES256, ECDSA P-256
//! with SHA-256), and its public half is published to relying parties as a
//! JWKS document. Building the claims (`sub`, `aud`, `exp`, `iat`, `jti`, ...)
//! is the caller's job; [`JwtKeys::sign`] signs a given claims object and
//! [`JwtKeys::validate`] checks a presented token against the published keys.
//!
//! # Key lifecycle
//!
//! A key set always holds exactly one *active* key and zero or more *retired*
//! keys:
//!
//! 1. **Active**: created by [`JwtKeys::load_or_create`] (first start) or by a
//!    rotation. It signs every new token and is published in the JWKS.
//! 2. **Retired**: when the active key is older than
//!    [`KeyPolicy::rotate_after`] ([`JwtKeys::maintain`]) or an operator forces
//!    it ([`JwtKeys::rotate`]), a fresh key becomes active and the old one is
//!    marked retired. It signs nothing more but stays published, because tokens
//!    it signed are still in circulation and relying parties must keep
//!    verifying them until they expire.
//! 3. **Dropped**: a token lives at most [`KeyPolicy::max_token_ttl`], so once
//!    `now > retired_at + max_token_ttl` no valid token can carry the retired
//!    key's `kid`; `maintain` removes it from the set and from the JWKS.
//!
//! Every change of the published set is persisted first and then announced on
//! the [`JwtKeys::subscribe`] channel (a counter), so that bundle distribution
//! can push the new JWKS.
//!
//! Because dropping relies on `max_token_ttl`, [`JwtKeys::sign`] refuses claims
//! whose `exp` lies further than `max_token_ttl` (plus a small clock slack)
//! beyond the current wall clock.
//!
//! # On-disk layout
//!
//! `dir` (created with mode 0700; an existing directory with group/other
//! permission bits is tightened to 0700) holds a single file `keys.json`,
//! mode 0600:
//!
//! ```json
//! {
//!   "version": 1,
//!   "keys": [
//!     {"kid": "<32 hex chars>", "created_at": 1700000000, "retired_at": null,
//!      "pkcs8": "<standard base64 of the PKCS#8 v1/v2 document from ring>"},
//!     {"kid": "...", "created_at": 1690000000, "retired_at": 1700000000, "pkcs8": "..."}
//!   ]
//! }
//! ```
//!
//! Timestamps are Unix seconds. Exactly one entry has `retired_at: null` (the
//! active key). The file is replaced atomically: written to a fresh temporary
//! file (`O_EXCL`, mode 0600) in the same directory, fsynced, renamed over
//! `keys.json`, and the directory is fsynced. A crash therefore leaves either
//! the old or the new key set, never a torn one; stale temporary files are
//! removed on the next load.
//!
//! If `keys.json` exists with group or other permission bits set, it is
//! **tightened to 0600** (with a warning) rather than refused: the agent keeps
//! its identity, and the operator is told the key may have been exposed and
//! can force a rotation. A `keys.json` that cannot be parsed, holds no active
//! key, or holds a key ring cannot load is refused ([`JwtError::KeyFile`]);
//! it is never silently replaced, since that would invalidate every token in
//! circulation and hide corruption.

mod jwks;
mod lifecycle;
mod sign;
mod store;
mod validate;

use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair as _};
use spiffe::TrustDomain;
use tokio::sync::watch;
use zeroize::Zeroizing;

/// The only signature algorithm we issue and accept.
const ALG: &str = "ES256";

/// Which kind of SVID a key set signs: what its JWKS entries say in `use`, what the tokens'
/// `typ` is, and which claims [`JwtKeys::sign`] requires. A WIT-SVID key set is separate from
/// the JWT-SVID one (its own directory), so that neither kind of token can pass for the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenProfile {
    /// JWT-SVIDs: `typ: JWT`, `aud` required.
    JwtSvid,
    /// WIT-SVIDs (the SPIFFE WIT-SVID standard): `typ: wit+jwt`, `aud` forbidden, `cnf.jwk`
    /// required.
    WitSvid,
}

impl TokenProfile {
    /// The JWK `use` of this profile's keys in a SPIFFE bundle.
    pub fn key_use(self) -> &'static str {
        match self {
            TokenProfile::JwtSvid => "jwt-svid",
            TokenProfile::WitSvid => "wit-svid",
        }
    }

    /// The JOSE header `typ` of this profile's tokens.
    pub fn typ(self) -> &'static str {
        match self {
            TokenProfile::JwtSvid => "JWT",
            TokenProfile::WitSvid => "wit+jwt",
        }
    }

    fn name(self) -> &'static str {
        match self {
            TokenProfile::JwtSvid => "JWT",
            TokenProfile::WitSvid => "WIT",
        }
    }
}
/// Tolerated clock skew for `iat`/`nbf` in the future and for the `exp` cap in `sign`.
const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// When keys rotate and how long retired keys stay published.
#[derive(Clone, Debug)]
pub struct KeyPolicy {
    /// A new signing key is made when the active one is older than this.
    pub rotate_after: Duration,
    /// The longest lifetime any token can have; a retired key stays published
    /// until this long after it was retired.
    pub max_token_ttl: Duration,
}

/// Errors of the JWT key module. Every variant names what was wrong; token
/// validation variants never echo secret material.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum JwtError {
    /// A file system operation failed.
    #[error("I/O error on {path}: {message}")]
    Io { path: String, message: String },
    /// The persisted key set is unreadable or inconsistent.
    #[error("invalid key file {path}: {reason}")]
    KeyFile { path: String, reason: String },
    /// Key generation, parsing or signing failed inside the crypto library.
    #[error("cryptographic failure: {0}")]
    Crypto(String),
    /// The supplied time cannot be represented (before the Unix epoch, or absurdly far away).
    #[error("invalid time: {0}")]
    Clock(String),
    /// `sign` was given claims that no JWT-SVID validator would accept.
    #[error("claims not signable: {0}")]
    BadClaims(String),
    /// The token is malformed (structure, encoding, JSON, claim types...).
    #[error("malformed token: {0}")]
    BadToken(String),
    /// The header `alg` is not ES256 (this includes "none" and every HMAC/RSA algorithm).
    #[error("unsupported token algorithm {0:?}")]
    UnsupportedAlgorithm(String),
    /// The header `kid` is not one of the published keys (unknown, or dropped after rotation).
    #[error("unknown signing key {0:?}")]
    UnknownKey(String),
    /// The signature does not verify with the key named by `kid`.
    #[error("invalid token signature")]
    BadSignature,
    /// `sub` is not a SPIFFE ID of a workload in our trust domain.
    #[error("invalid token subject: {0}")]
    BadSubject(String),
    /// `aud` does not contain the expected audience.
    #[error("token audience does not include the expected audience")]
    AudienceMismatch,
    /// `exp` is not after `now`.
    #[error("token expired")]
    Expired,
    /// `nbf` or `iat` lies further in the future than the tolerated clock skew.
    #[error("token not yet valid: {0}")]
    NotYetValid(String),
}

/// One key's immutable material. Shared by `Arc` so that a candidate key set
/// can be built, persisted and only then swapped in, without cloning secrets.
struct KeyMaterial {
    kid: String,
    created_at: u64,
    /// The PKCS#8 document, kept only to re-persist the key set. Wiped on drop.
    pkcs8: Zeroizing<Vec<u8>>,
    pair: EcdsaKeyPair,
}

impl KeyMaterial {
    /// The public key as an uncompressed point 0x04 || X || Y.
    fn public_point(&self) -> &[u8] {
        self.pair.public_key().as_ref()
    }
}

#[derive(Clone)]
struct Slot {
    key: Arc<KeyMaterial>,
    /// `None` for the active key.
    retired_at: Option<u64>,
}

/// Invariant: exactly one slot has `retired_at == None`, kids are unique.
#[derive(Clone)]
struct KeySet {
    slots: Vec<Slot>,
}

impl KeySet {
    fn active(&self) -> &Slot {
        // The invariant is established by `load`/`create` and kept by `rotate_in`.
        self.slots
            .iter()
            .find(|s| s.retired_at.is_none())
            .expect("key set invariant: exactly one active key")
    }

    fn find(&self, kid: &str) -> Option<&Slot> {
        self.slots.iter().find(|s| s.key.kid == kid)
    }

    /// Retires the active key at `now` and makes `new` the active one.
    fn rotate_in(&mut self, new: KeyMaterial, now: u64) {
        for slot in &mut self.slots {
            if slot.retired_at.is_none() {
                slot.retired_at = Some(now);
            }
        }
        // Active key first: keeps the JWKS and the file in a readable order.
        self.slots.insert(
            0,
            Slot {
                key: Arc::new(new),
                retired_at: None,
            },
        );
    }
}

/// The trust domain's JWT-SVID signing keys. `Send + Sync`; rotation happens
/// behind an internal lock, so one instance is shared by the whole agent.
pub struct JwtKeys {
    dir: PathBuf,
    file: PathBuf,
    profile: TokenProfile,
    trust_domain: TrustDomain,
    policy: KeyPolicy,
    rng: SystemRandom,
    state: RwLock<KeySet>,
    changes: watch::Sender<u64>,
}

impl std::fmt::Debug for JwtKeys {
    // Hand-written so that no key material can ever reach a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.read();
        let kids: Vec<&str> = state.slots.iter().map(|s| s.key.kid.as_str()).collect();
        f.debug_struct("JwtKeys")
            .field("dir", &self.dir)
            .field("profile", &self.profile)
            .field("trust_domain", &self.trust_domain.as_str())
            .field("policy", &self.policy)
            .field("kids", &kids)
            .finish()
    }
}

impl JwtKeys {
    fn read(&self) -> RwLockReadGuard<'_, KeySet> {
        // State is only replaced after a successful persist, so a panic while
        // holding the lock cannot leave it half-updated: poisoning is ignored.
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, KeySet> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }
}

fn unix_secs(t: SystemTime) -> Result<u64, JwtError> {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .map_err(|_| JwtError::Clock("time is before the Unix epoch".into()))
}

/// Whole seconds, rounded up: keys are kept (and kept active) slightly longer
/// rather than shorter than the policy says.
fn ceil_secs(d: Duration) -> u64 {
    d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0))
}

#[cfg(test)]
mod test_support {
    use super::*;
    use serde_json::{json, Map, Value};

    pub(super) const TD: &str = "example.org";
    pub(super) const AUD: &str = "spiffe://example.org/db";

    pub(super) fn policy() -> KeyPolicy {
        KeyPolicy {
            rotate_after: Duration::from_secs(24 * 3600),
            max_token_ttl: Duration::from_secs(3600),
        }
    }

    pub(super) fn td() -> TrustDomain {
        TrustDomain::new(TD).unwrap()
    }

    pub(super) fn unix(t: SystemTime) -> i64 {
        t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
    }

    pub(super) fn claims_at(now: SystemTime, ttl: i64, sub: &str) -> Map<String, Value> {
        let now = unix(now);
        let Value::Object(map) = json!({
            "sub": sub,
            "aud": [AUD, "other"],
            "iat": now,
            "exp": now + ttl,
            "jti": "abc",
        }) else {
            unreachable!()
        };
        map
    }

    pub(super) fn claims() -> Map<String, Value> {
        claims_at(SystemTime::now(), 300, "spiffe://example.org/web")
    }

    pub(super) fn setup() -> (tempfile::TempDir, JwtKeys) {
        let tmp = tempfile::tempdir().unwrap();
        let keys = JwtKeys::load_or_create(&tmp.path().join("jwt"), &td(), policy()).unwrap();
        (tmp, keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_send_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<JwtKeys>();
    }
}
