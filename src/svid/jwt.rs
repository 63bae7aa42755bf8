//! JWT-SVIDs: minted per lease and audience set, scoped to the audiences a lease allows,
//! cached until half their life (never across leases), and recorded in the audit log before
//! they are handed out.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use super::{AuditUnavailable, Manager, Requester};
use crate::audit::{event, Event};
use crate::lease::{ActiveLease, Budget, LeaseId};
use crate::selector::Selectors;

/// Task claims carried by every JWT-SVID. Private claim names must resist collisions
/// (RFC 7519, section 4.3), so they are URNs in mayfly's own namespace.
pub const CLAIM_TASK_ID: &str = "urn:mayfly:task_id";
pub const CLAIM_DELEGATOR: &str = "urn:mayfly:delegator";
pub const CLAIM_LEASE_ID: &str = "urn:mayfly:lease_id";
/// A delegated lease's ancestors, root first: `[{"sub", task_id, lease_id}]`.
pub const CLAIM_CHAIN: &str = "urn:mayfly:chain";

/// The delegation chain of a lease as RFC 8693 (section 4.1) nests it in `act`: the outermost
/// `act` is the current actor (the lease itself), each nested one the actor before it, and the
/// root lease is the most deeply nested. `None` for a lease that was not delegated.
///
/// Why this layout: in RFC 8693 `sub` is whom the chain acts for (here the root delegator)
/// and `act` the actors. JWT-SVID requires `sub` to be the holder's SPIFFE ID, so `sub`
/// cannot name the delegator; the delegator stays in `urn:mayfly:delegator` (and in the
/// SPIFFE ID). The `act` chain is then exactly what RFC 8693 would carry, so a reader of that
/// RFC reads the actors right, rather than an inverted chain (`act` naming the parent, which
/// an RFC 8693 reader would take for the current actor). The same chain is flat, root first,
/// in `urn:mayfly:chain`, for policies that would rather not recurse.
fn act_claim(l: &crate::lease::Lease) -> Option<Value> {
    if l.chain.is_empty() {
        return None;
    }
    let actor = |sub: String, task: &str, lease: &str| json!({ "sub": sub, CLAIM_TASK_ID: task, CLAIM_LEASE_ID: lease });
    let mut act: Option<Value> = None;
    for link in &l.chain {
        let mut a = actor(
            link.spiffe_id.to_string(),
            &link.task_id,
            link.lease_id.as_str(),
        );
        if let Some(prior) = act.take() {
            a["act"] = prior;
        }
        act = Some(a);
    }
    let mut current = actor(l.spiffe_id.to_string(), &l.task_id, l.id.as_str());
    current["act"] = act.expect("a non-empty chain");
    Some(current)
}

pub(super) fn chain_claim(l: &crate::lease::Lease) -> Value {
    Value::Array(
        l.chain
            .iter()
            .map(|link| {
                json!({
                    "sub": link.spiffe_id.to_string(),
                    CLAIM_TASK_ID: link.task_id,
                    CLAIM_LEASE_ID: link.lease_id.as_str(),
                })
            })
            .collect(),
    )
}

/// One minted token.
#[derive(Debug)]
pub struct JwtSvid {
    pub spiffe_id: String,
    pub token: String,
    pub lease_id: LeaseId,
    pub issued_at: SystemTime,
    pub expires_at: SystemTime,
}

