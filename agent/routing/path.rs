//! The request path as routing matches it and the upstream receives it: normalised once, before
//! matching, so a rule cannot be walked around with a spelling the upstream reads as the same
//! path (`//admin`, `/./admin`, `/x/../admin`, `/%61dmin`).
//!
//! The rule (docs/routing.md, "Path normalisation"), after Envoy's `normalize_path` +
//! `merge_slashes`, the settings Envoy Gateway turns on by default:
//! 1. percent-encoding (RFC 3986 §6.2.2.2): an encoded unreserved character (`A-Z a-z 0-9 - . _
//!    ~`, §2.3) is decoded, every other triplet keeps its encoding with upper-case hex (§2.1:
//!    "URI producers and normalizers should use uppercase hexadecimal digits");
//! 2. empty segments are merged (`//` → `/`);
//! 3. dot-segments are removed (§5.2.4), `%2E` included since step 1 decoded it.
//!
//! Refused (the proxy answers 400), because no single reading of them is safe: an encoded `/` or
//! `\` (`%2F`, `%5C`: one upstream splits the segment there, another does not), a raw `\` (some
//! servers read it as `/`), a control character, raw or encoded (`%00`–`%1F`, `%7F`), a `%` not
//! followed by two hex digits, and a `..` that would climb above the root.
//!
//! The query is not part of the path and is never touched.

use std::borrow::Cow;

/// Why a path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path does not start with \"/\"")]
    NotAbsolute,
    #[error("the path contains an encoded \"/\" or \"\\\" (%2F or %5C)")]
    EncodedSeparator,
    #[error("the path contains a backslash")]
    Backslash,
    #[error("the path contains a control character")]
    Control,
    #[error("the path contains a \"%\" not followed by two hex digits")]
    BadPercent,
    #[error("the path climbs above the root with \"..\"")]
    AboveRoot,
}

/// The normalised form of `raw`, a request's path as received (no query). Borrowed when `raw`
/// is already normal, which is the common case and costs one scan, no allocation.
///
/// `*` (an `OPTIONS *` request) and the empty path (a `CONNECT` request's authority form) are
/// not paths and come back unchanged.
pub fn normalise(raw: &str) -> Result<Cow<'_, str>, PathError> {
    if raw.is_empty() || raw == "*" {
        return Ok(Cow::Borrowed(raw));
    }
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if plainly_normal(raw.as_bytes()) || is_normal(raw.as_bytes())? {
        return Ok(Cow::Borrowed(raw));
    }
    let decoded = normalise_encoding(raw.as_bytes())?;
    remove_dot_segments(&decoded).map(Cow::Owned)
}

/// The common request's check, one tight pass: no byte that can need work or be refused (`%`,
/// `\`, a control) and no `/` followed by `/` or `.`. A path that fails it is not necessarily
/// abnormal (`/.well-known`, `/%C3%A9`): [`is_normal`] decides. (About 10 % fewer instructions
/// than `is_normal` alone on the benchmark's 16-byte path, callgrind: docs/routing.md, "Cost".)
fn plainly_normal(path: &[u8]) -> bool {
    let mut after_slash = false;
    for &b in path {
        if b < 0x20 || b == 0x7f || b == b'%' || b == b'\\' || (after_slash && (b == b'/' || b == b'.')) {
            return false;
        }
        after_slash = b == b'/';
    }
    true
}

