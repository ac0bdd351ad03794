//! Named secrets and where they come from.
//!
//! A [`Secret`] never prints its value: `Debug` says `[redacted]` and there is no `Display`, so a
//! stray `{:?}` in a log line or a panic message cannot leak it. Errors name the secret and its
//! source, never its value.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{SecretSourceKind, SecretSpec};

/// A secret value. Cheap to clone (shared), compared by value in constant time.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    pub fn new(value: impl Into<Arc<str>>) -> Secret {
        Secret(value.into())
    }

    /// The value, for the few places that must hand it on (a header, a child's environment).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

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
    #[error("secret {name:?}: {message}")]
    Remote { name: String, message: String },
}

/// A Secret Manager version resource name, global or regional.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretVersionName {
    pub project: String,
    pub location: Option<String>,
    pub secret: String,
    pub version: String,
}

impl SecretVersionName {
    /// Parses `projects/P/secrets/S/versions/V` or `projects/P/locations/L/secrets/S/versions/V`.
    pub fn parse(name: &str) -> Result<SecretVersionName, String> {
        let parts: Vec<&str> = name.split('/').collect();
        let shape = "expected projects/P/secrets/S/versions/V or projects/P/locations/L/secrets/S/versions/V";
        let ok = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        };
        let parsed = match parts.as_slice() {
            ["projects", p, "secrets", s, "versions", v] => SecretVersionName {
                project: (*p).to_owned(),
                location: None,
                secret: (*s).to_owned(),
                version: (*v).to_owned(),
            },
            ["projects", p, "locations", l, "secrets", s, "versions", v] => SecretVersionName {
                project: (*p).to_owned(),
                location: Some((*l).to_owned()),
                secret: (*s).to_owned(),
                version: (*v).to_owned(),
            },
            _ => return Err(format!("{name:?}: {shape}")),
        };
        let all = [&parsed.project, &parsed.secret, &parsed.version];
        if all.iter().any(|s| !ok(s)) || parsed.location.as_deref().is_some_and(|l| !ok(l)) {
            return Err(format!(
                "{name:?}: {shape} (segments may hold letters, digits, '-', '_', '.')"
            ));
        }
        Ok(parsed)
    }

    pub fn resource(&self) -> String {
        match &self.location {
            Some(l) => format!(
                "projects/{}/locations/{l}/secrets/{}/versions/{}",
                self.project, self.secret, self.version
            ),
            None => format!(
                "projects/{}/secrets/{}/versions/{}",
                self.project, self.secret, self.version
            ),
        }
    }
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
pub fn read_local(name: &str, spec: &SecretSpec) -> Option<Result<Secret, SecretError>> {
    let (raw, origin) = match spec.source {
        SecretSourceKind::File => {
            let path = file_path(spec.path.as_deref().unwrap_or(Path::new("")));
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(source) => {
                    return Some(Err(SecretError::File {
                        name: name.to_owned(),
                        path,
                        source,
                    }))
                }
            };
            (bytes, format!("file {}", path.display()))
        }
        SecretSourceKind::Env => {
            let var = spec.var.clone().unwrap_or_default();
            match std::env::var_os(&var) {
                Some(v) => (v.into_encoded_bytes(), format!("environment variable {var}")),
                None => {
                    return Some(Err(SecretError::EnvMissing {
                        name: name.to_owned(),
                        var,
                    }))
                }
            }
        }
        SecretSourceKind::GcpSecretManager => return None,
    };
    Some(from_bytes(name, raw, &origin))
}

/// Turns fetched bytes into a secret: UTF-8, one trailing newline trimmed, not empty.
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
    fn parses_global_and_regional_names() {
        let g = SecretVersionName::parse("projects/p1/secrets/tok/versions/latest").unwrap();
        assert_eq!(g.location, None);
        assert_eq!(g.resource(), "projects/p1/secrets/tok/versions/latest");
        let r = SecretVersionName::parse("projects/p1/locations/europe-west1/secrets/tok/versions/3").unwrap();
        assert_eq!(r.location.as_deref(), Some("europe-west1"));
        assert_eq!(
            r.resource(),
            "projects/p1/locations/europe-west1/secrets/tok/versions/3"
        );
        for bad in [
            "",
            "projects/p/secrets/s",
            "projects//secrets/s/versions/1",
            "projects/p/secrets/s/versions/1/x",
            "projects/p/secrets/s?x/versions/1",
        ] {
            assert!(SecretVersionName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn trailing_newline_trimmed_once_and_empty_refused() {
        assert_eq!(from_bytes("t", b"abc\n".to_vec(), "x").unwrap().expose(), "abc");
        assert_eq!(from_bytes("t", b"abc\r\n".to_vec(), "x").unwrap().expose(), "abc");
        assert_eq!(from_bytes("t", b"abc\n\n".to_vec(), "x").unwrap().expose(), "abc\n");
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
    fn file_errors_name_secret_and_path_not_value() {
        let spec = SecretSpec {
            source: SecretSourceKind::File,
            path: Some("/nonexistent/tok".into()),
            var: None,
            name: None,
            refresh: None,
        };
        let err = read_local("internal", &spec).unwrap().unwrap_err().to_string();
        assert!(
            err.contains("\"internal\"") && err.contains("/nonexistent/tok"),
            "{err}"
        );
    }
}
