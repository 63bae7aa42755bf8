//! The answer: evaluating a request against a loaded policy set, with approval gates turning a
//! deny into "requires approval" only when nothing but a gate forbids and a permit remains.

use cedar_policy::{Authorizer, PolicyId};

use super::request::build_request;
use super::{Loaded, PolicyRequest};

/// The outcome of [`PolicyEngine::evaluate`](super::PolicyEngine::evaluate).
/// Policy names are `@id` annotations (or Cedar policy ids), sorted.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Allowed; `policies` are the permits that matched.
    Allow { policies: Vec<String> },
    /// Allowed once approved; `policies` are the approval gates that matched.
    RequireApproval { policies: Vec<String> },
    /// Denied; `policies` are the forbids that matched (empty: no permit
    /// matched). `errors` are evaluation errors (policies that errored are
    /// skipped by Cedar) or the reason the request could not be built.
    Deny {
        policies: Vec<String>,
        errors: Vec<String>,
    },
}

impl Decision {
    /// True for [`Decision::Allow`].
    pub fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }

    /// The policies named by the decision.
    pub fn policies(&self) -> &[String] {
        match self {
            Decision::Allow { policies }
            | Decision::RequireApproval { policies }
            | Decision::Deny { policies, .. } => policies,
        }
    }
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Decision::Allow { policies } => write!(f, "allow (by {})", policies.join(", ")),
            Decision::RequireApproval { policies } => {
                write!(f, "requires approval (by {})", policies.join(", "))
            }
            Decision::Deny { policies, errors } => {
                if policies.is_empty() {
                    f.write_str("deny (no policy permits this)")?;
                } else {
                    write!(f, "deny (by {})", policies.join(", "))?;
                }
                if !errors.is_empty() {
                    write!(f, "; errors: {}", errors.join("; "))?;
                }
                Ok(())
            }
        }
    }
}

impl Loaded {
    pub(super) fn evaluate(&self, request: &PolicyRequest) -> Decision {
        let (cedar_request, entities) = match build_request(request, &self.schema) {
            Ok(built) => built,
            Err(err) => {
                return Decision::Deny {
                    policies: Vec::new(),
                    errors: vec![err],
                }
            }
        };
        let authorizer = Authorizer::new();
        let first = authorizer.is_authorized(&cedar_request, &self.policies, &entities);
        let first_reason: Vec<&PolicyId> = first.diagnostics().reason().collect();
        let mut errors: Vec<String> = first
            .diagnostics()
            .errors()
            .map(ToString::to_string)
            .collect();
        if first.decision() == cedar_policy::Decision::Allow {
            return Decision::Allow {
                policies: self.names_of(first_reason),
            };
        }
        let only_gates =
            !first_reason.is_empty() && first_reason.iter().all(|id| self.approval.contains(id));
        if !only_gates {
            return Decision::Deny {
                policies: self.names_of(first_reason),
                errors,
            };
        }
        let second = authorizer.is_authorized(&cedar_request, &self.without_approval, &entities);
        if second.decision() == cedar_policy::Decision::Allow {
            return Decision::RequireApproval {
                policies: self.names_of(first_reason),
            };
        }
        for err in second.diagnostics().errors() {
            let err = err.to_string();
            if !errors.contains(&err) {
                errors.push(err);
            }
        }
        Decision::Deny {
            policies: self.names_of(second.diagnostics().reason()),
            errors,
        }
    }

