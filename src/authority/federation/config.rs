//! The `[[federation]]` tables of the config file and what they resolve to.
//!
//! Each table names one foreign trust domain and where its bundle comes from: a local file, or
//! a bundle endpoint with one of the two profiles the SPIFFE Federation standard defines
//! (§5.2). The key names are SPIRE's (`bundle_endpoint_url`, `bundle_endpoint_profile`,
//! `endpoint_spiffe_id`), so an operator who federates SPIRE servers reads them the same way.
//! The trust domain is always given explicitly: §7.2 forbids inferring it from the URL or from
//! the endpoint's SPIFFE ID.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use spiffe::{SpiffeId, TrustDomain};
use url::Url;

/// The shortest poll interval an operator may configure; anything shorter hammers the
/// endpoint the standard asks clients to treat gently (§6.2).
const MIN_REFRESH: Duration = Duration::from_secs(1);

/// One `[[federation]]` table as written in the config file.
#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationEntry {
    /// The foreign trust domain, e.g. `partner.example`.
    pub trust_domain: Option<String>,
    /// A SPIFFE bundle (JSON), or PEM certificates (X.509 roots only), re-read when it changes.
    pub bundle_file: Option<PathBuf>,
    /// The bundle endpoint: `https://` only, without userinfo.
    pub bundle_endpoint_url: Option<String>,
    /// `https_web` or `https_spiffe`.
    pub bundle_endpoint_profile: Option<String>,
    /// `https_spiffe`: the SPIFFE ID the endpoint's server certificate must carry.
    pub endpoint_spiffe_id: Option<String>,
    /// `https_spiffe`, self-serving endpoint: the foreign bundle that authenticates the first
    /// fetch (SPIFFE bundle JSON or PEM), obtained out of band.
    pub bootstrap_bundle_file: Option<PathBuf>,
    /// `https_web`: PEM roots to trust instead of the built-in web roots (a private PKI).
    pub web_roots_file: Option<PathBuf>,
    /// How often to poll the endpoint, e.g. `5m`. Default: the bundle's `spiffe_refresh_hint`,
    /// else five minutes.
    pub refresh: Option<String>,
}

/// One foreign trust domain, checked: a value of this type is a usable configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederationSettings {
    pub trust_domain: TrustDomain,
    pub source: BundleSource,
}

/// Where a foreign trust domain's bundle comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BundleSource {
    /// A file the operator keeps up to date (§4.2 of the Federation standard: a local update is
    /// the latest bundle).
    File(PathBuf),
    /// A bundle endpoint, polled.
    Endpoint(EndpointSettings),
}

/// A bundle endpoint and how to authenticate it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSettings {
    /// `https`, no userinfo; the URL fetched every time (a redirect is never remembered).
    pub url: Url,
    pub profile: EndpointProfile,
    /// The operator's poll interval; `None`: the bundle's refresh hint, else five minutes.
    pub refresh: Option<Duration>,
}

/// The endpoint profiles of the SPIFFE Federation standard, §5.2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointProfile {
    /// §5.2.1: the server certificate is checked with web PKI against the URL's host.
    HttpsWeb {
        /// PEM roots instead of the built-in web roots.
        web_roots_file: Option<PathBuf>,
    },
    /// §5.2.2: the server certificate must be an X509-SVID for `endpoint_spiffe_id`, checked
    /// against the current bundle of that ID's trust domain; no host name is checked.
    HttpsSpiffe {
        endpoint_spiffe_id: SpiffeId,
        /// Set exactly when the endpoint is self-serving (its SPIFFE ID is in the trust domain
        /// whose bundle it serves). A non-self-serving endpoint is authenticated with the
        /// bundle of its own trust domain, which is then another `[[federation]]` entry.
        bootstrap_bundle_file: Option<PathBuf>,
    },
}

/// Checks the `[[federation]]` tables. Every problem is pushed to `errors` as one message that
/// names `federation[i].field`; only entries without problems are returned.
pub fn resolve(
    entries: &[FederationEntry],
    own_trust_domain: &TrustDomain,
    errors: &mut Vec<String>,
) -> Vec<FederationSettings> {
    // Each with the index of its table, for messages.
    let mut out: Vec<(usize, FederationSettings)> = Vec::new();
    // Trust domain -> index of the first entry that names it.
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (i, entry) in entries.iter().enumerate() {
        let before = errors.len();
        let trust_domain = trust_domain(i, entry, own_trust_domain, &mut seen, errors);
        let source = source(i, entry, trust_domain.as_ref(), errors);
        if let (Some(trust_domain), Some(source)) = (trust_domain, source) {
            if errors.len() == before {
                out.push((
                    i,
                    FederationSettings {
                        trust_domain,
                        source,
                    },
                ));
            }
        }
    }
    let unvouched = check_endpoint_trust(&out, own_trust_domain, errors);
    out.into_iter()
        .filter(|(i, _)| !unvouched.contains(i))
        .map(|(_, s)| s)
        .collect()
}

