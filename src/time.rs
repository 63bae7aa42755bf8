//! Wall-clock helpers shared by the CLI, the logs and the admin API, and the boot clock that
//! times leases while the agent runs.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// RFC 3339 in UTC with second precision, e.g. `2026-11-23T01:50:38Z`. A time RFC 3339 cannot
/// write (past the year 9999, or before year 0) is written as seconds since the epoch: never a
/// panic, whatever a caller asked for.
pub fn rfc3339(t: SystemTime) -> String {
    let secs: i128 = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs().into(),
        Err(e) => {
            let d = e.duration();
            -i128::from(d.as_secs()) - i128::from(d.subsec_nanos() > 0)
        }
    };
    i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|dt| {
            dt.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{secs}s since the Unix epoch"))
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
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration like 90s, 5m or 1h: {e}"))?;
    if d > MAX_DURATION {
        return Err(format!("{s:?} is longer than 100 years"));
    }
    Ok(d)
}

/// The longest duration anything takes: a hundred years (of 365.25 days, as humantime counts
/// them). Durations come from config and flags and are added to the clock; past this, an
/// addition could overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 31_557_600);

/// Rounds down to the whole second. Lease deadlines are whole seconds, so the deadline a lease
/// shows (RFC 3339, seconds) is the instant it ends; X.509 validity has second precision too,
/// so a certificate capped this way never outlives `t`.
pub fn floor_secs(t: SystemTime) -> SystemTime {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// A moment on the boot clock (`CLOCK_BOOTTIME`): it never steps, whatever is done to the
/// wall clock, and it counts time spent suspended. Leases end by it while the agent runs; wall
/// time is for certificates, tokens and what is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Boot(Duration);

impl Boot {
    pub fn now() -> Boot {
        // Through libc (nix), not rustix: rustix reads the vDSO itself, which valgrind does not
        // emulate (rustix issue 1559), and the agent must run under callgrind for BENCHMARKS.md.
        // CLOCK_BOOTTIME exists on every kernel the agent supports (2.6.39 and later).
        let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
            .expect("CLOCK_BOOTTIME is always readable");
        Boot(Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32))
    }

    /// When the wall clock will show `at`, as the two clocks stand now (now if `at` has passed).
    pub fn at_wall(at: SystemTime) -> Boot {
        Boot::at_wall_from(at, Boot::clocks())
    }

    /// Both clocks now, for [`Boot::at_wall_from`] over a batch.
    pub fn clocks() -> (SystemTime, Boot) {
        (SystemTime::now(), Boot::now())
    }

    /// [`Boot::at_wall`] against clocks read once for a whole batch (start-up restores every
    /// stored lease in one).
    pub fn at_wall_from(at: SystemTime, (wall, boot): (SystemTime, Boot)) -> Boot {
        let ahead = at.duration_since(wall).unwrap_or_default();
        Boot(boot.0.saturating_add(ahead))
    }

    /// How long until this moment (zero once it has passed).
    pub fn remaining(self) -> Duration {
        self.0.saturating_sub(Boot::now().0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_past_a_hundred_years_are_refused() {
        // Issue 14, hole 11: `[policy] approval_timeout = "1000000000y"` overflowed
        // `now + timeout` and panicked the agent at the first gated grant.
        assert!(parse_duration("1000000000y")
            .unwrap_err()
            .contains("100 years"));
        assert!(parse_duration("101y").is_err());
        assert!(parse_duration("100y").is_ok());
        assert_eq!(
            parse_duration("99y").unwrap(),
            Duration::from_secs(99 * 31_557_600)
        );
        let far = SystemTime::now() + MAX_DURATION + MAX_DURATION;
        assert!(
            far > SystemTime::now(),
            "twice the cap still adds to the clock"
        );
    }

    #[test]
    fn rfc3339_writes_seconds_and_never_panics() {
        let t = UNIX_EPOCH + Duration::new(1_763_862_638, 999_999_999);
        assert_eq!(rfc3339(t), "2025-11-23T01:50:38Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH - Duration::from_millis(1500)),
            "1969-12-31T23:59:58Z"
        );
        // Issue 14, hole 11: a renewal by a huge TTL formatted a time past year 9999.
        let far = UNIX_EPOCH + Duration::from_secs(400_000_000_000);
        assert_eq!(rfc3339(far), "400000000000s since the Unix epoch");
    }
}
