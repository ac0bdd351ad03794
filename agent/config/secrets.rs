//! `[secrets.NAME]`: where each named secret comes from. Read flat ([`SecretSpecAsWritten`]) so a
//! wrong combination names the missing or extra key; validation turns it into a [`SecretSpec`].

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{duration, SecretVersionName};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(super) enum SecretSourceKind {
    File,
    Env,
    GcpSecretManager,
}

impl fmt::Display for SecretSourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SecretSourceKind::File => "file",
            SecretSourceKind::Env => "env",
            SecretSourceKind::GcpSecretManager => "gcp-secret-manager",
        })
    }
}

/// One `[secrets.NAME]` table as written. Flat rather than an enum so that a wrong combination
/// gets a message naming the missing or extra key rather than serde's "data did not match any
/// variant"; validation turns it into a [`SecretSpec`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SecretSpecAsWritten {
    pub(super) source: SecretSourceKind,
    /// `file`: path to read. A relative path is looked up in `$CREDENTIALS_DIRECTORY` first
    /// (systemd `LoadCredential=`).
    pub(super) path: Option<PathBuf>,
    /// `env`: variable name.
    pub(super) var: Option<String>,
    /// `gcp-secret-manager`: `projects/P/secrets/S/versions/V` or
    /// `projects/P/locations/L/secrets/S/versions/V`.
    pub(super) name: Option<String>,
    /// Re-read interval; a changed value is applied without restart.
    #[serde(default, deserialize_with = "duration::at_most::<_, _, { duration::DAY }>")]
    pub(super) refresh: Option<Duration>,
}

/// Where one secret comes from: each source with what it needs, and only that.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// A file; a relative path is looked up in `$CREDENTIALS_DIRECTORY` first (systemd
    /// `LoadCredential=`).
    File(PathBuf),
    /// An environment variable (not empty).
    Env(String),
    /// A Secret Manager version.
    GcpSecretManager(SecretVersionName),
}

/// One named secret, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretSpec {
    pub source: SecretSource,
    /// Re-read interval (at least 1 s); a changed value is applied without restart.
    pub refresh: Option<Duration>,
}
