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

use std::collections::HashSet;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{
    EcdsaKeyPair, KeyPair as _, UnparsedPublicKey, ECDSA_P256_SHA256_FIXED,
    ECDSA_P256_SHA256_FIXED_SIGNING,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use spiffe::{SpiffeId, TrustDomain};
use tokio::sync::watch;
use zeroize::Zeroizing;

/// Name of the key set file inside the key directory.
const KEYS_FILE: &str = "keys.json";
/// Prefix of temporary files used for atomic replacement of [`KEYS_FILE`].
const TMP_PREFIX: &str = ".keys.json.tmp.";
/// Current on-disk format version.
const FORMAT_VERSION: u32 = 1;
/// The only signature algorithm we issue and accept.
const ALG: &str = "ES256";
/// Tolerated clock skew for `iat`/`nbf` in the future and for the `exp` cap in `sign`.
const CLOCK_SKEW: Duration = Duration::from_secs(60);
/// Upper bound for a presented token. JWT-SVIDs are small; refusing huge input
/// early bounds the work an unauthenticated peer can make us do.
const MAX_TOKEN_LEN: usize = 64 * 1024;
/// Length of a P-256 signature in the fixed (r||s) JWS encoding.
const SIGNATURE_LEN: usize = 64;
/// Length of an uncompressed P-256 point: 0x04 || X(32) || Y(32).
const PUBLIC_POINT_LEN: usize = 65;
/// Bytes of randomness in a kid (128 bits: unguessable, collision-free in practice).
const KID_RANDOM_BYTES: usize = 16;

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

#[derive(Serialize)]
struct FileOut<'a> {
    version: u32,
    keys: Vec<FileKeyOut<'a>>,
}

#[derive(Serialize)]
struct FileKeyOut<'a> {
    kid: &'a str,
    created_at: u64,
    retired_at: Option<u64>,
    pkcs8: &'a str,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileIn {
    version: u32,
    keys: Vec<FileKeyIn>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKeyIn {
    kid: String,
    created_at: u64,
    retired_at: Option<u64>,
    // Wrapped in `Zeroizing` right after parsing (see `load_key_set`).
    pkcs8: String,
}

/// The trust domain's JWT-SVID signing keys. `Send + Sync`; rotation happens
/// behind an internal lock, so one instance is shared by the whole agent.
pub struct JwtKeys {
    dir: PathBuf,
    file: PathBuf,
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
            .field("trust_domain", &self.trust_domain.as_str())
            .field("policy", &self.policy)
            .field("kids", &kids)
            .finish()
    }
}

impl JwtKeys {
    /// Loads the key set from `dir` (created 0700; key material in `keys.json`,
    /// mode 0600, written atomically temp+rename), or creates a first ECDSA
    /// P-256 key. Also runs `maintain(SystemTime::now())` once, so a key set
    /// that aged while the agent was down is rotated/pruned before use.
    pub fn load_or_create(
        dir: &Path,
        trust_domain: &TrustDomain,
        policy: KeyPolicy,
    ) -> Result<JwtKeys, JwtError> {
        ensure_private_dir(dir)?;
        remove_stale_temp_files(dir);
        let file = dir.join(KEYS_FILE);
        let rng = SystemRandom::new();
        let now = SystemTime::now();

        let set = match load_key_set(&file, &rng)? {
            Some(set) => {
                tracing::info!(
                    path = %file.display(),
                    active_kid = %set.active().key.kid,
                    keys = set.slots.len(),
                    "loaded JWT signing keys"
                );
                set
            }
            None => {
                let key = generate_key(&rng, &HashSet::new(), unix_secs(now)?)?;
                let set = KeySet {
                    slots: vec![Slot {
                        key: Arc::new(key),
                        retired_at: None,
                    }],
                };
                persist(dir, &file, &set)?;
                tracing::info!(
                    path = %file.display(),
                    active_kid = %set.active().key.kid,
                    "created first JWT signing key"
                );
                set
            }
        };

        let (changes, _) = watch::channel(0u64);
        let keys = JwtKeys {
            dir: dir.to_path_buf(),
            file,
            trust_domain: trust_domain.clone(),
            policy,
            rng,
            state: RwLock::new(set),
            changes,
        };
        keys.maintain(now)?;
        Ok(keys)
    }

