//! The resource names of an SDS request, resolved against what the caller holds: which secret
//! each name gives, and which names nothing gives.
//!
//! The names and their meanings are SPIRE agent's, so that a mesh configured for SPIRE asks
//! mayfly the same questions: the caller's SPIFFE IDs, trust domain IDs (`spiffe://td`), and
//! three configurable aliases (`default`, `ROOTCA`, `ALL`). An empty list asks for everything
//! the caller may have.

use std::collections::BTreeSet;

/// The configurable aliases (SPIRE's `default_svid_name`, `default_bundle_name` and
/// `default_all_bundles_name`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Aliases {
    /// The caller's first SVID.
    pub svid: String,
    /// The own trust domain's bundle.
    pub bundle: String,
    /// Every bundle the agent knows. When it equals `bundle` (OpenShift's zero-trust operator
    /// sets both to `ROOTCA`), that name gives every bundle.
    pub all_bundles: String,
}

impl Default for Aliases {
    fn default() -> Self {
        Aliases {
            svid: "default".into(),
            bundle: "ROOTCA".into(),
            all_bundles: "ALL".into(),
        }
    }
}

impl Aliases {
    /// Every problem with these aliases, for the config's one list of errors.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (key, v) in [
            ("sds.default_svid_name", &self.svid),
            ("sds.default_bundle_name", &self.bundle),
            ("sds.default_all_bundles_name", &self.all_bundles),
        ] {
            if v.is_empty() {
                out.push(format!("{key}: must not be empty"));
            } else if v.starts_with("spiffe://") || is_istio_file_name(v) {
                out.push(format!(
                    "{key}: {v:?} would hide the SDS names of that form; choose another"
                ));
            }
        }
        if self.svid == self.bundle || self.svid == self.all_bundles {
            out.push(format!(
                "sds.default_svid_name: {:?} is also a bundle name",
                self.svid
            ));
        }
        out
    }
}

/// Names Istio 1.21+ sends for certificates it reads from files itself (`file-root:…`,
/// `file-cert:…`). They are not ours to answer: the agent never reads a file for a caller. They
/// are left out of the answer rather than failing the whole stream (SPIRE's spire#5687).
pub fn is_istio_file_name(name: &str) -> bool {
    name.starts_with("file-root:") || name.starts_with("file-cert:")
}

/// One secret an answer carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pick {
    /// One of the trust domain's bundles (`trust_domain` without the scheme), under `name`.
    Bundle { name: String, trust_domain: String },
    /// Every bundle the agent knows, under `name`.
    AllBundles { name: String },
    /// The caller's SVID at `index` (in the order the Workload API gives them), under `name`.
    Svid { name: String, index: usize },
}

impl Pick {
    pub fn name(&self) -> &str {
        match self {
            Pick::Bundle { name, .. } | Pick::AllBundles { name } | Pick::Svid { name, .. } => name,
        }
    }
}

/// What a request's names resolve to.
#[derive(Debug, PartialEq, Eq)]
pub struct Resolved {
    /// Bundles first, then SVIDs, as SPIRE orders them.
    pub picks: Vec<Pick>,
    /// Names nothing gives (sorted): the caller does not hold them, or they name nothing.
    pub unknown: Vec<String>,
    /// Istio's file names, left unanswered.
    pub skipped: Vec<String>,
}

/// The names a request asks for: empty names dropped, each once, sorted.
pub fn requested(names: &[String]) -> BTreeSet<String> {
    names.iter().filter(|n| !n.is_empty()).cloned().collect()
}

