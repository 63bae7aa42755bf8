//! Delegation's first rule: a child lease only ever narrows its parent. This module checks a
//! delegation request against its parent and builds the child; it stores nothing and asks no
//! policy.
//!
//! A child ends no later than its parent (`expires_at` and `max_expires_at`), its SVIDs and
//! JWTs live no longer, its audiences are a non-empty subset of the parent's (any, if the
//! parent has no list), it delegates fewer levels, it ends on a violation if the parent does,
//! and it binds to fewer processes:
//!
//! - the child inherits every selector of its parent but the parent's `unix:pid` bindings, and
//!   adds the selectors the request names (so it can only ever match processes that match
//!   the parent's other facts);
//! - if the parent is bound to processes, the child must be bound to at least one, and each
//!   process it is bound to is a process the parent is bound to or a descendant of one (read
//!   from `/proc` now, start times included);
//! - the child has at least one selector the parent does not, so it never names the same
//!   processes under another name.
//!
//! Malformed input is an `InvalidField` naming the field; a request that would widen the
//! parent is `Refused`, naming the rule.

use std::time::{Duration, SystemTime};

use crate::selector::Selectors;

use super::{
    check_reason, check_segment, check_selectors, check_ttl, deadline, render_id, sorted_audiences,
    Lease, LeaseError, LeaseId, LeaseLimits, LeaseState, Link, Principal, MAX_NAME_LEN,
    MAX_SELECTORS, MIN_TTL,
};

/// What a workload asks for its child.
#[derive(Clone, Debug, Default)]
pub struct DelegateInput {
    pub task_id: String,
    pub agent: String,
    pub ttl: Option<Duration>,
    /// Unset: equal to `ttl`.
    pub max_ttl: Option<Duration>,
    /// Unset: the parent's.
    pub svid_ttl: Option<Duration>,
    /// Unset: the parent's.
    pub jwt_ttl: Option<Duration>,
    pub selectors: Vec<String>,
    pub audiences: Vec<String>,
    pub reason: String,
    /// Unset: one less than the parent's.
    pub max_delegation_depth: Option<u32>,
    pub end_on_violation: bool,
}

fn refused(rule: &str, message: String) -> LeaseError {
    LeaseError::Refused(format!("narrowing rule {rule}: {message}"))
}

fn rfc(t: SystemTime) -> String {
    crate::time::rfc3339(t)
}

