//! Layer-7 routing: Gateway API `HTTPRoute` matching, precedence and filters.
//!
//! [`spec`] holds the rule pieces as configured (TOML `[[route]]` or the config API's JSON),
//! [`matching`] the compiled matches and their precedence order, [`filters`] the compiled
//! filters. [`crate::routing::table::RouteTable`] puts them together once per configuration.

pub mod config_api;
pub mod filters;
pub mod matching;
pub mod mirror;
pub mod source;
pub mod spec;
pub mod table;

pub use filters::{FilterLevel, Filters, PathModifier};
pub use matching::{MatchList, RequestHead, RouteMatch};
pub use spec::{FilterSpec, MatchSpec, TimeoutsSpec};

#[cfg(test)]
mod tests;

#[cfg(test)]
mod randomized;
