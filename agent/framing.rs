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
//! connection reads (head; then a `Content-Length` body, skipped, or a chunked one, followed by
//! its chunk sizes; then the next head) and reports the first bare LF in a head. Body bytes are
//! never inspected; a chunk-size or trailer line may end in a bare LF (hyper's chunk decoder
//! decides those), as only the heads are where two readers would see different requests.
//! After a head it cannot frame (conflicting lengths, a coding other than chunked: hyper
//! refuses those and closes; both `Transfer-Encoding` and `Content-Length`: hyper reads the
//! chunked body, then closes) it stops for the rest of the connection. Which framing a head
//! has is decided as hyper decides it (`proto/h1/role.rs`): the last `Transfer-Encoding` line
//! says whether the body is chunked, so `Transfer-Encoding: gzip` then `Transfer-Encoding:
//! chunked` is a chunked body on a kept-alive connection, and the heads after it are checked.
//! fuzz/fuzz_targets/head_guard_httparse.rs holds the guard to that model.

/// The answer to a head with a bare LF: written straight to the socket, then the connection
/// closes (hyper never saw the head, so it has nothing to answer).
pub const BARE_LF_RESPONSE: &[u8] = b"HTTP/1.1 400 Bad Request\r\n\
content-type: application/json\r\n\
content-length: 98\r\n\
connection: close\r\n\
\r\n\
{\"error\":\"bad_request\",\"message\":\"request line or header ended by a bare LF; HTTP/1.1 needs CRLF\"}";

/// Longest header line kept; longer lines are only scanned for their terminator.
const MAX_KEPT_LINE: usize = 256;

