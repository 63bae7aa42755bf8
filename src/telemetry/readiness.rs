//! Readiness by guards (as in ztunnel): each start-up step holds a [`ReadyGuard`]; the agent
//! is ready once all are dropped.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

/// What is still starting up.
#[derive(Default)]
pub struct Readiness {
    pending: Mutex<BTreeSet<&'static str>>,
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
}