#[derive(Debug, thiserror::Error)]
pub enum JwtFetchError {
    #[error("no identity issued")]
    NoIdentity,
    #[error("the caller does not hold {0}")]
    NotHeld(String),
    #[error("audience {0:?} is not allowed for this task")]
    AudienceNotAllowed(String),
    #[error(transparent)]
    Audit(#[from] AuditUnavailable),
    #[error("signing failed: {0}")]
    Signing(String),
    #[error("lease {lease_id} mints at most {per_second} JWT-SVIDs a second ({burst} at once); try again in {retry_ms} ms")]
    RateLimited {
        lease_id: LeaseId,
        per_second: u32,
        burst: u32,
        retry_ms: u64,
    },
}

/// Tokens kept per lease at most; past that the oldest goes. Each distinct audience set is a
/// token, and a caller may ask for any number of sets.
pub(super) const CACHED_PER_LEASE: usize = 16;

/// Per lease, its tokens and what it may still mint.
pub(super) type JwtCache = std::sync::Mutex<HashMap<LeaseId, LeaseTokens>>;

/// One lease's tokens by sorted, deduplicated audience set, and its mint budget.
#[derive(Default)]
pub(super) struct LeaseTokens {
    pub(super) tokens: HashMap<Vec<String>, Arc<JwtSvid>>,
    budget: Budget,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

impl Manager {
    /// JWT-SVIDs for the caller's matching leases (or only the one with `spiffe_id`), for
    /// `audiences` (sorted, deduplicated, non-empty: the caller checks).
    pub async fn jwt_svids(
        &self,
        selectors: &Selectors,
        who: &Requester,
        audiences: &[String],
        spiffe_id: Option<&str>,
    ) -> Result<Vec<Arc<JwtSvid>>, JwtFetchError> {
        let mut leases = self.registry.matching(selectors);
        if leases.is_empty() {
            return Err(JwtFetchError::NoIdentity);
        }
        if let Some(id) = spiffe_id {
            leases.retain(|l| l.lease.spiffe_id.to_string() == id);
            if leases.is_empty() {
                return Err(JwtFetchError::NotHeld(id.to_owned()));
            }
        }
        // A lease that lists audiences allows only those; others are skipped, and if none is
        // left the caller learns which audience was refused.
        let mut refused = None;
        leases.retain(|l| {
            let allowed = &l.lease.audiences;
            match audiences
                .iter()
                .find(|a| !allowed.is_empty() && !allowed.contains(a))
            {
                Some(a) => {
                    refused.get_or_insert_with(|| a.clone());
                    false
                }
                None => true,
            }
        });
        if leases.is_empty() {
            return Err(JwtFetchError::AudienceNotAllowed(
                refused.unwrap_or_default(),
            ));
        }
        let mut out = Vec::with_capacity(leases.len());
        for lease in leases {
            if let Some(svid) = self.jwt_for(lease, who, audiences).await? {
                out.push(svid);
            }
        }
        if out.is_empty() {
            // Every matching lease is about to end: nothing can be minted that lives a second.
            return Err(JwtFetchError::NoIdentity);
        }
        Ok(out)
    }

