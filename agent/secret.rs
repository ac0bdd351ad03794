//! The [`Secret`] value type: what every secret (a configured one, an access token, an
//! identity token) is held as.
//!
//! It never prints its value: `Debug` says `[redacted]` and there is no `Display`, so a stray
//! `{:?}` in a log line or a panic message cannot leak it. Equality is constant-time for
//! values of one length (the length of a token is not the secret), so comparing a presented
//! token with [`Secret::matches`] or `==` does not tell how much of it was right.
//!
//! The bytes are overwritten with zeros when the last clone is dropped (a rotated token, a
//! refreshed access token), so memory the allocator hands out again does not still hold them.
//! That covers the value as held; the copies made on the way in (a file's read buffer, an HTTP
//! response body) and out (a header, a child's environment) are not tracked. The process being
//! non-dumpable (`main.rs`) is what keeps a core file from carrying the live ones.

use std::fmt;
use std::sync::Arc;

use subtle::ConstantTimeEq;
use zeroize::Zeroize;

/// A secret value. Cheap to clone (shared).
#[derive(Clone)]
pub struct Secret(Arc<Wiped>);

/// The one copy every clone of a [`Secret`] shares; zeroed on drop.
struct Wiped(String);

impl Drop for Wiped {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(Arc::new(Wiped(value.into())))
    }

    /// The value, for the few places that must hand it on (a header, a child's environment).
    pub fn expose(&self) -> &str {
        &self.0 .0
    }

    /// Whether `presented` is this value, compared in constant time.
    pub fn matches(&self, presented: &[u8]) -> bool {
        self.ct_matches(presented).into()
    }

    /// [`Secret::matches`] as a `subtle::Choice`, to combine several comparisons without an
    /// early exit.
    pub fn ct_matches(&self, presented: &[u8]) -> subtle::Choice {
        self.expose().as_bytes().ct_eq(presented)
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Secret) -> bool {
        self.matches(other.expose().as_bytes())
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
