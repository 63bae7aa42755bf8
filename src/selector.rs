//! Selectors: the facts a lease requires of a process (`unix:uid:1000`, `k8s:ns:shop`), in one
//! grammar. Attestors produce them from kernel and kubelet facts, leases hold them, the
//! registry indexes them. A [`Selector`] that exists is well formed and canonical, so two
//! equal facts are equal strings.

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

/// Longest selector accepted from a caller.
pub const MAX_SELECTOR_LEN: usize = 1024;

/// What a selector says something about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Key {
    Unix(UnixKey),
    K8s(K8sKey),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnixKey {
    Uid,
    Gid,
    SupplementaryGid,
    User,
    Group,
    SupplementaryGroup,
    Path,
    Sha256,
    /// `PID:START`: a process, bound to its start time so that a reused PID never matches.
    Pid,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum K8sKey {
    PodUid,
    ContainerId,
    Ns,
    Sa,
    PodName,
    /// `KEY:VALUE`.
    PodLabel,
    ContainerName,
    ContainerImage,
    NodeName,
}

const UNIX_KEYS: [(UnixKey, &str); 9] = [
    (UnixKey::Uid, "uid"),
    (UnixKey::User, "user"),
    (UnixKey::Gid, "gid"),
    (UnixKey::Group, "group"),
    (UnixKey::SupplementaryGid, "supplementary_gid"),
    (UnixKey::SupplementaryGroup, "supplementary_group"),
    (UnixKey::Path, "path"),
    (UnixKey::Sha256, "sha256"),
    (UnixKey::Pid, "pid"),
];

const K8S_KEYS: [(K8sKey, &str); 9] = [
    (K8sKey::PodUid, "pod-uid"),
    (K8sKey::ContainerId, "container-id"),
    (K8sKey::Ns, "ns"),
    (K8sKey::Sa, "sa"),
    (K8sKey::PodName, "pod-name"),
    (K8sKey::PodLabel, "pod-label"),
    (K8sKey::ContainerName, "container-name"),
    (K8sKey::ContainerImage, "container-image"),
    (K8sKey::NodeName, "node-name"),
];

/// Index order: a lease is indexed under its selector of the kind that narrows callers most.
const SPECIFICITY: [Key; 8] = [
    Key::Unix(UnixKey::Pid),
    Key::K8s(K8sKey::ContainerId),
    Key::K8s(K8sKey::PodUid),
    Key::Unix(UnixKey::Sha256),
    Key::Unix(UnixKey::Path),
    Key::Unix(UnixKey::Uid),
    Key::Unix(UnixKey::User),
    Key::Unix(UnixKey::Gid),
];

impl Key {
    /// The `type:key` prefix, without the final colon.
    pub fn name(self) -> (&'static str, &'static str) {
        match self {
            Key::Unix(k) => ("unix", UNIX_KEYS.iter().find(|(u, _)| *u == k).unwrap().1),
            Key::K8s(k) => ("k8s", K8S_KEYS.iter().find(|(u, _)| *u == k).unwrap().1),
        }
    }

    fn of(kind: &str, key: &str) -> Option<Key> {
        match kind {
            "unix" => UNIX_KEYS
                .iter()
                .find(|(_, n)| *n == key)
                .map(|(k, _)| Key::Unix(*k)),
            "k8s" => K8S_KEYS
                .iter()
                .find(|(_, n)| *n == key)
                .map(|(k, _)| Key::K8s(*k)),
            _ => None,
        }
    }
}

/// Why a selector was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{raw:?}: {message}")]
pub struct SelectorError {
    pub raw: String,
    pub message: String,
}

/// One selector, `type:key:value`, well formed. Cheap to clone: every attestation, lease,
/// index key and stream listener holds selectors, and they share one copy of the text. Its
/// key is kept beside the text (indexing a lease asks for it; start-up does so for every
/// stored lease). Equality, order and hash are the text's, as `Borrow<str>` requires.
#[derive(Clone)]
pub struct Selector {
    text: Arc<str>,
    key: Key,
}

impl PartialEq for Selector {
    fn eq(&self, other: &Selector) -> bool {
        self.text == other.text
    }
}

impl Eq for Selector {}

impl std::hash::Hash for Selector {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.text.hash(state)
    }
}

