//! The proxy's own HTTP/1.1 upstream pool against upstreams that close pooled connections: a
//! request is sent again only when it never left; one whose bytes reached the upstream is
//! answered 502, never repeated.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::body;
use common::client::{self, find, get};
use common::{AgentBuilder, ConfigText};
use http::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the upstream does with the `n`th request (from 0) on a connection, once it has read it
/// whole.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Then {
    /// `200 ok`, keep-alive.
    Answer,
    /// `200 ok`, then close the connection without saying so (no `Connection: close`), as an
    /// upstream with a short keep-alive timeout does.
    AnswerAndClose,
    /// Close without answering.
    Close,
}

/// A raw-socket HTTP/1.1 upstream that counts the requests it read and the connections it
/// accepted.
struct RawUpstream {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
    /// Connections accepted and not yet closed by either side.
    open: Arc<AtomicUsize>,
}

impl RawUpstream {
    async fn start(then: fn(usize) -> Then) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let (r, c, o) = (requests.clone(), connections.clone(), open.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                c.fetch_add(1, Ordering::SeqCst);
                o.fetch_add(1, Ordering::SeqCst);
                let (r, o) = (r.clone(), o.clone());
                tokio::spawn(async move {
                    serve(stream, then, r).await;
                    o.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        RawUpstream {
            addr,
            requests,
            connections,
            open,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

async fn serve(mut stream: TcpStream, then: fn(usize) -> Then, requests: Arc<AtomicUsize>) {
    let mut buf = Vec::new();
    for n in 0.. {
        // The head, then a Content-Length body (the tests send nothing chunked).
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse().unwrap());
        while buf.len() < head_end + len {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
            }
        }
        buf.drain(..head_end + len);
        requests.fetch_add(1, Ordering::SeqCst);
        let action = then(n);
        if action != Then::Close {
            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
            if stream.write_all(answer).await.is_err() {
                return;
            }
        }
        if action != Then::Answer {
            return;
        }
    }
}

fn one_worker(url: &str) -> ConfigText {
    // One worker, so every request goes through the same pool.
    ConfigText::new().host("app.test", url).proxy("workers = 1")
}

#[tokio::test]
async fn requests_on_connections_the_upstream_closed_are_never_lost_nor_repeated() {
    let up = RawUpstream::start(|_| Then::AnswerAndClose).await;
    let agent = AgentBuilder::new().start(&one_worker(&up.url())).await;
    // Each request finds the previous one's connection pooled but closed by the upstream:
    // either the pool sees it closed, or hyper hands the request back unsent; both go out on
    // a new connection.
    for i in 0..40 {
        let reply = get(agent.proxy_addr(), "app.test", "/", &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "request {i}: {}", reply.text());
        assert_eq!(reply.text(), "ok");
    }
    assert_eq!(up.requests(), 40, "each request reached the upstream exactly once");
    assert_eq!(up.connections(), 40);
}

#[tokio::test]
async fn a_request_whose_bytes_left_is_answered_502_not_sent_again() {
    // The first request on each connection is answered; the second is read and the connection
    // closed without an answer.
    let up = RawUpstream::start(|n| if n == 0 { Then::Answer } else { Then::Close }).await;
    let agent = AgentBuilder::new().start(&one_worker(&up.url())).await;
    assert_eq!(
        get(agent.proxy_addr(), "app.test", "/", &[]).await.status,
        StatusCode::OK
    );
    // This one goes out on the pooled connection, reaches the upstream, and gets no answer.
    let post = client::request(Method::POST, "app.test", "/orders")
        .header("content-length", "5")
        .body(body::full("hello"))
        .unwrap();
    let reply = client::send(agent.proxy_addr(), post).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
    assert_eq!(
        up.requests(),
        2,
        "the POST reached the upstream once and was not repeated"
    );
    assert_eq!(up.connections(), 1);

    // The same for an idempotent GET: its bytes left, so it is not repeated either.
    assert_eq!(
        get(agent.proxy_addr(), "app.test", "/", &[]).await.status,
        StatusCode::OK
    );
    let reply = get(agent.proxy_addr(), "app.test", "/again", &[]).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
    assert_eq!(up.requests(), 4);
    assert_eq!(up.connections(), 2);
}

#[tokio::test]
async fn idle_upstream_connections_are_reused_then_closed_after_pool_idle_timeout() {
    let up = RawUpstream::start(|_| Then::Answer).await;
    let config = one_worker(&up.url()).proxy("pool_idle_timeout = \"300ms\"");
    let agent = AgentBuilder::new().start(&config).await;
    for _ in 0..10 {
        assert_eq!(
            get(agent.proxy_addr(), "app.test", "/", &[]).await.status,
            StatusCode::OK
        );
    }
    assert_eq!(
        up.connections(),
        1,
        "ten sequential requests share one pooled connection"
    );
    // After the idle timeout the pool closes it (the upstream reads EOF); the next request
    // opens another.
    common::eventually(
        common::DEADLINE,
        "the idle upstream connection to be closed",
        || async { (up.open() == 0).then_some(()) },
    )
    .await;
    assert_eq!(
        get(agent.proxy_addr(), "app.test", "/", &[]).await.status,
        StatusCode::OK
    );
    assert_eq!(up.connections(), 2);
}
