//! Giving memory back after a burst of connections.
//!
//! Each connection costs ~27 KiB of HTTP/2 state, allocated from whichever malloc arena the
//! serving thread uses. When a burst of a few thousand connections closes, glibc keeps the
//! freed memory: it returns only the top of each heap by itself, and the rest stays mapped
//! (measured: 2000 concurrent connections left RSS at 90 MiB, and repeated bursts at 132 MiB,
//! from 19 MiB; `malloc_trim(0)` brought it back to 22 MiB). So after the number of open
//! connections has fallen well below its recent peak, the agent asks glibc to return what is
//! free.
//!
//! This is the crate's only `unsafe`: the one call into glibc, which no safe API offers.

/// Connections that must have closed since the peak before memory is trimmed.
pub const TRIM_AFTER_CLOSED: usize = 256;

/// Follows the number of open connections and says when a trim is worth it.
#[derive(Debug, Default)]
pub struct TrimPolicy {
    peak: usize,
}

impl TrimPolicy {
    /// Told the most connections open at once since the last call and the number open now;
    /// true when so many closed since the peak that a trim is due (the peak then starts again
    /// from now). The peak comes from the listener, not from sampling: a burst of 2000
    /// connections that opened and closed between two checks was missed by a sample.
    pub fn observe(&mut self, peak: usize, open: usize) -> bool {
        self.peak = self.peak.max(peak).max(open);
        if self.peak - open >= TRIM_AFTER_CLOSED {
            self.peak = open;
            return true;
        }
        false
    }
}

/// Returns free heap memory to the kernel (glibc's `malloc_trim(0)`); a no-op elsewhere.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: malloc_trim takes no pointers and only walks glibc's own arenas under their
    // locks; it is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trim_is_due_once_enough_connections_closed_since_the_peak() {
        let mut p = TrimPolicy::default();
        assert!(!p.observe(10, 10));
        assert!(!p.observe(2000, 2000));
        assert!(!p.observe(2000, 1800));
        assert!(p.observe(1800, 1744));
        // The peak starts again from there.
        assert!(!p.observe(1744, 1600));
        assert!(p.observe(1600, 1488));
        assert!(p.observe(1488, 0));
        assert!(!p.observe(100, 100));
        trim();
    }

    #[test]
    fn a_burst_between_two_checks_is_still_seen() {
        let mut p = TrimPolicy::default();
        assert!(!p.observe(1, 1));
        // 2000 connections opened and closed since the last check: only the peak saw them.
        assert!(p.observe(2001, 1));
        assert!(!p.observe(1, 1));
    }
}
