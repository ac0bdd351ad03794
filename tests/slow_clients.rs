//! Slow and idle clients cannot hold the proxy, through the real binary: a request body that
//! stops arriving, an upgraded connection with no traffic, an HTTP/2 connection with no
//! stream, and more connections than `proxy.max_connections`.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::client::{read_response, wait_closed};
use common::ws::WsClient;
use common::{AgentBuilder, ConfigText, FakeUpstream, Wire, DEADLINE};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Polls `cond` until it holds, failing the test after [`DEADLINE`].
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_that_stops_arriving_gets_408_and_frees_the_upstream() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let config = ConfigText::new()
        .proxy(r#"body_read_timeout = "1s""#)
        .host("slow.test", &up.url());
    let agent = AgentBuilder::new().start(&config).await;

    // One byte of ten, then silence.
    let mut s = TcpStream::connect(agent.proxy_addr()).await.expect("connect");
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: slow.test\r\nContent-Length: 10\r\n\r\na")
        .await
        .expect("send");
    let start = tokio::time::Instant::now();
    let mut buf = Vec::new();
    let reply = tokio::time::timeout(DEADLINE, read_response(&mut s, &mut buf))
        .await
        .expect("an answer, not a connection held for ever")
        .expect("read")
        .expect("a response");
    assert_eq!(reply.status, 408, "{}", reply.text());
    assert!(start.elapsed() >= Duration::from_millis(900), "{:?}", start.elapsed());
    assert!(reply.text().contains("body_read_timeout"), "{}", reply.text());
    // The upstream saw its request aborted: its connection is not held either.
    eventually("the upstream's request aborted", || {
        up.stats.body_errors.load(Ordering::SeqCst) == 1
    })
    .await;
    wait_closed(&mut s, DEADLINE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_keeps_moving_is_never_cut_however_slow() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let config = ConfigText::new()
        .proxy(r#"body_read_timeout = "1s""#)
        .host("slow.test", &up.url());
    let agent = AgentBuilder::new().start(&config).await;

    // A byte every 300 ms: 1.8 s in all, longer than the timeout, never silent for it.
    let mut s = TcpStream::connect(agent.proxy_addr()).await.expect("connect");
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: slow.test\r\nContent-Length: 6\r\n\r\n")
        .await
        .expect("send head");
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.write_all(b"x").await.expect("send a byte");
    }
    let mut buf = Vec::new();
    let reply = tokio::time::timeout(DEADLINE, read_response(&mut s, &mut buf))
        .await
        .expect("answered")
        .expect("read")
        .expect("a response");
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(up.stats.body_errors.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_connection_with_no_traffic_is_closed_on_both_sides() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let config = ConfigText::new()
        .proxy(r#"upgrade_idle_timeout = "1s""#)
        .host("ws.test", &up.url());
    let agent = AgentBuilder::new().start(&config).await;

    let mut ws = WsClient::connect(agent.proxy_addr(), "ws.test", "/ws", &[]).await;
    assert_eq!(ws.handshake.status, 101, "{}", ws.handshake.text());
    // Traffic keeps it open past the limit.
    for i in 0..4u8 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        ws.send(0x1, &[b'a' + i]).await;
        assert_eq!(ws.recv().await.payload, vec![b'a' + i]);
    }
    // Then silence: closed within about the limit.
    let took = wait_closed(&mut ws.stream, DEADLINE).await;
    assert!(took >= Duration::from_millis(900), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upgraded_connection_s_timeout_is_not_the_request_s() {
    // A WebSocket that talks is not cut by a short body timeout or head timeout either.
    let up = FakeUpstream::start(Wire::Http1).await;
    let config = ConfigText::new()
        .proxy(r#"body_read_timeout = "1s""#)
        .host("ws.test", &up.url());
    let agent = AgentBuilder::new().start(&config).await;
    let mut ws = WsClient::connect(agent.proxy_addr(), "ws.test", "/ws", &[]).await;
    assert_eq!(ws.handshake.status, 101, "{}", ws.handshake.text());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    ws.send(0x1, b"still here").await;
    assert_eq!(ws.recv().await.payload, b"still here".to_vec());
}

/// An HTTP/2 connection with prior knowledge (as cloudflared's `http2Origin` opens one); the
/// returned task ends when the agent closes the connection.
async fn h2_connect(
    addr: std::net::SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<common::body::AnyBody>,
    tokio::task::JoinHandle<()>,
) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("HTTP/2 handshake");
    (
        sender,
        tokio::spawn(async move {
            let _ = conn.await;
        }),
    )
}

fn h2_get(path: &str) -> http::Request<common::body::AnyBody> {
    common::client::request(http::Method::GET, "h2.test", path)
        .uri(format!("http://h2.test{path}"))
        .body(common::body::empty())
        .expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_with_no_stream_is_closed_after_the_idle_timeout() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let config = ConfigText::new()
        .proxy(r#"idle_timeout = "1s""#)
        .host("h2.test", &up.url());
    let agent = AgentBuilder::new().start(&config).await;

    let (mut sender, conn) = h2_connect(agent.proxy_addr()).await;
    // A stream open longer than the idle timeout is not idleness.
    let resp = tokio::time::timeout(DEADLINE, sender.send_request(h2_get("/?delay_ms=2500")))
        .await
        .expect("answered in time")
        .expect("a response over the open connection");
    assert_eq!(resp.status(), 200);
    drop(resp);
    // Then no stream at all: closed within two idle periods (GOAWAY, then the socket).
    let start = tokio::time::Instant::now();
    tokio::time::timeout(DEADLINE, conn)
        .await
        .expect("the idle HTTP/2 connection was closed")
        .expect("connection task");
    assert!(start.elapsed() >= Duration::from_millis(900), "{:?}", start.elapsed());
}

async fn metric(agent: &common::Agent, name: &str) -> Option<u64> {
    let text = reqwest::get(agent.health_url("/metrics"))
        .await
        .expect("/metrics answers")
        .text()
        .await
        .expect("/metrics body");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// A keep-alive HTTP/1.1 connection that has been served one request.
async fn served_connection(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: cap.test\r\n\r\n")
        .await
        .expect("send");
    let mut buf = Vec::new();
    let reply = tokio::time::timeout(DEADLINE, read_response(&mut s, &mut buf))
        .await
        .expect("answered")
        .expect("read")
        .expect("a response");
    assert_eq!(reply.status, 200, "{}", reply.text());
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_closed_at_once_and_counted() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let config = ConfigText::new()
        .proxy("max_connections = 2")
        .proxy("workers = 2")
        .host("cap.test", &up.url());
    let agent = AgentBuilder::new().start(&config).await;
    let addr = agent.proxy_addr();

    let first = served_connection(addr).await;
    let _second = served_connection(addr).await;
    // The third is accepted and closed without an answer, whichever worker takes it.
    for _ in 0..3 {
        let mut third = TcpStream::connect(addr).await.expect("connect");
        let _ = third.write_all(b"GET / HTTP/1.1\r\nHost: cap.test\r\n\r\n").await;
        let mut buf = Vec::new();
        let read = tokio::time::timeout(DEADLINE, read_response(&mut third, &mut buf))
            .await
            .expect("closed at once, not left waiting");
        assert!(!matches!(read, Ok(Some(_))), "over the cap, yet answered: {read:?}");
    }
    assert_eq!(metric(&agent, "tunnel_agent_proxy_connections").await, Some(2));
    assert_eq!(
        metric(&agent, "tunnel_agent_proxy_connections_refused_total").await,
        Some(3)
    );
    // A place freed is a place for the next one.
    drop(first);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while metric(&agent, "tunnel_agent_proxy_connections").await != Some(1) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the closed connection's place never freed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(served_connection(addr).await);
}