impl PartialOrd for Selector {
    fn partial_cmp(&self, other: &Selector) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Selector {
    fn cmp(&self, other: &Selector) -> std::cmp::Ordering {
        self.text.cmp(&other.text)
    }
}

impl Selector {
    /// A selector from facts the agent read itself (the kernel, the kubelet): not checked
    /// against the grammar, because the facts are what they are.
    pub fn fact(key: Key, value: impl fmt::Display) -> Selector {
        let (kind, name) = key.name();
        Selector {
            text: format!("{kind}:{name}:{value}").into(),
            key,
        }
    }

    /// A process bound to its start time.
    pub fn process(pid: i32, start: u64) -> Selector {
        Selector::fact(Key::Unix(UnixKey::Pid), format_args!("{pid}:{start}"))
    }

    /// A selector from a caller, checked against the grammar and put in canonical form (so
    /// `unix:uid:0000` is `unix:uid:0`, and matches uid 0). A bare `unix:pid:PID` parses
    /// (see [`Selector::unbound_pid`]) but must be bound before a lease holds it.
    pub fn parse(raw: &str) -> Result<Selector, SelectorError> {
        let bad = |m: &str| SelectorError {
            raw: raw.to_owned(),
            message: m.to_owned(),
        };
        if raw.len() > MAX_SELECTOR_LEN {
            return Err(bad(&format!("longer than {MAX_SELECTOR_LEN} bytes")));
        }
        let mut parts = raw.splitn(3, ':');
        let (kind, key, value) = match (parts.next(), parts.next(), parts.next()) {
            (Some(k), Some(key), Some(v)) => (k, key, v),
            _ => return Err(bad("must be type:key:value")),
        };
        let Some(k) = Key::of(kind, key) else {
            return Err(bad(&match kind {
                "k8s" => format!(
                    "unknown k8s selector {key:?} (supported: {})",
                    K8S_KEYS.map(|(_, n)| n).join(", ")
                ),
                "unix" => format!(
                    "unknown unix selector {key:?} (supported: {})",
                    UNIX_KEYS.map(|(_, n)| n).join(", ")
                ),
                _ => format!("unknown selector type {kind:?} (supported: unix, k8s)"),
            }));
        };
        let value = canonical_value(k, value).map_err(bad)?;
        Ok(Selector {
            text: format!("{kind}:{key}:{value}").into(),
            key: k,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn key(&self) -> Key {
        self.key
    }

    /// What comes after `type:key:`.
    pub fn value(&self) -> &str {
        self.text.splitn(3, ':').nth(2).unwrap_or("")
    }

    /// The process this selector binds to, as `(pid, start time)`.
    pub fn bound_process(&self) -> Option<(i32, u64)> {
        if self.key() != Key::Unix(UnixKey::Pid) {
            return None;
        }
        let (pid, start) = self.value().split_once(':')?;
        Some((pid.parse().ok()?, start.parse().ok()?))
    }

    /// The PID of a bare `unix:pid:PID`, which has yet to be bound to its start time.
    pub fn unbound_pid(&self) -> Option<i32> {
        if self.key() != Key::Unix(UnixKey::Pid) || self.value().contains(':') {
            return None;
        }
        self.value().parse().ok()
    }
}

/// The value in canonical form (numbers without leading zeros), or why it is refused. No value
/// may carry a control character: selectors are printed, and logged, as they are.
fn canonical_value(key: Key, value: &str) -> Result<String, &'static str> {
    if value.chars().any(char::is_control) {
        return Err("value must not contain control characters");
    }
    let digits = |v: &str| !v.is_empty() && v.len() <= 20 && v.bytes().all(|b| b.is_ascii_digit());
    match key {
        Key::K8s(k) => {
            if value.is_empty() {
                return Err("value must not be empty");
            }
            if k == K8sKey::PodLabel && !value.contains(':') {
                return Err("pod-label value must be KEY:VALUE");
            }
        }
        Key::Unix(UnixKey::Uid | UnixKey::Gid | UnixKey::SupplementaryGid) => {
            return match value.parse::<u32>() {
                Ok(id) if digits(value) => Ok(id.to_string()),
                _ => Err("value must be a numeric id"),
            };
        }
        Key::Unix(UnixKey::User | UnixKey::Group | UnixKey::SupplementaryGroup) => {
            if value.is_empty() || value.chars().any(|c| c.is_whitespace() || c == ':') {
                return Err("value must be a user or group name");
            }
        }
        Key::Unix(UnixKey::Path) => {
            if !value.starts_with('/') {
                return Err("value must be an absolute path");
            }
        }
        Key::Unix(UnixKey::Sha256) => {
            if value.len() != 64
                || !value
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return Err("value must be 64 lowercase hex digits");
            }
        }
        Key::Unix(UnixKey::Pid) => {
            let (pid, start) = match value.split_once(':') {
                Some((p, s)) => (p, Some(s)),
                None => (value, None),
            };
            let pid = match pid.parse::<i32>() {
                Ok(p) if digits(pid) && p > 0 => p,
                _ => return Err("value must be PID or PID:START_TIME"),
            };
            return match start {
                None => Ok(pid.to_string()),
                Some(s) => match s.parse::<u64>() {
                    Ok(start) if digits(s) => Ok(format!("{pid}:{start}")),
                    _ => Err("start time must be a number"),
                },
            };
        }
    }
    Ok(value.to_owned())
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.text, f)
    }
}

