//! INTEGRATOR: path normalisation (issue 18, High #1). Not built yet: it needs
//! `tunnel_agent::routing::path::normalise` (agent/routing/path.rs, another branch). After that
//! branch is merged, check the function's final name and signature below, enable the `[[bin]]`
//! entry marked in fuzz/Cargo.toml, add a few seed paths under fuzz/corpus/path_normalise/
//! (`/a/./b`, `//admin`, `/%61dmin/x`, `/x/../y`), and run `fuzz/run.sh path_normalise`.
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

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    if http::uri::PathAndQuery::try_from(raw).is_err() || !raw.starts_with('/') || raw.contains('?') {
        return;
    }
    // INTEGRATOR: the normaliser's entry point.
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
    let b = once.as_bytes();
    for (i, _) in once.match_indices('%') {
        let hex = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        let byte = hex.and_then(|h| u8::from_str_radix(h, 16).ok());
        assert!(byte.is_some_and(|v| !unreserved(v)), "{raw:?} -> {once:?}");
    }
});
