//! Readiness by guards (as in ztunnel): each start-up step holds a [`ReadyGuard`]; the agent
//! is ready once all are dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

/// What is still starting up.
#[derive(Default)]
pub struct Readiness {
    pending: Mutex<BTreeSet<&'static str>>,
    /// Parts that started but are failing now (say, an audit log that cannot be written),
    /// with why.
    failing: Mutex<BTreeMap<&'static str, String>>,
}

/// Dropping it marks its step done.
pub struct ReadyGuard {
    readiness: Arc<Readiness>,
    name: &'static str,
}

impl Readiness {
    pub fn register(self: &Arc<Self>, name: &'static str) -> ReadyGuard {
        self.pending
            .lock()
            .expect("readiness poisoned")
            .insert(name);
        ReadyGuard {
            readiness: self.clone(),
            name,
        }
    }

    /// Marks `part` as failing, with why (`None`: working again). A failing part makes the
    /// agent not ready until it works again.
    pub fn set_failing(&self, part: &'static str, why: Option<String>) {
        let mut failing = self.failing.lock().expect("readiness poisoned");
        match why {
            Some(why) => failing.insert(part, why),
            None => failing.remove(part),
        };
    }

    /// What is failing now, as `part: why`.
    pub fn failing(&self) -> Vec<String> {
        let failing = self.failing.lock().expect("readiness poisoned");
        failing
            .iter()
            .map(|(part, why)| format!("{part}: {why}"))
            .collect()
    }

    /// The steps still pending; empty when ready.
    pub fn pending(&self) -> Vec<&'static str> {
        self.pending
            .lock()
            .expect("readiness poisoned")
            .iter()
            .copied()
            .collect()
    }
}

impl Drop for ReadyGuard {
    fn drop(&mut self) {
        self.readiness
            .pending
            .lock()
            .expect("readiness poisoned")
            .remove(self.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_names_what_is_pending() {
        let r = Arc::new(Readiness::default());
        let a = r.register("signing CA");
        let b = r.register("sockets");
        assert_eq!(r.pending(), vec!["signing CA", "sockets"]);
        drop(a);
        assert_eq!(r.pending(), vec!["sockets"]);
        drop(b);
        assert!(r.pending().is_empty());
    }

    #[test]
    fn a_failing_part_is_named_until_it_works_again() {
        let r = Arc::new(Readiness::default());
        assert!(r.failing().is_empty());
        r.set_failing("audit log", Some("disk full".into()));
        assert_eq!(r.failing(), ["audit log: disk full"]);
        r.set_failing("audit log", None);
        assert!(r.failing().is_empty());
    }
}
