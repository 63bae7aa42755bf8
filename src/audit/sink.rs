//! The audit port: where every part of the agent records what happened, and learns whether the
//! record is durable before it acts. The hash-chained log ([`AuditLog`]) is the sink the agent
//! runs on; [`MemorySink`] keeps records in memory, and can refuse them, for tests.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};

use super::{AuditError, AuditLog, Event};
use crate::telemetry::Readiness;

/// The future [`AuditSink::record`] returns.
pub type Recorded<'a> = Pin<Box<dyn Future<Output = Result<(), AuditError>> + Send + 'a>>;

pub trait AuditSink: Send + Sync + 'static {
    /// Resolves once the record is durable. An error means it is not: the caller refuses
    /// whatever the record was for (fail closed).
    fn record<'a>(&'a self, event: &'a Event<'a>) -> Recorded<'a>;
}

/// How the agent's parts hold their sink.
pub type Audit = Arc<dyn AuditSink>;

impl AuditSink for AuditLog {
    fn record<'a>(&'a self, event: &'a Event<'a>) -> Recorded<'a> {
        Box::pin(async move { AuditLog::record(self, event).await.map(drop) })
    }
}

/// A sink that tells readiness whether records are being made durable: the agent is not ready
/// from a failed record until one succeeds again (issuance fails closed meanwhile, and
/// `/healthz/ready` says why).
pub struct ReportingSink {
    inner: Audit,
    readiness: Arc<Readiness>,
}

impl ReportingSink {
    /// What readiness calls the audit log.
    pub const PART: &'static str = "audit log";

    pub fn new(inner: Audit, readiness: Arc<Readiness>) -> Arc<Self> {
        Arc::new(ReportingSink { inner, readiness })
    }
}

impl AuditSink for ReportingSink {
    fn record<'a>(&'a self, event: &'a Event<'a>) -> Recorded<'a> {
        Box::pin(async move {
            let result = self.inner.record(event).await;
            let why = result.as_ref().err().map(|e| e.to_string());
            self.readiness.set_failing(Self::PART, why);
            result
        })
    }
}

/// Records in memory, in order: nothing survives the process.
#[derive(Default)]
pub struct MemorySink {
    records: Mutex<Vec<(String, Map<String, Value>)>>,
    /// While set, every record is refused with this I/O error (a full disk, say).
    failing: Mutex<Option<String>>,
}

impl MemorySink {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// From now on every record fails with `why` (`None`: records succeed again).
    pub fn fail(&self, why: Option<&str>) {
        *self.failing.lock().expect("memory sink poisoned") = why.map(str::to_owned);
    }

    /// The events recorded so far, by name.
    pub fn events(&self) -> Vec<String> {
        let records = self.records.lock().expect("memory sink poisoned");
        records.iter().map(|(name, _)| name.clone()).collect()
    }

    /// Every record so far: its event name and fields.
    pub fn records(&self) -> Vec<(String, Map<String, Value>)> {
        self.records.lock().expect("memory sink poisoned").clone()
    }
}

impl AuditSink for MemorySink {
    fn record<'a>(&'a self, event: &'a Event<'a>) -> Recorded<'a> {
        let result = match &*self.failing.lock().expect("memory sink poisoned") {
            Some(why) => Err(AuditError::Io(why.clone())),
            None => {
                let mut records = self.records.lock().expect("memory sink poisoned");
                records.push((event.name(), event.fields()));
                Ok(())
            }
        };
        Box::pin(std::future::ready(result))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::event::Requester;

    /// Issue 14, hole 13: `/healthz/ready` said 200 while no audit record could be written.
    #[tokio::test]
    async fn a_failing_audit_log_makes_the_agent_not_ready_until_it_recovers() {
        let memory = MemorySink::new();
        let readiness = Arc::new(Readiness::default());
        let sink = ReportingSink::new(memory.clone(), readiness.clone());
        let event = || {
            let who = Requester {
                rpc: "FetchX509SVID",
                pid: 1,
                uid: 0,
                exe_sha256: None,
                selectors: vec![],
            };
            Event::RequestDenied(who, "no identity issued")
        };
        sink.record(&event()).await.unwrap();
        assert!(readiness.failing().is_empty());
        memory.fail(Some("No space left on device"));
        sink.record(&event()).await.unwrap_err();
        assert_eq!(
            readiness.failing(),
            ["audit log: audit log I/O error: No space left on device"]
        );
        memory.fail(None);
        sink.record(&event()).await.unwrap();
        assert!(readiness.failing().is_empty());
        assert_eq!(memory.events().len(), 2);
    }
}
