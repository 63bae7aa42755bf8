//! Loading a policy set: reading the policy files and schema, validating them, naming the
//! policies and finding the approval gates; and the file fingerprint the watcher polls.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::SystemTime;

use cedar_policy::ffi::DetailedError;
use cedar_policy::{Effect, PolicyId, PolicySet, Schema, ValidationMode, Validator};

use super::diagnostic::{line_col, render};
use super::request::build_request;
use super::{
    Fingerprint, Loaded, PolicyError, PolicyRequest, PolicySource, DEFAULT_POLICY, DEFAULT_SCHEMA,
    READS_POLICY,
};

const DEFAULT_POLICY_NAME: &str = "<embedded default.cedar>";
const READS_POLICY_NAME: &str = "<embedded reads.cedar>";
const DEFAULT_SCHEMA_NAME: &str = "<embedded mayfly.cedarschema>";
const APPROVAL_ANNOTATION: &str = "approval";
const APPROVAL_REQUIRED: &str = "required";

fn read(path: &Path) -> Result<String, PolicyError> {
    std::fs::read_to_string(path).map_err(|source| PolicyError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The policy files a source stands for (directories expanded).
fn policy_files(source: &PolicySource) -> Result<Vec<PathBuf>, PolicyError> {
    let mut files = Vec::new();
    for path in &source.policy_files {
        let io = |source| PolicyError::Io {
            path: path.clone(),
            source,
        };
        if std::fs::metadata(path).map_err(io)?.is_dir() {
            let mut found = Vec::new();
            for entry in std::fs::read_dir(path).map_err(io)? {
                let entry = entry.map_err(io)?;
                let file = entry.path();
                if file.extension().is_some_and(|e| e == "cedar") && file.is_file() {
                    found.push(file);
                }
            }
            found.sort();
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    Ok(files)
}

/// Modification time and size of every configured file, every `*.cedar` file
/// in configured directories, and the directories themselves.
pub(super) fn fingerprint(source: &PolicySource) -> Fingerprint {
    fn stat(path: &Path) -> Option<(SystemTime, u64)> {
        let meta = std::fs::metadata(path).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    }
    let mut out = Vec::new();
    for path in source.policy_files.iter().chain(source.schema_file.iter()) {
        out.push((path.clone(), stat(path)));
        if path.is_dir() {
            if let Ok(entries) = std::fs::read_dir(path) {
                let mut files: Vec<PathBuf> = entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|e| e == "cedar"))
                    .collect();
                files.sort();
                out.extend(files.into_iter().map(|f| {
                    let s = stat(&f);
                    (f, s)
                }));
            }
        }
    }
    out
}

fn load_schema(source: &PolicySource) -> Result<(Schema, String), PolicyError> {
    let (path, text, name) = match &source.schema_file {
        Some(path) => (path.clone(), read(path)?, path.display().to_string()),
        None => (
            PathBuf::from(DEFAULT_SCHEMA_NAME),
            DEFAULT_SCHEMA.to_string(),
            "embedded default".to_string(),
        ),
    };
    let is_json = path.extension().is_some_and(|e| e == "json");
    let schema = if is_json {
        Schema::from_json_str(&text).map_err(|e| PolicyError::Schema {
            message: render(Some(&path), Some(&text), &DetailedError::from(&e)),
            path: path.clone(),
        })?
    } else {
        let (schema, warnings) =
            Schema::from_cedarschema_str(&text).map_err(|e| PolicyError::Schema {
                message: render(Some(&path), Some(&text), &DetailedError::from(&e)),
                path: path.clone(),
            })?;
        for warning in warnings {
            tracing::warn!(schema = %path.display(), "{warning}");
        }
        schema
    };
    // The schema must accept the requests mayfly builds.
    build_request(&PolicyRequest::default(), &schema).map_err(|message| PolicyError::Schema {
        path: path.clone(),
        message: format!(
            "{}: the schema does not match the requests mayfly sends: {message}",
            path.display()
        ),
    })?;
    Ok((schema, name))
}

pub(super) fn load_source(source: &PolicySource) -> Result<Loaded, PolicyError> {
    // Observe file state before reading, so a change during the read is seen
    // by the next poll.
    let fingerprint = fingerprint(source);
    let (schema, schema_name) = load_schema(source)?;
    let texts: Vec<(PathBuf, String)> = if source.policy_files.is_empty() {
        vec![(
            PathBuf::from(DEFAULT_POLICY_NAME),
            DEFAULT_POLICY.to_string(),
        )]
    } else {
        let files = policy_files(source)?;
        let mut texts = Vec::with_capacity(files.len());
        for file in files {
            let text = read(&file)?;
            texts.push((file, text));
        }
        texts
    };
    let texts: Vec<(PathBuf, String)> = texts
        .into_iter()
        .chain([(PathBuf::from(READS_POLICY_NAME), READS_POLICY.to_string())])
        .collect();

    let validator = Validator::new(schema.clone());
    let mut policies = PolicySet::new();
    let mut without_approval = PolicySet::new();
    let mut approval = HashSet::new();
    let mut names: HashMap<PolicyId, String> = HashMap::new();
    let mut named_in: HashMap<String, PathBuf> = HashMap::new();
    let mut next = 0usize;
    // Policies of the set itself, not counting the embedded reads policy beside it.
    let mut own = 0usize;
    for (path, text) in &texts {
        let parsed = PolicySet::from_str(text).map_err(|errs| PolicyError::Parse {
            path: path.clone(),
            message: errs
                .iter()
                .map(|e| render(Some(path), Some(text), &DetailedError::from(e)))
                .collect::<Vec<_>>()
                .join("\n"),
        })?;
        if path.as_os_str() != READS_POLICY_NAME {
            own += parsed.policies().count();
        }
        if parsed.templates().next().is_some() {
            return Err(PolicyError::Invalid {
                path: path.clone(),
                message: "Cedar policy templates are not supported".to_string(),
            });
        }
        // Renumber so ids are unique across files (policy0, policy1, ...).
        let mut file_set = PolicySet::new();
        for policy in parsed.policies() {
            let id = PolicyId::new(format!("policy{next}"));
            next += 1;
            let policy = policy.new_id(id);
            file_set.add(policy).map_err(|e| PolicyError::Invalid {
                path: path.clone(),
                message: e.to_string(),
            })?;
        }
        let result = validator.validate(&file_set, ValidationMode::Strict);
        if !result.validation_passed() {
            // Cedar reports a mistake once per action it applies to; show
            // each location once.
            let mut seen = HashSet::new();
            let mut messages = Vec::new();
            for err in result.validation_errors() {
                let detail = DetailedError::from(err);
                let key = (
                    err.policy_id().clone(),
                    detail
                        .source_locations
                        .first()
                        .map(|l| (l.loc.start, l.loc.end)),
                    detail.help.clone(),
                );
                if !seen.insert(key) {
                    continue;
                }
                let mut message = render(Some(path), Some(text), &detail);
                if let Some(name) = file_set
                    .policy(err.policy_id())
                    .and_then(|p| p.annotation("id"))
                {
                    message.push_str(&format!("\n    policy: {name}"));
                }
                messages.push(message);
            }
            return Err(PolicyError::Validation {
                path: path.clone(),
                message: messages.join("\n"),
            });
        }
        for warning in result.validation_warnings() {
            tracing::warn!(
                "{}",
                render(Some(path), Some(text), &DetailedError::from(warning))
            );
        }
        for policy in file_set.policies() {
            let id = policy.id().clone();
            let name = policy
                .annotation("id")
                .map_or_else(|| id.to_string(), str::to_string);
            let line = policy_line(text, policy);
            let at = format!("{}:{line}", path.display());
            if let Some(other) = named_in.insert(name.clone(), PathBuf::from(&at)) {
                return Err(PolicyError::Invalid {
                    path: path.clone(),
                    message: format!(
                        "line {line}: duplicate policy name `{name}` (also at {})",
                        other.display()
                    ),
                });
            }
            let is_gate = match policy.annotation(APPROVAL_ANNOTATION) {
                None => false,
                Some(APPROVAL_REQUIRED) if policy.effect() == Effect::Forbid => true,
                Some(APPROVAL_REQUIRED) => {
                    return Err(PolicyError::Invalid {
                        path: path.clone(),
                        message: format!(
                            "line {line}: policy `{name}`: @approval(\"required\") is only \
                             meaningful on forbid policies"
                        ),
                    })
                }
                Some(other) => {
                    return Err(PolicyError::Invalid {
                        path: path.clone(),
                        message: format!(
                            "line {line}: policy `{name}`: unknown @approval value {other:?} \
                             (the only accepted value is \"required\")"
                        ),
                    })
                }
            };
            names.insert(id.clone(), name);
            let add_err = |e: cedar_policy::PolicySetError| PolicyError::Invalid {
                path: path.clone(),
                message: e.to_string(),
            };
            policies.add(policy.clone()).map_err(add_err)?;
            if is_gate {
                approval.insert(id);
            } else {
                without_approval.add(policy.clone()).map_err(add_err)?;
            }
        }
    }
    if own == 0 {
        let list = texts
            .iter()
            .filter(|(p, _)| p.as_os_str() != READS_POLICY_NAME)
            .map(|(p, _)| p.display().to_string())
            .collect::<Vec<_>>();
        let list = if list.is_empty() {
            source
                .policy_files
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
        } else {
            list
        };
        return Err(PolicyError::NoPolicies(list.join(", ")));
    }

    let description = if source.is_embedded() {
        "embedded default".to_string()
    } else {
        let files = if source.policy_files.is_empty() {
            "embedded default".to_string()
        } else {
            texts
                .iter()
                .map(|(p, _)| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "policies: {files} ({} policies, {} approval gates); schema: {schema_name}",
            names.len(),
            approval.len()
        )
    };
    Ok(Loaded {
        policies,
        without_approval,
        approval,
        names,
        schema,
        description,
        fingerprint,
    })
}

/// Line (1-based) where `policy` starts in `text` (0 if unknown). Cedar
/// keeps each policy's exact source text, so it can be found in the file.
fn policy_line(text: &str, policy: &cedar_policy::Policy) -> usize {
    let src = policy.to_string();
    match text.find(src.as_str()) {
        Some(offset) if !src.is_empty() => line_col(text, offset).0,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::test_support::{grant, names, write};
    use crate::policy::{Action, Decision, PolicyEngine};

    #[test]
    fn default_policy_and_schema_load() {
        let engine = PolicyEngine::load(PolicySource::default()).unwrap();
        assert_eq!(engine.describe(), "embedded default");
        // The shipped schema file is the embedded one.
        let engine =
            PolicyEngine::load(PolicySource {
                policy_files: vec![
                    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/default.cedar")
                ],
                schema_file: Some(
                    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/mayfly.cedarschema"),
                ),
            })
            .unwrap();
        assert!(
            engine.describe().contains("default.cedar"),
            "{}",
            engine.describe()
        );
        assert!(
            engine.describe().contains("mayfly.cedarschema"),
            "{}",
            engine.describe()
        );
    }

    #[test]
    fn policy_without_id_is_named_by_cedar_id() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.cedar");
        write(
            &file,
            "permit (principal, action == Mayfly::Action::\"revoke\", resource);\n\
             permit (principal, action == Mayfly::Action::\"approve\", resource);\n",
        );
        let engine = PolicyEngine::load(PolicySource {
            policy_files: vec![dir.path().to_path_buf()],
            schema_file: None,
        })
        .unwrap();
        let mut req = grant(1, &[], 1);
        req.action = Action::Approve;
        assert_eq!(
            engine.evaluate(&req),
            Decision::Allow {
                policies: names(&["policy1"])
            }
        );
    }

    #[test]
    fn directory_loads_cedar_files_with_unique_ids() {
        let dir = tempfile::tempdir().unwrap();
        write(
            &dir.path().join("a.cedar"),
            "permit (principal, action == Mayfly::Action::\"revoke\", resource);",
        );
        write(
            &dir.path().join("b.cedar"),
            "permit (principal, action == Mayfly::Action::\"approve\", resource);",
        );
        write(&dir.path().join("notes.txt"), "not cedar");
        let engine = PolicyEngine::load(PolicySource {
            policy_files: vec![dir.path().to_path_buf()],
            schema_file: None,
        })
        .unwrap();
        let mut req = grant(1, &[], 1);
        req.action = Action::Approve;
        assert_eq!(
            engine.evaluate(&req),
            Decision::Allow {
                policies: names(&["policy1"])
            }
        );
        assert!(engine.describe().contains("b.cedar"));
    }

    #[test]
    fn syntax_error_names_file_and_cedar_message() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("broken.cedar");
        write(
            &file,
            "// comment\n@id(\"x\")\npermit (principal, action, resource) when { context.ttl_secs <= };\n",
        );
        let err = PolicyEngine::load(PolicySource {
            policy_files: vec![file.clone()],
            schema_file: None,
        })
        .unwrap_err();
        let msg = err.to_string();
        eprintln!("{msg}");
        assert!(matches!(err, PolicyError::Parse { .. }), "{err:?}");
        assert!(msg.contains("broken.cedar:3:"), "{msg}");
        assert!(msg.contains("unexpected token"), "{msg}");
    }

    #[test]
    fn validation_error_names_file_and_cedar_message() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("typo.cedar");
        write(
            &file,
            "@id(\"typo\")\npermit (principal, action, resource)\nwhen { context.ttl_sec <= 60 };\n",
        );
        let err = PolicyEngine::load(PolicySource {
            policy_files: vec![file.clone()],
            schema_file: None,
        })
        .unwrap_err();
        let msg = err.to_string();
        eprintln!("{msg}");
        assert!(matches!(err, PolicyError::Validation { .. }), "{err:?}");
        assert!(msg.contains("typo.cedar:3:"), "{msg}");
        assert!(msg.contains("ttl_sec"), "{msg}");
        assert!(
            msg.contains("does not have the attribute") || msg.contains("attribute"),
            "{msg}"
        );

        // Unknown entity type.
        write(
            &file,
            "permit (principal == Mayfly::Usr::\"0\", action, resource);",
        );
        let msg = PolicyEngine::load(PolicySource {
            policy_files: vec![file],
            schema_file: None,
        })
        .unwrap_err()
        .to_string();
        eprintln!("{msg}");
        assert!(
            msg.contains("typo.cedar:1:") && msg.contains("Mayfly::Usr"),
            "{msg}"
        );
    }

    #[test]
    fn schema_errors_name_the_schema_file() {
        let dir = tempfile::tempdir().unwrap();
        let schema = dir.path().join("bad.cedarschema");
        write(&schema, "namespace Mayfly { entity User = { uid: Long, ; }");
        let err = PolicyEngine::load(PolicySource {
            policy_files: vec![],
            schema_file: Some(schema.clone()),
        })
        .unwrap_err();
        let msg = err.to_string();
        eprintln!("{msg}");
        assert!(matches!(err, PolicyError::Schema { .. }), "{err:?}");
        assert!(msg.contains("bad.cedarschema"), "{msg}");

        // Parses, but lacks attributes mayfly sends.
        write(
            &schema,
            "namespace Mayfly { entity User; entity Identity; \
             action grant, renew, revoke, approve appliesTo { principal: User, resource: Identity }; }",
        );
        let msg = PolicyEngine::load(PolicySource {
            policy_files: vec![],
            schema_file: Some(schema),
        })
        .unwrap_err()
        .to_string();
        eprintln!("{msg}");
        assert!(
            msg.contains("does not match the requests mayfly sends"),
            "{msg}"
        );
    }

    #[test]
    fn bad_approval_annotations_and_duplicates_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.cedar");
        let load = |text: &str| {
            write(&file, text);
            PolicyEngine::load(PolicySource {
                policy_files: vec![file.clone()],
                schema_file: None,
            })
        };
        let err = load("@approval(\"required\")\npermit (principal, action, resource);")
            .unwrap_err()
            .to_string();
        assert!(err.contains("only meaningful on forbid"), "{err}");
        let err = load("@approval(\"require\")\nforbid (principal, action, resource);")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown @approval value"), "{err}");
        let err = load(
            "@id(\"a\")\npermit (principal, action, resource);\n@id(\"a\")\nforbid (principal, action, resource);",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("duplicate policy name `a`") && err.contains("line 3"),
            "{err}"
        );
        let err = load("permit (principal == ?principal, action, resource);")
            .unwrap_err()
            .to_string();
        assert!(err.contains("templates"), "{err}");
        let err = load("// nothing here\n").unwrap_err();
        assert!(matches!(err, PolicyError::NoPolicies(_)), "{err:?}");
        let err = PolicyEngine::load(PolicySource {
            policy_files: vec![dir.path().join("missing.cedar")],
            schema_file: None,
        })
        .unwrap_err();
        assert!(matches!(err, PolicyError::Io { .. }) && err.to_string().contains("missing.cedar"));
    }
}
