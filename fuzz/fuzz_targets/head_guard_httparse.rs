//! Differential: the bare-LF guard (agent/framing.rs) against a model of what hyper reads from
//! the same connection bytes: httparse's parse of each request head (hyper's parser, hyper's
//! settings), then hyper 1.x's server-side body framing (proto/h1/role.rs: `Transfer-Encoding`
//! wins over `Content-Length`, only the last `Transfer-Encoding` line decides whether the body
//! is chunked, `Content-Length` is digits only, equal when repeated).
//!
//! The findings it checks, for every head hyper would parse on a kept-alive connection:
//! - a head with a bare LF that hyper accepts must have been refused by the guard by the end of
//!   that head (else the guard was walked around: a front that splits on CRLF only sees another
//!   request than hyper does);
//! - a stream of heads without a bare LF must pass the guard (no valid request refused).
//!
//! By design, and not findings: we refuse bare LF where httparse accepts it (RFC 9112 §2.2
//! allows both); the guard skips what hyper refuses anyway (it closes the connection); chunk
//! lines and trailers are hyper's to judge, so the model stops following a connection at any
//! chunk or trailer line that is not strictly CRLF-framed.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tunnel_agent::framing::BareLfGuard;

/// hyper's default limit on the headers of one request (`DEFAULT_MAX_HEADERS`).
const MAX_HEADERS: usize = 100;

enum Framing {
    Length(u64),
    Chunked,
}

/// One parsed head: its length, whether it has a bare LF, and its body's framing; `None` when
/// hyper would not read another request after this one (refused, closing, upgraded).
struct Head {
    len: usize,
    bare_lf: bool,
    framing: Option<Framing>,
}

fn has_bare_lf(head: &[u8]) -> bool {
    head.iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || head[i - 1] != b'\r'))
}

/// hyper's `from_digits`: no sign, no spaces, no lists.
fn digits(v: &[u8]) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit()
            .then_some(())
            .and_then(|()| n.checked_mul(10)?.checked_add(u64::from(b - b'0')))
    })
}

/// The next head as hyper reads it; `None`: incomplete, or refused (hyper answers 400 and
/// closes, so nothing after it is a request).
fn parse_head(bytes: &[u8]) -> Option<Head> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        _ => return None,
    };
    http::Method::from_bytes(req.method?.as_bytes()).ok()?;
    http::Uri::try_from(req.path?).ok()?;
    let http11 = req.version? == 1;
    let (mut te, mut chunked, mut cl, mut close) = (false, false, None, !http11);
    for h in req.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        match name.as_str() {
            "transfer-encoding" => {
                if !http11 {
                    return None;
                }
                te = true;
                let last = std::str::from_utf8(h.value).ok().and_then(|s| s.rsplit(',').next());
                chunked = last.is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"));
            }
            "content-length" if !te => {
                let n = digits(h.value)?;
                if cl.is_some_and(|m| m != n) {
                    return None;
                }
                cl = Some(n);
            }
            "content-length" => cl = cl.or(Some(0)),
            // Closing or switching protocols: what follows is not read as requests.
            "connection" | "upgrade" => close = true,
            _ => {}
        }
    }
    if te && !chunked {
        return None;
    }
    // Both: hyper reads the chunked body, then closes (`keep_alive = false`).
    close |= te && cl.is_some() || req.method == Some("CONNECT");
    let framing = match (close, chunked) {
        (true, _) => None,
        (false, true) => Some(Framing::Chunked),
        (false, false) => Some(Framing::Length(cl.unwrap_or(0))),
    };
    Some(Head {
        len,
        bare_lf: has_bare_lf(&bytes[..len]),
        framing,
    })
}

/// The length of a strictly CRLF-framed chunked body with trailers, or `None`.
fn chunked_len(bytes: &[u8]) -> Option<usize> {
    let mut at = 0;
    loop {
        let line_end = at + bytes[at..].windows(2).position(|w| w == b"\r\n")?;
        let line = &bytes[at..line_end];
        if line.contains(&b'\n') || line.contains(&b'\r') {
            return None;
        }
        let size_end = line.iter().position(|&b| b == b';').unwrap_or(line.len());
        let size = usize::from_str_radix(std::str::from_utf8(&line[..size_end]).ok()?, 16).ok()?;
        if !line[..size_end].iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        at = line_end + 2;
        if size == 0 {
            break;
        }
        at = at.checked_add(size)?;
        if bytes.get(at..at + 2)? != b"\r\n" {
            return None;
        }
        at += 2;
    }
    // Trailer lines, then an empty line.
    loop {
        let line_end = at + bytes[at..].windows(2).position(|w| w == b"\r\n")?;
        let line = &bytes[at..line_end];
        if line.contains(&b'\n') || line.contains(&b'\r') {
            return None;
        }
        at = line_end + 2;
        if line.is_empty() {
            return Some(at);
        }
    }
}

fuzz_target!(|bytes: &[u8]| {
    let mut at = 0;
    while at < bytes.len() {
        let Some(head) = parse_head(&bytes[at..]) else {
            return;
        };
        let end = at + head.len;
        let mut guard = BareLfGuard::default();
        let verdict = guard.feed(&bytes[..end]);
        if head.bare_lf {
            assert!(
                verdict.is_err(),
                "hyper reads a head with a bare LF at {at}..{end} that the guard let through (active: {})",
                guard.active()
            );
            return;
        }
        assert!(verdict.is_ok(), "the guard refused heads without a bare LF (..{end})");
        at = match head.framing {
            None => return,
            Some(Framing::Length(n)) => match usize::try_from(n).ok().and_then(|n| end.checked_add(n)) {
                Some(next) if next <= bytes.len() => next,
                _ => return,
            },
            Some(Framing::Chunked) => match chunked_len(&bytes[end..]) {
                Some(n) => end + n,
                None => return,
            },
        };
    }
});