/// Whether `path` (starting with `/`) is already in normal form; the refusals are found here,
/// so the slow path only meets paths it can normalise.
fn is_normal(path: &[u8]) -> Result<bool, PathError> {
    let mut normal = true;
    let mut i = 0;
    while i < path.len() {
        match path[i] {
            b'\\' => return Err(PathError::Backslash),
            b if b < 0x20 || b == 0x7f => return Err(PathError::Control),
            b'%' => {
                let byte = percent_byte(path, i)?;
                let lower_hex = path[i + 1..i + 3].iter().any(u8::is_ascii_lowercase);
                if is_unreserved(byte) || lower_hex {
                    normal = false;
                }
                i += 2;
            }
            b'/' => {
                // The segment after this `/`: empty (`//`, but not a trailing `/`), `.` or `..`.
                let rest = &path[i + 1..];
                let end = rest.iter().position(|&b| b == b'/').unwrap_or(rest.len());
                let segment = &rest[..end];
                let dots = segment == b"." || segment == b"..";
                if dots || (segment.is_empty() && end < rest.len()) {
                    normal = false;
                }
            }
            _ => {}
        }
        i += 1;
    }
    Ok(normal)
}

/// The byte a `%` at `at` encodes. Refuses a malformed triplet and the encodings that
/// [`normalise`] refuses whatever else the path holds.
fn percent_byte(path: &[u8], at: usize) -> Result<u8, PathError> {
    let hex = |i: usize| path.get(i).and_then(|&b| char::from(b).to_digit(16));
    let (Some(high), Some(low)) = (hex(at + 1), hex(at + 2)) else {
        return Err(PathError::BadPercent);
    };
    // Two hex digits: at most 0xFF.
    let byte = u8::try_from(high * 16 + low).map_err(|_| PathError::BadPercent)?;
    match byte {
        b'/' | b'\\' => Err(PathError::EncodedSeparator),
        b if b < 0x20 || b == 0x7f => Err(PathError::Control),
        b => Ok(b),
    }
}

/// RFC 3986 §2.3: `ALPHA / DIGIT / "-" / "." / "_" / "~"`.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Step 1: unreserved characters decoded, every other triplet with upper-case hex.
fn normalise_encoding(path: &[u8]) -> Result<String, PathError> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < path.len() {
        if path[i] != b'%' {
            out.push(path[i]);
            i += 1;
            continue;
        }
        let byte = percent_byte(path, i)?;
        if is_unreserved(byte) {
            out.push(byte);
        } else {
            out.extend_from_slice(&[b'%', HEX[usize::from(byte >> 4)], HEX[usize::from(byte & 0xF)]]);
        }
        i += 3;
    }
    // Only ASCII was decoded and only ASCII triplets rewritten: the rest is `path`'s own UTF-8.
    String::from_utf8(out).map_err(|_| PathError::BadPercent)
}

/// Steps 2 and 3: `//` merged and dot-segments removed (RFC 3986 §5.2.4), a trailing `/`, `/.`
/// or `/..` leaving a trailing `/`. `..` at the root is refused rather than dropped: a request
/// that tries to climb is not one a browser sends.
fn remove_dot_segments(path: &str) -> Result<String, PathError> {
    let mut kept: Vec<&str> = Vec::new();
    let mut segments = path.split('/').skip(1).peekable();
    let mut trailing_slash = false;
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        match segment {
            "" | "." => {}
            ".." => {
                kept.pop().ok_or(PathError::AboveRoot)?;
            }
            s => kept.push(s),
        }
        trailing_slash = last && matches!(segment, "" | "." | "..");
    }
    let mut out = String::with_capacity(path.len());
    for s in &kept {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || kept.is_empty() {
        out.push('/');
    }
    Ok(out)
}

