//! JWT-SVIDs: minted per lease and audience set, scoped to the audiences a lease allows,
//! cached until half their life (never across leases), and recorded in the audit log before
//! they are handed out.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use super::{AuditUnavailable, Manager, Requester};
use crate::audit::{event, Event};
use crate::lease::{ActiveLease, LeaseId};
use crate::selector::Selectors;

/// Task claims carried by every JWT-SVID. Private claim names must resist collisions
/// (RFC 7519, section 4.3), so they are URNs in mayfly's own namespace.
pub const CLAIM_TASK_ID: &str = "urn:mayfly:task_id";
pub const CLAIM_DELEGATOR: &str = "urn:mayfly:delegator";
pub const CLAIM_LEASE_ID: &str = "urn:mayfly:lease_id";

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
}

/// Cache key: one lease and a sorted, deduplicated audience set.
pub(super) type JwtCacheKey = (LeaseId, Vec<String>);
pub(super) type JwtCache = std::sync::Mutex<HashMap<JwtCacheKey, Arc<JwtSvid>>>;

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
        let key = (lease.lease.id.clone(), audiences.to_vec());
        let now = SystemTime::now();
        let started = std::time::Instant::now();
        if let Some(cached) = self.jwt_cache.lock().expect("jwt cache poisoned").get(&key) {
            let life = cached
                .expires_at
                .duration_since(cached.issued_at)
                .unwrap_or_default();
            if now < cached.issued_at + life / 2 {
                return Ok(Some(cached.clone()));
            }
        }
        let l = &lease.lease;
        let expires_at = (now + l.jwt_ttl).min(*lease.expires_at.borrow());
        let (iat, exp) = (unix(now), unix(expires_at));
        if exp <= iat {
            return Ok(None);
        }
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
        let Value::Object(claims) = claims else {
            unreachable!("a json object")
        };
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
        // Never serve a token after its lease ended: drop the lease's entries when it does.
        let fresh_lease = {
            let mut cache = self.jwt_cache.lock().expect("jwt cache poisoned");
            let fresh = !cache.keys().any(|(id, _)| id == &l.id);
            cache.insert(key, svid.clone());
            fresh
        };
        if fresh_lease {
            if let Some(me) = self.me.upgrade() {
                let (id, ended) = (l.id.clone(), lease.ended.clone());
                self.registry.spawn(async move {
                    ended.cancelled().await;
                    me.jwt_cache
                        .lock()
                        .expect("jwt cache poisoned")
                        .retain(|(lease, _), _| lease != &id);
                });
            }
        }
        if lease.ended.is_cancelled() {
            return Ok(None);
        }
        Ok(Some(svid))
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
