//! Clients towards the agent: hyper's own HTTP/1.1 and HTTP/2 clients (one fresh connection per
//! call, so each test controls exactly what goes on the wire), and a raw-socket HTTP/1.1
//! reader for the cases hyper would normalise away (repeated header lines, partial heads).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, Version};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;

use super::body::{self, AnyBody};
use super::DEADLINE;

/// A whole response: head, body and trailers.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.text()))
    }

    /// The JSON an echo upstream returns: what it received.
    pub fn echoed(&self) -> super::upstream::Echo {
        assert_eq!(self.status, StatusCode::OK, "echo request failed: {}", self.text());
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not an echo reply ({e}): {:?}", self.text()))
    }
}

/// A request builder for `host` + `path` in origin form, as HTTP/1.1 sends it.
pub fn request(method: Method, host: &str, path: &str) -> http::request::Builder {
    Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, host)
}

/// `GET path` with `Host: host` and extra headers, over a fresh HTTP/1.1 connection.
pub async fn get(addr: SocketAddr, host: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut b = request(Method::GET, host, path);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(addr, b.body(body::empty()).expect("request")).await
}

/// One request over a fresh HTTP/1.1 connection; panics on transport errors.
pub async fn send(addr: SocketAddr, req: Request<AnyBody>) -> Reply {
    try_send(addr, req)
        .await
        .unwrap_or_else(|e| panic!("HTTP/1.1 request to {addr} failed: {e}"))
}

pub async fn try_send(addr: SocketAddr, req: Request<AnyBody>) -> Result<Reply, String> {
    let work = async {
        let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let resp = sender.send_request(req).await.map_err(|e| chain(&e))?;
        collect(resp).await
    };
    tokio::time::timeout(DEADLINE, work)
        .await
        .map_err(|_| format!("no complete response within {DEADLINE:?}"))?
}

/// One request over a fresh HTTP/2 connection with prior knowledge (what cloudflared does
/// for an `http2Origin`). The request URI must be absolute (`:scheme`, `:authority`).
pub async fn send_h2(addr: SocketAddr, req: Request<AnyBody>) -> Reply {
    let work = async {
        let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let resp = sender.send_request(req).await.map_err(|e| chain(&e))?;
        collect(resp).await
    };
    tokio::time::timeout(DEADLINE, work)
        .await
        .unwrap_or_else(|_| Err(format!("no complete response within {DEADLINE:?}")))
        .unwrap_or_else(|e| panic!("HTTP/2 request to {addr} failed: {e}"))
}

async fn collect(resp: http::Response<hyper::body::Incoming>) -> Result<Reply, String> {
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.map_err(|e| chain(&e))?;
    let trailers = collected.trailers().cloned();
    Ok(Reply {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    })
}

/// An error with its whole cause chain, as the agent itself formats them.
pub use tunnel_agent::errors::error_chain as chain;

/// A response read off a raw socket.
#[derive(Debug)]
pub struct RawReply {
    pub status: u16,
    /// Header lines in wire order, names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads one HTTP/1.1 response from `stream`. `buf` carries bytes read past the end of the
/// response (the next response on a keep-alive connection); pass the same one each time.
/// `Ok(None)` when the peer closed before sending anything.
pub async fn read_response(
    stream: &mut (impl AsyncRead + Unpin),
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<RawReply>> {
    let head_end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i + 4;
        }
        if fill(stream, buf).await? == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed inside a response head",
            ));
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    buf.drain(..head_end);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut reply = RawReply {
        status,
        headers,
        body: Vec::new(),
    };
    if status == 101 || status == 204 || status == 304 {
        return Ok(Some(reply));
    }
    if reply
        .header("transfer-encoding")
        .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"))
    {
        loop {
            let line_end = loop {
                if let Some(i) = find(buf, b"\r\n") {
                    break i;
                }
                if fill(stream, buf).await? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
            };
            let size_text = String::from_utf8_lossy(&buf[..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .unwrap_or_else(|_| panic!("bad chunk size line {size_text:?}"));
            buf.drain(..line_end + 2);
            if size == 0 {
                // Trailer section, ended by an empty line.
                loop {
                    if let Some(i) = find(buf, b"\r\n") {
                        let empty = i == 0;
                        buf.drain(..i + 2);
                        if empty {
                            return Ok(Some(reply));
                        }
                        continue;
                    }
                    if fill(stream, buf).await? == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                }
            }
            while buf.len() < size + 2 {
                if fill(stream, buf).await? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
            }
            reply.body.extend_from_slice(&buf[..size]);
            buf.drain(..size + 2);
        }
    } else if let Some(len) = reply.header("content-length") {
        let len: usize = len.parse().expect("numeric content-length");
        while buf.len() < len {
            if fill(stream, buf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        reply.body = buf.drain(..len).collect();
    } else {
        while fill(stream, buf).await? > 0 {}
        reply.body = std::mem::take(buf);
    }
    Ok(Some(reply))
}

async fn fill(stream: &mut (impl AsyncRead + Unpin), buf: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut chunk = [0u8; 16 * 1024];
    let n = stream.read(&mut chunk).await?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Writes `request` on a fresh connection and reads one response, with a deadline.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> RawReply {
    use tokio::io::AsyncWriteExt;
    let work = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(request).await?;
        let mut buf = Vec::new();
        read_response(&mut s, &mut buf).await
    };
    match tokio::time::timeout(DEADLINE, work).await {
        Ok(Ok(Some(r))) => r,
        Ok(Ok(None)) => panic!("connection closed without a response"),
        Ok(Err(e)) => panic!("raw exchange failed: {e}"),
        Err(_) => panic!("no response within {DEADLINE:?}"),
    }
}

/// Waits until the peer closes `stream` (EOF or reset), returning how long that took.
/// Fails the test if it is still open after `within`.
pub async fn wait_closed(stream: &mut TcpStream, within: Duration) -> Duration {
    let start = tokio::time::Instant::now();
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(start + within, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed(),
            Ok(Ok(_)) => continue,
            Err(_) => panic!("connection still open after {within:?}"),
        }
    }
}