impl std::ops::Deref for Selector {
    type Target = str;
    fn deref(&self) -> &str {
        &self.text
    }
}

impl PartialEq<str> for Selector {
    fn eq(&self, other: &str) -> bool {
        *self.text == *other
    }
}

impl PartialEq<&str> for Selector {
    fn eq(&self, other: &&str) -> bool {
        *self.text == **other
    }
}

impl PartialEq<String> for Selector {
    fn eq(&self, other: &String) -> bool {
        *self.text == **other
    }
}

impl Borrow<str> for Selector {
    fn borrow(&self) -> &str {
        &self.text
    }
}

impl serde::Serialize for Selector {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

/// A set of selectors: sorted and without duplicates.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Selectors(Vec<Selector>);

impl Selectors {
    pub fn iter(&self) -> std::slice::Iter<'_, Selector> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, s: &str) -> bool {
        self.0.binary_search_by(|x| x.as_str().cmp(s)).is_ok()
    }

    /// Whether every selector in `self` is among `other`'s.
    pub fn all_in(&self, other: &Selectors) -> bool {
        self.0.iter().all(|s| other.contains(s))
    }

    /// Adds selectors, keeping the set sorted and deduplicated.
    pub fn extend(&mut self, more: impl IntoIterator<Item = Selector>) {
        self.0.extend(more);
        self.0.sort();
        self.0.dedup();
    }

    /// The values of the selectors with one of these keys, in order.
    pub fn values(&self, keys: &[Key]) -> Vec<&str> {
        self.0
            .iter()
            .filter(|s| keys.contains(&s.key()))
            .map(Selector::value)
            .collect()
    }

    /// The selector an index keeps this set under: the one of the kind that narrows callers
    /// most (a lease can only match callers that hold it). `None` for an empty set.
    pub fn index_key(&self) -> Option<&Selector> {
        SPECIFICITY
            .iter()
            .find_map(|k| self.0.iter().find(|s| s.key() == *k))
            .or_else(|| self.0.first())
    }

    /// Every process these selectors bind to, as `(pid, start time)`.
    pub fn processes(&self) -> impl Iterator<Item = (i32, u64)> + '_ {
        self.0.iter().filter_map(Selector::bound_process)
    }

    /// The selectors as strings, for the wire and the policies.
    pub fn to_strings(&self) -> Vec<String> {
        self.0.iter().map(|s| s.text.to_string()).collect()
    }

    /// Space-separated, for logs.
    pub fn joined(&self) -> String {
        self.to_strings().join(" ")
    }
}

impl FromIterator<Selector> for Selectors {
    fn from_iter<I: IntoIterator<Item = Selector>>(it: I) -> Self {
        let mut v: Vec<Selector> = it.into_iter().collect();
        v.sort();
        v.dedup();
        Selectors(v)
    }
}

