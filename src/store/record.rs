//! The lease record as redb stores it: a private, versioned copy of [`Lease`], so that the
//! in-memory model can change without silently changing what is on disk.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use spiffe::SpiffeId;

use crate::lease::{Lease, LeaseId, LeaseState, Link, Principal};
use crate::selector::Selector;

/// The record format written by this version. Bump it (and keep reading the old one) whenever the
/// meaning of a field or the encoding changes.
pub(super) const FORMAT_VERSION: u32 = 4;

/// Format 1: the record as JSON.
pub(super) const FORMAT_JSON: u32 = 1;

/// Format 2: postcard, as format 3 without its last field (`end_reason`).
pub(super) const FORMAT_2: u32 = 2;

/// Format 3: postcard, as format 4 without its last field (`delegation`).
pub(super) const FORMAT_3: u32 = 3;

/// JWT TTL of leases stored before leases had one.
pub(super) const DEFAULT_JWT_TTL: Duration = Duration::from_secs(300);

#[derive(Deserialize)]
pub(super) struct Version {
    pub(super) v: u32,
}

/// The on-disk form of a [`Lease`], in format 1 (JSON) or 2 and 3 (postcard). Times are signed
/// nanoseconds since the Unix epoch and durations nanoseconds, so every value round-trips
/// exactly. Postcard writes the fields in this order, without names: in format 3 every field
/// is present, and a change to this struct is a new format version.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LeaseRecord {
    pub(super) v: u32,
    pub(super) id: String,
    pub(super) task_id: String,
    pub(super) delegator: String,
    pub(super) agent: String,
    pub(super) spiffe_id: String,
    pub(super) selectors: Vec<String>,
    pub(super) created_at: i128,
    pub(super) expires_at: i128,
    pub(super) max_expires_at: i128,
    pub(super) svid_ttl_nanos: u128,
    /// Added after v1 records were first written; absent means the default JWT TTL.
    #[serde(default)]
    pub(super) jwt_ttl_nanos: Option<u128>,
    pub(super) audiences: Vec<String>,
    pub(super) reason: String,
    pub(super) granted_by: PrincipalRecord,
    pub(super) state: String,
    pub(super) ended_at: Option<i128>,
    pub(super) ended_by: Option<PrincipalRecord>,
    /// Approval gates (added after v1 records were first written; absent means none).
    #[serde(default)]
    pub(super) approval_deadline: Option<i128>,
    #[serde(default)]
    pub(super) approved_at: Option<i128>,
    #[serde(default)]
    pub(super) approved_by: Option<PrincipalRecord>,
    /// Added in format 3; absent (and `None` in older records) means no reason was recorded.
    #[serde(default)]
    pub(super) end_reason: Option<String>,
    /// Added in format 4; absent (and `None` when it holds only defaults) means a lease that
    /// was not delegated, delegates nothing and does not end on a violation.
    #[serde(default)]
    pub(super) delegation: Option<DelegationRecord>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DelegationRecord {
    pub(super) chain: Vec<LinkRecord>,
    pub(super) may_delegate: u32,
    pub(super) end_on_violation: bool,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LinkRecord {
    pub(super) lease_id: String,
    pub(super) spiffe_id: String,
    pub(super) task_id: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PrincipalRecord {
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) pid: Option<i32>,
    pub(super) user: Option<String>,
}

impl From<&Lease> for LeaseRecord {
    fn from(l: &Lease) -> Self {
        LeaseRecord {
            v: FORMAT_VERSION,
            id: l.id.to_string(),
            task_id: l.task_id.clone(),
            delegator: l.delegator.clone(),
            agent: l.agent.clone(),
            spiffe_id: l.spiffe_id.to_string(),
            selectors: l.selectors.to_strings(),
            created_at: time_to_nanos(l.created_at),
            expires_at: time_to_nanos(l.expires_at),
            max_expires_at: time_to_nanos(l.max_expires_at),
            svid_ttl_nanos: l.svid_ttl.as_nanos(),
            jwt_ttl_nanos: Some(l.jwt_ttl.as_nanos()),
            audiences: l.audiences.clone(),
            reason: l.reason.clone(),
            granted_by: PrincipalRecord::from(&l.granted_by),
            state: l.state.as_str().to_owned(),
            ended_at: l.ended_at.map(time_to_nanos),
            ended_by: l.ended_by.as_ref().map(PrincipalRecord::from),
            approval_deadline: l.approval_deadline.map(time_to_nanos),
            approved_at: l.approved_at.map(time_to_nanos),
            approved_by: l.approved_by.as_ref().map(PrincipalRecord::from),
            end_reason: (!l.end_reason.is_empty()).then(|| l.end_reason.clone()),
            delegation: (!l.chain.is_empty() || l.may_delegate > 0 || l.end_on_violation).then(
                || DelegationRecord {
                    chain: l
                        .chain
                        .iter()
                        .map(|link| LinkRecord {
                            lease_id: link.lease_id.to_string(),
                            spiffe_id: link.spiffe_id.to_string(),
                            task_id: link.task_id.clone(),
                        })
                        .collect(),
                    may_delegate: l.may_delegate,
                    end_on_violation: l.end_on_violation,
                },
            ),
        }
    }
}

impl LeaseRecord {
    pub(super) fn into_lease(self) -> Result<Lease, String> {
        let time = |field: &str, n: i128| {
            nanos_to_time(n).ok_or_else(|| format!("{field}: {n} is out of range"))
        };
        let (chain, may_delegate, end_on_violation) = match self.delegation {
            None => (Vec::new(), 0, false),
            Some(d) => (
                d.chain
                    .into_iter()
                    .map(|link| {
                        Ok(Link {
                            lease_id: LeaseId::parse(&link.lease_id)
                                .map_err(|e| format!("chain: {e}"))?,
                            spiffe_id: SpiffeId::new(&link.spiffe_id)
                                .map_err(|e| format!("chain: {:?}: {e}", link.spiffe_id))?,
                            task_id: link.task_id,
                        })
                    })
                    .collect::<Result<Vec<_>, String>>()?,
                d.may_delegate,
                d.end_on_violation,
            ),
        };
        Ok(Lease {
            chain,
            may_delegate,
            end_on_violation,
            id: LeaseId::parse(&self.id).map_err(|e| format!("id: {e}"))?,
            spiffe_id: SpiffeId::new(&self.spiffe_id)
                .map_err(|e| format!("spiffe_id {:?}: {e}", self.spiffe_id))?,
            created_at: time("created_at", self.created_at)?,
            expires_at: time("expires_at", self.expires_at)?,
            max_expires_at: time("max_expires_at", self.max_expires_at)?,
            svid_ttl: nanos_to_duration(self.svid_ttl_nanos).ok_or_else(|| {
                format!("svid_ttl_nanos: {} is out of range", self.svid_ttl_nanos)
            })?,
            jwt_ttl: match self.jwt_ttl_nanos {
                None => DEFAULT_JWT_TTL,
                Some(n) => nanos_to_duration(n)
                    .ok_or_else(|| format!("jwt_ttl_nanos: {n} is out of range"))?,
            },
            state: parse_state(&self.state)
                .ok_or_else(|| format!("state: unknown state {:?}", self.state))?,
            ended_at: self.ended_at.map(|n| time("ended_at", n)).transpose()?,
            task_id: self.task_id,
            delegator: self.delegator,
            agent: self.agent,
            selectors: self
                .selectors
                .iter()
                .map(|s| Selector::parse(s).map_err(|e| format!("selectors: {e}")))
                .collect::<Result<_, _>>()?,
            audiences: self.audiences,
            reason: self.reason,
            granted_by: self.granted_by.into(),
            ended_by: self.ended_by.map(Principal::from),
            approval_deadline: self
                .approval_deadline
                .map(|n| time("approval_deadline", n))
                .transpose()?,
            approved_at: self
                .approved_at
                .map(|n| time("approved_at", n))
                .transpose()?,
            approved_by: self.approved_by.map(Principal::from),
            end_reason: self.end_reason.unwrap_or_default(),
        })
    }
}

impl From<&Principal> for PrincipalRecord {
    fn from(p: &Principal) -> Self {
        PrincipalRecord {
            uid: p.uid,
            gid: p.gid,
            pid: p.pid,
            user: p.user.clone(),
        }
    }
}

impl From<PrincipalRecord> for Principal {
    fn from(p: PrincipalRecord) -> Self {
        Principal {
            uid: p.uid,
            gid: p.gid,
            pid: p.pid,
            user: p.user,
        }
    }
}

/// The inverse of [`LeaseState::as_str`].
fn parse_state(s: &str) -> Option<LeaseState> {
    [
        LeaseState::Pending,
        LeaseState::Active,
        LeaseState::Revoked,
        LeaseState::Expired,
        LeaseState::Completed,
        LeaseState::ProcessExited,
        LeaseState::ParentEnded,
    ]
    .into_iter()
    .find(|state| state.as_str() == s)
}

pub(super) const NANOS_PER_SEC: i128 = 1_000_000_000;

/// Signed, because a `SystemTime` may lie before the epoch (a clock set badly); i128 holds any
/// `SystemTime` the platform can represent.
fn time_to_nanos(t: SystemTime) -> i128 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    }
}

fn nanos_to_time(n: i128) -> Option<SystemTime> {
    let d = nanos_to_duration(n.unsigned_abs())?;
    if n >= 0 {
        UNIX_EPOCH.checked_add(d)
    } else {
        UNIX_EPOCH.checked_sub(d)
    }
}

fn nanos_to_duration(n: u128) -> Option<Duration> {
    let per_sec = NANOS_PER_SEC as u128;
    let secs = u64::try_from(n / per_sec).ok()?;
    Some(Duration::new(secs, (n % per_sec) as u32))
}