/// Checks `input` against `parent` and builds the child lease (active; nothing stored).
pub fn validate_delegation(
    parent: &Lease,
    input: DelegateInput,
    limits: &LeaseLimits,
    now: SystemTime,
    by: Principal,
) -> Result<Lease, LeaseError> {
    if parent.state != LeaseState::Active {
        return Err(LeaseError::NotActive {
            id: parent.id.to_string(),
            state: parent.state,
        });
    }
    if parent.may_delegate == 0 {
        return Err(LeaseError::Refused(format!(
            "delegation depth: lease {} may not delegate (its grant allows {} more levels)",
            parent.id, parent.may_delegate
        )));
    }
    check_segment("task_id", &input.task_id, MAX_NAME_LEN)?;
    check_segment("agent", &input.agent, MAX_NAME_LEN)?;

    let ttl = input
        .ttl
        .ok_or_else(|| LeaseError::invalid("ttl", "is required"))?;
    check_ttl("ttl", ttl, MIN_TTL, limits.max_ttl)?;
    let max_ttl = input.max_ttl.unwrap_or(ttl);
    check_ttl("max_ttl", max_ttl, ttl, limits.max_ttl)?;
    let expires_at = deadline("ttl", now, ttl)?;
    if expires_at > parent.expires_at {
        return Err(refused(
            "expires_at",
            format!(
                "the child would end at {}, after its parent's expires_at {}",
                rfc(expires_at),
                rfc(parent.expires_at)
            ),
        ));
    }
    let max_expires_at = deadline("max_ttl", now, max_ttl)?;
    if max_expires_at > parent.max_expires_at {
        return Err(refused(
            "max_expires_at",
            format!(
                "the child's renewal ceiling {} is after its parent's max_expires_at {}",
                rfc(max_expires_at),
                rfc(parent.max_expires_at)
            ),
        ));
    }
    let svid_ttl = input.svid_ttl.unwrap_or(parent.svid_ttl);
    check_ttl("svid_ttl", svid_ttl, MIN_TTL, limits.max_svid_ttl)?;
    if svid_ttl > parent.svid_ttl {
        return Err(refused(
            "svid_ttl",
            format!(
                "{} is above the parent's {}",
                humantime::format_duration(svid_ttl),
                humantime::format_duration(parent.svid_ttl)
            ),
        ));
    }
    let jwt_ttl = input.jwt_ttl.unwrap_or(parent.jwt_ttl);
    check_ttl("jwt_ttl", jwt_ttl, MIN_TTL, limits.max_jwt_ttl)?;
    if jwt_ttl > parent.jwt_ttl {
        return Err(refused(
            "jwt_ttl",
            format!(
                "{} is above the parent's {}",
                humantime::format_duration(jwt_ttl),
                humantime::format_duration(parent.jwt_ttl)
            ),
        ));
    }

    let audiences = sorted_audiences(input.audiences)?;
    if audiences.is_empty() {
        return Err(LeaseError::invalid(
            "audiences",
            "a delegated lease must name its JWT audiences (an empty list would allow any)",
        ));
    }
    if !parent.audiences.is_empty() {
        if let Some(a) = audiences.iter().find(|a| !parent.audiences.contains(a)) {
            return Err(refused(
                "audiences",
                format!(
                    "{a:?} is not among the parent's audiences {:?}",
                    parent.audiences
                ),
            ));
        }
    }

    let selectors = child_selectors(&parent.selectors, &input.selectors)?;

    let may_delegate = match input.max_delegation_depth {
        None => parent.may_delegate - 1,
        Some(n) if n < parent.may_delegate => n,
        Some(n) => {
            return Err(refused(
                "max_delegation_depth",
                format!(
                    "{n} levels: a child of lease {} may delegate at most {}",
                    parent.id,
                    parent.may_delegate - 1
                ),
            ))
        }
    };
    check_reason(&input.reason)?;

    // Who the chain acts for stays who it was: the root's delegator.
    let spiffe_id = render_id(limits, &input.agent, &input.task_id, &parent.delegator)?;
    if spiffe_id == parent.spiffe_id || parent.chain.iter().any(|l| l.spiffe_id == spiffe_id) {
        return Err(refused(
            "spiffe_id",
            format!(
                "{spiffe_id} is the identity of an ancestor; give the child its own agent or task ID"
            ),
        ));
    }
    let mut chain = parent.chain.clone();
    chain.push(Link {
        lease_id: parent.id.clone(),
        spiffe_id: parent.spiffe_id.clone(),
        task_id: parent.task_id.clone(),
    });

    Ok(Lease {
        id: LeaseId::random(),
        task_id: input.task_id,
        delegator: parent.delegator.clone(),
        agent: input.agent,
        spiffe_id,
        selectors,
        created_at: now,
        expires_at,
        max_expires_at,
        svid_ttl,
        jwt_ttl,
        audiences,
        reason: input.reason,
        granted_by: by,
        state: LeaseState::Active,
        ended_at: None,
        ended_by: None,
        end_reason: String::new(),
        approval_deadline: None,
        approved_at: None,
        approved_by: None,
        chain,
        may_delegate,
        end_on_violation: parent.end_on_violation || input.end_on_violation,
        // Set by the registry, which knows the node, for a lease bound to a process.
        node: None,
        revision: 0,
    })
}

