//! Failure answers and client-side limits: 502 / 504 / 431 / 413, the slowloris guard, and the
//! idle keep-alive that must outlive the header read timeout.

mod common;

use std::time::Duration;

use common::body::Generated;
use common::client::{self, get, raw_exchange, read_response, wait_closed};
use common::{AgentBuilder, ConfigText, FakeUpstream, Wire, DEADLINE};
use http::{Method, StatusCode};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_upstream_answers_502_json() {
    // A port that was just free: nothing listens there.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let agent = AgentBuilder::new()
        .start(&ConfigText::new().host("down.test", &format!("http://{closed}")))
        .await;
    let r = get(agent.proxy_addr(), "down.test", "/", &[]).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(r.json()["error"], "upstream_unreachable");
    agent
        .wait_for_log(&["upstream request failed", "route=down.test"], DEADLINE)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_answers_504_after_the_timeout() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let config = ConfigText::new()
        .proxy("upstream_timeout = \"400ms\"")
        .host("global.test", &up.url())
        .raw(&format!(
            "[[route]]\nhostnames = [\"route.test\"]\nupstream = \"{}\"\ntimeout = \"300ms\"\n",
            up.url()
        ));
    let agent = AgentBuilder::new().start(&config).await;
    for host in ["global.test", "route.test"] {
        let started = tokio::time::Instant::now();
        let r = get(agent.proxy_addr(), host, "/?delay_ms=5000", &[]).await;
        let took = started.elapsed();
        assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT, "{host}: {}", r.text());
        assert_eq!(r.json()["error"], "upstream_timeout");
        assert!(took >= Duration::from_millis(300), "{host}: answered after {took:?}");
        assert!(took < Duration::from_millis(4500), "{host}: answered after {took:?}");
    }
    // A fast answer on the same routes is unaffected.
    assert_eq!(
        get(agent.proxy_addr(), "route.test", "/", &[]).await.status,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_head_gets_431() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let agent = AgentBuilder::new()
        .start(
            &ConfigText::new()
                .proxy("max_header_bytes = 8192")
                .host("app.test", &up.url()),
        )
        .await;
    let big = "a".repeat(20 * 1024);
    let request = format!("GET / HTTP/1.1\r\nHost: app.test\r\nX-Big: {big}\r\nConnection: close\r\n\r\n");
    let r = raw_exchange(agent.proxy_addr(), request.as_bytes()).await;
    assert_eq!(r.status, 431);
    assert_eq!(up.requests(), 0);
    // Just under the limit is fine.
    let fits = "b".repeat(6 * 1024);
    assert_eq!(
        get(agent.proxy_addr(), "app.test", "/", &[("x-fits", &fits)])
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_the_limit_gets_413() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let agent = AgentBuilder::new()
        .start(
            &ConfigText::new()
                .proxy("max_body_bytes = 65536")
                .host("app.test", &up.url()),
        )
        .await;
    let addr = agent.proxy_addr();

    // Declared too large: refused from the head alone, without reading the body or going
    // upstream.
    let head = b"POST /sink HTTP/1.1\r\nHost: app.test\r\nContent-Length: 1000000\r\n\r\n";
    let r = raw_exchange(addr, head).await;
    assert_eq!(r.status, 413);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&r.body).expect("JSON")["error"],
        "body_too_large"
    );
    assert_eq!(up.requests(), 0);

    // Chunked: no length up front, so the limit is enforced as the body streams. The client
    // keeps writing while it reads, as cloudflared does; the answer may come before the body
    // is finished, and the connection may close under the writer.
    let mut conn = TcpStream::connect(addr).await.expect("connect");
    let (mut rd, mut wr) = conn.split();
    let write = async {
        wr.write_all(b"POST /sink HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await?;
        let chunk = vec![b'x'; 8192];
        for _ in 0..25 {
            wr.write_all(format!("{:x}\r\n", chunk.len()).as_bytes()).await?;
            wr.write_all(&chunk).await?;
            wr.write_all(b"\r\n").await?;
        }
        wr.write_all(b"0\r\n\r\n").await?;
        std::io::Result::Ok(())
    };
    let read = async {
        let mut buf = Vec::new();
        tokio::time::timeout(DEADLINE, read_response(&mut rd, &mut buf)).await
    };
    let (_, response) = tokio::join!(tokio::time::timeout(DEADLINE, write), read);
    let r = response
        .expect("answered in time")
        .expect("read the answer")
        .expect("an answer, not a bare close");
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&r.body).expect("JSON")["error"],
        "body_too_large"
    );
    assert!(up.sink_bytes() <= 65536, "upstream got {} bytes", up.sink_bytes());

    // At the limit: passes.
    let req = client::request(Method::POST, "app.test", "/sink")
        .body(Generated::new(65536, 8192, false).boxed_any())
        .expect("request");
    let r = client::send(addr, req).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["bytes"], 65536);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_client_is_disconnected_after_header_read_timeout() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let agent = AgentBuilder::new()
        .start(
            &ConfigText::new()
                .proxy("header_read_timeout = \"500ms\"")
                .host("app.test", &up.url()),
        )
        .await;

    // A head that starts and stalls.
    let mut stalled = TcpStream::connect(agent.proxy_addr()).await.expect("connect");
    stalled.write_all(b"GET / HTTP/1.1\r\nHost: app").await.expect("write");
    let took = wait_closed(&mut stalled, DEADLINE).await;
    assert!(took >= Duration::from_millis(400), "closed after only {took:?}");

    // A head that trickles a byte every 100 ms: each byte is progress, but the deadline runs
    // from the first one.
    let mut trickle = TcpStream::connect(agent.proxy_addr()).await.expect("connect");
    let started = tokio::time::Instant::now();
    let head = b"GET / HTTP/1.1\r\nHost: app.test\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut closed = false;
    for b in head.iter() {
        if trickle.write_all(&[*b]).await.is_err() {
            closed = true;
            break;
        }
        let mut probe = [0u8; 1];
        // Reading doubles as the pacing: a closed connection reads as EOF at once.
        match tokio::time::timeout(
            Duration::from_millis(100),
            tokio::io::AsyncReadExt::read(&mut trickle, &mut probe),
        )
        .await
        {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(_)) => panic!("the trickling client got a response"),
            Err(_) => {}
        }
    }
    assert!(closed, "trickled head completed: slowloris not stopped");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(up.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_outlives_header_read_timeout() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let agent = AgentBuilder::new()
        .start(
            &ConfigText::new()
                .proxy("header_read_timeout = \"300ms\"")
                .host("app.test", &up.url()),
        )
        .await;
    let mut conn = TcpStream::connect(agent.proxy_addr()).await.expect("connect");
    let mut buf = Vec::new();
    let request = b"GET /one HTTP/1.1\r\nHost: app.test\r\n\r\n";
    conn.write_all(request).await.expect("write");
    let first = read_response(&mut conn, &mut buf)
        .await
        .expect("read")
        .expect("response");
    assert_eq!(first.status, 200);

    // cloudflared keeps pooled origin connections idle for up to 90 s; the 300 ms head
    // timeout must not apply while no request has started.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // A response that takes longer than the head timeout is fine too: the head was complete.
    conn.write_all(b"GET /two?delay_ms=800 HTTP/1.1\r\nHost: app.test\r\n\r\n")
        .await
        .expect("write on the idle connection");
    let second = tokio::time::timeout(DEADLINE, read_response(&mut conn, &mut buf))
        .await
        .expect("in time")
        .expect("read")
        .expect("the idle keep-alive connection still serves");
    assert_eq!(second.status, 200, "{}", second.text());
    assert!(second.text().contains("/two"));
    assert_eq!(up.requests(), 2);
}