/// Longest `Content-Length`/`Transfer-Encoding` line kept, so their framing is read as hyper
/// reads it (`Content-Length: 000…0005`, a long list of codings): longer than any head hyper
/// takes with `proxy.max_header_bytes` up to this size (it refuses a longer head, 431). Only
/// a client sending such a line makes a connection keep more than [`MAX_KEPT_LINE`].
const MAX_FRAMING_LINE: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// In a request head (or before one).
    Head,
    /// Skipping this many body bytes.
    Body(u64),
    /// In a chunk-size line (RFC 9112 §7.1): the size read so far, how many hex digits it had,
    /// and whether the digits are over (an extension or the CR follows, ignored).
    ChunkSize { size: u64, digits: u32, done: bool },
    /// Skipping this many bytes of chunk data.
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkDataEnd,
    /// The trailer section after the last chunk; `empty`: the current line has nothing yet, so
    /// its LF ends the body.
    Trailers { empty: bool },
    /// Not following the framing any more (an unframeable head).
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
    /// The head has a `Transfer-Encoding` line.
    transfer_encoding: bool,
    /// The last `Transfer-Encoding` line ends with `chunked`.
    chunked: bool,
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
            transfer_encoding: false,
            chunked: false,
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
                State::Body(left) | State::ChunkData(left) => {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(bytes.len());
                    bytes = &bytes[n..];
                    let left = left - n as u64;
                    self.state = match (&self.state, left) {
                        (State::Body(_), 0) => State::Head,
                        (State::Body(_), _) => State::Body(left),
                        (_, 0) => State::ChunkDataEnd,
                        (_, _) => State::ChunkData(left),
                    };
                }
                State::ChunkSize { size, digits, done } => {
                    let b = bytes[0];
                    bytes = &bytes[1..];
                    let hex = (b as char).to_digit(16);
                    self.state = match (b, hex) {
                        (b'\n', _) if digits == 0 => State::Off,
                        (b'\n', _) if size == 0 => State::Trailers { empty: true },
                        (b'\n', _) => State::ChunkData(size),
                        (_, Some(d)) if !done => match size.checked_mul(16) {
                            Some(s) => State::ChunkSize {
                                size: s + u64::from(d),
                                digits: digits + 1,
                                done,
                            },
                            // hyper refuses a size over u64 too.
                            None => State::Off,
                        },
                        _ => State::ChunkSize {
                            size,
                            digits,
                            done: true,
                        },
                    };
                }
                State::ChunkDataEnd => {
                    if bytes[0] == b'\n' {
                        self.state = State::ChunkSize {
                            size: 0,
                            digits: 0,
                            done: false,
                        };
                    }
                    bytes = &bytes[1..];
                }
                State::Trailers { empty } => {
                    let b = bytes[0];
                    bytes = &bytes[1..];
                    self.state = match b {
                        b'\n' if empty => State::Head,
                        b'\n' => State::Trailers { empty: true },
                        b'\r' => State::Trailers { empty },
                        _ => State::Trailers { empty: false },
                    };
                }
                State::Head => {
                    // Whole stretches between LFs at once: the head is most of what is read.
                    let (line, lf) = match memchr::memchr(b'\n', bytes) {
                        Some(i) => (&bytes[..i], Some(i)),
                        None => (bytes, None),
                    };
                    self.keep_stretch(line);
                    let Some(i) = lf else {
                        return Ok(());
                    };
                    if !self.prev_cr {
                        return Err(());
                    }
                    self.end_line();
                    bytes = &bytes[i + 1..];
                }
            }
        }
        Ok(())
    }

    /// Adds bytes of a head line that hold no LF. A CR is part of the line unless it is the last
    /// byte before the LF (hyper refuses a bare CR), so the last one waits in `prev_cr`.
    fn keep_stretch(&mut self, stretch: &[u8]) {
        let Some((&last, rest)) = stretch.split_last() else {
            return;
        };
        if self.prev_cr {
            self.keep(b"\r");
        }
        self.keep(rest);
        self.prev_cr = last == b'\r';
        if !self.prev_cr {
            self.keep(&[last]);
        }
    }

    fn keep(&mut self, bytes: &[u8]) {
        self.line_len += bytes.len();
        // Enough to see the header's name, then more if it is a framing one.
        let room = MAX_KEPT_LINE.saturating_sub(self.line.len());
        let (first, rest) = bytes.split_at(bytes.len().min(room));
        self.line.extend_from_slice(first);
        if !rest.is_empty() && is_framing_line(&self.line) {
            let room = MAX_FRAMING_LINE.saturating_sub(self.line.len());
            self.line.extend_from_slice(&rest[..rest.len().min(room)]);
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
            let te = self.transfer_encoding.then_some(self.chunked);
            self.state = match (self.unframeable, te, self.content_length) {
                (true, _, _) => State::Off,
                // Not chunked: hyper refuses it (RFC 9112 §6.3 says a server ought to).
                (false, Some(false), _) => State::Off,
                // Both: hyper reads the chunked body, then closes the connection.
                (false, Some(true), Some(_)) => State::Off,
                (false, Some(true), None) => State::ChunkSize {
                    size: 0,
                    digits: 0,
                    done: false,
                },
                (false, None, Some(n)) if n > 0 => State::Body(n),
                (false, None, _) => State::Head,
            };
            self.lines = 0;
            self.content_length = None;
            self.transfer_encoding = false;
            self.chunked = false;
            self.unframeable = false;
        }
    }

    /// Notes the framing headers of the current head.
    fn header_line(&mut self) {
        if self.line_len > self.line.len() {
            // Cut short: only a problem if it is one of ours.
            if is_framing_line(&self.line) {
                self.unframeable = true;
            }
            return;
        }
        let Some(colon) = self.line.iter().position(|&b| b == b':') else {
            return;
        };
        let (name, value) = (&self.line[..colon], self.line[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // Chunked must be the last coding (RFC 9112 §6.1). hyper looks at each line in
            // turn and keeps what the last one says: an earlier line naming another coding (or
            // `chunked` twice) does not stop it reading a chunked body and the next request.
            let last = value.rsplit(|&b| b == b',').next().unwrap_or(value).trim_ascii();
            self.transfer_encoding = true;
            self.chunked = last.eq_ignore_ascii_case(b"chunked");
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

fn is_framing_line(line: &[u8]) -> bool {
    starts_with_name(line, b"content-length") || starts_with_name(line, b"transfer-encoding")
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
    fn chunked_bodies_are_followed_and_the_next_head_is_checked_in_any_split() {
        // Chunk data with LFs and CRLFs in it, an extension, a multi-digit size, trailers.
        let data = b"\r\n\r\n\nGET / HTTP/1.1\nxxxxxxxxx\r\n";
        let body = &[
            &b"3;ext=1\r\na\nb\r\n"[..],
            format!("{:X}\r\n", data.len()).as_bytes(),
            data,
            b"\r\n0\r\nX-T: 1\r\n\r\n",
        ]
        .concat()[..];
        let head = b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n";
        let good = [&head[..], body, b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n"].concat();
        let bad = [&head[..], body, b"GET /2 HTTP/1.1\nHost: a\r\n\r\n"].concat();
        for cut in 0..good.len() {
            assert_eq!(feed_all(&[&good[..cut], &good[cut..]]), Ok(()), "cut at {cut}");
            assert_eq!(feed_all(&[&bad[..cut], &bad[cut..]]), Err(()), "cut at {cut}");
        }
        let mut g = BareLfGuard::default();
        assert_eq!(g.feed(&good), Ok(()));
        assert!(g.active(), "still following: {:?}", g.state);
        // The chunked body without trailers, then a bare-LF head.
        let req = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\na\nb\r\n0\r\n\r\nGET / HTTP/1.1\n\n";
        assert_eq!(feed_all(&[req]), Err(()));
    }

    #[test]
    fn chunked_framing_it_cannot_follow_turns_the_guard_off() {
        for req in [
            &b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n11111111111111111\r\n",
        ] {
            let mut g = BareLfGuard::default();
            assert_eq!(g.feed(req), Ok(()), "{req:?}");
            assert!(!g.active(), "{req:?}: {:?}", g.state);
        }
    }

    /// hyper frames a body by the last `Transfer-Encoding` line and keeps the connection: a
    /// bare-LF head after such a body must still be found (the guard used to stop at the first
    /// line that was not `chunked`, letting every later head through unchecked).
    #[test]
    fn the_last_transfer_encoding_line_decides_and_the_next_head_is_checked() {
        for te in [
            &b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n"[..],
            b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            b"Transfer-Encoding: cmunked\r\ntransfer-encoding: gzip, CHUNKED\r\n",
        ] {
            let head = [
                &b"POST / HTTP/1.1\r\nHost: a\r\n"[..],
                te,
                b"\r\n3\r\na\nb\r\n0\r\n\r\n",
            ]
            .concat();
            let bad = [&head[..], b"GET /x HTTP/1.1\r\nHost: a\n\r\n"].concat();
            assert_eq!(feed_all(&[&bad]), Err(()), "{:?}", String::from_utf8_lossy(te));
            let good = [&head[..], b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"].concat();
            let mut g = BareLfGuard::default();
            assert_eq!(g.feed(&good), Ok(()));
            assert!(g.active(), "{:?}: {:?}", String::from_utf8_lossy(te), g.state);
        }
    }

    /// Framing lines longer than other kept lines are still read: a long list of codings or a
    /// zero-padded length frames a body hyper reads on a kept-alive connection.
    #[test]
    fn long_framing_lines_are_read_and_the_next_head_is_checked() {
        let codings = format!(
            "Transfer-Encoding: {}\r\nTransfer-Encoding: chunked\r\n",
            "\u{ff}".repeat(300)
        );
        let chunked = [codings.as_bytes(), b"\r\n0\r\n\r\n"].concat();
        let length = format!("Content-Length: {}3\r\n\r\na\nb", "0".repeat(400)).into_bytes();
        for framing in [chunked, length] {
            let head = [&b"POST / HTTP/1.1\r\nHost: a\r\n"[..], &framing].concat();
            let bad = [&head[..], b"GET /x HTTP/1.1\r\nHost: a\n\r\n"].concat();
            assert_eq!(feed_all(&[&bad]), Err(()), "{:?}", String::from_utf8_lossy(&framing));
        }
        // Past the framing limit, the guard stops (hyper refuses the head as too large).
        let huge = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}1\r\n\r\n",
            "0".repeat(MAX_FRAMING_LINE)
        );
        let mut g = BareLfGuard::default();
        assert_eq!(g.feed(huge.as_bytes()), Ok(()));
        assert!(!g.active());
        assert!(g.line.capacity() <= MAX_FRAMING_LINE * 2, "{}", g.line.capacity());
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