fn trust_domain(
    i: usize,
    entry: &FederationEntry,
    own: &TrustDomain,
    seen: &mut BTreeMap<String, usize>,
    errors: &mut Vec<String>,
) -> Option<TrustDomain> {
    let Some(text) = &entry.trust_domain else {
        errors.push(format!(
            "federation[{i}].trust_domain: missing; name the foreign trust domain explicitly"
        ));
        return None;
    };
    // A bare name: a SPIFFE ID here would hide a path the operator meant for something else.
    if text.contains(":/") {
        errors.push(format!(
            "federation[{i}].trust_domain {text:?}: a trust domain name such as \
             \"partner.example\", not a URI"
        ));
        return None;
    }
    let td = match TrustDomain::new(text) {
        Ok(td) => td,
        Err(e) => {
            errors.push(format!("federation[{i}].trust_domain {text:?}: {e}"));
            return None;
        }
    };
    if &td == own {
        errors.push(format!(
            "federation[{i}].trust_domain {text:?}: is the agent's own trust domain"
        ));
        return None;
    }
    if let Some(first) = seen.get(td.as_str()) {
        errors.push(format!(
            "federation[{i}].trust_domain {text:?}: already configured in federation[{first}]"
        ));
        return None;
    }
    seen.insert(td.to_string(), i);
    Some(td)
}

fn source(
    i: usize,
    entry: &FederationEntry,
    trust_domain: Option<&TrustDomain>,
    errors: &mut Vec<String>,
) -> Option<BundleSource> {
    match (&entry.bundle_file, &entry.bundle_endpoint_url) {
        (Some(path), None) => {
            let endpoint_only = [
                (
                    "bundle_endpoint_profile",
                    entry.bundle_endpoint_profile.is_some(),
                ),
                ("endpoint_spiffe_id", entry.endpoint_spiffe_id.is_some()),
                (
                    "bootstrap_bundle_file",
                    entry.bootstrap_bundle_file.is_some(),
                ),
                ("web_roots_file", entry.web_roots_file.is_some()),
                ("refresh", entry.refresh.is_some()),
            ];
            let before = errors.len();
            for (field, _) in endpoint_only.iter().filter(|(_, set)| *set) {
                errors.push(format!(
                    "federation[{i}].{field}: only with bundle_endpoint_url (a bundle_file is \
                     re-read whenever it changes)"
                ));
            }
            (errors.len() == before).then(|| BundleSource::File(path.clone()))
        }
        (None, Some(url)) => {
            endpoint(i, entry, url, trust_domain, errors).map(BundleSource::Endpoint)
        }
        (Some(_), Some(_)) => {
            errors.push(format!(
                "federation[{i}]: bundle_file and bundle_endpoint_url exclude each other; set one"
            ));
            None
        }
        (None, None) => {
            errors.push(format!(
                "federation[{i}]: set bundle_file or bundle_endpoint_url (where the bundle comes \
                 from)"
            ));
            None
        }
    }
}

