//! One rule as configured, before it is compiled: what a host-map entry, a `[[route]]` and a
//! pushed rule all reduce to, and the hostname rule they share. A leaf of `routing`: the table's
//! compiler and the checks that run before it (limits, destinations, the index) read it.

use std::time::Duration;

use crate::config::{BackendSpec, FilterSpec, HostHeader, MatchSpec, TimeoutsSpec};

/// One rule as configured, before compiling: what a host-map entry, a `[[route]]` and a pushed
/// rule all reduce to.
#[derive(Debug)]
pub(crate) struct RuleSource {
    pub name: String,
    /// Where the rule came from, for error messages (`route[2]`, `rules[0]`).
    pub key: String,
    pub hostnames: Vec<String>,
    pub backends: Vec<BackendSpec>,
    /// Single upstream given as a string (host map entry or `upstream =`).
    pub shorthand: bool,
    /// Key to blame for a bad shorthand upstream, when not the route's own key.
    pub upstream_key: Option<String>,
    pub matches: Vec<MatchSpec>,
    pub filters: Vec<FilterSpec>,
    pub timeouts: TimeoutsSpec,
    /// Backend timeout when `timeouts.backend_request` is not given.
    pub default_backend_timeout: Duration,
    /// The controller's rule-level `unavailableStatus`.
    pub unavailable_status: Option<u16>,
    /// `Host` towards backends that do not choose their own.
    pub host_header: HostHeader,
    /// Names of the listeners this rule is attached to; empty: all of them.
    pub listeners: Vec<String>,
}

/// Normalises a configured hostname. Accepts `*.` wildcards; rejects ports and junk.
pub(crate) fn normalise_hostname(h: &str) -> Result<String, String> {
    let lower = h.trim().to_ascii_lowercase();
    let bare = lower.strip_prefix("*.").unwrap_or(&lower);
    let valid_label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if bare.is_empty() || bare.len() > 253 || !bare.split('.').all(valid_label) {
        return Err(format!(
            "{h:?} is not a valid hostname (no port, no scheme; a leading \"*.\" is allowed)"
        ));
    }
    Ok(lower)
}
