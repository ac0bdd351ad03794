//! Routing's errors, one per layer: [`RuleError`] says why one value of a rule cannot be
//! compiled (without knowing where the value is), [`RoutesError`] is a table refused with every
//! problem, each under its key (`route[2].backends[0].url`, `rules[0].filters[1]`). What users see
//! (`check`, a refused push's `problems`, the log) is the key and the rule error's reason.
//! [`SourceError`] is a route source that gave no host map (a routes file, the metadata
//! attribute, the last good copy).

use std::path::PathBuf;

use crate::config::Problem;
use crate::gcp::MetadataError;

/// Why one configured value of a rule (an upstream URL, a hostname, a match, a filter, a CORS
/// origin, TLS material) cannot be compiled. It says what is wrong, not where: the compiler files
/// it under the value's key with [`RuleError::at`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct RuleError {
    reason: String,
}

impl RuleError {
    pub(crate) fn new(reason: impl Into<String>) -> RuleError {
        RuleError { reason: reason.into() }
    }

    /// What is wrong, as users see it.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// This error as a problem of the value at `key`.
    pub fn at(self, key: impl Into<String>) -> Problem {
        Problem {
            key: key.into(),
            reason: self.reason,
        }
    }
}

impl From<String> for RuleError {
    fn from(reason: String) -> RuleError {
        RuleError { reason }
    }
}

impl From<&str> for RuleError {
    fn from(reason: &str) -> RuleError {
        RuleError::new(reason)
    }
}

/// A route table that does not compile: every problem found, each with its key. Its message is
/// the problems as `key: reason`, joined by `; `.
#[derive(Debug, thiserror::Error)]
#[error("{}", problems.iter().map(|p| format!("{}: {}", p.key, p.reason)).collect::<Vec<_>>().join("; "))]
pub struct RoutesError {
    pub problems: Vec<Problem>,
}

/// A host map (`{"hostname": "https://upstream"}`) that is not one. It gives the position only:
/// serde_json's own message quotes the offending value, and a misconfigured `routes.file` may
/// well point at a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} (line {line}, column {column})")]
pub struct HostMapError {
    pub what: &'static str,
    pub line: usize,
    pub column: usize,
}

/// Why a route source gave no host map.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A routes file (or the last good copy) cannot be read.
    #[error("cannot read {}: {error}", path.display())]
    Read { path: PathBuf, error: std::io::Error },
    /// What was read is not a host map; `origin` is the file's path or `metadata attribute P`.
    #[error("{origin}: {error}")]
    NotAHostMap { origin: String, error: HostMapError },
    /// The metadata server did not give the attribute.
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    /// What the source gave builds no valid table: at boot, as unusable as an unreachable
    /// source (the last good table is served).
    #[error("invalid routes: {0}")]
    Invalid(RoutesError),
    /// The watched attribute was deleted: the table in use keeps serving.
    #[error("metadata attribute {path} was deleted; keeping the current routes")]
    Deleted { path: String },
}
