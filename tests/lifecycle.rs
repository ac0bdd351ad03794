//! The agent's life under signals (SIGHUP reload, SIGTERM drain) and its upstream connection
//! pool.

mod common;

use std::time::Duration;

use common::body;
use common::client::{self, get};
use common::ws::{WsClient, OP_CLOSE, OP_TEXT};
use common::{eventually, AgentBuilder, ConfigText, FakeUpstream, Wire, DEADLINE};
use http::{Method, StatusCode};
use nix::sys::signal::Signal;

fn file_routes_config(routes_file: &std::path::Path) -> ConfigText {
    ConfigText::new()
        .routes("source = \"file\"")
        .routes(&format!("file = {routes_file:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_changed_routes_file() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let builder = AgentBuilder::new();
    let routes = builder.file("routes.json", &format!(r#"{{"a.test": "{}"}}"#, up.url()));
    let agent = builder.start(&file_routes_config(&routes)).await;
    let addr = agent.proxy_addr();
    assert_eq!(get(addr, "b.test", "/", &[]).await.status, StatusCode::NOT_FOUND);

    agent.write_file(
        "routes.json",
        &format!(r#"{{"a.test": "{0}", "b.test": "{0}/b"}}"#, up.url()),
    );
    agent.signal(Signal::SIGHUP);
    agent.wait_for_log(&["configuration reloaded"], DEADLINE).await;
    let echo = get(addr, "b.test", "/x", &[]).await.echoed();
    assert_eq!(echo.uri, "/b/x", "the new route, with its base path");
    assert_eq!(get(addr, "a.test", "/", &[]).await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_a_broken_file_keeps_the_old_table() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let builder = AgentBuilder::new();
    let routes = builder.file("routes.json", &format!(r#"{{"a.test": "{}"}}"#, up.url()));
    let config = file_routes_config(&routes);
    let agent = builder.start(&config).await;
    let addr = agent.proxy_addr();

    // A truncated routes file.
    agent.write_file("routes.json", &format!(r#"{{"a.test": "{}", "b.te"#, up.url()));
    agent.signal(Signal::SIGHUP);
    let line = agent.wait_for_log(&["reload rejected"], DEADLINE).await;
    assert!(line.contains("routes.json"), "the log names the file: {line}");
    assert!(line.contains("JSON"), "the log says what is wrong: {line}");
    assert_eq!(get(addr, "a.test", "/", &[]).await.status, StatusCode::OK);

    // A config file with a typo'd key.
    agent.rewrite_config(&config.clone().raw("[proxy2]\nx = 1"));
    agent.signal(Signal::SIGHUP);
    // toml's message spans several lines (it quotes the offending line): read the whole entry.
    let entry = eventually(DEADLINE, "a second rejected reload", || async {
        let text = agent.logs().join("\n");
        let mut parts = text.match_indices("reload rejected").skip(1);
        parts
            .next()
            .map(|(at, _)| text[at..].to_owned())
            .filter(|entry| entry.contains("proxy2"))
    })
    .await;
    assert!(entry.contains("agent.toml"), "the log names the file: {entry}");
    assert!(entry.contains("proxy2"), "the log names the key: {entry}");
    assert_eq!(get(addr, "a.test", "/", &[]).await.status, StatusCode::OK);
    let status = client::get(agent.health_addr(), "localhost", "/status", &[])
        .await
        .json();
    assert!(
        status["last_reload_error"]
            .as_str()
            .is_some_and(|e| e.contains("proxy2")),
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_exits_0() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let mut agent = AgentBuilder::new()
        .start(&ConfigText::new().host("app.test", &up.url()))
        .await;
    let addr = agent.proxy_addr();
    let health = agent.health_addr();
    assert_eq!(
        client::get(health, "localhost", "/ready", &[]).await.status,
        StatusCode::OK
    );

    // An idle keep-alive connection (as cloudflared keeps) must not hold up the exit.
    let mut idle = tokio::net::TcpStream::connect(addr).await.expect("connect");
    {
        use tokio::io::AsyncWriteExt;
        idle.write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
            .await
            .expect("write");
        let mut buf = Vec::new();
        let r = client::read_response(&mut idle, &mut buf)
            .await
            .expect("read")
            .expect("response");
        assert_eq!(r.status, 200);
    }

    let in_flight = tokio::spawn(async move {
        let req = client::request(Method::POST, "app.test", "/slow?delay_ms=1500")
            .body(body::full("payload"))
            .expect("request");
        client::try_send(addr, req).await
    });
    eventually(DEADLINE, "the slow request reaching the upstream", || async {
        (up.requests() == 2).then_some(())
    })
    .await;
    agent.signal(Signal::SIGTERM);

    // Readiness fails while the request drains: 503, or the health listener already gone.
    eventually(DEADLINE, "/ready to stop answering 200", || async {
        let req = client::request(Method::GET, "localhost", "/ready")
            .body(body::empty())
            .expect("request");
        match client::try_send(health, req).await {
            Ok(r) if r.status == StatusCode::OK => None,
            Ok(r) => {
                assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
                assert_eq!(r.json()["draining"], true);
                Some(())
            }
            Err(_) => Some(()),
        }
    })
    .await;
    // New connections are no longer accepted on the proxy port.
    eventually(DEADLINE, "the proxy listener to close", || async {
        tokio::net::TcpStream::connect(addr).await.is_err().then_some(())
    })
    .await;

    let reply = in_flight.await.expect("task").expect("the in-flight request completed");
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.echoed().body_len, 7);
    // Well inside the 10 s shutdown grace: nothing waits on the idle connection.
    let status = agent.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(0), "exit status {status}");
    agent.wait_for_log(&["proxy stopped", "drained=true"], DEADLINE).await;
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_http2_streams_too() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let mut agent = AgentBuilder::new()
        .start(&ConfigText::new().host("app.test", &up.url()))
        .await;
    let addr = agent.proxy_addr();
    let in_flight = tokio::spawn(async move {
        let req = http::Request::builder()
            .uri("http://app.test/slow?delay_ms=1000")
            .body(body::empty())
            .expect("request");
        client::send_h2(addr, req).await
    });
    eventually(DEADLINE, "the slow request reaching the upstream", || async {
        (up.requests() == 1).then_some(())
    })
    .await;
    agent.signal(Signal::SIGTERM);
    let reply = in_flight.await.expect("the HTTP/2 stream completed");
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(agent.wait_exit(DEADLINE).await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_gives_up_on_requests_after_the_grace() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let mut agent = AgentBuilder::new()
        .start(
            &ConfigText::new()
                .agent("shutdown_grace = \"1s\"")
                .host("app.test", &up.url()),
        )
        .await;
    let addr = agent.proxy_addr();
    let stuck = tokio::spawn(async move {
        let req = client::request(Method::GET, "app.test", "/?delay_ms=60000")
            .body(body::empty())
            .expect("request");
        client::try_send(addr, req).await
    });
    eventually(DEADLINE, "the stuck request reaching the upstream", || async {
        (up.requests() == 1).then_some(())
    })
    .await;
    let started = tokio::time::Instant::now();
    agent.signal(Signal::SIGTERM);
    let status = agent.wait_exit(DEADLINE).await;
    let took = started.elapsed();
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(
        took >= Duration::from_millis(900),
        "exited after {took:?}, before the grace"
    );
    assert!(took < Duration::from_secs(8), "exited after {took:?}");
    agent
        .wait_for_log(&["connections still open after the shutdown grace"], DEADLINE)
        .await;
    assert!(
        stuck.await.expect("task").is_err(),
        "the stuck request was cut, not answered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_open_websocket_finish() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let mut agent = AgentBuilder::new()
        .start(&ConfigText::new().host("ws.test", &up.url()))
        .await;
    let mut ws = WsClient::connect(agent.proxy_addr(), "ws.test", "/ws", &[]).await;
    assert_eq!(ws.handshake.status, 101);
    ws.send(OP_TEXT, b"before").await;
    assert_eq!(ws.recv().await.payload, b"before");

    agent.signal(Signal::SIGTERM);
    agent.wait_for_log(&["shutting down"], DEADLINE).await;
    // The session is a request in flight: it keeps working during the drain...
    ws.send(OP_TEXT, b"during the drain").await;
    assert_eq!(ws.recv().await.payload, b"during the drain");
    assert!(
        agent.logs().iter().all(|l| !l.contains("proxy stopped")),
        "drain ended with a session open"
    );
    // ...and the agent exits as soon as the client closes it, well inside the 10 s grace.
    ws.send(OP_CLOSE, &1000u16.to_be_bytes()).await;
    assert_eq!(ws.recv().await.opcode, OP_CLOSE);
    drop(ws);
    let status = agent.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(0));
    agent.wait_for_log(&["proxy stopped", "drained=true"], DEADLINE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_on_an_idle_agent_exits_0() {
    let mut agent = AgentBuilder::new().start(&ConfigText::new()).await;
    agent.signal(Signal::SIGINT);
    let status = agent.wait_exit(DEADLINE).await;
    assert_eq!(status.code(), Some(0), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_pooled() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let agent = AgentBuilder::new()
        .start(&ConfigText::new().host("app.test", &up.url()))
        .await;
    // Each request on its own downstream connection, even one asking to close it: the
    // upstream side is a separate hop with its own keep-alive.
    for i in 0..50 {
        let headers: &[(&str, &str)] = if i % 2 == 0 { &[("connection", "close")] } else { &[] };
        assert_eq!(
            get(agent.proxy_addr(), "app.test", "/", headers).await.status,
            StatusCode::OK
        );
    }
    eprintln!("50 sequential requests, {} upstream connections", up.connections());
    assert_eq!(up.requests(), 50);
    assert!(
        up.connections() <= 2,
        "50 sequential requests used {} upstream connections",
        up.connections()
    );
}