    /// Rotates when due (new active key; the old one is retired, still
    /// published) and drops retired keys past `retired_at + max_token_ttl`.
    /// Persists any change before it becomes visible. Returns true when the
    /// published key set changed.
    pub fn maintain(&self, now: SystemTime) -> Result<bool, JwtError> {
        let now_s = unix_secs(now)?;
        let rotate_after = ceil_secs(self.policy.rotate_after);
        let keep_for = ceil_secs(self.policy.max_token_ttl);

        let mut state = self.write();
        let mut next = (*state).clone();
        let mut changed = false;

        // A clock that went backwards yields age 0: never rotate on it.
        let active_age = now_s.saturating_sub(next.active().key.created_at);
        if active_age >= rotate_after {
            let new = self.new_key(&next, now_s)?;
            tracing::info!(
                old_kid = %next.active().key.kid,
                new_kid = %new.kid,
                age_secs = active_age,
                "rotating JWT signing key"
            );
            next.rotate_in(new, now_s);
            changed = true;
        }

        let before = next.slots.len();
        next.slots.retain(|slot| match slot.retired_at {
            None => true,
            // Keep while a token signed just before retirement could still be
            // unexpired: drop only strictly after retired_at + max_token_ttl.
            Some(retired_at) => {
                let keep = now_s <= retired_at.saturating_add(keep_for);
                if !keep {
                    tracing::info!(kid = %slot.key.kid, "dropping retired JWT signing key");
                }
                keep
            }
        });
        changed |= next.slots.len() != before;

        if changed {
            self.commit(&mut state, next)?;
        }
        Ok(changed)
    }

    /// Forces a rotation now (tests, operators). Persists.
    pub fn rotate(&self, now: SystemTime) -> Result<(), JwtError> {
        let now_s = unix_secs(now)?;
        let mut state = self.write();
        let mut next = (*state).clone();
        let new = self.new_key(&next, now_s)?;
        tracing::info!(
            old_kid = %next.active().key.kid,
            new_kid = %new.kid,
            "forced rotation of JWT signing key"
        );
        next.rotate_in(new, now_s);
        self.commit(&mut state, next)
    }

    /// A receiver of a counter bumped on every change of the published key set.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The JWKS document (JSON bytes): `{"keys":[{"kty":"EC","crv":"P-256",
    /// "x":..,"y":..,"kid":..,"use":"jwt-svid","alg":"ES256"}, ...]}` with
    /// base64url (unpadded) coordinates; the active key comes first.
    pub fn jwks(&self) -> Vec<u8> {
        let state = self.read();
        let keys: Vec<Value> = state.slots.iter().map(|s| jwk(&s.key)).collect();
        serde_json::to_vec(&serde_json::json!({ "keys": keys }))
            .expect("serializing a JSON value cannot fail")
    }

    /// The kid of the active key.
    pub fn active_kid(&self) -> String {
        self.read().active().key.kid.clone()
    }

