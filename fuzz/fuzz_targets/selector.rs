//! Selector parsing (`Selector::parse`, what a grant's selectors and stored leases go through),
//! one selector per line: never a panic; what parses is canonical (parsing it again gives the
//! same selector), has no control character, and answers every accessor.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mayfly::selector::{Selector, Selectors};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parsed = Vec::new();
    for raw in text.split('\n') {
        let Ok(s) = Selector::parse(raw) else {
            continue;
        };
        let again = Selector::parse(s.as_str()).expect("a canonical selector parses again");
        assert_eq!(again, s, "canonical form is stable");
        assert!(!s.as_str().chars().any(char::is_control), "{s:?}");
        let (kind, key) = s.key().name();
        assert!(s.as_str().starts_with(&format!("{kind}:{key}:")));
        let value = s.value();
        assert_eq!(s.as_str().len(), kind.len() + key.len() + 2 + value.len());
        if let Some((pid, start)) = s.bound_process() {
            assert_eq!(Selector::process(pid, start), s);
        }
        if let Some(pid) = s.unbound_pid() {
            assert!(pid > 0);
        }
        parsed.push(s);
    }
    let set: Selectors = parsed.iter().cloned().collect();
    for s in &parsed {
        assert!(set.contains(s.as_str()));
    }
    if let Some(k) = set.index_key() {
        assert!(set.contains(k.as_str()));
    }
    let _ = set.joined();
});