/// `uri` with its path normalised and its query kept byte for byte; `None` when the path was
/// normal already (nothing to rebuild).
pub fn normalise_uri(uri: &http::Uri) -> Result<Option<http::Uri>, PathError> {
    let path = match normalise(uri.path())? {
        Cow::Borrowed(_) => return Ok(None),
        Cow::Owned(p) => p,
    };
    let mut pq = path;
    if let Some(q) = uri.query() {
        pq.push('?');
        pq.push_str(q);
    }
    let mut parts = uri.clone().into_parts();
    // Built from a path that parsed, with only unreserved characters decoded: it parses again.
    parts.path_and_query = Some(http::uri::PathAndQuery::try_from(pq).map_err(|_| PathError::BadPercent)?);
    http::Uri::from_parts(parts)
        .map(Some)
        .map_err(|_| PathError::BadPercent)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(raw: &str) -> Result<String, PathError> {
        normalise(raw).map(Cow::into_owned)
    }

    #[test]
    fn the_issues_walk_arounds_become_the_path_the_upstream_sees() {
        for raw in [
            "//admin/x",
            "/./admin/x",
            "/x/../admin/x",
            "/%61dmin/x",
            "/%2e/admin/x",
            "/%2E%2E/x/",
        ] {
            let want = if raw == "/%2E%2E/x/" {
                Err(PathError::AboveRoot)
            } else {
                Ok("/admin/x".to_owned())
            };
            assert_eq!(n(raw), want, "{raw}");
        }
    }

    #[test]
    fn rfc_3986_dot_segment_examples_and_trailing_slashes() {
        let cases = [
            ("/", "/"),
            ("/a/b/c/./../../g", "/a/g"),
            ("/mid/content=5/../6", "/mid/6"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/a//", "/a/"),
            ("/a/..", "/"),
            ("/.", "/"),
            ("//", "/"),
            ("/a/...", "/a/..."),
            ("/a/.b/..c", "/a/.b/..c"),
        ];
        for (raw, want) in cases {
            assert_eq!(n(raw).as_deref(), Ok(want), "{raw}");
        }
    }

    #[test]
    fn percent_encoding_decodes_unreserved_and_upper_cases_the_rest() {
        assert_eq!(n("/%7euser/%41%2d%5F"), Ok("/~user/A-_".into()));
        assert_eq!(n("/caf%c3%a9?x"), Ok("/caf%C3%A9?x".into()));
        assert_eq!(n("/%25%32%66"), Ok("/%252f".into()), "decoded once, never twice");
        assert!(matches!(normalise("/caf%C3%A9/%25"), Ok(Cow::Borrowed(_))));
    }

    #[test]
    fn refusals() {
        let cases = [
            ("/a%2Fb", PathError::EncodedSeparator),
            ("/a%2fb", PathError::EncodedSeparator),
            ("/a%5cb", PathError::EncodedSeparator),
            ("/a\\b", PathError::Backslash),
            ("/a%00", PathError::Control),
            ("/a%0a", PathError::Control),
            ("/a%7F", PathError::Control),
            ("/a\u{1}", PathError::Control),
            ("/a%", PathError::BadPercent),
            ("/a%4", PathError::BadPercent),
            ("/a%zz", PathError::BadPercent),
            ("/..", PathError::AboveRoot),
            ("/a/../../b", PathError::AboveRoot),
            ("a/b", PathError::NotAbsolute),
        ];
        for (raw, want) in cases {
            assert_eq!(n(raw), Err(want), "{raw:?}");
        }
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for raw in [
            "/",
            "/a/b",
            "/a/b/",
            "/a.b/..c/",
            "*",
            "",
            "/pkg.Service/Method",
            "/%C3%A9",
        ] {
            assert!(matches!(normalise(raw), Ok(Cow::Borrowed(_))), "{raw}");
        }
    }

    #[test]
    fn the_query_is_kept_as_sent() {
        let uri: http::Uri = "/a/./b?x=%2f&y=/../".parse().unwrap();
        let got = normalise_uri(&uri).unwrap().unwrap();
        assert_eq!(got.path_and_query().unwrap().as_str(), "/a/b?x=%2f&y=/../");
        let normal: http::Uri = "/a/b?x=1".parse().unwrap();
        assert_eq!(normalise_uri(&normal), Ok(None));
        let absolute: http::Uri = "http://h:8/x//y?q".parse().unwrap();
        assert_eq!(
            normalise_uri(&absolute).unwrap().unwrap().to_string(),
            "http://h:8/x/y?q"
        );
    }
}
