//! Header hygiene in both directions (RFC 9110 §7.6.1 hop-by-hop fields), forwarding headers,
//! and the Host the upstream sees.

mod common;

use common::client::{self, get, raw_exchange};
use common::{AgentBuilder, ConfigText, FakeUpstream, Wire};
use http::StatusCode;

async fn echo_agent() -> (FakeUpstream, common::Agent) {
    let up = FakeUpstream::start(Wire::Http1).await;
    let agent = AgentBuilder::new()
        .start(&ConfigText::new().host("app.test", &up.url()))
        .await;
    (up, agent)
}

fn echo_of(raw: &client::RawReply) -> common::upstream::Echo {
    assert_eq!(raw.status, 200, "{}", raw.text());
    serde_json::from_slice(&raw.body).expect("echo JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_named_on_any_connection_line_are_not_forwarded() {
    let (_up, agent) = echo_agent().await;
    // Two separate Connection lines, as a sender may legally split them (RFC 9110 §5.3); a
    // proxy that reads only the first line forwards X-Second.
    let request = b"GET /conn HTTP/1.1\r\n\
        Host: app.test\r\n\
        Connection: X-First\r\n\
        X-First: 1\r\n\
        Connection: x-second, close\r\n\
        X-Second: 2\r\n\
        X-Kept: 3\r\n\
        \r\n";
    let echo = echo_of(&raw_exchange(agent.proxy_addr(), request).await);
    assert!(!echo.has("x-first"), "{:?}", echo.headers);
    assert!(
        !echo.has("x-second"),
        "second Connection line ignored: {:?}",
        echo.headers
    );
    assert!(!echo.has("connection") || echo.header("connection") == Some("keep-alive"));
    assert_eq!(echo.header("x-kept"), Some("3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_hop_by_hop_request_headers_are_not_forwarded() {
    let (_up, agent) = echo_agent().await;
    let request = b"GET / HTTP/1.1\r\n\
        Host: app.test\r\n\
        Keep-Alive: timeout=5\r\n\
        TE: deflate\r\n\
        Trailer: X-Checksum\r\n\
        Upgrade: h2c\r\n\
        Proxy-Authorization: Basic cHJveHk6cGFzcw==\r\n\
        Proxy-Connection: keep-alive\r\n\
        Proxy-Authenticate: Basic\r\n\
        X-Kept: yes\r\n\
        Connection: close\r\n\
        \r\n";
    let echo = echo_of(&raw_exchange(agent.proxy_addr(), request).await);
    for name in [
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
        "proxy-authenticate",
    ] {
        assert!(!echo.has(name), "{name} forwarded: {:?}", echo.headers);
    }
    assert_eq!(echo.header("x-kept"), Some("yes"));
}

/// h2c smuggling: an HTTP/1.1 upgrade to cleartext HTTP/2 (removed by RFC 9113) must reach the
/// upstream as a plain request, with nothing a lenient upstream could switch protocols on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upgrade_requests_are_forwarded_without_the_upgrade() {
    let (_up, agent) = echo_agent().await;
    let request = b"GET /smuggle HTTP/1.1\r\n\
        Host: app.test\r\n\
        Upgrade: h2c\r\n\
        HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\
        Connection: Upgrade, HTTP2-Settings\r\n\
        \r\n";
    let reply = raw_exchange(agent.proxy_addr(), request).await;
    let echo = echo_of(&reply);
    for name in ["upgrade", "http2-settings"] {
        assert!(!echo.has(name), "{name} forwarded: {:?}", echo.headers);
    }
    if let Some(c) = echo.header("connection") {
        assert!(!c.to_ascii_lowercase().contains("upgrade"), "connection: {c}");
    }
}

/// A request line or header ended by a bare LF: 400 and a closed connection, never a request
/// the upstream sees (a CRLF-only front would frame it differently, RFC 9112 §2.2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_with_bare_lf_line_ends_get_400_and_never_reach_the_upstream() {
    let (up, agent) = echo_agent().await;
    for request in [
        &b"GET /lf HTTP/1.1\nHost: app.test\r\n\r\n"[..],
        b"GET /lf HTTP/1.1\r\nHost: app.test\nX-Smuggled: 1\r\n\r\n",
        b"GET /lf HTTP/1.1\r\nHost: app.test\r\n\n",
    ] {
        let reply = raw_exchange(agent.proxy_addr(), request).await;
        assert_eq!(
            reply.status,
            400,
            "{:?}: {}",
            String::from_utf8_lossy(request),
            reply.text()
        );
        assert!(reply.text().contains("bare LF"), "{}", reply.text());
    }
    assert_eq!(up.requests(), 0, "a bare-LF request reached the upstream");

    // CRLF requests on one keep-alive connection, the first with a body full of bare LFs:
    // bodies are not heads, and the second request is still checked and served.
    let body = "a\nb\n\nc";
    let two = format!(
        "POST /body HTTP/1.1\r\nHost: app.test\r\nContent-Length: {}\r\n\r\n{body}\
         GET /second HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut s = tokio::net::TcpStream::connect(agent.proxy_addr()).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut s, two.as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    for path in ["/body", "/second"] {
        let r = client::read_response(&mut s, &mut buf)
            .await
            .unwrap()
            .expect("a response");
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert!(r.text().contains(path), "{path}: {}", r.text());
    }
    assert_eq!(up.requests(), 2);
}

/// The check goes on after a chunked request body: a bare-LF head that follows one on the same
/// keep-alive connection is refused too, while a CRLF one is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_lf_head_after_a_chunked_body_gets_400_too() {
    let (up, agent) = echo_agent().await;
    // Chunk data with bare LFs and a head-like line inside: data, not a head.
    let chunked = "POST /chunked HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n\
                   5\r\na\nb\nc\r\n12\r\nGET /x HTTP/1.1\n\n\n\r\n0\r\n\r\n";
    for (second, status) in [
        ("GET /second HTTP/1.1\nHost: app.test\r\nConnection: close\r\n\r\n", 400),
        (
            "GET /second HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n",
            200,
        ),
    ] {
        let mut s = tokio::net::TcpStream::connect(agent.proxy_addr()).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut s, chunked.as_bytes())
            .await
            .unwrap();
        let mut buf = Vec::new();
        let r = client::read_response(&mut s, &mut buf)
            .await
            .unwrap()
            .expect("a response");
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.text().contains("/chunked"), "{}", r.text());
        // Only once the first answer is in: the agent sees the second head on its own.
        tokio::io::AsyncWriteExt::write_all(&mut s, second.as_bytes())
            .await
            .unwrap();
        let r = client::read_response(&mut s, &mut buf)
            .await
            .unwrap()
            .expect("a response");
        assert_eq!(r.status, status, "{second:?}: {}", r.text());
        if status == 400 {
            assert!(r.text().contains("bare LF"), "{}", r.text());
        }
    }
    assert_eq!(
        up.requests(),
        3,
        "the chunked POSTs and the CRLF GET, never the bare-LF one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_response_headers_are_not_returned() {
    let (_up, agent) = echo_agent().await;
    let r = get(agent.proxy_addr(), "app.test", "/hop", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    for name in ["x-resp-hop", "keep-alive", "proxy-authenticate", "proxy-connection"] {
        assert!(!r.headers.contains_key(name), "{name} returned: {:?}", r.headers);
    }
    if let Some(c) = r.headers.get("connection") {
        assert!(!c.to_str().unwrap_or("").contains("x-resp-hop"), "{c:?}");
    }
    assert_eq!(r.headers["x-end-to-end"], "kept");
    assert_eq!(r.body, "hop");

    // HTTP/2 forbids connection-specific fields outright (RFC 9113 §8.2.2): an HTTP/2 client
    // (cloudflared's http2Origin) must get a clean response from the same HTTP/1.1 upstream.
    let req = http::Request::builder()
        .uri("http://app.test/hop")
        .body(common::body::empty())
        .expect("request");
    let r = client::send_h2(agent.proxy_addr(), req).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["x-end-to-end"], "kept");
    assert!(!r.headers.contains_key("x-resp-hop"), "{:?}", r.headers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_and_upstream_host() {
    let (up, agent) = echo_agent().await;
    let addr = agent.proxy_addr();

    let fresh = get(addr, "app.test", "/", &[]).await.echoed();
    assert_eq!(fresh.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(fresh.header("x-forwarded-proto"), Some("http"));
    let hosts = fresh.header_all("host");
    assert_eq!(
        hosts,
        vec![up.addr().to_string().as_str()],
        "the upstream sees its own host:port"
    );

    // cloudflared sets both; the client chain is kept and our peer appended, the scheme kept.
    let relayed = get(
        addr,
        "app.test",
        "/",
        &[("x-forwarded-for", "203.0.113.7"), ("x-forwarded-proto", "https")],
    )
    .await
    .echoed();
    assert_eq!(relayed.header("x-forwarded-for"), Some("203.0.113.7, 127.0.0.1"));
    assert_eq!(relayed.header("x-forwarded-proto"), Some("https"));

    // A chain split over two lines is one list (RFC 9110 §5.3): nothing of it may be lost.
    let request = b"GET / HTTP/1.1\r\n\
        Host: app.test\r\n\
        X-Forwarded-For: 198.51.100.1\r\n\
        X-Forwarded-For: 203.0.113.7\r\n\
        Connection: close\r\n\
        \r\n";
    let split = echo_of(&raw_exchange(addr, request).await);
    assert_eq!(
        split.header_all("x-forwarded-for").join(", "),
        "198.51.100.1, 203.0.113.7, 127.0.0.1"
    );
}
