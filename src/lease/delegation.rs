//! The delegation use cases: a workload that holds an active lease creates child leases from
//! it, lists them and ends them, with nothing but that lease. Every `Delegate` goes the same
//! way: find the parent among the caller's leases, the limits (depth, fan-out, rate), the
//! narrowing rules (`narrow`), then the policies (action `delegate`), then the registry.
//! Refusals by a limit, a rule or a policy, and a parent named that the caller does not hold,
//! are scope violations: a parent granted with `end_on_violation` is revoked for them.
//!
//! Which leases a caller holds: those it matches, as on the Workload API, and those bound to
//! its parent process (`unix:pid`) whose other selectors it matches itself. The second is what
//! lets `mayfly delegate`, run by the process a lease is bound to, act for that lease; a
//! process further down (the child `mayfly delegate` starts) cannot reach the lease above.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::attest::Attestation;
use crate::audit::{event, Audit, Event};
use crate::policy::{Action, Decision, PolicyEngine, PolicyRequest, WorkloadAttrs};
use crate::selector::{Key, Selector, Selectors, UnixKey};

use super::narrow::validate_delegation;
use super::service::{context_of, judge, resource_of};
use super::{Budget, DelegateInput, Lease, LeaseError, LeaseId, LeaseState, Leases, Principal};

/// Why a delegation call was refused. Nothing changed (but for a violation's end).
#[derive(Debug, thiserror::Error)]
pub enum DelegationError {
    /// Malformed input, a narrowing rule, a limit, or a lease not in the state needed.
    #[error(transparent)]
    Lease(#[from] LeaseError),
    /// The caller holds no active lease.
    #[error("no identity issued")]
    NoLease,
    /// The caller holds several leases and did not say which to delegate from.
    #[error(
        "parent: the caller holds {0} leases; name the one to delegate from by its SPIFFE ID ({1})"
    )]
    Ambiguous(usize, String),
    /// The caller named a lease (by SPIFFE ID or lease ID) it does not hold.
    #[error("{0}")]
    NotHeld(String),
    /// A policy denied the delegation.
    #[error("{0}")]
    Denied(String),
    /// The parent delegates faster than its rate allows.
    #[error("{0}")]
    RateLimited(String),
}

/// A caller of the Delegation service, from its attestation: who it is and which selector sets
/// stand for the leases it holds.
#[derive(Clone, Debug)]
pub struct Holder {
    pub principal: Principal,
    /// Its own selectors.
    selectors: Selectors,
    /// Its selectors with its own `unix:pid` binding replaced by its parent process's, if
    /// its parent could be read.
    through_parent: Option<Selectors>,
    /// The caller's start time, with its pid: the process itself.
    start_time: u64,
}

/// A lease the caller holds, and how.
struct Held {
    lease: Lease,
    /// Held through the caller's parent process (not matched by the caller itself).
    via_parent: bool,
}

impl Holder {
    /// The holder an attestation describes (reads its parent process from `/proc`, checked
    /// against the start time the attestation proved).
    pub fn from_attestation(att: &Attestation) -> Holder {
        let own = Selector::process(att.pid, att.start_time);
        let through_parent = match crate::attest::process_parent(att.pid) {
            Ok((ppid, start)) if start == att.start_time && ppid > 0 => {
                crate::attest::process_start_time(ppid).ok().map(|pstart| {
                    let mut s: Selectors = att
                        .selectors
                        .iter()
                        .filter(|s| **s != own && s.key() != Key::Unix(UnixKey::Pid))
                        .cloned()
                        .collect();
                    s.extend([Selector::process(ppid, pstart)]);
                    s
                })
            }
            _ => None,
        };
        Holder {
            principal: Principal {
                uid: att.uid,
                spiffe_id: None,
                gid: att.gid,
                pid: Some(att.pid),
                user: None,
            },
            selectors: att.selectors.clone(),
            through_parent,
            start_time: att.start_time,
        }
    }

    /// Whether the process `(pid, start)` is one this caller started (a strict descendant).
    fn started(&self, pid: i32, start: u64) -> bool {
        let me = self.principal.pid.unwrap_or(0);
        pid != me && crate::attest::is_descendant(pid, start, me, self.start_time)
    }
}

