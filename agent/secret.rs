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
use std::time::Duration;

use subtle::ConstantTimeEq;
use tokio::time::Instant;
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

/// Query parameter names whose values are credentials when their lower-cased name contains one
/// of these (`token`, `access_token`, `api_key`, `X-Amz-Signature`, `password`, `sig`, …).
const SENSITIVE_QUERY: &[&str] = &[
    "token",
    "key",
    "secret",
    "pass",
    "auth",
    "sig",
    "credential",
    "session",
    "code",
];

/// `url` as it may be shown (in `/status`, a log line, an error): without `user:password@` and
/// with every sensitive query value replaced by `[redacted]`. Anything else is kept verbatim,
/// so the operator still sees which host and path it is. Text that is not a URL comes back as
/// it was.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let mut out = String::with_capacity(url.len());
    out.push_str(scheme);
    match authority.rfind('@') {
        Some(at) => {
            out.push_str("[redacted]@");
            out.push_str(&authority[at + 1..]);
        }
        None => out.push_str(authority),
    }
    let (before_fragment, fragment) = match tail.find('#') {
        Some(i) => tail.split_at(i),
        None => (tail, ""),
    };
    match before_fragment.split_once('?') {
        Some((path, query)) => {
            out.push_str(path);
            out.push('?');
            for (i, pair) in query.split('&').enumerate() {
                if i > 0 {
                    out.push('&');
                }
                match pair.split_once('=') {
                    Some((name, _)) if sensitive_query_name(name) => {
                        out.push_str(name);
                        out.push_str("=[redacted]");
                    }
                    _ => out.push_str(pair),
                }
            }
        }
        None => out.push_str(before_fragment),
    }
    out.push_str(fragment);
    out
}

fn sensitive_query_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SENSITIVE_QUERY.iter().any(|s| name.contains(s))
}

/// `text` (an error message, a status line) with every `scheme://…` URL in it passed through
/// [`redact_url`]. A URL ends at whitespace or at a quote, bracket or parenthesis, which is how
/// error messages (reqwest's `for url (…)`, `{:?}`) embed them.
pub fn redact_urls_in(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let start = rest[..i]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || "+-.".contains(c)))
            .map_or(0, |j| j + 1);
        let len = rest[i..]
            .find(|c: char| c.is_whitespace() || "\"'<>()[]{}`".contains(c))
            .map_or(rest.len(), |n| i + n);
        out.push_str(&rest[..start]);
        out.push_str(&redact_url(&rest[start..len]));
        rest = &rest[len..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_userinfo_and_sensitive_query_values() {
        assert_eq!(
            redact_url("https://user:p%40ss@health.internal:8443/check?token=abc&x=1&API_KEY=k#frag"),
            "https://[redacted]@health.internal:8443/check?token=[redacted]&x=1&API_KEY=[redacted]#frag"
        );
        assert_eq!(
            redact_url("http://10.0.0.5:8080/healthz"),
            "http://10.0.0.5:8080/healthz"
        );
        assert_eq!(
            redact_url("http://h/?a=b&sig=s&flag"),
            "http://h/?a=b&sig=[redacted]&flag"
        );
        assert_eq!(redact_url("http://u@h"), "http://[redacted]@h");
        // '@' after the authority is not userinfo.
        assert_eq!(redact_url("http://h/a@b"), "http://h/a@b");
        assert_eq!(redact_url("not a url"), "not a url");
        assert_eq!(
            redact_urls_in("error sending request for url (http://a:b@h:1/x?access_token=t): refused; see https://ok/"),
            "error sending request for url (http://[redacted]@h:1/x?access_token=[redacted]): refused; see https://ok/"
        );
        assert_eq!(
            redact_urls_in("\"http://u:p@h\" is not valid"),
            "\"http://[redacted]@h\" is not valid"
        );
        assert_eq!(redact_urls_in("no url here"), "no url here");
    }

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
