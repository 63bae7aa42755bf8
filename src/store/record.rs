//! The lease record as the stores keep it (redb on disk, etcd as key values): a private,
//! versioned copy of [`Lease`], so that the in-memory model can change without silently
//! changing what is stored.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use spiffe::SpiffeId;

use crate::lease::{Lease, LeaseId, LeaseState, Link, Principal};
use crate::selector::Selector;

/// The record format written by this version. Bump it (and keep reading the old one) whenever the
/// meaning of a field or the encoding changes.
pub(super) const FORMAT_VERSION: u32 = 5;

/// Format 1: the record as JSON.
pub(super) const FORMAT_JSON: u32 = 1;

/// Format 2: postcard, as format 3 without its last field (`end_reason`).
pub(super) const FORMAT_2: u32 = 2;

/// Format 3: postcard, as format 4 without its last field (`delegation`).
pub(super) const FORMAT_3: u32 = 3;

/// Format 4: postcard, as format 5 without its last two fields (`node`, `remote`).
pub(super) const FORMAT_4: u32 = 4;

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
    /// Added in format 5; absent means a lease of no particular node.
    #[serde(default)]
    pub(super) node: Option<String>,
    /// Added in format 5; absent (and `None` when all three are local callers) means no
    /// remote caller granted, approved or ended the lease.
    #[serde(default)]
    pub(super) remote: Option<RemoteRecord>,
}

/// The identities of remote admin callers (their certificates' SPIFFE IDs or names).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RemoteRecord {
    pub(super) granted_by: Option<String>,
    pub(super) ended_by: Option<String>,
    pub(super) approved_by: Option<String>,
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
            node: l.node.clone(),
            remote: {
                let id = |p: Option<&Principal>| p.and_then(|p| p.spiffe_id.clone());
                let r = RemoteRecord {
                    granted_by: id(Some(&l.granted_by)),
                    ended_by: id(l.ended_by.as_ref()),
                    approved_by: id(l.approved_by.as_ref()),
                };
                (r.granted_by.is_some() || r.ended_by.is_some() || r.approved_by.is_some())
                    .then_some(r)
            },
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
        let (granted_id, ended_id, approved_id) = match self.remote {
            None => (None, None, None),
            Some(r) => (r.granted_by, r.ended_by, r.approved_by),
        };
        let principal = |p: PrincipalRecord, id: Option<String>| Principal {
            spiffe_id: id,
            ..Principal::from(p)
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
            granted_by: principal(self.granted_by, granted_id),
            ended_by: self.ended_by.map(|p| principal(p, ended_id)),
            approval_deadline: self
                .approval_deadline
                .map(|n| time("approval_deadline", n))
                .transpose()?,
            approved_at: self
                .approved_at
                .map(|n| time("approved_at", n))
                .transpose()?,
            approved_by: self.approved_by.map(|p| principal(p, approved_id)),
            end_reason: self.end_reason.unwrap_or_default(),
            node: self.node,
            revision: 0,
        })
    }
}

/// A lease in the current format (postcard).
pub(super) fn encode(lease: &Lease) -> Result<Vec<u8>, String> {
    postcard::to_stdvec(&LeaseRecord::from(lease)).map_err(|e| e.to_string())
}

/// A lease stored under `key` (its ID), in any format this agent reads; why not, if it is not.
pub(super) fn decode(key: &str, bytes: &[u8]) -> Result<Lease, String> {
    // A version this agent knows in the other encoding is damage, not a newer format.
    let unknown = |v: u32| match v {
        FORMAT_JSON => format!("format version {v} in binary (format {v} is JSON)"),
        FORMAT_2 | FORMAT_3 | FORMAT_4 | FORMAT_VERSION => {
            format!("format version {v} in JSON (format {v} is binary)")
        }
        _ => format!(
            "unknown format version {v} (this agent reads {FORMAT_JSON} to {FORMAT_VERSION})"
        ),
    };
    let record = if bytes.first() == Some(&b'{') {
        // Parsed once; only a record that fails is parsed again for its version alone, so
        // that a future format is reported as such rather than as whatever field it lacks.
        match serde_json::from_slice::<LeaseRecord>(bytes) {
            Ok(record) if record.v == FORMAT_JSON => record,
            Ok(record) => return Err(unknown(record.v)),
            Err(e) => {
                return Err(match serde_json::from_slice::<Version>(bytes) {
                    Ok(version) if version.v != FORMAT_JSON => unknown(version.v),
                    Ok(_) => format!("invalid record: {e}"),
                    Err(e) => format!("invalid JSON: {e}"),
                })
            }
        }
    } else {
        // The version comes first, and is checked before the rest is trusted to be laid out
        // as this agent expects.
        let (v, _) = postcard::take_from_bytes::<u32>(bytes)
            .map_err(|e| format!("invalid record: no format version ({e})"))?;
        // Formats 3 and 4 each appended an `Option`, and format 5 two; postcard writes `None`
        // as one zero byte, so an older record with those bytes after it is the same lease.
        let missing = match v {
            FORMAT_VERSION => 0,
            FORMAT_4 => 2,
            FORMAT_3 => 3,
            FORMAT_2 => 4,
            _ => return Err(unknown(v)),
        };
        let padded;
        let bytes = if missing == 0 {
            bytes
        } else {
            padded = [bytes, &[0u8; 4][..missing]].concat();
            &padded[..]
        };
        match postcard::take_from_bytes::<LeaseRecord>(bytes) {
            Ok((record, [])) => record,
            Ok((_, rest)) => {
                return Err(format!(
                    "invalid record: {} bytes after its end",
                    rest.len()
                ))
            }
            Err(e) => return Err(format!("invalid record: {e}")),
        }
    };
    let lease = record.into_lease()?;
    if lease.id.as_str() != key {
        return Err(format!("holds lease {}", lease.id));
    }
    Ok(lease)
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
            spiffe_id: None,
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