    fn names_of<'a>(&self, ids: impl IntoIterator<Item = &'a PolicyId>) -> Vec<String> {
        let mut names: Vec<String> = ids
            .into_iter()
            .map(|id| {
                self.names
                    .get(id)
                    .cloned()
                    .unwrap_or_else(|| id.to_string())
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::test_support::{grant, names, strict, HOUR};
    use crate::policy::{Action, PolicyEngine, PolicySource};

    #[test]
    fn default_allows_grant_within_limit_and_denies_above() {
        let engine = PolicyEngine::load(PolicySource::default()).unwrap();
        let ok = grant(1000, &[], 4 * HOUR);
        assert_eq!(
            engine.evaluate(&ok),
            Decision::Allow {
                policies: names(&["grant-renew-within-max-ttl"])
            }
        );
        let mut renew = grant(1000, &[], HOUR);
        renew.action = Action::Renew;
        assert!(engine.evaluate(&renew).is_allow());

        let too_long = grant(1000, &[], 4 * HOUR + 1);
        assert_eq!(
            engine.evaluate(&too_long),
            Decision::Deny {
                policies: vec![],
                errors: vec![]
            },
            "nothing permits a grant above max_ttl_limit_secs"
        );
        renew.context.ttl_secs = 5 * HOUR;
        assert!(!engine.evaluate(&renew).is_allow());
    }

    #[test]
    fn default_allows_revoke_and_approve() {
        let engine = PolicyEngine::load(PolicySource::default()).unwrap();
        let mut req = grant(1000, &[], 100 * HOUR);
        req.action = Action::Revoke;
        assert_eq!(
            engine.evaluate(&req),
            Decision::Allow {
                policies: names(&["revoke"])
            }
        );
        req.action = Action::Approve;
        assert_eq!(
            engine.evaluate(&req),
            Decision::Allow {
                policies: names(&["approve"])
            }
        );
    }

    #[test]
    fn strict_admin_grant_allowed_non_admin_denied() {
        let engine = strict();
        assert_eq!(
            engine.evaluate(&grant(1000, &["mayfly-admins"], 600)),
            Decision::Allow {
                policies: names(&["admins-may-grant"])
            }
        );
        assert_eq!(
            engine.evaluate(&grant(1001, &["developers"], 600)),
            Decision::Deny {
                policies: vec![],
                errors: vec![]
            }
        );
    }

    #[test]
    fn strict_ttl_over_an_hour_denied_by_forbid() {
        let engine = strict();
        let d = engine.evaluate(&grant(1000, &["mayfly-admins"], 2 * HOUR));
        let Decision::Deny { policies, errors } = d else {
            panic!("expected deny, got {d:?}")
        };
        assert!(
            policies.contains(&"ttl-at-most-1h".to_string()),
            "{policies:?}"
        );
        assert!(errors.is_empty(), "{errors:?}");
    }

    #[test]
    fn strict_unknown_delegator_denied() {
        let engine = strict();
        let mut req = grant(1000, &["mayfly-admins"], 600);
        req.context.delegator = "robot/x".into();
        assert_eq!(
            engine.evaluate(&req),
            Decision::Deny {
                policies: names(&["known-delegator"]),
                errors: vec![]
            }
        );
        req.context.delegator = "orchestrator/ci".into();
        assert!(engine.evaluate(&req).is_allow());
    }

    #[test]
    fn strict_long_grant_requires_approval() {
        let engine = strict();
        assert_eq!(
            engine.evaluate(&grant(1000, &["mayfly-admins"], 30 * 60)),
            Decision::RequireApproval {
                policies: names(&["long-grant-needs-approval"])
            }
        );
    }

    #[test]
    fn strict_payments_requires_approval() {
        let engine = strict();
        let mut req = grant(1000, &["mayfly-admins"], 600);
        req.resource.agent = "payments".into();
        req.resource.spiffe_id = "spiffe://example.org/agent/payments".into();
        assert_eq!(
            engine.evaluate(&req),
            Decision::RequireApproval {
                policies: names(&["payments-needs-approval"])
            }
        );
        // Both gates at once are listed.
        req.context.ttl_secs = 30 * 60;
        assert_eq!(
            engine.evaluate(&req),
            Decision::RequireApproval {
                policies: names(&["long-grant-needs-approval", "payments-needs-approval"])
            }
        );
    }

    #[test]
    fn strict_gate_without_permit_is_deny() {
        // A non-admin asking for payments: only a gate forbids, but nothing
        // permits the grant once the gate is set aside.
        let engine = strict();
        let mut req = grant(1001, &["developers"], 600);
        req.resource.agent = "payments".into();
        assert_eq!(
            engine.evaluate(&req),
            Decision::Deny {
                policies: vec![],
                errors: vec![]
            }
        );
    }

    #[test]
    fn strict_forbid_plus_gate_is_deny() {
        let engine = strict();
        let mut req = grant(1000, &["mayfly-admins"], 600);
        req.resource.agent = "payments".into();
        req.context.delegator = "robot/x".into();
        assert_eq!(
            engine.evaluate(&req),
            Decision::Deny {
                policies: names(&["known-delegator", "payments-needs-approval"]),
                errors: vec![]
            }
        );
        // 2h: the hard TTL limit plus the long-grant gate → deny.
        let d = engine.evaluate(&grant(1000, &["mayfly-admins"], 2 * HOUR));
        assert_eq!(
            d,
            Decision::Deny {
                policies: names(&["long-grant-needs-approval", "ttl-at-most-1h"]),
                errors: vec![]
            }
        );
    }

    #[test]
    fn strict_approve_only_by_security() {
        let engine = strict();
        let mut req = grant(2000, &["security"], 30 * 60);
        req.action = Action::Approve;
        req.context.grantor_uid = 1000;
        assert_eq!(
            engine.evaluate(&req),
            Decision::Allow {
                policies: names(&["security-may-approve"])
            }
        );
        let mut other = req.clone();
        other.principal.groups = vec!["mayfly-admins".into()];
        assert_eq!(
            engine.evaluate(&other),
            Decision::Deny {
                policies: vec![],
                errors: vec![]
            }
        );
        // Four eyes: a security member cannot approve their own grant.
        req.context.grantor_uid = 2000;
        assert_eq!(
            engine.evaluate(&req),
            Decision::Deny {
                policies: names(&["no-self-approval"]),
                errors: vec![]
            }
        );
    }

    #[test]
    fn strict_renew_and_revoke() {
        let engine = strict();
        let mut req = grant(1001, &[], 600);
        req.context.grantor_uid = 1001;
        req.action = Action::Renew;
        assert!(engine.evaluate(&req).is_allow());
        req.action = Action::Revoke;
        assert!(engine.evaluate(&req).is_allow());
        req.context.grantor_uid = 1000;
        assert!(!engine.evaluate(&req).is_allow());
        req.principal.uid = 0;
        assert!(engine.evaluate(&req).is_allow());
    }

    /// Issue 14, hole 6: `complete` ended anyone's lease, whatever the policies said.
    #[test]
    fn strict_complete_is_decided_like_revoke() {
        let engine = strict();
        let mut req = grant(1001, &[], 600);
        req.action = Action::Complete;
        req.context.grantor_uid = 1000;
        assert!(
            !engine.evaluate(&req).is_allow(),
            "not the grantor, not an admin"
        );
        req.context.grantor_uid = 1001;
        assert!(
            engine.evaluate(&req).is_allow(),
            "the grantor completes its own task"
        );
        let default = PolicyEngine::load(PolicySource::default()).unwrap();
        req.context.grantor_uid = 1000;
        assert!(
            default.evaluate(&req).is_allow(),
            "the default keeps today's behaviour"
        );
    }
}