    async fn jwt_for(
        &self,
        lease: ActiveLease,
        who: &Requester,
        audiences: &[String],
    ) -> Result<Option<Arc<JwtSvid>>, JwtFetchError> {
        let now = SystemTime::now();
        let started = std::time::Instant::now();
        let cached = {
            let cache = self.jwt_cache.lock().expect("jwt cache poisoned");
            cache
                .get(&lease.lease.id)
                .and_then(|t| t.tokens.get(audiences))
                .cloned()
        };
        if let Some(cached) = cached {
            let life = cached
                .expires_at
                .duration_since(cached.issued_at)
                .unwrap_or_default();
            if now < cached.issued_at + life / 2 {
                return Ok(Some(cached.clone()));
            }
        }
        let l = &lease.lease;
        let end = *lease.expires_at.borrow();
        let expires_at = now.checked_add(l.jwt_ttl).map_or(end, |t| t.min(end));
        let (iat, exp) = (unix(now), unix(expires_at));
        if exp <= iat {
            return Ok(None);
        }
        self.take_mint(&lease)?;
        let jti = hex::encode(rand::random::<[u8; 16]>());
        let claims = json!({
            "sub": l.spiffe_id.to_string(),
            "aud": audiences,
            "iat": iat,
            "exp": exp,
            "jti": jti,
            CLAIM_TASK_ID: l.task_id,
            CLAIM_DELEGATOR: l.delegator,
            CLAIM_LEASE_ID: l.id.as_str(),
        });
        let Value::Object(mut claims) = claims else {
            unreachable!("a json object")
        };
        if let Some(act) = act_claim(l) {
            claims.insert("act".into(), act);
            claims.insert(CLAIM_CHAIN.into(), chain_claim(l));
        }
        let token = self
            .jwt_keys
            .sign(&claims)
            .map_err(|e| JwtFetchError::Signing(e.to_string()))?;
        let expires_at = UNIX_EPOCH + Duration::from_secs(exp);
        {
            let audit = &self.audit;
            let kid = self.jwt_keys.active_kid();
            let event = Event::JwtIssued(event::JwtIssued {
                jti: &jti,
                audiences,
                spiffe_id: l.spiffe_id.to_string(),
                expires_at: crate::time::rfc3339(expires_at),
                lease_id: l.id.as_str(),
                task_id: &l.task_id,
                delegator: &l.delegator,
                kid: &kid,
                pid: who.pid,
                uid: who.uid,
                exe_sha256: who.exe_sha256.as_deref(),
                chain: l.audit_chain(),
            });
            let appended =
                crate::telemetry::timed(&self.metrics.audit_write_seconds, audit.record(&event));
            if let Err(e) = appended.await {
                tracing::error!(
                    event = "jwt_not_audited",
                    lease_id = %l.id,
                    error = %e,
                    "AUDIT LOG UNAVAILABLE: refusing to hand out an unaudited JWT-SVID"
                );
                return Err(AuditUnavailable(e.to_string()).into());
            }
        }
        tracing::info!(
            event = "jwt_issued",
            jti = %jti,
            spiffe_id = %l.spiffe_id,
            audiences = %audiences.join(","),
            expires_at = %crate::time::rfc3339(expires_at),
            lease_id = %l.id,
            pid = who.pid,
            uid = who.uid,
            "jwt-svid issued"
        );
        let kind = crate::telemetry::KindLabel {
            kind: crate::telemetry::SvidKind::jwt,
        };
        self.metrics.svids_issued.get_or_create(&kind).inc();
        self.metrics
            .issuance_seconds
            .get_or_create(&kind)
            .observe(started.elapsed().as_secs_f64());
        let svid = Arc::new(JwtSvid {
            spiffe_id: l.spiffe_id.to_string(),
            token,
            lease_id: l.id.clone(),
            issued_at: UNIX_EPOCH + Duration::from_secs(iat),
            expires_at,
        });
        {
            let mut cache = self.jwt_cache.lock().expect("jwt cache poisoned");
            // Ended meanwhile: its entry is gone (or about to go), and it gets no new token.
            if lease.ended.is_cancelled() {
                return Ok(None);
            }
            let tokens = &mut cache.entry(l.id.clone()).or_default().tokens;
            if tokens.len() >= CACHED_PER_LEASE && !tokens.contains_key(audiences) {
                let oldest = tokens
                    .iter()
                    .min_by_key(|(_, t)| t.issued_at)
                    .map(|(aud, _)| aud.clone());
                if let Some(oldest) = oldest {
                    tokens.remove(&oldest);
                }
            }
            tokens.insert(audiences.to_vec(), svid.clone());
        }
        if lease.ended.is_cancelled() {
            return Ok(None);
        }
        Ok(Some(svid))
    }

    /// Takes one mint from the lease's budget (a new lease's entry starts full, and goes when
    /// the lease ends, tokens and budget alike).
    fn take_mint(&self, lease: &ActiveLease) -> Result<(), JwtFetchError> {
        let rate = self.registry.limits().jwt_mint;
        let id = &lease.lease.id;
        let mut cache = self.jwt_cache.lock().expect("jwt cache poisoned");
        let fresh = !cache.contains_key(id);
        let taken = cache
            .entry(id.clone())
            .or_default()
            .budget
            .take(rate, std::time::Instant::now());
        drop(cache);
        if fresh {
            if let Some(me) = self.me.upgrade() {
                let (id, ended) = (id.clone(), lease.ended.clone());
                self.registry.spawn(async move {
                    ended.cancelled().await;
                    me.jwt_cache.lock().expect("jwt cache poisoned").remove(&id);
                });
            }
        }
        taken.map_err(|wait| {
            self.metrics.mints_refused.inc();
            JwtFetchError::RateLimited {
                lease_id: id.clone(),
                per_second: rate.per_second,
                burst: rate.burst,
                retry_ms: wait.as_millis() as u64 + 1,
            }
        })
    }

