//! The duration parser of config TTLs and CLI flags (`mayfly::time::parse_duration`): never a
//! panic; what it accepts round-trips through the protobuf form the CLI sends (when it fits
//! there) and formats without panicking, as a deadline too.
#![no_main]

use std::time::SystemTime;

use libfuzzer_sys::fuzz_target;
use mayfly::time::{from_duration, parse_duration, rfc3339, to_duration};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(d) = parse_duration(text) else {
        return;
    };
    if i64::try_from(d.as_secs()).is_ok() {
        assert_eq!(from_duration(&to_duration(d)), Some(d));
    }
    // What check_ttl and `task` print.
    let shown = humantime::format_duration(d).to_string();
    assert_eq!(parse_duration(&shown), Ok(d), "{shown}");
    if let Some(t) = SystemTime::now().checked_add(d) {
        let _ = rfc3339(t);
        let _ = rfc3339(mayfly::time::floor_secs(t));
    }
});