    /// Signs `claims` as a JWS compact token with header
    /// `{"alg":"ES256","kid":<active kid>,"typ":"JWT"}`.
    ///
    /// The claims must be ones a JWT-SVID validator accepts (`sub` a workload
    /// SPIFFE ID of our trust domain, `aud` a non-empty string or array of
    /// strings, `exp` an integer), and `exp` must not exceed the wall clock
    /// plus `max_token_ttl` (plus 60 s slack): the retired-key drop schedule
    /// depends on that bound.
    pub fn sign(&self, claims: &Map<String, Value>) -> Result<String, JwtError> {
        self.check_signable(claims)?;

        let state = self.read();
        let key = &state.active().key;
        let header = serde_json::json!({ "alg": ALG, "kid": key.kid, "typ": "JWT" });
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
        URL_SAFE_NO_PAD.encode_string(signature.as_ref(), &mut token);
        Ok(token)
    }

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
        if signature.len() != SIGNATURE_LEN {
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

    // ----- internals -----

    fn read(&self) -> RwLockReadGuard<'_, KeySet> {
        // State is only replaced after a successful persist, so a panic while
        // holding the lock cannot leave it half-updated: poisoning is ignored.
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, KeySet> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn new_key(&self, set: &KeySet, now_s: u64) -> Result<KeyMaterial, JwtError> {
        let taken: HashSet<String> = set.slots.iter().map(|s| s.key.kid.clone()).collect();
        generate_key(&self.rng, &taken, now_s)
    }

    /// Persists `next`, then makes it current and announces it. The lock is
    /// held across the write so that file and memory never disagree and
    /// concurrent rotations serialize.
    fn commit(
        &self,
        state: &mut RwLockWriteGuard<'_, KeySet>,
        next: KeySet,
    ) -> Result<(), JwtError> {
        persist(&self.dir, &self.file, &next)?;
        **state = next;
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
        Ok(())
    }

    fn check_subject(&self, sub: &str) -> Result<(), JwtError> {
        let id = SpiffeId::new(sub)
            .map_err(|e| JwtError::BadSubject(format!("not a SPIFFE ID: {e}")))?;
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
        let aud_ok = match claims.get("aud") {
            Some(Value::String(_)) => true,
            Some(Value::Array(items)) => !items.is_empty() && items.iter().all(Value::is_string),
            _ => false,
        };
        if !aud_ok {
            return Err(JwtError::BadClaims(
                "aud must be a string or a non-empty array of strings".into(),
            ));
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

// ----- helpers -----

fn io_err(path: &Path, e: std::io::Error) -> JwtError {
    JwtError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

fn unix_secs(t: SystemTime) -> Result<u64, JwtError> {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .map_err(|_| JwtError::Clock("time is before the Unix epoch".into()))
}

fn unix_secs_f64(t: SystemTime) -> Result<f64, JwtError> {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .map_err(|_| JwtError::Clock("time is before the Unix epoch".into()))
}

/// Whole seconds, rounded up: keys are kept (and kept active) slightly longer
/// rather than shorter than the policy says.
fn ceil_secs(d: Duration) -> u64 {
    d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0))
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

fn decode_json_object(part: &str, what: &str) -> Result<Map<String, Value>, JwtError> {
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

fn jwk(key: &KeyMaterial) -> Value {
    let point = key.public_point();
    debug_assert_eq!(point.len(), PUBLIC_POINT_LEN);
    serde_json::json!({
        "kty": "EC",
        "crv": "P-256",
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
        "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        "kid": key.kid,
        "use": "jwt-svid",
        "alg": ALG,
    })
}

fn generate_key(
    rng: &SystemRandom,
    taken: &HashSet<String>,
    created_at: u64,
) -> Result<KeyMaterial, JwtError> {
    // ring's Document is a short-lived stack value it does not wipe (and we
    // cannot reach into); the long-lived copy we keep is zeroized on drop.
    let pkcs8 = {
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, rng)
            .map_err(|_| JwtError::Crypto("P-256 key generation failed".into()))?;
        Zeroizing::new(doc.as_ref().to_vec())
    };
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, rng)
        .map_err(|e| JwtError::Crypto(format!("generated key unusable: {e}")))?;
    let kid = loop {
        let mut bytes = [0u8; KID_RANDOM_BYTES];
        rng.fill(&mut bytes)
            .map_err(|_| JwtError::Crypto("random generator failed".into()))?;
        let kid = hex::encode(bytes);
        if !taken.contains(&kid) {
            break kid;
        }
    };
    Ok(KeyMaterial {
        kid,
        created_at,
        pkcs8,
        pair,
    })
}

fn valid_kid(kid: &str) -> bool {
    !kid.is_empty()
        && kid.len() <= 128
        && kid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Creates `dir` with mode 0700, or tightens an existing one that is open to
/// group/other: the directory guards the temp files of atomic writes too.
fn ensure_private_dir(dir: &Path) -> Result<(), JwtError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io_err(dir, e))?;
    let meta = fs::metadata(dir).map_err(|e| io_err(dir, e))?;
    if !meta.is_dir() {
        return Err(JwtError::Io {
            path: dir.display().to_string(),
            message: "not a directory".into(),
        });
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        tracing::warn!(path = %dir.display(), mode = format!("{mode:o}"), "tightening JWT key directory to 0700");
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| io_err(dir, e))?;
    }
    Ok(())
}

fn remove_stale_temp_files(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
            let path = entry.path();
            if let Err(e) = fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove stale temporary key file");
            }
        }
    }
}