fn endpoint(
    i: usize,
    entry: &FederationEntry,
    url_text: &str,
    trust_domain: Option<&TrustDomain>,
    errors: &mut Vec<String>,
) -> Option<EndpointSettings> {
    let before = errors.len();
    let url = match endpoint_url(url_text) {
        Ok(url) => Some(url),
        Err(e) => {
            errors.push(format!(
                "federation[{i}].bundle_endpoint_url {url_text:?}: {e}"
            ));
            None
        }
    };
    let refresh =
        entry
            .refresh
            .as_deref()
            .and_then(|text| match crate::time::parse_duration(text) {
                Ok(d) if d >= MIN_REFRESH => Some(d),
                Ok(_) => {
                    errors.push(format!(
                        "federation[{i}].refresh {text:?}: must be at least 1s"
                    ));
                    None
                }
                Err(e) => {
                    errors.push(format!("federation[{i}].refresh: {e}"));
                    None
                }
            });
    let wrong_profile = |field: &str, profile: &str, errors: &mut Vec<String>| {
        errors.push(format!(
            "federation[{i}].{field}: not used by bundle_endpoint_profile \"{profile}\""
        ));
    };
    let profile = match entry.bundle_endpoint_profile.as_deref() {
        Some("https_web") => {
            if entry.endpoint_spiffe_id.is_some() {
                wrong_profile("endpoint_spiffe_id", "https_web", errors);
            }
            if entry.bootstrap_bundle_file.is_some() {
                wrong_profile("bootstrap_bundle_file", "https_web", errors);
            }
            Some(EndpointProfile::HttpsWeb {
                web_roots_file: entry.web_roots_file.clone(),
            })
        }
        Some("https_spiffe") => {
            if entry.web_roots_file.is_some() {
                wrong_profile("web_roots_file", "https_spiffe", errors);
            }
            https_spiffe(i, entry, trust_domain, errors)
        }
        Some(other) => {
            errors.push(format!(
                "federation[{i}].bundle_endpoint_profile {other:?}: \"https_web\" or \
                 \"https_spiffe\""
            ));
            None
        }
        None => {
            // §7.2: the profile cannot be inferred from the URL, nor tried one after the other.
            errors.push(format!(
                "federation[{i}].bundle_endpoint_profile: missing; \"https_web\" or \
                 \"https_spiffe\""
            ));
            None
        }
    };
    match (url, profile) {
        (Some(url), Some(profile)) if errors.len() == before => Some(EndpointSettings {
            url,
            profile,
            refresh,
        }),
        _ => None,
    }
}

fn https_spiffe(
    i: usize,
    entry: &FederationEntry,
    trust_domain: Option<&TrustDomain>,
    errors: &mut Vec<String>,
) -> Option<EndpointProfile> {
    let Some(text) = &entry.endpoint_spiffe_id else {
        errors.push(format!(
            "federation[{i}].endpoint_spiffe_id: required with \"https_spiffe\" (the SPIFFE ID \
             of the bundle endpoint server)"
        ));
        return None;
    };
    let id = match endpoint_spiffe_id(text) {
        Ok(id) => id,
        Err(e) => {
            errors.push(format!("federation[{i}].endpoint_spiffe_id {text:?}: {e}"));
            return None;
        }
    };
    let self_serving = trust_domain.is_some_and(|td| id.trust_domain() == td);
    let bootstrap = entry.bootstrap_bundle_file.clone();
    match (self_serving, &bootstrap) {
        (true, None) => {
            errors.push(format!(
                "federation[{i}].bootstrap_bundle_file: required, since the endpoint serves its \
                 own trust domain's bundle: the first fetch is authenticated with a bundle \
                 obtained out of band"
            ));
            None
        }
        (false, Some(_)) if trust_domain.is_some() => {
            errors.push(format!(
                "federation[{i}].bootstrap_bundle_file: the endpoint is in trust domain {}, \
                 whose bundle authenticates it; configure that trust domain in its own \
                 [[federation]] table instead",
                id.trust_domain()
            ));
            None
        }
        _ => Some(EndpointProfile::HttpsSpiffe {
            endpoint_spiffe_id: id,
            bootstrap_bundle_file: bootstrap,
        }),
    }
}

/// §5.2.1.1 and §5.2.2.1: scheme `https`, no userinfo. A redirect target must pass the same.
pub(super) fn endpoint_url(text: &str) -> Result<Url, String> {
    let url = Url::parse(text).map_err(|e| format!("not a URL: {e}"))?;
    check_endpoint_url(&url)?;
    Ok(url)
}