/// The child's selectors: the parent's but its process bindings, and those asked for, checked
/// against the selector rules (see the module documentation).
fn child_selectors(parent: &Selectors, asked: &[String]) -> Result<Selectors, LeaseError> {
    let asked = if asked.is_empty() {
        Selectors::default()
    } else {
        check_selectors(asked)?
    };
    let mut child: Selectors = parent
        .iter()
        .filter(|s| s.bound_process().is_none())
        .cloned()
        .collect();
    child.extend(asked.iter().cloned());
    if child.len() > MAX_SELECTORS {
        return Err(LeaseError::invalid(
            "selectors",
            format!(
                "with the parent's, {} selectors: at most {MAX_SELECTORS} allowed",
                child.len()
            ),
        ));
    }
    let parent_bound: Vec<(i32, u64)> = parent.processes().collect();
    let child_bound: Vec<(i32, u64)> = child.processes().collect();
    if !parent_bound.is_empty() {
        if child_bound.is_empty() {
            return Err(refused(
                "selectors",
                "the parent is bound to a process, so the child must be bound (unix:pid) to it or to one of its descendants".into(),
            ));
        }
        for &(pid, start) in &child_bound {
            if !parent_bound
                .iter()
                .any(|&(ppid, pstart)| crate::attest::is_descendant(pid, start, ppid, pstart))
            {
                return Err(refused(
                    "selectors",
                    format!(
                        "unix:pid:{pid}:{start} is not a process the parent is bound to, nor a descendant of one"
                    ),
                ));
            }
        }
    }
    if child.iter().all(|s| parent.contains(s.as_str())) {
        return Err(refused(
            "selectors",
            "the child must add a selector to its parent's (a unix:pid binding, say): the same selectors are not narrower".into(),
        ));
    }
    Ok(child)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::{test_limits, validate_grant, GrantInput};

    fn parent(selectors: &[&str], audiences: &[&str]) -> Lease {
        let input = GrantInput {
            task_id: "plan".into(),
            delegator: "user/alice".into(),
            agent: "planner".into(),
            ttl: Some(Duration::from_secs(600)),
            max_ttl: Some(Duration::from_secs(1200)),
            svid_ttl: Some(Duration::from_secs(120)),
            jwt_ttl: Some(Duration::from_secs(60)),
            selectors: selectors.iter().map(|s| s.to_string()).collect(),
            audiences: audiences.iter().map(|s| s.to_string()).collect(),
            max_delegation_depth: 2,
            ..Default::default()
        };
        validate_grant(input, &test_limits(), SystemTime::now(), Principal::agent()).unwrap()
    }

    fn me() -> String {
        let pid = std::process::id() as i32;
        format!(
            "unix:pid:{pid}:{}",
            crate::attest::process_start_time(pid).unwrap()
        )
    }

    fn child(selectors: &[&str], audiences: &[&str]) -> DelegateInput {
        DelegateInput {
            task_id: "step-1".into(),
            agent: "executor".into(),
            ttl: Some(Duration::from_secs(60)),
            selectors: selectors.iter().map(|s| s.to_string()).collect(),
            audiences: audiences.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn delegate(p: &Lease, c: DelegateInput) -> Result<Lease, LeaseError> {
        // `parent` floors its deadlines to whole seconds; so does the child, from the same now.
        validate_delegation(p, c, &test_limits(), p.created_at, Principal::agent())
    }

    fn rule(r: Result<Lease, LeaseError>) -> String {
        match r {
            Err(LeaseError::Refused(m)) => m,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_child_inherits_the_delegator_and_records_the_chain() {
        let p = parent(&["unix:uid:1000"], &[]);
        let c = delegate(&p, child(&["unix:gid:5"], &["db"])).unwrap();
        assert_eq!(
            c.spiffe_id.to_string(),
            "spiffe://example.org/agent/executor/task/step-1/delegator/user/alice"
        );
        assert_eq!(c.chain.len(), 1);
        assert_eq!(c.parent(), Some(&p.id));
        assert_eq!(c.chain[0].spiffe_id, p.spiffe_id);
        assert_eq!(c.may_delegate, 1);
        assert_eq!((c.svid_ttl, c.jwt_ttl), (p.svid_ttl, p.jwt_ttl));
        let grandchild = delegate(
            &c,
            DelegateInput {
                agent: "tool".into(),
                ..child(&["unix:gid:6"], &["db"])
            },
        )
        .unwrap();
        assert_eq!(grandchild.chain.len(), 2);
        assert_eq!(grandchild.chain[0].lease_id, p.id);
        assert_eq!(grandchild.may_delegate, 0);
        let err = rule(delegate(
            &grandchild,
            DelegateInput {
                agent: "deeper".into(),
                ..child(&["unix:gid:7"], &["db"])
            },
        ));
        assert!(err.contains("may not delegate"), "{err}");
    }

    #[test]
    fn deadlines_and_ttls_narrow_at_their_boundary() {
        let p = parent(&["unix:uid:1000"], &[]);
        let sel = &["unix:gid:5"];
        let at = |ttl: u64, max: Option<u64>| {
            delegate(
                &p,
                DelegateInput {
                    ttl: Some(Duration::from_secs(ttl)),
                    max_ttl: max.map(Duration::from_secs),
                    ..child(sel, &["db"])
                },
            )
        };
        assert!(at(600, None).is_ok());
        assert!(rule(at(601, None)).contains("expires_at"));
        assert!(at(600, Some(1200)).is_ok());
        assert!(rule(at(600, Some(1201))).contains("max_expires_at"));
        let ttls = |svid: u64, jwt: u64| {
            delegate(
                &p,
                DelegateInput {
                    svid_ttl: Some(Duration::from_secs(svid)),
                    jwt_ttl: Some(Duration::from_secs(jwt)),
                    ..child(sel, &["db"])
                },
            )
        };
        assert!(ttls(120, 60).is_ok());
        assert!(rule(ttls(121, 60)).contains("svid_ttl"));
        assert!(rule(ttls(120, 61)).contains("jwt_ttl"));
    }

    #[test]
    fn audiences_are_a_non_empty_subset() {
        let sel = &["unix:gid:5"];
        let scoped = parent(&["unix:uid:1000"], &["db", "search"]);
        assert!(delegate(&scoped, child(sel, &["db"])).is_ok());
        assert!(delegate(&scoped, child(sel, &["db", "search"])).is_ok());
        assert!(rule(delegate(&scoped, child(sel, &["db", "mail"]))).contains("audiences"));
        let any = parent(&["unix:uid:1000"], &[]);
        assert!(delegate(&any, child(sel, &["mail"])).is_ok());
        for p in [&scoped, &any] {
            match delegate(p, child(sel, &[])) {
                Err(LeaseError::InvalidField {
                    field: "audiences", ..
                }) => {}
                other => panic!("an empty list must be refused: {other:?}"),
            }
        }
    }

    #[test]
    fn selectors_inherit_the_parent_s_and_must_add_one() {
        let p = parent(&["unix:uid:1000", "unix:gid:5"], &[]);
        // Nothing added, or only what the parent has: the same set, not narrower.
        let sames: [&[&str]; 3] = [&[], &["unix:uid:1000"], &["unix:uid:1000", "unix:gid:5"]];
        for same in sames {
            assert!(rule(delegate(&p, child(same, &["db"]))).contains("must add"));
        }
        // Naming fewer than the parent's still keeps them all.
        let c = delegate(&p, child(&["unix:gid:6"], &["db"])).unwrap();
        assert_eq!(
            c.selectors.to_strings(),
            ["unix:gid:5", "unix:gid:6", "unix:uid:1000"]
        );
        // A pid binding is the usual addition (this test's own process).
        let pid = me();
        let c = delegate(&p, child(&[&pid], &["db"])).unwrap();
        assert!(c.selectors.contains(&pid) && c.selectors.contains("unix:uid:1000"));
        // Malformed selectors are bad input, named.
        match delegate(&p, child(&["unix:uid:x"], &["db"])) {
            Err(LeaseError::InvalidField {
                field: "selectors", ..
            }) => {}
            other => panic!("{other:?}"),
        }
        let many: Vec<String> = (0..MAX_SELECTORS)
            .map(|i| format!("unix:gid:{}", 100 + i))
            .collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        match delegate(&p, child(&many, &["db"])) {
            Err(LeaseError::InvalidField {
                field: "selectors", ..
            }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_pid_bound_parent_binds_its_child_to_itself_or_a_descendant() {
        let mine = me();
        let p = parent(&[&mine, "unix:uid:1000"], &[]);
        // No binding: refused.
        assert!(rule(delegate(&p, child(&["unix:gid:5"], &["db"]))).contains("must be bound"));
        // The same process, with one more selector: allowed.
        assert!(delegate(&p, child(&[&mine, "unix:gid:5"], &["db"])).is_ok());
        // The same process and nothing more: the same set.
        assert!(rule(delegate(&p, child(&[&mine], &["db"]))).contains("must add"));
        // A spawned child process: a descendant.
        let mut kid = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let kid_pid = kid.id() as i32;
        let kid_sel = format!(
            "unix:pid:{kid_pid}:{}",
            crate::attest::process_start_time(kid_pid).unwrap()
        );
        assert!(delegate(&p, child(&[&kid_sel], &["db"])).is_ok());
        // Our parent is not our descendant.
        let (ppid, _) = crate::attest::process_parent(std::process::id() as i32).unwrap();
        let up = format!(
            "unix:pid:{ppid}:{}",
            crate::attest::process_start_time(ppid).unwrap()
        );
        assert!(rule(delegate(&p, child(&[&up], &["db"]))).contains("nor a descendant"));
        // The parent's uid is kept with a bare binding; its own binding is not.
        let c = delegate(&p, child(&[&kid_sel], &["db"])).unwrap();
        assert_eq!(c.selectors.len(), 2);
        assert!(c.selectors.contains("unix:uid:1000") && !c.selectors.contains(&mine));
        kid.kill().unwrap();
        kid.wait().unwrap();
        // A dead process is no one's descendant.
        assert!(rule(delegate(&p, child(&[&kid_sel], &["db"]))).contains("nor a descendant"));
    }

    #[test]
    fn depth_and_identity_rules() {
        let p = parent(&["unix:uid:1000"], &[]);
        let sel = &["unix:gid:5"];
        let depth = |n| {
            delegate(
                &p,
                DelegateInput {
                    max_delegation_depth: Some(n),
                    ..child(sel, &["db"])
                },
            )
        };
        assert_eq!(depth(0).unwrap().may_delegate, 0);
        assert_eq!(depth(1).unwrap().may_delegate, 1);
        assert!(rule(depth(2)).contains("max_delegation_depth"));
        let same = DelegateInput {
            agent: "planner".into(),
            task_id: "plan".into(),
            ..child(sel, &["db"])
        };
        assert!(rule(delegate(&p, same)).contains("spiffe_id"));
        let mut strict = p.clone();
        strict.end_on_violation = true;
        assert!(
            delegate(&strict, child(sel, &["db"]))
                .unwrap()
                .end_on_violation
        );
    }
}
