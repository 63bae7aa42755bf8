//! Who a caller is and what identity it holds: the identity source every server on the
//! workload socket stands on (`source`).

pub mod source;

pub use source::{BundleKind, BundleUpdates, IdentityError, IdentitySource, Parts, X509Updates};