    /// Validates a token for `audience`: signature, audience and expiry against our keys, and
    /// the lease it was minted under must still be active. Returns the claims.
    pub fn validate_jwt(&self, token: &str, audience: &str) -> Result<Map<String, Value>, String> {
        let claims = self
            .jwt_keys
            .validate(token, audience, SystemTime::now())
            .map_err(|e| e.to_string())?;
        let lease = claims
            .get(CLAIM_LEASE_ID)
            .and_then(Value::as_str)
            .ok_or("token names no lease")?;
        let id = LeaseId::parse(lease).map_err(|e| e.to_string())?;
        if !self.registry.is_active(&id) {
            return Err(format!("the task lease {lease} of this token has ended"));
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod act_tests {
    use super::*;
    use crate::lease::{test_limits, validate_grant, GrantInput, Link, Principal};
    use spiffe::SpiffeId;

    #[test]
    fn the_chain_nests_with_the_current_actor_outermost_and_the_root_deepest() {
        let input = GrantInput {
            task_id: "tool-1".into(),
            delegator: "user/alice".into(),
            agent: "tool".into(),
            ttl: Some(std::time::Duration::from_secs(60)),
            selectors: vec!["unix:uid:1".into()],
            ..Default::default()
        };
        let mut l =
            validate_grant(input, &test_limits(), SystemTime::now(), Principal::agent()).unwrap();
        assert_eq!(
            act_claim(&l),
            None,
            "a lease granted directly has no act claim"
        );
        let link = |agent: &str| Link {
            lease_id: LeaseId::random(),
            spiffe_id: SpiffeId::new(format!("spiffe://example.org/{agent}")).unwrap(),
            task_id: format!("{agent}-task"),
        };
        l.chain = vec![link("planner"), link("executor")];
        let act = act_claim(&l).unwrap();
        assert_eq!(act["sub"], l.spiffe_id.to_string());
        assert_eq!(act["urn:mayfly:lease_id"], l.id.as_str());
        assert_eq!(act["act"]["sub"], "spiffe://example.org/executor");
        assert_eq!(act["act"]["act"]["sub"], "spiffe://example.org/planner");
        assert_eq!(act["act"]["act"]["urn:mayfly:task_id"], "planner-task");
        assert!(act["act"]["act"].get("act").is_none());
        let chain = chain_claim(&l);
        assert_eq!(chain[0]["sub"], "spiffe://example.org/planner");
        assert_eq!(chain[1]["sub"], "spiffe://example.org/executor");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::MemorySink;
    use crate::authority::jwt_keys::{JwtKeys, KeyPolicy};
    use crate::authority::x509::{CaHandle, CaSource, SigningCa};
    use crate::lease::{Durable, GrantInput, Leases, Principal};
    use crate::selector::Selector;

    struct Fixture {
        _dir: tempfile::TempDir,
        manager: Arc<Manager>,
        leases: Arc<Leases>,
        audit: Arc<MemorySink>,
        lease: crate::lease::Lease,
        caller: Selectors,
        who: Requester,
    }

    /// A manager with one lease for uid 4242, minting at `mint`.
    async fn fixture(mint: crate::lease::MintRate) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let mut limits = crate::lease::test_limits();
        limits.jwt_mint = mint;
        let td = limits.trust_domain.clone();
        let ca = SigningCa::load_or_create(
            dir.path(),
            &td,
            &CaSource::default(),
            Duration::from_secs(24 * 3600),
        )
        .unwrap();
        let policy = KeyPolicy {
            rotate_after: Duration::from_secs(24 * 3600),
            max_token_ttl: Duration::from_secs(3600),
        };
        let keys = JwtKeys::load_or_create(&dir.path().join("jwt"), &td, policy).unwrap();
        let audit = MemorySink::new();
        let metrics =
            crate::telemetry::Metrics::new(&mut prometheus_client::registry::Registry::default());
        let durable = Durable {
            store: crate::store::MemoryStore::new(),
            audit: audit.clone(),
            metrics: metrics.clone(),
            node: "node-a".into(),
        };
        let leases = Leases::new(limits, durable);
        let input = GrantInput {
            task_id: "t".into(),
            delegator: "alice".into(),
            agent: "a".into(),
            ttl: Some(Duration::from_secs(600)),
            selectors: vec!["unix:uid:4242".into()],
            ..Default::default()
        };
        let lease = leases.grant_input(input, Principal::agent()).await.unwrap();
        let manager = Manager::new(
            CaHandle::new(ca),
            Arc::new(keys),
            leases.clone(),
            audit.clone(),
            metrics,
        );
        let caller: Selectors = [Selector::parse("unix:uid:4242").unwrap()]
            .into_iter()
            .collect();
        let who = Requester {
            pid: 1,
            uid: 4242,
            exe_sha256: None,
        };
        Fixture {
            _dir: dir,
            manager,
            leases,
            audit,
            lease,
            caller,
            who,
        }
    }

    /// Issue 14, hole 5: one caller asking for many audience sets grew the token cache (and
    /// RSS) without bound until its lease ended.
    #[tokio::test]
    async fn the_token_cache_keeps_a_bounded_number_of_tokens_per_lease() {
        let Fixture {
            _dir,
            manager,
            leases,
            audit,
            lease,
            caller,
            who,
        } = fixture(crate::lease::MintRate {
            per_second: 1000,
            burst: 1000,
        })
        .await;
        for i in 0..3 * CACHED_PER_LEASE {
            let aud = vec![format!("spiffe://example.org/db-{i}")];
            let got = manager.jwt_svids(&caller, &who, &aud, None).await.unwrap();
            assert_eq!(got.len(), 1);
        }
        let cached = |m: &Manager| {
            let cache = m.jwt_cache.lock().unwrap();
            cache.get(&lease.id).map_or(0, |t| t.tokens.len())
        };
        assert_eq!(cached(&manager), CACHED_PER_LEASE);
        // The newest stays cached: asking again mints nothing new.
        let minted = audit.events().len();
        let last = vec![format!(
            "spiffe://example.org/db-{}",
            3 * CACHED_PER_LEASE - 1
        )];
        manager.jwt_svids(&caller, &who, &last, None).await.unwrap();
        assert_eq!(audit.events().len(), minted);
        // And the lease's end drops them all.
        leases
            .end(
                &lease.id,
                crate::lease::LeaseState::Revoked,
                Principal::agent(),
                "",
            )
            .await
            .unwrap();
        for _ in 0..100 {
            if cached(&manager) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(cached(&manager), 0);
    }

    /// Issue 14, hole 5: one workload asked for token after token, each for new audiences;
    /// every one was minted, signed and audited (the audit log grew 484 MB in 12 s) until the
    /// disk filled and issuance failed for everyone.
    #[tokio::test]
    async fn minting_is_held_to_the_lease_s_rate_and_the_cache_still_serves() {
        let f = fixture(crate::lease::MintRate {
            per_second: 2,
            burst: 3,
        })
        .await;
        let aud = |i: usize| vec![format!("spiffe://example.org/db-{i}")];
        for i in 0..3 {
            f.manager
                .jwt_svids(&f.caller, &f.who, &aud(i), None)
                .await
                .unwrap();
        }
        let err = f
            .manager
            .jwt_svids(&f.caller, &f.who, &aud(3), None)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, JwtFetchError::RateLimited { retry_ms, .. } if *retry_ms <= 501),
            "{err:?}"
        );
        let minted = f.audit.events().len();
        // What is cached is still served, and nothing more was audited.
        f.manager
            .jwt_svids(&f.caller, &f.who, &aud(0), None)
            .await
            .unwrap();
        assert_eq!(f.audit.events().len(), minted);
        // The budget comes back at its rate.
        tokio::time::sleep(Duration::from_millis(550)).await;
        f.manager
            .jwt_svids(&f.caller, &f.who, &aud(3), None)
            .await
            .unwrap();
        assert_eq!(f.manager.metrics.mints_refused.get(), 1);
        drop(f.leases);
        let _ = f.lease;
    }
}
