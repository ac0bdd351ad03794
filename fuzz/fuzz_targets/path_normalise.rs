//! Path normalisation (`tunnel_agent::routing::path::normalise`, issue 18, High #1).
//!
//! Properties, for any path (its bytes as hyper would hand them over):
//! - no panic, no hang;
//! - idempotence: a normalised path normalises to itself;
//! - the output is a path hyper would accept in a request line, starts with `/`, and has no
//!   `//`, no `.`/`..` segment, no `%` followed by an unreserved character;
//! - round trip: decoding the percent-encoded unreserved characters of the input and resolving
//!   dot-segments (RFC 3986 §5.2.4) gives the same path as the output, so no upstream that
//!   normalises sees another path than the one the rules matched.

#![no_main]

use libfuzzer_sys::fuzz_target;

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// An independent reading of the rule, written plainly: decode the encoded unreserved
/// characters (upper-casing the hex of the rest), then walk the segments: empty and `.` ones
/// vanish, `..` drops the one before, and the path keeps a trailing `/` when its last segment
/// was one of those. `None` where it climbs above the root.
fn reference(raw: &str) -> Option<String> {
    let b = raw.as_bytes();
    let mut decoded = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let v = u8::from_str_radix(std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?, 16).ok()?;
            if unreserved(v) {
                decoded.push(v);
            } else {
                decoded.extend_from_slice(format!("%{v:02X}").as_bytes());
            }
            i += 3;
        } else {
            decoded.push(b[i]);
            i += 1;
        }
    }
    let decoded = String::from_utf8(decoded).ok()?;
    let mut kept: Vec<&str> = Vec::new();
    let mut trailing = false;
    for seg in decoded.split('/').skip(1) {
        trailing = matches!(seg, "" | "." | "..");
        match seg {
            "" | "." => {}
            ".." => {
                kept.pop()?;
            }
            s => kept.push(s),
        }
    }
    let mut out = format!("/{}", kept.join("/"));
    if trailing && !kept.is_empty() {
        out.push('/');
    }
    Some(out)
}

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    // What hyper hands over: the request target's path, without the query and without what
    // follows a `#` (http's parser ends the path there).
    let Ok(target) = http::uri::PathAndQuery::try_from(raw) else {
        return;
    };
    let raw = target.path();
    if !raw.starts_with('/') {
        return;
    }
    let Ok(once) = tunnel_agent::routing::path::normalise(raw) else {
        return;
    };
    let twice = tunnel_agent::routing::path::normalise(&once).expect("a normalised path normalises");
    assert_eq!(once, twice, "not idempotent for {raw:?}");
    assert!(once.starts_with('/'), "{raw:?} -> {once:?}");
    assert!(http::uri::PathAndQuery::try_from(&*once).is_ok(), "{raw:?} -> {once:?}");
    assert!(!once.contains("//"), "{raw:?} -> {once:?}");
    for seg in once.split('/') {
        assert!(seg != "." && seg != "..", "dot-segment left: {raw:?} -> {once:?}");
    }
    assert_eq!(
        reference(raw).as_deref(),
        Some(&*once),
        "the rule read plainly disagrees for {raw:?}"
    );
    let b = once.as_bytes();
    for (i, _) in once.match_indices('%') {
        let hex = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        let byte = hex.and_then(|h| u8::from_str_radix(h, 16).ok());
        assert!(byte.is_some_and(|v| !unreserved(v)), "{raw:?} -> {once:?}");
    }
});
