//! Request heads ended by a bare LF get 400 before hyper parses them.
//!
//! RFC 9112 §2.2: "a recipient MAY recognize a single LF as a line terminator", so hyper (and
//! httparse under it) accepts `GET / HTTP/1.1\nHost: a\n\n`. A front that splits on CRLF only
//! sees that as one line, or as a different request than we do: the disagreement request
//! smuggling is made of. We are behind cloudflared, which always sends CRLF, so the strict
//! reading costs nothing and removes the ambiguity; the RFC allows it ("a server that receives
//! ... MAY respond with a 400").
//!
//! hyper has no switch for this, so [`BareLfGuard`] follows HTTP/1.1 framing on the bytes the
//! connection reads (head; then a `Content-Length` body, skipped; then the next head) and
//! reports the first bare LF in a head. Bodies are never inspected. After a chunked body (or a
//! head it cannot frame, which hyper will refuse anyway) it stops for the rest of the
//! connection: following chunk framing is more code than the remaining risk is worth, and
//! cloudflared sends request bodies with `Content-Length` when it knows it.

/// The answer to a head with a bare LF: written straight to the socket, then the connection
/// closes (hyper never saw the head, so it has nothing to answer).
pub const BARE_LF_RESPONSE: &[u8] = b"HTTP/1.1 400 Bad Request\r\n\
content-type: application/json\r\n\
content-length: 98\r\n\
connection: close\r\n\
\r\n\
{\"error\":\"bad_request\",\"message\":\"request line or header ended by a bare LF; HTTP/1.1 needs CRLF\"}";

/// Longest header line kept for reading `Content-Length`/`Transfer-Encoding`; longer lines are
/// only scanned for their terminator.
const MAX_KEPT_LINE: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// In a request head (or before one).
    Head,
    /// Skipping this many body bytes.
    Body(u64),
    /// Not following the framing any more (chunked body, unframeable head).
    Off,
}

/// Follows one connection's incoming HTTP/1.1 bytes; see the module doc.
#[derive(Debug)]
pub struct BareLfGuard {
    state: State,
    /// The current line, up to [`MAX_KEPT_LINE`] bytes, without its CR.
    line: Vec<u8>,
    line_len: usize,
    prev_cr: bool,
    /// Lines of the current head so far (the request line included).
    lines: usize,
    content_length: Option<u64>,
    unframeable: bool,
}

impl Default for BareLfGuard {
    fn default() -> Self {
        BareLfGuard {
            state: State::Head,
            line: Vec::with_capacity(64),
            line_len: 0,
            prev_cr: false,
            lines: 0,
            content_length: None,
            unframeable: false,
        }
    }
}

impl BareLfGuard {
    /// Whether there is anything left to watch on this connection.
    pub fn active(&self) -> bool {
        self.state != State::Off
    }