/// Resolves `names` (from [`requested`]) for a caller holding `svids` (SPIFFE IDs, in order),
/// with `trust_domains` the bundles the agent knows (names without scheme, sorted) and `own`
/// this agent's trust domain.
pub fn resolve(
    names: &BTreeSet<String>,
    aliases: &Aliases,
    own: &str,
    trust_domains: &[String],
    svids: &[String],
) -> Resolved {
    let mut picks = Vec::new();
    if names.is_empty() {
        picks.extend(trust_domains.iter().map(|td| Pick::Bundle {
            name: format!("spiffe://{td}"),
            trust_domain: td.clone(),
        }));
        picks.extend(svids.iter().enumerate().map(|(index, id)| Pick::Svid {
            name: id.clone(),
            index,
        }));
        return Resolved {
            picks,
            unknown: Vec::new(),
            skipped: Vec::new(),
        };
    }
    let (mut unknown, mut skipped, mut svid_picks) = (Vec::new(), Vec::new(), Vec::new());
    for name in names {
        if name == &aliases.all_bundles {
            picks.push(Pick::AllBundles { name: name.clone() });
        } else if name == &aliases.bundle {
            picks.push(Pick::Bundle {
                name: name.clone(),
                trust_domain: own.to_owned(),
            });
        } else if let Some(td) = name
            .strip_prefix("spiffe://")
            .filter(|td| trust_domains.iter().any(|t| t == td))
        {
            picks.push(Pick::Bundle {
                name: name.clone(),
                trust_domain: td.to_owned(),
            });
        } else if name == &aliases.svid && !svids.is_empty() {
            svid_picks.push(Pick::Svid {
                name: name.clone(),
                index: 0,
            });
        } else if let Some(index) = svids.iter().position(|id| id == name) {
            svid_picks.push(Pick::Svid {
                name: name.clone(),
                index,
            });
        } else if is_istio_file_name(name) {
            skipped.push(name.clone());
        } else {
            unknown.push(name.clone());
        }
    }
    picks.extend(svid_picks);
    Resolved {
        picks,
        unknown,
        skipped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> BTreeSet<String> {
        requested(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    fn tds() -> Vec<String> {
        vec!["example.org".into(), "other.test".into()]
    }

    fn ids() -> Vec<String> {
        vec![
            "spiffe://example.org/task/a".into(),
            "spiffe://example.org/task/b".into(),
        ]
    }

    fn run(v: &[&str]) -> Resolved {
        resolve(
            &names(v),
            &Aliases::default(),
            "example.org",
            &tds(),
            &ids(),
        )
    }

    #[test]
    fn no_names_give_every_bundle_by_trust_domain_and_every_svid_by_id() {
        let r = run(&[]);
        let got: Vec<&str> = r.picks.iter().map(Pick::name).collect();
        assert_eq!(
            got,
            [
                "spiffe://example.org",
                "spiffe://other.test",
                "spiffe://example.org/task/a",
                "spiffe://example.org/task/b"
            ]
        );
        assert_eq!(run(&["", ""]).picks, r.picks, "empty names are no names");
    }

    #[test]
    fn aliases_give_the_first_svid_the_own_bundle_and_all_bundles() {
        let r = run(&["default", "ROOTCA", "ALL"]);
        assert!(r.unknown.is_empty() && r.skipped.is_empty());
        assert_eq!(
            r.picks,
            [
                Pick::AllBundles { name: "ALL".into() },
                Pick::Bundle {
                    name: "ROOTCA".into(),
                    trust_domain: "example.org".into()
                },
                Pick::Svid {
                    name: "default".into(),
                    index: 0
                },
            ]
        );
    }

    #[test]
    fn ids_and_trust_domains_name_themselves() {
        let r = run(&["spiffe://example.org/task/b", "spiffe://other.test"]);
        assert_eq!(
            r.picks,
            [
                Pick::Bundle {
                    name: "spiffe://other.test".into(),
                    trust_domain: "other.test".into()
                },
                Pick::Svid {
                    name: "spiffe://example.org/task/b".into(),
                    index: 1
                },
            ]
        );
    }

    #[test]
    fn what_the_caller_does_not_hold_is_unknown_and_istio_file_names_are_skipped() {
        let r = run(&[
            "spiffe://example.org/task/z",
            "spiffe://nowhere.test",
            "file-root:system",
            "file-cert:/etc/a.crt~/etc/a.key",
            "ROOTCA",
        ]);
        assert_eq!(
            r.unknown,
            ["spiffe://example.org/task/z", "spiffe://nowhere.test"]
        );
        assert_eq!(
            r.skipped,
            ["file-cert:/etc/a.crt~/etc/a.key", "file-root:system"]
        );
        assert_eq!(r.picks.len(), 1);
        let none = resolve(
            &names(&["default"]),
            &Aliases::default(),
            "example.org",
            &tds(),
            &[],
        );
        assert_eq!(none.unknown, ["default"], "no SVID, no default");
    }

    #[test]
    fn one_name_for_the_bundle_and_all_bundles_gives_all_bundles() {
        let aliases = Aliases {
            all_bundles: "ROOTCA".into(),
            ..Aliases::default()
        };
        let r = resolve(&names(&["ROOTCA"]), &aliases, "example.org", &tds(), &ids());
        assert_eq!(
            r.picks,
            [Pick::AllBundles {
                name: "ROOTCA".into()
            }]
        );
        assert!(aliases.problems().is_empty());
    }

    #[test]
    fn aliases_that_would_hide_other_names_are_refused() {
        let bad = Aliases {
            svid: "ALL".into(),
            bundle: "spiffe://example.org".into(),
            all_bundles: "ALL".into(),
        };
        let p = bad.problems();
        assert_eq!(p.len(), 2, "{p:?}");
        let empty = Aliases {
            svid: String::new(),
            ..Aliases::default()
        };
        assert_eq!(empty.problems().len(), 1);
        assert!(Aliases::default().problems().is_empty());
    }
}