/// The SETTINGS the agent's HTTP/2 side announces, read off the wire after the client preface
/// (RFC 9113 §3.4, §6.5): `(identifier, value)` pairs.
async fn h2_server_settings(addr: std::net::SocketAddr) -> Vec<(u16, u32)> {
    use tokio::io::AsyncReadExt;
    let mut s = TcpStream::connect(addr).await.expect("connect");
    // Preface, then an empty SETTINGS frame (length 0, type 0x4, no flags, stream 0).
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .expect("write preface");
    let mut header = [0u8; 9];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut header))
        .await
        .expect("in time")
        .expect("frame header");
    assert_eq!(header[3], 0x4, "the server's first frame is SETTINGS");
    let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await.expect("settings payload");
    payload
        .chunks_exact(6)
        .map(|c| {
            (
                u16::from_be_bytes([c[0], c[1]]),
                u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_get_the_configured_header_limit() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let agent = AgentBuilder::new()
        .start(
            &ConfigText::new()
                .proxy("max_header_bytes = 32768")
                .host("app.test", &up.url()),
        )
        .await;
    let addr = agent.proxy_addr();
    // SETTINGS_MAX_HEADER_LIST_SIZE (0x6) is how HTTP/2 states the head limit.
    let settings = h2_server_settings(addr).await;
    assert!(settings.contains(&(0x6, 32768)), "announced settings: {settings:?}");

    // A 20 KiB header fits 32 KiB over either protocol.
    let big = "c".repeat(20 * 1024);
    assert_eq!(
        get(addr, "app.test", "/", &[("x-big", &big)]).await.status,
        StatusCode::OK
    );
    let req = http::Request::builder()
        .uri("http://app.test/")
        .header("x-big", &big)
        .body(common::body::empty())
        .expect("request");
    assert_eq!(client::send_h2(addr, req).await.status, StatusCode::OK);
}

/// A chunked request body that arrives in `chunks` pieces of `chunk_len` bytes, one every
/// `every`: a slow client (or a slow link behind cloudflared).
struct Trickle {
    left: u32,
    chunk: bytes::Bytes,
    every: Duration,
    sleep: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl http_body::Body for Trickle {
    type Data = bytes::Bytes;
    type Error = common::body::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        use std::future::Future;
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        let every = self.every;
        let sleep = self.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(every)));
        std::task::ready!(sleep.as_mut().poll(cx));
        self.sleep = None;
        self.left -= 1;
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(self.chunk.clone()))))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_is_not_an_upstream_timeout() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let agent = AgentBuilder::new()
        .start(
            &ConfigText::new()
                .proxy("upstream_timeout = \"1s\"")
                .host("app.test", &up.url()),
        )
        .await;
    // 3 s of steady upload against a 1 s upstream timeout: the upstream is receiving all the
    // while and answers as soon as the body ends.
    let body = Trickle {
        left: 30,
        chunk: bytes::Bytes::from(vec![b'u'; 32 * 1024]),
        every: Duration::from_millis(100),
        sleep: None,
    };
    let req = client::request(Method::POST, "app.test", "/sink")
        .body(http_body_util::BodyExt::boxed(body))
        .expect("request");
    let r = client::send(agent.proxy_addr(), req).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["bytes"], 30 * 32 * 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wedged_upstream_times_out_even_mid_upload() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let agent = AgentBuilder::new()
        .start(
            &ConfigText::new()
                .proxy("upstream_timeout = \"500ms\"")
                .host("app.test", &up.url()),
        )
        .await;
    // Far more than the socket buffers hold: the upload stalls once the upstream stops reading.
    let mut conn = TcpStream::connect(agent.proxy_addr()).await.expect("connect");
    let (mut rd, mut wr) = conn.split();
    let write = async {
        wr.write_all(b"POST /wedged HTTP/1.1\r\nHost: app.test\r\nContent-Length: 268435456\r\n\r\n")
            .await?;
        let chunk = vec![b'w'; 64 * 1024];
        for _ in 0..4096 {
            wr.write_all(&chunk).await?;
        }
        std::io::Result::Ok(())
    };
    let started = tokio::time::Instant::now();
    let read = async {
        let mut buf = Vec::new();
        tokio::time::timeout(DEADLINE, read_response(&mut rd, &mut buf)).await
    };
    // The writer either stalls (buffers full) or fails once the agent answers and closes.
    let write = async {
        if write.await.is_ok() {
            panic!("a wedged upstream swallowed 256 MiB");
        }
        std::future::pending::<()>().await
    };
    let response = tokio::select! {
        r = read => r,
        () = write => unreachable!(),
    };
    let r = response
        .expect("answered in time, not a hang")
        .expect("read")
        .expect("an answer");
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(started.elapsed() < Duration::from_secs(10));
}