    /// Feeds bytes as they are read. `Err(())` at the first bare LF in a request head.
    #[allow(clippy::result_unit_err)]
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), ()> {
        while !bytes.is_empty() {
            match self.state {
                State::Off => return Ok(()),
                State::Body(left) => {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(bytes.len());
                    bytes = &bytes[n..];
                    let left = left - n as u64;
                    self.state = if left == 0 { State::Head } else { State::Body(left) };
                }
                State::Head => {
                    let b = bytes[0];
                    bytes = &bytes[1..];
                    if b == b'\n' {
                        if !self.prev_cr {
                            return Err(());
                        }
                        self.end_line();
                    } else {
                        if self.prev_cr {
                            // The CR was part of the line, not its end (hyper refuses bare CR).
                            self.keep(b'\r');
                        }
                        self.prev_cr = b == b'\r';
                        if !self.prev_cr {
                            self.keep(b);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn keep(&mut self, b: u8) {
        self.line_len += 1;
        if self.line.len() < MAX_KEPT_LINE {
            self.line.push(b);
        }
    }

    fn end_line(&mut self) {
        let empty = self.line_len == 0;
        if !empty && self.lines > 0 {
            self.header_line();
        }
        if !empty {
            self.lines += 1;
        }
        self.line.clear();
        self.line_len = 0;
        self.prev_cr = false;
        // An empty line before any request line is ignorable (RFC 9112 §2.2); after one, it ends
        // the head.
        if empty && self.lines > 0 {
            self.state = match (self.unframeable, self.content_length) {
                (true, _) => State::Off,
                (false, Some(n)) if n > 0 => State::Body(n),
                (false, _) => State::Head,
            };
            self.lines = 0;
            self.content_length = None;
            self.unframeable = false;
        }
    }

    /// Notes the framing headers of the current head.
    fn header_line(&mut self) {
        if self.line_len > self.line.len() {
            // Cut short: only a problem if it is one of ours.
            if starts_with_name(&self.line, b"content-length") || starts_with_name(&self.line, b"transfer-encoding") {
                self.unframeable = true;
            }
            return;
        }
        let Some(colon) = self.line.iter().position(|&b| b == b':') else {
            return;
        };
        let (name, value) = (&self.line[..colon], self.line[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            self.unframeable = true;
        } else if name.eq_ignore_ascii_case(b"content-length") {
            let parsed = std::str::from_utf8(value).ok().and_then(|v| v.parse::<u64>().ok());
            match (parsed, self.content_length) {
                (Some(n), None) => self.content_length = Some(n),
                (Some(n), Some(m)) if n == m => {}
                _ => self.unframeable = true,
            }
        }
    }
}

fn starts_with_name(line: &[u8], name: &[u8]) -> bool {
    line.len() >= name.len() && line[..name.len()].eq_ignore_ascii_case(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(chunks: &[&[u8]]) -> Result<(), ()> {
        let mut g = BareLfGuard::default();
        chunks.iter().try_for_each(|c| g.feed(c))
    }

    #[test]
    fn the_canned_response_declares_its_length() {
        let text = std::str::from_utf8(BARE_LF_RESPONSE).unwrap();
        let (_, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(text.contains(&format!("content-length: {}\r\n", body.len())), "{text}");
        serde_json::from_str::<serde_json::Value>(body).unwrap();
    }

    #[test]
    fn crlf_heads_pass_in_any_split() {
        let req = b"\r\nGET / HTTP/1.1\r\nHost: a\r\nX: y\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n";
        for cut in 0..req.len() {
            assert_eq!(feed_all(&[&req[..cut], &req[cut..]]), Ok(()), "cut at {cut}");
        }
    }

    #[test]
    fn a_bare_lf_anywhere_in_a_head_is_found_in_any_split() {
        for req in [
            &b"GET / HTTP/1.1\nHost: a\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: a\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nX: b\n\r\n",
        ] {
            for cut in 0..req.len() {
                assert_eq!(feed_all(&[&req[..cut], &req[cut..]]), Err(()), "{req:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn content_length_bodies_are_skipped_and_the_next_head_is_checked() {
        let ok = b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\na\n\nb\nGET / HTTP/1.1\r\n\r\n";
        assert_eq!(feed_all(&[ok]), Ok(()));
        let bad = b"POST / HTTP/1.1\r\ncontent-length:  3 \r\n\r\n\n\n\nGET / HTTP/1.1\n\n";
        assert_eq!(feed_all(&[bad]), Err(()));
    }

    #[test]
    fn a_chunked_body_turns_the_guard_off() {
        let mut g = BareLfGuard::default();
        let req = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\na\nb\r\n0\r\n\r\n";
        assert_eq!(g.feed(req), Ok(()));
        assert!(!g.active());
        assert_eq!(g.feed(b"GET / HTTP/1.1\n\n"), Ok(()), "no longer followed");
    }

    #[test]
    fn conflicting_lengths_turn_the_guard_off() {
        let mut g = BareLfGuard::default();
        assert_eq!(
            g.feed(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            Ok(())
        );
        assert!(!g.active());
    }
}