pub struct DelegationService {
    registry: Arc<Leases>,
    audit: Audit,
    policy: Arc<PolicyEngine>,
    approval_timeout: Duration,
    /// Per parent, what it may still delegate this second.
    budgets: Mutex<HashMap<LeaseId, Budget>>,
    /// Held from the fan-out check until the child is in the registry, so that concurrent
    /// delegations cannot together pass `max_children`. One for all parents: a delegation
    /// waits for at most the durable writes of those ahead of it.
    admitting: tokio::sync::Mutex<()>,
    /// Who the remote admin API admits (`admin.allowed_spiffe_ids`): a delegated identity is
    /// never one of them, or a workload could delegate itself the power to grant.
    admin_callers: Vec<String>,
}

impl DelegationService {
    pub fn new(
        registry: Arc<Leases>,
        audit: Audit,
        policy: Arc<PolicyEngine>,
        approval_timeout: Duration,
        admin_callers: Vec<String>,
    ) -> Self {
        DelegationService {
            registry,
            audit,
            policy,
            approval_timeout,
            admin_callers,
            budgets: Mutex::new(HashMap::new()),
            admitting: tokio::sync::Mutex::new(()),
        }
    }

    /// The active leases the caller holds, oldest first, without duplicates: those it matches,
    /// and (unless one of those is bound to the caller's own process, as a delegated
    /// executor's is) those bound to its parent process.
    fn held(&self, holder: &Holder) -> Vec<Held> {
        let mut out: Vec<Held> = self
            .registry
            .matching(&holder.selectors)
            .into_iter()
            .map(|l| Held {
                lease: Lease::clone(&l.lease),
                via_parent: false,
            })
            .collect();
        let me = (holder.principal.pid.unwrap_or(0), holder.start_time);
        let bound_to_me = out
            .iter()
            .any(|h| h.lease.selectors.processes().any(|p| p == me));
        if let (false, Some(set)) = (bound_to_me, &holder.through_parent) {
            for l in self.registry.matching(set) {
                if !out.iter().any(|o| o.lease.id == l.lease.id) {
                    out.push(Held {
                        lease: Lease::clone(&l.lease),
                        via_parent: true,
                    });
                }
            }
        }
        out
    }

