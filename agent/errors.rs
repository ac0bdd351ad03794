//! Helpers for rendering errors, shared by every module that talks to a peer.

/// An error and its causes in one line, `: `-separated. `reqwest`'s top-level message hides the
/// cause ("error sending request"); the chain says what happened (refused, timed out, TLS).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}
