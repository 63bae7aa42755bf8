//! What the agent tells its operators: metrics (`metrics`) and readiness (`readiness`). The
//! health server that serves them is `server::health`.

pub mod metrics;
pub mod readiness;

pub use metrics::{
    timed, KindLabel, Metrics, RefusedLabel, ResultLabel, StateLabel, StreamGuard, SvidKind,
};
pub use readiness::{Readiness, ReadyGuard};