    /// The lease to delegate from: the one named (by SPIFFE ID), or the only one held; and
    /// whether the caller holds it through its parent process.
    async fn parent(&self, holder: &Holder, named: &str) -> Result<Held, DelegationError> {
        if named.len() > super::MAX_SPIFFE_ID_LEN
            || (!named.is_empty() && spiffe::SpiffeId::new(named).is_err())
        {
            return Err(
                LeaseError::invalid("parent", "must be a SPIFFE ID the caller holds").into(),
            );
        }
        let mut held = self.held(holder);
        if held.is_empty() {
            return Err(DelegationError::NoLease);
        }
        if !named.is_empty() {
            held.retain(|h| h.lease.spiffe_id.to_string() == named);
            return match held.len() {
                0 => Err(self
                    .violation(holder, None, format!("the caller does not hold {named}"))
                    .await),
                // Two leases with one SPIFFE ID (the same task granted twice): the oldest.
                _ => Ok(held.swap_remove(0)),
            };
        }
        match held.len() {
            1 => Ok(held.swap_remove(0)),
            n => Err(DelegationError::Ambiguous(
                n,
                held.iter()
                    .map(|h| h.lease.spiffe_id.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            )),
        }
    }

    /// A refusal that is a scope violation: audited, the leases concerned that end on a
    /// violation end, and the refusal is returned as it was. `parent`: the lease the caller
    /// delegated from; `None`: every lease the caller holds (it named one it does not hold).
    async fn violation(
        &self,
        holder: &Holder,
        parent: Option<&Lease>,
        what: String,
    ) -> DelegationError {
        self.refused(holder, parent, &what).await;
        match parent {
            None => DelegationError::NotHeld(what),
            Some(_) => DelegationError::Lease(LeaseError::Refused(what)),
        }
    }

    /// Audits a refused delegation and ends what ends on a violation (see [`Self::violation`]).
    async fn refused(&self, holder: &Holder, parent: Option<&Lease>, what: &str) {
        tracing::info!(event = "delegation_refused", parent = ?parent.map(|p| &p.id), pid = holder.principal.pid, uid = holder.principal.uid, why = %what, "delegation refused");
        let record = Event::DelegationRefused(event::DelegationRefused {
            parent_lease_id: parent.map(|p| p.id.as_str()),
            parent_spiffe_id: parent.map(|p| p.spiffe_id.to_string()),
            task_id: parent.map(|p| p.task_id.as_str()),
            pid: holder.principal.pid,
            uid: holder.principal.uid,
            reason: what,
            chain: parent.map(Lease::audit_chain).unwrap_or_default(),
        });
        if let Err(e) = self.audit.record(&record).await {
            tracing::error!(error = %e, "could not audit a refused delegation");
        }
        self.end_strict(holder, parent, what).await;
    }

    /// Ends, for a violation, the leases concerned that end on one: `parent`, or (`None`)
    /// every lease the caller holds itself.
    async fn end_strict(&self, holder: &Holder, parent: Option<&Lease>, what: &str) {
        let strict: Vec<LeaseId> = match parent {
            Some(p) if p.end_on_violation => vec![p.id.clone()],
            Some(_) => Vec::new(),
            None => self
                .held(holder)
                .into_iter()
                .filter(|h| !h.via_parent && h.lease.end_on_violation)
                .map(|h| h.lease.id)
                .collect(),
        };
        self.registry
            .end_for_violation(strict, &format!("delegation refused: {what}"))
            .await;
    }

    /// Creates a child lease from the caller's lease `parent` (a SPIFFE ID, or empty).
    pub async fn delegate(
        &self,
        holder: &Holder,
        parent: &str,
        input: DelegateInput,
    ) -> Result<Lease, DelegationError> {
        let Held {
            lease: parent,
            via_parent,
        } = self.parent(holder, parent).await?;
        let limits = self.registry.limits().delegation;
        // Not a violation: a burst is retried, not anomalous use.
        if parent.may_delegate > 0 {
            if let Err(wait) = self.take(&parent.id, limits.rate) {
                let what = format!(
                    "rate: lease {} delegates at most {} a second ({} at once); try again in {} ms",
                    parent.id,
                    limits.rate.per_second,
                    limits.rate.burst,
                    wait.as_millis() + 1
                );
                tracing::info!(event = "delegation_refused", lease_id = %parent.id, why = %what);
                return Err(DelegationError::RateLimited(what));
            }
        }
        let _admitting = self.admitting.lock().await;
        if parent.may_delegate > 0 {
            let live = self.registry.live_children(&parent.id);
            if live >= limits.max_children as usize {
                let what = format!(
                    "fan-out: lease {} already has {live} live children (delegation.max_children {})",
                    parent.id, limits.max_children
                );
                return Err(self.violation(holder, Some(&parent), what).await);
            }
        }
        let child = match validate_delegation(
            &parent,
            input,
            self.registry.limits(),
            SystemTime::now(),
            holder.principal.clone(),
        ) {
            Ok(child) => child,
            Err(LeaseError::Refused(what)) => {
                return Err(self.violation(holder, Some(&parent), what).await);
            }
            Err(e) => return Err(e.into()),
        };
        // Acting for its parent process's lease, a caller (`mayfly delegate`) may bind children
        // only to processes it started itself: not to the planner, nor to its siblings.
        if via_parent {
            if let Some((pid, start)) = child
                .selectors
                .processes()
                .find(|&(pid, start)| !holder.started(pid, start))
            {
                let what = format!(
                    "narrowing rule selectors: acting for the lease of its parent process, the caller may bind children only to processes it started; unix:pid:{pid}:{start} is not one"
                );
                return Err(self.violation(holder, Some(&parent), what).await);
            }
        }
        // Never an identity the remote admin API admits.
        let id = child.spiffe_id.to_string();
        if self
            .admin_callers
            .iter()
            .any(|p| super::service::remote_allowed(p, &id))
        {
            let what = format!(
                "narrowing rule spiffe_id: {id} is admitted to the remote admin API (admin.allowed_spiffe_ids); a delegated identity never is"
            );
            return Err(self.violation(holder, Some(&parent), what).await);
        }
        // Never an identity a live lease holds already: a delegation names its own workload.
        if let Some(holder_of) = self.registry.holder_of(&child.spiffe_id) {
            let what = format!(
                "narrowing rule spiffe_id: {} is held by lease {holder_of}; give the child its own agent or task ID",
                child.spiffe_id
            );
            return Err(self.violation(holder, Some(&parent), what).await);
        }
        let request = PolicyRequest {
            action: Action::Delegate,
            principal: Default::default(),
            workload: WorkloadAttrs {
                spiffe_id: parent.spiffe_id.to_string(),
                lease_id: parent.id.to_string(),
                task_id: parent.task_id.clone(),
                delegator: parent.delegator.clone(),
                depth: parent.depth(),
                uid: holder.principal.uid,
            },
            resource: resource_of(&child),
            context: context_of(&child, child.ttl(), self.registry.limits().max_ttl),
        };
        let decision = match judge(&self.policy, &self.audit, request, &child).await {
            Ok(d) => d,
            Err(why) => {
                // Audited as policy_denied already.
                self.end_strict(holder, Some(&parent), &format!("policy: {why}"))
                    .await;
                return Err(DelegationError::Denied(why));
            }
        };
        let lease = match decision {
            Decision::RequireApproval { policies } => {
                self.registry
                    .hold(child, self.approval_timeout, &policies)
                    .await?
            }
            _ => self.registry.grant(child).await?,
        };
        tracing::info!(
            event = "lease_delegated",
            lease_id = %lease.id,
            parent = %parent.id,
            depth = lease.depth(),
            state = %lease.state,
            "lease delegated"
        );
        Ok(lease)
    }

    /// Takes one delegation from the parent's budget.
    fn take(&self, parent: &LeaseId, rate: super::MintRate) -> Result<(), Duration> {
        let mut budgets = self.budgets.lock().expect("delegation budgets poisoned");
        // Budgets of ended parents go now and then, not per call.
        if budgets.len() > 4096 {
            budgets.retain(|id, _| self.registry.is_active(id));
        }
        budgets
            .entry(parent.clone())
            .or_default()
            .take(rate, std::time::Instant::now())
    }

    /// The children of the caller's leases (or of the one named), live and recently ended.
    pub async fn list(&self, holder: &Holder, parent: &str) -> Result<Vec<Lease>, DelegationError> {
        let parents = if parent.is_empty() {
            let held = self.held(holder);
            if held.is_empty() {
                return Err(DelegationError::NoLease);
            }
            held
        } else {
            vec![self.parent(holder, parent).await?]
        };
        let me = holder.principal.pid;
        // Through its parent process, a caller sees only the children it delegated itself.
        Ok(parents
            .iter()
            .flat_map(|h| {
                self.registry
                    .children_of(&h.lease.id)
                    .into_iter()
                    .filter(move |c| !h.via_parent || c.granted_by.pid == me)
            })
            .collect())
    }

    /// Ends a lease delegated (at any depth) from one of the caller's leases: `completed`, or
    /// revoked for `reason`.
    pub async fn end(
        &self,
        holder: &Holder,
        id: &LeaseId,
        completed: bool,
        reason: &str,
    ) -> Result<Lease, DelegationError> {
        super::check_reason(reason)?;
        let held = self.held(holder);
        if held.is_empty() {
            return Err(DelegationError::NoLease);
        }
        // Only what the registry holds in memory (live and recently ended leases): a lease a
        // caller can end is one of those, and an unknown ID reads nothing from the store.
        let not_held = || {
            DelegationError::NotHeld(format!(
                "lease {id} was not delegated from a lease the caller holds"
            ))
        };
        let lease = self.registry.recent(id).ok_or_else(not_held)?;
        // Held directly, any descendant; through the parent process, only the children the
        // caller delegated itself.
        let Some(ancestor) = lease.chain.iter().find(|link| {
            held.iter().any(|h| {
                h.lease.id == link.lease_id
                    && (!h.via_parent || lease.granted_by.pid == holder.principal.pid)
            })
        }) else {
            return Err(not_held());
        };
        let (state, why) = if completed {
            (LeaseState::Completed, "task completed".to_owned())
        } else if reason.is_empty() {
            (
                LeaseState::Revoked,
                format!("ended by its ancestor lease {}", ancestor.lease_id),
            )
        } else {
            (
                LeaseState::Revoked,
                format!(
                    "ended by its ancestor lease {}: {reason}",
                    ancestor.lease_id
                ),
            )
        };
        Ok(self
            .registry
            .end(id, state, holder.principal.clone(), &why)
            .await?)
    }
}
