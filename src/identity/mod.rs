//! Who a caller is and what identity it holds: the one selector grammar (`selector`) and the
//! identity source every server on the workload socket stands on (`source`).

pub mod selector;
pub mod source;

pub use selector::{K8sKey, Key, Selector, SelectorError, Selectors, UnixKey};

pub use source::{BundleKind, BundleUpdates, IdentityError, IdentitySource, Parts, X509Updates};
