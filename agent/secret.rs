//! The [`Secret`] value type: what every secret (a configured one, an access token, an
//! identity token) is held as.
//!
//! It never prints its value: `Debug` says `[redacted]` and there is no `Display`, so a stray
//! `{:?}` in a log line or a panic message cannot leak it. Equality is constant-time for
//! values of one length (the length of a token is not the secret), so comparing a presented
//! token with [`Secret::matches`] or `==` does not tell how much of it was right.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use subtle::ConstantTimeEq;
use tokio::time::Instant;

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

/// One accepted token of a rotating secret (the proxy's internal token, the config API's
/// bearer token). During a rotation the previous value stays accepted until `until`.
#[derive(Debug, Clone)]
pub struct AcceptedToken {
    pub value: Secret,
    pub until: Option<Instant>,
}

const MAX_OVERLAP: Duration = Duration::from_secs(365 * 24 * 3600);

/// The tokens accepted once `current` is the secret's value: it, and each other one of
/// `previous` until its own deadline, or for `overlap` from now when it has none yet (it was
/// the current one until now). The inbound auth and the config API's bearer token rotate so.
pub fn rotated(current: Secret, previous: &[AcceptedToken], overlap: Duration) -> Vec<AcceptedToken> {
    let now = Instant::now();
    let mut accepted = vec![AcceptedToken {
        value: current.clone(),
        until: None,
    }];
    for old in previous {
        if old.value == current || old.until.is_some_and(|u| u <= now) {
            continue;
        }
        // Capped, so the deadline cannot overflow the clock (a year is past any sane overlap).
        let until = match old.until {
            Some(u) => u,
            None => match now.checked_add(overlap.min(MAX_OVERLAP)) {
                Some(u) => u,
                None => continue,
            },
        };
        accepted.push(AcceptedToken {
            value: old.value.clone(),
            until: Some(until),
        });
    }
    accepted
}

/// Constant-time comparison against every accepted token still in its overlap (no early exit
/// on the first match, so timing does not tell which one matched).
pub fn accepts(tokens: &[AcceptedToken], presented: &[u8]) -> bool {
    let now = Instant::now();
    let mut ok = subtle::Choice::from(0);
    for t in tokens {
        if t.until.is_none_or(|u| now < u) {
            ok |= t.value.ct_matches(presented);
        }
    }
    ok.into()
}