/// Reads `keys.json`; `Ok(None)` when it does not exist yet.
fn load_key_set(file: &Path, rng: &SystemRandom) -> Result<Option<KeySet>, JwtError> {
    let mut f = match File::open(file) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(file, e)),
    };
    let meta = f.metadata().map_err(|e| io_err(file, e))?;
    if !meta.is_file() {
        return Err(JwtError::KeyFile {
            path: file.display().to_string(),
            reason: "not a regular file".into(),
        });
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode != 0o600 {
        tracing::warn!(
            path = %file.display(),
            mode = format!("{mode:o}"),
            "JWT key file had mode other than 0600; tightening it (consider rotating the keys)"
        );
        f.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(|e| io_err(file, e))?;
    }
    let mut raw = Zeroizing::new(Vec::new());
    f.read_to_end(&mut raw).map_err(|e| io_err(file, e))?;

    let bad = |reason: String| JwtError::KeyFile {
        path: file.display().to_string(),
        reason,
    };
    // serde_json's error text may quote input; never include it (it could hold key bytes).
    let parsed: FileIn = serde_json::from_slice(&raw).map_err(|e| {
        bad(format!(
            "not a valid key set document (line {}, column {})",
            e.line(),
            e.column()
        ))
    })?;
    if parsed.version != FORMAT_VERSION {
        return Err(bad(format!("unsupported version {}", parsed.version)));
    }

    let mut slots = Vec::with_capacity(parsed.keys.len());
    let mut kids = HashSet::new();
    for entry in parsed.keys {
        if !valid_kid(&entry.kid) {
            return Err(bad("a kid is empty, too long or not URL-safe".into()));
        }
        if !kids.insert(entry.kid.clone()) {
            return Err(bad(format!("duplicate kid {}", entry.kid)));
        }
        let encoded = Zeroizing::new(entry.pkcs8);
        let pkcs8 = Zeroizing::new(
            STANDARD
                .decode(encoded.as_bytes())
                .map_err(|_| bad(format!("key {} is not valid base64", entry.kid)))?,
        );
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, rng)
            .map_err(|e| bad(format!("key {} is not a P-256 PKCS#8 key: {e}", entry.kid)))?;
        slots.push(Slot {
            key: Arc::new(KeyMaterial {
                kid: entry.kid,
                created_at: entry.created_at,
                pkcs8,
                pair,
            }),
            retired_at: entry.retired_at,
        });
    }
    let active = slots.iter().filter(|s| s.retired_at.is_none()).count();
    if active != 1 {
        return Err(bad(format!(
            "expected exactly one active key, found {active}"
        )));
    }
    // Active key first, then the most recently retired.
    slots.sort_by_key(|s| std::cmp::Reverse(s.retired_at.unwrap_or(u64::MAX)));
    Ok(Some(KeySet { slots }))
}

