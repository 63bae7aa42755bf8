//! The identity source every server on the workload socket stands on: attest a caller, hand it
//! the identities its leases give it, follow them, and refuse (audited) a caller that holds
//! none. SDS and delegation use it as the Workload API does.

pub mod source;

pub use source::{
    BundleKind, BundleUpdates, IdentityError, IdentitySource, Parts, TrustBundle, WitUpdates,
    X509Updates,
};
