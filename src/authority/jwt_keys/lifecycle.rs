//! Creating, rotating and dropping keys: the lifecycle described in the
//! folder docs, with every change persisted before it is announced.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, RwLock, RwLockWriteGuard};
use std::time::SystemTime;

use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use spiffe::TrustDomain;
use tokio::sync::watch;
use zeroize::Zeroizing;

use super::store::{ensure_private_dir, load_key_set, persist, remove_stale_temp_files, KEYS_FILE};
use super::{
    ceil_secs, unix_secs, JwtError, JwtKeys, KeyMaterial, KeyPolicy, KeySet, Slot, TokenProfile,
};

/// Bytes of randomness in a kid (128 bits: unguessable, collision-free in practice).
const KID_RANDOM_BYTES: usize = 16;

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
        JwtKeys::load_or_create_for(TokenProfile::JwtSvid, dir, trust_domain, policy)
    }

    /// [`JwtKeys::load_or_create`] for the keys of another kind of token (its own `dir`).
    pub fn load_or_create_for(
        profile: TokenProfile,
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
                    kind = profile.name(),
                    "loaded token signing keys"
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
                    kind = profile.name(),
                    "created first token signing key"
                );
                set
            }
        };

        let (changes, _) = watch::channel(0u64);
        let keys = JwtKeys {
            dir: dir.to_path_buf(),
            file,
            profile,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::jwt_keys::test_support::*;
    use crate::authority::jwt_keys::validate::decode_json_object;
    use std::time::Duration;

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
}
