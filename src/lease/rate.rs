//! A token bucket, for what one lease may do per second (mint JWT-SVIDs, delegate).

use std::time::Duration;

use super::MintRate;

/// A token bucket: `None` is full.
#[derive(Default)]
pub struct Budget(Option<(f64, std::time::Instant)>);

impl Budget {
    /// Takes one mint, or says how long until one is available.
    pub fn take(&mut self, rate: MintRate, now: std::time::Instant) -> Result<(), Duration> {
        let burst = f64::from(rate.burst);
        let per_second = f64::from(rate.per_second);
        let (level, at) = self.0.unwrap_or((burst, now));
        let level = (level + now.duration_since(at).as_secs_f64() * per_second).min(burst);
        if level >= 1.0 {
            self.0 = Some((level - 1.0, now));
            return Ok(());
        }
        self.0 = Some((level, now));
        let wait = if per_second > 0.0 {
            (1.0 - level) / per_second
        } else {
            3600.0
        };
        Err(Duration::from_secs_f64(wait))
    }
}
