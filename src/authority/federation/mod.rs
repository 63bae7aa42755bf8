//! Federation: the bundles of other trust domains.

pub mod bundle;
pub mod config;
