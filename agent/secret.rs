//! The [`Secret`] value type: what every secret (a configured one, an access token, an
//! identity token) is held as.
//!
//! It never prints its value: `Debug` says `[redacted]` and there is no `Display`, so a stray
//! `{:?}` in a log line or a panic message cannot leak it. Equality is constant-time for
//! values of one length (the length of a token is not the secret), so comparing a presented
//! token with [`Secret::matches`] or `==` does not tell how much of it was right.

use std::fmt;
use std::sync::Arc;

use subtle::ConstantTimeEq;

/// A secret value. Cheap to clone (shared).
#[derive(Clone)]
pub struct Secret(Arc<str>);

impl Secret {
    pub fn new(value: impl Into<Arc<str>>) -> Secret {
        Secret(value.into())
    }

    /// The value, for the few places that must hand it on (a header, a child's environment).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this value, compared in constant time.
    pub fn matches(&self, presented: &[u8]) -> bool {
        self.ct_matches(presented).into()
    }

    /// [`Secret::matches`] as a `subtle::Choice`, to combine several comparisons without an
    /// early exit.
    pub fn ct_matches(&self, presented: &[u8]) -> subtle::Choice {
        self.0.as_bytes().ct_eq(presented)
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Secret) -> bool {
        self.matches(other.0.as_bytes())
    }
}

impl Eq for Secret {}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted_and_equality_is_by_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "[redacted]");
        assert_eq!(s, Secret::new(String::from("hunter2")));
        assert_ne!(s, Secret::new("hunter3"));
        assert_ne!(s, Secret::new("hunter22"));
        assert!(s.matches(b"hunter2"));
        assert!(!s.matches(b"hunter"));
        assert!(!s.matches(b""));
    }
}
