//! Routing: where a route table comes from, how it is compiled, and how a request finds its
//! backend (Gateway API `HTTPRoute` matching, precedence and filters).
//!
//! [`crate::config::route_spec`] holds the rule pieces as configured (TOML `[[route]]` or the
//! config API's JSON), [`matching`] the compiled matches and their precedence order, [`filters`]
//! the compiled filters. The compiler (`compile`) puts them together into a
//! [`table::RouteTable`] once per configuration, one method per piece of a rule;
//! [`validate`] runs that compile step over a config file so `check` and the running agent never
//! disagree. The table's sources: the config file or a host map ([`source`], watched or read
//! once) and the controller's pushes ([`config_api`], in the wire format of [`pushed`], the last one kept by `persisted`); every
//! table, whatever its source, is applied by `crate::node`. [`error`] holds routing's error
//! types: a rule's value, a refused table, a source that gave nothing.

pub mod compile;
pub mod config_api;
pub mod cors;
pub mod destination;
pub mod error;
pub mod filters;
mod index;
pub mod limits;
pub mod matching;
pub mod mirror;
pub mod path;
mod persisted;
pub mod pushed;
mod rule_source;
pub mod source;
pub mod table;
pub mod tls;
pub mod trial;

pub use filters::{Filters, PathModifier};
pub use matching::{MatchList, RequestHead, RouteMatch};
pub mod validate;

pub use validate::{load_config, parse_config};

#[cfg(test)]
mod tests;

#[cfg(test)]
mod randomized;