impl<'a> IntoIterator for &'a Selectors {
    type Item = &'a Selector;
    type IntoIter = std::slice::Iter<'a, Selector>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl serde::Serialize for Selectors {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grammar_accepts_canonical_selectors_and_names_what_is_wrong() {
        for good in [
            "unix:uid:1000",
            "unix:user:alice",
            "unix:supplementary_gid:27",
            "unix:path:/usr/bin/python3",
            "unix:pid:42",
            "unix:pid:42:12345",
            "k8s:ns:shop",
            "k8s:pod-label:app:web",
        ] {
            let s = Selector::parse(good).unwrap();
            assert_eq!(s.as_str(), good);
            assert_eq!(s.to_string(), good);
        }
        for (bad, why) in [
            ("unix:uid", "type:key:value"),
            ("unix:uid:x", "numeric id"),
            ("unix:shell:/bin/sh", "unknown unix selector"),
            ("k8s:zone:a", "unknown k8s selector"),
            ("docker:id:1", "unknown selector type"),
            ("unix:path:relative", "absolute path"),
            ("unix:sha256:ABC", "64 lowercase hex"),
            ("unix:pid:0", "PID or PID:START_TIME"),
            ("unix:pid:1:x", "start time"),
            ("k8s:pod-label:nocolon", "KEY:VALUE"),
            ("unix:user:a b", "user or group name"),
        ] {
            let e = Selector::parse(bad).unwrap_err();
            assert!(e.to_string().contains(why), "{bad}: {e}");
        }
        let long = format!("unix:path:/{}", "a".repeat(MAX_SELECTOR_LEN));
        assert!(Selector::parse(&long).is_err());
    }

    /// Issue 14, hole 12: control characters let a selector forge extra lines or selectors
    /// in `task get` (or drive the terminal), and non-canonical numbers never matched.
    #[test]
    fn control_characters_are_refused_and_numbers_are_canonical() {
        for forged in [
            "unix:path:/bin/sh\nunix:uid:0",
            "unix:path:/bin/\u{1b}[2Jx",
            "unix:user:alice\u{7}",
            "k8s:ns:shop\r",
            "k8s:pod-label:app:web\u{0}",
            "unix:path:/a\tb",
        ] {
            let e = Selector::parse(forged).unwrap_err();
            assert!(
                e.to_string().contains("control characters"),
                "{forged:?}: {e}"
            );
        }
        // A space in a path is a legitimate path.
        assert!(Selector::parse("unix:path:/opt/My App/run").is_ok());
        for (raw, canonical) in [
            ("unix:uid:0000", "unix:uid:0"),
            ("unix:gid:007", "unix:gid:7"),
            ("unix:supplementary_gid:0100", "unix:supplementary_gid:100"),
            ("unix:pid:0042", "unix:pid:42"),
            ("unix:pid:07:000123", "unix:pid:7:123"),
        ] {
            assert_eq!(Selector::parse(raw).unwrap().as_str(), canonical, "{raw}");
        }
        let caller: Selectors = [Selector::fact(Key::Unix(UnixKey::Uid), 0)]
            .into_iter()
            .collect();
        let lease: Selectors = [Selector::parse("unix:uid:0000").unwrap()]
            .into_iter()
            .collect();
        assert!(
            lease.all_in(&caller),
            "a canonicalised selector matches the fact"
        );
        assert!(Selector::parse("unix:uid:4294967296").is_err());
        assert!(Selector::parse("unix:uid:-1").is_err());
    }

    #[test]
    fn facts_keys_values_and_process_binding() {
        let s = Selector::fact(Key::Unix(UnixKey::Uid), 1000);
        assert_eq!(s.as_str(), "unix:uid:1000");
        assert_eq!(s.key(), Key::Unix(UnixKey::Uid));
        assert_eq!(s.value(), "1000");
        let label = Selector::fact(Key::K8s(K8sKey::PodLabel), "app:web");
        assert_eq!(label.as_str(), "k8s:pod-label:app:web");
        assert_eq!(label.value(), "app:web");
        let p = Selector::process(42, 777);
        assert_eq!(p.as_str(), "unix:pid:42:777");
        assert_eq!(p.bound_process(), Some((42, 777)));
        assert_eq!(p.unbound_pid(), None);
        let bare = Selector::parse("unix:pid:42").unwrap();
        assert_eq!(bare.unbound_pid(), Some(42));
        assert_eq!(bare.bound_process(), None);
    }

    #[test]
    fn sets_are_sorted_deduplicated_and_indexed_by_the_narrowest_kind() {
        let set: Selectors = ["unix:uid:1", "unix:gid:2", "unix:uid:1", "k8s:pod-uid:p"]
            .into_iter()
            .map(|s| Selector::parse(s).unwrap())
            .collect();
        assert_eq!(
            set.to_strings(),
            ["k8s:pod-uid:p", "unix:gid:2", "unix:uid:1"]
        );
        assert_eq!(set.index_key().unwrap().as_str(), "k8s:pod-uid:p");
        let caller: Selectors = set
            .iter()
            .cloned()
            .chain([Selector::process(9, 9)])
            .collect();
        assert!(set.all_in(&caller));
        assert!(!caller.all_in(&set));
        assert_eq!(caller.index_key().unwrap().as_str(), "unix:pid:9:9");
        assert_eq!(caller.processes().collect::<Vec<_>>(), [(9, 9)]);
        let gids = caller.values(&[Key::Unix(UnixKey::Gid), Key::Unix(UnixKey::Uid)]);
        assert_eq!(gids, ["2", "1"]);
    }
}
