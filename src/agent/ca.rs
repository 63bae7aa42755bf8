//! Keeps the trust domain's CAs current while the agent runs: does what is due (the embedded
//! CA's rotation, a reload of the operator's files), audits every change, and tells metrics and
//! readiness.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::dir_watch::DirWatch;
use crate::audit::{event, Audit, Event};
use crate::authority::x509::{Authorities, CaEvent, CaHandle, CaInfo, FILE_CHECK};
use crate::telemetry::{Metrics, Readiness};

/// How soon a failed rotation is tried again.
const RETRY: Duration = Duration::from_secs(5);

/// The readiness part the CA reports under.
pub const READY_PART: &str = "signing CA";

/// Runs until `shutdown`.
pub async fn maintain(
    mut authorities: Authorities,
    handle: Arc<CaHandle>,
    audit: Audit,
    metrics: Metrics,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) {
    // Why the last maintenance failed, while it does.
    let mut failing: Option<String> = None;
    // The operator's files are also watched, so a renewal is used at once.
    let mut watch = match &authorities {
        Authorities::Operator(o) => match DirWatch::new(o.files()) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the CA files' directories; checking them every {FILE_CHECK:?}");
                None
            }
        },
        Authorities::Embedded(_) => None,
    };
    loop {
        let now = SystemTime::now();
        report(
            &authorities,
            &handle,
            &metrics,
            &readiness,
            failing.as_deref(),
        );
        // Never sleep long on a wall-clock deadline: a suspended host or a clock step is
        // caught within a minute (the operator's files are read every `FILE_CHECK` anyway).
        let wait = match failing {
            Some(_) => RETRY,
            None => authorities
                .next_check(now)
                .duration_since(now)
                .unwrap_or_default()
                .min(Duration::from_secs(60)),
        };
        let changed = async {
            match &mut watch {
                Some(w) => w.changed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
            r = changed => if let Err(e) = r {
                tracing::warn!(error = %e, "watching the CA files' directories failed; checking them every {FILE_CHECK:?}");
                watch = None;
            },
        }
        let (back, result) = tokio::task::spawn_blocking(move || {
            let result = authorities.maintain(SystemTime::now());
            (authorities, result)
        })
        .await
        .expect("CA maintenance panicked");
        authorities = back;
        match result {
            Ok(events) => {
                failing = None;
                // Recorded before anyone is served the change, as an SVID is before it is
                // handed out. A log that cannot take them does not stop a rotation: the CA's
                // end would stop every issuance instead.
                for e in &events {
                    record(e, &audit, &metrics).await;
                }
                authorities.install(&handle);
            }
            Err(e) => {
                tracing::error!(event = "ca_maintenance_failed", error = %e,
                    "CA rotation failed; the current CA keeps signing, retrying in {RETRY:?}");
                failing = Some(e.to_string());
            }
        }
    }
}

fn report(
    authorities: &Authorities,
    handle: &CaHandle,
    metrics: &Metrics,
    readiness: &Readiness,
    failing: Option<&str>,
) {
    metrics.set_ca_not_after(handle.current().not_after());
    metrics.set_ca_next_rotation(authorities.next_rotation());
    let refused = authorities.refused();
    metrics.ca_reload_refused.set(i64::from(refused.is_some()));
    let why = match (refused, failing) {
        (Some(why), _) => Some(format!(
            "CA files changed but were refused ({why}); the previous CA keeps signing"
        )),
        (None, Some(why)) => Some(format!(
            "CA rotation failing ({why}); the current CA keeps signing until it expires"
        )),
        (None, None) => None,
    };
    readiness.set_failing(READY_PART, why);
}

async fn record(e: &CaEvent, audit: &Audit, metrics: &Metrics) {
    let what = e.name();
    let (ca, until, reason) = match e {
        CaEvent::Prepared(ca)
        | CaEvent::Published(ca)
        | CaEvent::Activated(ca)
        | CaEvent::Removed(ca) => (Some(ca), None, None),
        CaEvent::Retired {
            ca,
            in_bundle_until,
        } => (Some(ca), Some(*in_bundle_until), None),
        CaEvent::ReloadRefused { reason } => {
            metrics.ca_reloads_refused.inc();
            (None, None, Some(reason.as_str()))
        }
    };
    if let Some(ca) = ca {
        tracing::info!(event = format!("ca_{what}"), serial = %ca.serial, subject = %ca.subject,
            not_after = %crate::time::rfc3339(ca.not_after),
            in_bundle_until = until.map(crate::time::rfc3339), "CA {what}");
    }
    let change = event::CaChange {
        what,
        ca: ca.map(cert),
        in_bundle_until: until.map(crate::time::rfc3339),
        reason,
    };
    if let Err(err) = audit.record(&Event::Ca(change)).await {
        tracing::error!(error = %err, event = format!("ca_{what}"), "could not audit a CA change");
    }
}

fn cert(ca: &CaInfo) -> event::CaCert<'_> {
    event::CaCert {
        serial: &ca.serial,
        fingerprint_sha256: &ca.fingerprint,
        subject: &ca.subject,
        not_before: crate::time::rfc3339(ca.not_before),
        not_after: crate::time::rfc3339(ca.not_after),
    }
}