/// Atomically replaces `keys.json` with `set`.
fn persist(dir: &Path, file: &Path, set: &KeySet) -> Result<(), JwtError> {
    let encoded: Vec<Zeroizing<String>> = set
        .slots
        .iter()
        .map(|s| Zeroizing::new(STANDARD.encode(s.key.pkcs8.as_slice())))
        .collect();
    let doc = FileOut {
        version: FORMAT_VERSION,
        keys: set
            .slots
            .iter()
            .zip(&encoded)
            .map(|(s, pkcs8)| FileKeyOut {
                kid: &s.key.kid,
                created_at: s.key.created_at,
                retired_at: s.retired_at,
                pkcs8: pkcs8.as_str(),
            })
            .collect(),
    };
    let mut bytes = Zeroizing::new(Vec::new());
    serde_json::to_writer_pretty(&mut *bytes, &doc)
        .map_err(|e| JwtError::Crypto(format!("cannot encode key set: {e}")))?;
    bytes.push(b'\n');

    let rng = SystemRandom::new();
    let mut suffix = [0u8; 8];
    rng.fill(&mut suffix)
        .map_err(|_| JwtError::Crypto("random generator failed".into()))?;
    let tmp = dir.join(format!("{TMP_PREFIX}{}", hex::encode(suffix)));

    let write = || -> Result<(), JwtError> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| io_err(&tmp, e))?;
        f.write_all(&bytes).map_err(|e| io_err(&tmp, e))?;
        f.sync_all().map_err(|e| io_err(&tmp, e))?;
        drop(f);
        fs::rename(&tmp, file).map_err(|e| io_err(file, e))?;
        // Make the rename itself durable.
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err(dir, e))
    };
    let result = write();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const TD: &str = "example.org";
    const AUD: &str = "spiffe://example.org/db";

    fn policy() -> KeyPolicy {
        KeyPolicy {
            rotate_after: Duration::from_secs(24 * 3600),
            max_token_ttl: Duration::from_secs(3600),
        }
    }

    fn td() -> TrustDomain {
        TrustDomain::new(TD).unwrap()
    }

    fn unix(t: SystemTime) -> i64 {
        t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
    }

    fn claims_at(now: SystemTime, ttl: i64, sub: &str) -> Map<String, Value> {
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

    fn claims() -> Map<String, Value> {
        claims_at(SystemTime::now(), 300, "spiffe://example.org/web")
    }

    fn b64json(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
    }

    fn setup() -> (tempfile::TempDir, JwtKeys) {
        let tmp = tempfile::tempdir().unwrap();
        let keys = JwtKeys::load_or_create(&tmp.path().join("jwt"), &td(), policy()).unwrap();
        (tmp, keys)
    }

    #[test]
    fn create_then_reload_keeps_key_and_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state").join("jwt");
        let kid = {
            let keys = JwtKeys::load_or_create(&dir, &td(), policy()).unwrap();
            keys.active_kid()
        };
        assert_eq!(kid.len(), 32);
        assert!(kid.bytes().all(|b| b.is_ascii_hexdigit()));

        let dir_mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(dir_mode, 0o700);
        let file = dir.join(KEYS_FILE);
        let file_mode = fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(file_mode, 0o600);

        let keys = JwtKeys::load_or_create(&dir, &td(), policy()).unwrap();
        assert_eq!(keys.active_kid(), kid);
        // The reloaded key signs tokens that validate: the private key survived.
        let token = keys.sign(&claims()).unwrap();
        keys.validate(&token, AUD, SystemTime::now()).unwrap();
        // No temp files left behind.
        let names: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec![KEYS_FILE.to_string()]);
    }

    #[test]
    fn loose_file_mode_is_tightened_and_corrupt_file_refused() {
        let (tmp, keys) = setup();
        let dir = tmp.path().join("jwt");
        let file = dir.join(KEYS_FILE);
        let kid = keys.active_kid();
        drop(keys);

        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let keys = JwtKeys::load_or_create(&dir, &td(), policy()).unwrap();
        assert_eq!(keys.active_kid(), kid);
        assert_eq!(
            fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        drop(keys);

        fs::write(&file, b"{not json").unwrap();
        let err = JwtKeys::load_or_create(&dir, &td(), policy()).unwrap_err();
        assert!(matches!(err, JwtError::KeyFile { .. }), "{err:?}");
        // The corrupt file is not replaced behind the operator's back.
        assert_eq!(fs::read(&file).unwrap(), b"{not json");
    }

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
            format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
        };
        assert!(matches!(
            keys.validate(&token, AUD, now),
            Err(JwtError::BadSubject(_))
        ));
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

    #[test]
    fn rotation_lifecycle() {
        let (tmp, keys) = setup();
        let mut rx = keys.subscribe();
        let v0 = *rx.borrow_and_update();

        let t0 = SystemTime::now();
        let old_kid = keys.active_kid();
        let old_token = keys
            .sign(&claims_at(t0, 300, "spiffe://example.org/web"))
            .unwrap();

        keys.rotate(t0).unwrap();
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), v0 + 1);
        let new_kid = keys.active_kid();
        assert_ne!(new_kid, old_kid);

        // Old token still validates; old key is still published.
        keys.validate(&old_token, AUD, t0).unwrap();
        let jwks = String::from_utf8(keys.jwks()).unwrap();
        assert!(jwks.contains(&old_kid) && jwks.contains(&new_kid));

        // New tokens carry the new kid.
        let new_token = keys
            .sign(&claims_at(t0, 300, "spiffe://example.org/web"))
            .unwrap();
        let header = decode_json_object(new_token.split('.').next().unwrap(), "h").unwrap();
        assert_eq!(header["kid"], new_kid.as_str());

        // Rotation was persisted.
        {
            let reloaded =
                JwtKeys::load_or_create(&tmp.path().join("jwt"), &td(), policy()).unwrap();
            assert_eq!(reloaded.active_kid(), new_kid);
            reloaded.validate(&old_token, AUD, t0).unwrap();
        }

        // Exactly at retired_at + max_token_ttl the old key is still kept.
        let ttl = policy().max_token_ttl;
        assert!(!keys.maintain(t0 + ttl).unwrap());
        assert!(!rx.has_changed().unwrap());

        // Past it: dropped.
        let later = t0 + ttl + Duration::from_secs(2);
        assert!(keys.maintain(later).unwrap());
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), v0 + 2);
        let jwks = String::from_utf8(keys.jwks()).unwrap();
        assert!(!jwks.contains(&old_kid) && jwks.contains(&new_kid));
        assert_eq!(
            keys.validate(&old_token, AUD, t0),
            Err(JwtError::UnknownKey(old_kid.clone()))
        );
        keys.validate(&new_token, AUD, t0).unwrap();

        // Nothing more to do.
        assert!(!keys.maintain(later).unwrap());

        // The drop was persisted too.
        let reloaded = JwtKeys::load_or_create(&tmp.path().join("jwt"), &td(), policy()).unwrap();
        let jwks = String::from_utf8(reloaded.jwks()).unwrap();
        assert!(!jwks.contains(&old_kid));
    }

    #[test]
    fn maintain_rotates_when_due() {
        let (_tmp, keys) = setup();
        let rx = keys.subscribe();
        let now = SystemTime::now();
        let kid = keys.active_kid();

        assert!(!keys.maintain(now + Duration::from_secs(3600)).unwrap());
        assert_eq!(keys.active_kid(), kid);
        assert!(!rx.has_changed().unwrap());

        let due = now + policy().rotate_after + Duration::from_secs(1);
        assert!(keys.maintain(due).unwrap());
        assert_ne!(keys.active_kid(), kid);
        assert!(rx.has_changed().unwrap());
        let jwks = String::from_utf8(keys.jwks()).unwrap();
        assert!(jwks.contains(&kid), "retired key still published");

        // A clock that jumps backwards neither rotates nor drops.
        assert!(!keys.maintain(now).unwrap());

        // Eventually the retired key goes away.
        let gone = due + policy().max_token_ttl + Duration::from_secs(1);
        assert!(keys.maintain(gone).unwrap());
        assert!(!String::from_utf8(keys.jwks()).unwrap().contains(&kid));
    }

    #[test]
    fn keys_are_send_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<JwtKeys>();
    }
}
