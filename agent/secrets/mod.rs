//! Named secrets and where they come from.
//!
//! A value is a [`Secret`] (see `crate::secret`: redacted `Debug`, constant-time equality).
//! Errors name the secret and its source, never its value.
//!
//! - this file: local sources (`file`, `env`) and the error type;
//! - [`resolve`]: every configured secret at boot and on reload, retrying transient failures;
//! - [`refresh`]: re-reading secrets that have a `refresh` interval.

pub mod refresh;
pub mod resolve;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::config::SecretSource;
pub use crate::secret::Secret;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret {name:?}: cannot read file {}: {source}", path.display())]
    File {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("secret {name:?}: environment variable {var} is not set")]
    EnvMissing { name: String, var: String },
    #[error("secret {name:?}: value from {origin} is empty")]
    Empty { name: String, origin: String },
    #[error("secret {name:?}: value from {origin} is not valid UTF-8")]
    NotUtf8 { name: String, origin: String },
    /// A value no client could ever send: secrets are header values and tokens, and HTTP trims
    /// surrounding whitespace and forbids control characters (RFC 9110 §5.5).
    #[error("secret {name:?}: value from {origin} {why}")]
    Unsendable { name: String, origin: String, why: String },
    #[error("secret {name:?}: {message}")]
    Remote { name: String, message: String },
}

impl SecretError {
    /// The config key the error is about (`secrets.NAME.path`, `.var` or `.name`), for
    /// `check`'s `FILE: KEY: REASON` lines.
    pub fn key(&self) -> String {
        let field = |origin: &str| {
            if origin.starts_with("file ") {
                "path"
            } else if origin.starts_with("environment variable ") {
                "var"
            } else {
                "name"
            }
        };
        let (name, field) = match self {
            SecretError::File { name, .. } => (name, "path"),
            SecretError::EnvMissing { name, .. } => (name, "var"),
            SecretError::Empty { name, origin }
            | SecretError::NotUtf8 { name, origin }
            | SecretError::Unsendable { name, origin, .. } => (name, field(origin)),
            SecretError::Remote { name, .. } => (name, "name"),
        };
        format!("secrets.{name}.{field}")
    }
}

/// Why no HTTP client could send `value` as a header value (or `None` when one can): a control
/// character other than HTAB, or whitespace at either end (parsers strip it, RFC 9110 §5.5).
/// The message says where, never what the value is.
fn unsendable(value: &str) -> Option<String> {
    if let Some((at, c)) = value.char_indices().find(|(_, c)| c.is_control() && *c != '\t') {
        return Some(format!(
            "has a control character (U+{:04X}) at byte {at}; no client can send it in a header",
            u32::from(c)
        ));
    }
    if value.starts_with([' ', '\t']) || value.ends_with([' ', '\t']) {
        return Some(
            "starts or ends with whitespace (only one trailing newline is trimmed); HTTP strips it, so no client can send it"
                .to_owned(),
        );
    }
    None
}

/// Where a file secret is read from: an absolute path as given; a relative one from
/// `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`) when set, else as given.
fn file_path(path: &Path) -> PathBuf {
    if path.is_relative() {
        if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
            return Path::new(&dir).join(path);
        }
    }
    path.to_owned()
}

/// Trims one trailing newline (`\n` or `\r\n`), as `echo foo > file` and cloud-init leave one.
fn trim_newline(mut s: String) -> String {
    if s.ends_with('\n') {
        s.pop();
        if s.ends_with('\r') {
            s.pop();
        }
    }
    s
}

/// Reads one secret from a local source (`file`, `env`). Remote sources are fetched by
/// [`crate::gcp`]; this returns `None` for them.
pub fn read_local(name: &str, source: &SecretSource) -> Option<Result<Secret, SecretError>> {
    match source {
        SecretSource::File(path) => Some(read_file(name, path)),
        SecretSource::Env(var) => Some(read_env(name, var)),
        SecretSource::GcpSecretManager(_) => None,
    }
}

/// A `file` secret; a relative path is looked up in `$CREDENTIALS_DIRECTORY` first.
pub fn read_file(name: &str, path: &Path) -> Result<Secret, SecretError> {
    let path = file_path(path);
    match std::fs::read(&path) {
        Ok(bytes) => from_bytes(name, bytes, &format!("file {}", path.display())),
        Err(source) => Err(SecretError::File {
            name: name.to_owned(),
            path,
            source,
        }),
    }
}

/// An `env` secret.
pub fn read_env(name: &str, var: &str) -> Result<Secret, SecretError> {
    match std::env::var_os(var) {
        Some(v) => from_bytes(name, v.into_encoded_bytes(), &format!("environment variable {var}")),
        None => Err(SecretError::EnvMissing {
            name: name.to_owned(),
            var: var.to_owned(),
        }),
    }
}

/// Turns fetched bytes into a secret: UTF-8, one trailing newline trimmed, not empty, and
/// sendable as a header value.
pub fn from_bytes(name: &str, raw: Vec<u8>, origin: &str) -> Result<Secret, SecretError> {
    let text = String::from_utf8(raw).map_err(|_| SecretError::NotUtf8 {
        name: name.to_owned(),
        origin: origin.to_owned(),
    })?;
    let text = trim_newline(text);
    if text.is_empty() {
        return Err(SecretError::Empty {
            name: name.to_owned(),
            origin: origin.to_owned(),
        });
    }
    if let Some(why) = unsendable(&text) {
        return Err(SecretError::Unsendable {
            name: name.to_owned(),
            origin: origin.to_owned(),
            why,
        });
    }
    Ok(Secret::new(text))
}

/// The current value of every configured secret, by name.
pub type SecretValues = BTreeMap<String, Secret>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "[redacted]");
        let map: SecretValues = [("tok".to_owned(), s)].into();
        assert!(!format!("{map:?}").contains("hunter2"));
    }

    #[test]
    fn trailing_newline_trimmed_once_and_empty_refused() {
        assert_eq!(from_bytes("t", b"abc\n".to_vec(), "x").unwrap().expose(), "abc");
        assert_eq!(from_bytes("t", b"abc\r\n".to_vec(), "x").unwrap().expose(), "abc");
        assert!(matches!(
            from_bytes("t", b"\n".to_vec(), "x"),
            Err(SecretError::Empty { .. })
        ));
        assert!(matches!(
            from_bytes("t", vec![0xff], "x"),
            Err(SecretError::NotUtf8 { .. })
        ));
    }

    #[test]
    fn values_no_client_can_send_are_refused_without_echoing_them() {
        for raw in [
            &b"zqv\n\n"[..],
            b"ab\x00c",
            b"zqv\x7f",
            b"zq1\nzq2",
            b" zqv",
            b"zqv \n",
            b"\tzqv",
            b"zqv\r",
        ] {
            let e = from_bytes("tok", raw.to_vec(), "file /x").expect_err(&format!("{raw:?}"));
            assert!(matches!(e, SecretError::Unsendable { .. }), "{raw:?}: {e}");
            assert_eq!(e.key(), "secrets.tok.path");
            let text = e.to_string();
            assert!(!text.contains("zq"), "{text}");
        }
        // Inner spaces and tabs are legal in a header value.
        assert_eq!(from_bytes("t", b"a b\tc\n".to_vec(), "x").unwrap().expose(), "a b\tc");
    }

    #[test]
    fn file_errors_name_secret_and_path_not_value() {
        let source = SecretSource::File("/nonexistent/tok".into());
        let err = read_local("internal", &source).unwrap().unwrap_err().to_string();
        assert!(
            err.contains("\"internal\"") && err.contains("/nonexistent/tok"),
            "{err}"
        );
    }
}