pub(super) fn check_endpoint_url(url: &Url) -> Result<(), String> {
    if url.scheme() != "https" {
        return Err(format!("scheme {:?}: must be https", url.scheme()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry userinfo (user:password@)".into());
    }
    if url.host().is_none() {
        return Err("has no host".into());
    }
    Ok(())
}

/// The endpoint's identity as its X509-SVID must carry it: a valid SPIFFE ID with a path
/// (X509-SVID §5.2), written canonically, since the certificate's URI SAN is compared to it
/// byte for byte.
fn endpoint_spiffe_id(text: &str) -> Result<SpiffeId, String> {
    let id = SpiffeId::new(text).map_err(|e| e.to_string())?;
    if id.path().is_empty() {
        return Err("has no path; an X509-SVID's SPIFFE ID names a workload".into());
    }
    if id.to_string() != text {
        return Err(format!("not in canonical form; write {id}"));
    }
    Ok(id)
}

/// A non-self-serving `https_spiffe` endpoint is authenticated with the bundle of its own
/// trust domain (§5.2.2.2), so that trust domain must be another entry, and following these
/// links must end somewhere else than where it started. Returns the indexes of the entries
/// that fail.
fn check_endpoint_trust(
    resolved: &[(usize, FederationSettings)],
    own: &TrustDomain,
    errors: &mut Vec<String>,
) -> Vec<usize> {
    let configured = |td: &TrustDomain| resolved.iter().any(|(_, s)| &s.trust_domain == td);
    // The trust domain whose bundle authenticates `td`'s endpoint, if that is another one.
    let vouched_by = |td: &TrustDomain| -> Option<&TrustDomain> {
        let (_, s) = resolved.iter().find(|(_, s)| &s.trust_domain == td)?;
        match &s.source {
            BundleSource::Endpoint(EndpointSettings {
                profile:
                    EndpointProfile::HttpsSpiffe {
                        endpoint_spiffe_id,
                        bootstrap_bundle_file: None,
                    },
                ..
            }) => Some(endpoint_spiffe_id.trust_domain()),
            _ => None,
        }
    };
    let mut failed = Vec::new();
    for (i, s) in resolved {
        let Some(first) = vouched_by(&s.trust_domain) else {
            continue;
        };
        let problem = if first == own {
            Some(format!(
                "an endpoint in the agent's own trust domain {own} serving another trust \
                 domain's bundle is not supported"
            ))
        } else {
            chain_problem(
                first,
                &s.trust_domain,
                resolved.len(),
                configured,
                vouched_by,
            )
        };
        if let Some(problem) = problem {
            errors.push(format!("federation[{i}].endpoint_spiffe_id: {problem}"));
            failed.push(*i);
        }
    }
    failed
}

/// Follows the endpoints' trust domains from `first` until one whose bundle comes from
/// elsewhere (a file, web PKI, a bootstrap bundle).
fn chain_problem<'a>(
    first: &'a TrustDomain,
    start: &TrustDomain,
    entries: usize,
    configured: impl Fn(&TrustDomain) -> bool,
    vouched_by: impl Fn(&TrustDomain) -> Option<&'a TrustDomain>,
) -> Option<String> {
    let mut at = first;
    let mut steps = 0;
    loop {
        if !configured(at) {
            return Some(format!(
                "the endpoint is in trust domain {at}, which has no [[federation]] table to \
                 provide its bundle"
            ));
        }
        let next = vouched_by(at)?;
        steps += 1;
        // Each step moves to another entry: more steps than entries is a circle too.
        if next == start || steps > entries {
            return Some(
                "the endpoints vouch for each other in a circle, so no bundle can ever be \
                 fetched first"
                    .to_owned(),
            );
        }
        at = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn resolve_all(entries: &[FederationEntry]) -> (Vec<FederationSettings>, Vec<String>) {
        let mut errors = Vec::new();
        let out = resolve(entries, &own(), &mut errors);
        (out, errors)
    }

    fn file(td: &str) -> FederationEntry {
        FederationEntry {
            trust_domain: Some(td.into()),
            bundle_file: Some("/etc/mayfly/partner.json".into()),
            ..Default::default()
        }
    }

    fn web(td: &str) -> FederationEntry {
        FederationEntry {
            trust_domain: Some(td.into()),
            bundle_endpoint_url: Some("https://bundles.partner.example/td".into()),
            bundle_endpoint_profile: Some("https_web".into()),
            ..Default::default()
        }
    }

    fn spiffe(td: &str, endpoint_id: &str, bootstrap: bool) -> FederationEntry {
        FederationEntry {
            trust_domain: Some(td.into()),
            bundle_endpoint_url: Some("https://10.0.0.1:8443".into()),
            bundle_endpoint_profile: Some("https_spiffe".into()),
            endpoint_spiffe_id: Some(endpoint_id.into()),
            bootstrap_bundle_file: bootstrap.then(|| "/etc/mayfly/bootstrap.pem".into()),
            ..Default::default()
        }
    }

    /// The one message of a single bad entry.
    fn only_error(entry: FederationEntry) -> String {
        let (out, errors) = resolve_all(&[entry]);
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(errors.len(), 1, "{errors:?}");
        errors.into_iter().next().unwrap()
    }

    #[test]
    fn good_entries_resolve_to_typed_settings() {
        let mut w = web("web.example");
        w.refresh = Some("30s".into());
        w.web_roots_file = Some("/etc/ssl/private-ca.pem".into());
        let (out, errors) = resolve_all(&[
            file("Files.Example"),
            w,
            spiffe("bob.example", "spiffe://bob.example/bundle-endpoint", true),
        ]);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].trust_domain.as_str(), "files.example");
        assert_eq!(
            out[0].source,
            BundleSource::File("/etc/mayfly/partner.json".into())
        );
        let BundleSource::Endpoint(e) = &out[1].source else {
            panic!("{:?}", out[1]);
        };
        assert_eq!(e.url.as_str(), "https://bundles.partner.example/td");
        assert_eq!(e.refresh, Some(Duration::from_secs(30)));
        assert_eq!(
            e.profile,
            EndpointProfile::HttpsWeb {
                web_roots_file: Some("/etc/ssl/private-ca.pem".into())
            }
        );
        let BundleSource::Endpoint(e) = &out[2].source else {
            panic!("{:?}", out[2]);
        };
        assert_eq!(e.refresh, None);
        let EndpointProfile::HttpsSpiffe {
            endpoint_spiffe_id,
            bootstrap_bundle_file,
        } = &e.profile
        else {
            panic!("{e:?}");
        };
        assert_eq!(
            endpoint_spiffe_id.to_string(),
            "spiffe://bob.example/bundle-endpoint"
        );
        assert!(bootstrap_bundle_file.is_some());
    }

    #[test]
    fn toml_tables_parse_and_unknown_keys_are_refused() {
        #[derive(serde::Deserialize)]
        struct File {
            federation: Vec<FederationEntry>,
        }
        let f: File = toml::from_str(
            r#"
            [[federation]]
            trust_domain = "bob.example"
            bundle_endpoint_url = "https://bob.example.org/bundle"
            bundle_endpoint_profile = "https_spiffe"
            endpoint_spiffe_id = "spiffe://bob.example/spire/server"
            bootstrap_bundle_file = "/etc/mayfly/bob.json"
            refresh = "5m"
            "#,
        )
        .unwrap();
        let (out, errors) = resolve_all(&f.federation);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(out.len(), 1);
        let err = toml::from_str::<File>(
            "[[federation]]\ntrust_domain = \"a.example\"\nbundle_url = \"https://x\"\n",
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("bundle_url"), "{err}");
    }

    #[test]
    fn the_trust_domain_must_be_named_valid_foreign_and_unique() {
        let mut e = file("x");
        e.trust_domain = None;
        assert!(only_error(e).starts_with("federation[0].trust_domain: missing"));
        let msg = only_error(file("Not A Domain!"));
        assert!(
            msg.starts_with("federation[0].trust_domain \"Not A Domain!\""),
            "{msg}"
        );
        let msg = only_error(file("spiffe://partner.example"));
        assert!(msg.contains("not a URI"), "{msg}");
        let msg = only_error(file("example.org"));
        assert!(msg.contains("own trust domain"), "{msg}");

        let (out, errors) = resolve_all(&[file("a.example"), web("A.example")]);
        assert_eq!(out.len(), 1);
        assert_eq!(
            errors,
            ["federation[1].trust_domain \"A.example\": already configured in federation[0]"]
        );
    }

    #[test]
    fn exactly_one_source() {
        let mut both = web("a.example");
        both.bundle_file = Some("/x".into());
        assert!(only_error(both).contains("exclude each other"));
        let neither = FederationEntry {
            trust_domain: Some("a.example".into()),
            ..Default::default()
        };
        assert!(only_error(neither).contains("set bundle_file or bundle_endpoint_url"));
    }

    #[test]
    fn endpoint_options_with_a_file_are_refused() {
        let mut e = file("a.example");
        e.refresh = Some("1m".into());
        e.web_roots_file = Some("/roots.pem".into());
        let (out, errors) = resolve_all(&[e]);
        assert!(out.is_empty());
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].starts_with("federation[0].web_roots_file: only with"));
        assert!(errors[1].starts_with("federation[0].refresh: only with"));
    }

    #[test]
    fn the_url_must_be_https_without_userinfo() {
        for (url, expect) in [
            ("http://bundles.example/b", "must be https"),
            ("https://user:pw@bundles.example/b", "userinfo"),
            ("https://user@bundles.example/b", "userinfo"),
            ("bundles.example/b", "not a URL"),
            ("file:///etc/bundle.json", "must be https"),
        ] {
            let mut e = web("a.example");
            e.bundle_endpoint_url = Some(url.into());
            let msg = only_error(e);
            assert!(
                msg.starts_with(&format!("federation[0].bundle_endpoint_url {url:?}: "))
                    && msg.contains(expect),
                "{url}: {msg}"
            );
        }
    }

    #[test]
    fn the_profile_is_required_and_known() {
        let mut e = web("a.example");
        e.bundle_endpoint_profile = None;
        assert!(only_error(e).starts_with("federation[0].bundle_endpoint_profile: missing"));
        let mut e = web("a.example");
        e.bundle_endpoint_profile = Some("https".into());
        assert!(only_error(e).starts_with("federation[0].bundle_endpoint_profile \"https\""));
    }

    #[test]
    fn options_of_the_other_profile_are_refused() {
        let mut e = web("a.example");
        e.endpoint_spiffe_id = Some("spiffe://a.example/ep".into());
        e.bootstrap_bundle_file = Some("/b.json".into());
        let (_, errors) = resolve_all(&[e]);
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].starts_with("federation[0].endpoint_spiffe_id: not used by"));
        assert!(errors[1].starts_with("federation[0].bootstrap_bundle_file: not used by"));
        let mut e = spiffe("a.example", "spiffe://a.example/ep", true);
        e.web_roots_file = Some("/roots.pem".into());
        assert!(only_error(e).starts_with("federation[0].web_roots_file: not used by"));
    }

    #[test]
    fn https_spiffe_needs_a_valid_endpoint_id_and_a_bootstrap_when_self_serving() {
        let mut e = spiffe("a.example", "x", true);
        e.endpoint_spiffe_id = None;
        assert!(only_error(e).starts_with("federation[0].endpoint_spiffe_id: required"));
        for (id, expect) in [
            ("https://a.example/ep", "scheme"),
            ("spiffe://a.example", "no path"),
            ("spiffe://a.example/", "trailing slash"),
            ("spiffe://A.example/ep", "canonical"),
            ("spiffe://a.example/a/../ep", ""),
        ] {
            let msg = only_error(spiffe("a.example", id, true));
            assert!(
                msg.starts_with(&format!("federation[0].endpoint_spiffe_id {id:?}: "))
                    && msg.contains(expect),
                "{id}: {msg}"
            );
        }
        let msg = only_error(spiffe("a.example", "spiffe://a.example/ep", false));
        assert!(
            msg.starts_with("federation[0].bootstrap_bundle_file: required"),
            "{msg}"
        );
    }

    #[test]
    fn refresh_must_be_a_duration_of_a_second_or_more() {
        let mut e = web("a.example");
        e.refresh = Some("soon".into());
        assert!(only_error(e).starts_with("federation[0].refresh: "));
        let mut e = web("a.example");
        e.refresh = Some("500ms".into());
        assert!(only_error(e).contains("at least 1s"));
    }

    #[test]
    fn a_non_self_serving_endpoint_is_vouched_for_by_another_entry() {
        // §5.2.2.2, figure 4: prod.example's bundle is served by example.com's endpoint.
        let hub = spiffe("example.com", "spiffe://example.com/bundle-server", true);
        let prod = spiffe("prod.example", "spiffe://example.com/bundle-server", false);
        let (out, errors) = resolve_all(&[hub.clone(), prod.clone()]);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(out.len(), 2);

        // Without the hub's own table nothing can authenticate the endpoint.
        let msg = only_error(prod.clone());
        assert!(msg.contains("has no [[federation]] table"), "{msg}");

        // A bootstrap bundle belongs to the endpoint's trust domain's own table.
        let mut with_bootstrap = prod.clone();
        with_bootstrap.bootstrap_bundle_file = Some("/x.json".into());
        let (_, errors) = resolve_all(&[hub, with_bootstrap]);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].starts_with("federation[1].bootstrap_bundle_file: the endpoint is in"));

        // Two endpoints that vouch for each other can never start.
        let a = spiffe("a.example", "spiffe://b.example/ep", false);
        let b = spiffe("b.example", "spiffe://a.example/ep", false);
        let (_, errors) = resolve_all(&[a, b]);
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors.iter().all(|e| e.contains("circle")), "{errors:?}");

        // Our own trust domain's bundle is not the federation's to use.
        let msg = only_error(spiffe("a.example", "spiffe://example.org/ep", false));
        assert!(msg.contains("own trust domain"), "{msg}");
    }
}
