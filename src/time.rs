//! Wall-clock helpers shared by the CLI, the logs and the admin API.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// RFC 3339 in UTC with second precision, e.g. `2026-11-23T01:50:38Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let dt = time::OffsetDateTime::from(t);
    let dt = dt.replace_nanosecond(0).unwrap_or(dt);
    dt.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| format!("{:?}", t))
}

pub fn to_timestamp(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

pub fn from_timestamp(t: &prost_types::Timestamp) -> Option<SystemTime> {
    if t.seconds < 0 || !(0..1_000_000_000).contains(&t.nanos) {
        return None;
    }
    Some(UNIX_EPOCH + Duration::new(t.seconds as u64, t.nanos as u32))
}

pub fn to_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// A protobuf duration as a std one; negative or malformed durations are `None`.
pub fn from_duration(d: &prost_types::Duration) -> Option<Duration> {
    if d.seconds < 0 || !(0..1_000_000_000).contains(&d.nanos) {
        return None;
    }
    Some(Duration::new(d.seconds as u64, d.nanos as u32))
}

/// Parses `90s`, `5m`, `1h`, `1h30m`, `500ms`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration like 90s, 5m or 1h: {e}"))
}

/// Rounds down to the whole second. Lease deadlines are whole seconds, so the deadline a lease
/// shows (RFC 3339, seconds) is the instant it ends; X.509 validity has second precision too,
/// so a certificate capped this way never outlives `t`.
pub fn floor_secs(t: SystemTime) -> SystemTime {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    UNIX_EPOCH + Duration::from_secs(secs)
}
