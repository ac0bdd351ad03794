//! Protocols beyond plain request/response: WebSocket upgrade passthrough, HTTP/2 cleartext
//! upstreams with trailers, gRPC-Web over HTTP/1.1.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::body::{self, Frames};
use common::client::{self, send, send_h2};
use common::upstream::{grpc_web_frame, grpc_web_response_body};
use common::ws::{WsClient, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT};
use common::{AgentBuilder, ConfigText, FakeUpstream, Wire};
use http::{Method, Request, StatusCode, Version};

const TOKEN: &str = "ws-test-internal-token";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_passes_through() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let config = ConfigText::new()
        .internal_auth("TA_TOKEN")
        .proxy("header_read_timeout = \"500ms\"")
        .host("ws.test", &up.url());
    let agent = AgentBuilder::new().env("TA_TOKEN", TOKEN).start(&config).await;

    let mut ws = WsClient::connect(
        agent.proxy_addr(),
        "ws.test",
        "/ws",
        &[("X-Internal-Auth-Token", TOKEN)],
    )
    .await;
    assert_eq!(ws.handshake.status, 101, "{:?}", ws.handshake);
    assert_eq!(
        ws.handshake.header("upgrade").map(str::to_ascii_lowercase).as_deref(),
        Some("websocket")
    );

    ws.send(OP_TEXT, b"hello").await;
    assert_eq!(ws.recv().await.payload, b"hello");
    let big: Vec<u8> = (0..100_000u32).map(|i| (i % 256) as u8).collect();
    ws.send(OP_BINARY, &big).await;
    let echoed = ws.recv().await;
    assert_eq!((echoed.opcode, echoed.payload.len()), (OP_BINARY, big.len()));
    assert_eq!(echoed.payload, big);
    ws.send(OP_PING, b"p").await;
    let pong = ws.recv().await;
    assert_eq!((pong.opcode, pong.payload.as_slice()), (OP_PONG, &b"p"[..]));

    // A WebSocket is quiet for long stretches; the proxy's header_read_timeout (500 ms here)
    // guards request heads, not an upgraded connection.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    ws.send(OP_TEXT, b"still there?").await;
    assert_eq!(ws.recv().await.payload, b"still there?");

    ws.send(OP_CLOSE, &1000u16.to_be_bytes()).await;
    assert_eq!(ws.recv().await.opcode, OP_CLOSE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_needs_the_internal_token() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let config = ConfigText::new().internal_auth("TA_TOKEN").host("ws.test", &up.url());
    let agent = AgentBuilder::new().env("TA_TOKEN", TOKEN).start(&config).await;
    let ws = WsClient::connect(agent.proxy_addr(), "ws.test", "/ws", &[]).await;
    assert_eq!(ws.handshake.status, 401);
    assert_eq!(up.requests(), 0);
}

fn h2c_config(up: &FakeUpstream) -> ConfigText {
    ConfigText::new().raw(&format!(
        r#"
[[route]]
hostnames = ["grpc.test"]
upstream = "{}"
protocol = "h2c"
"#,
        up.url()
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upstream_trailers_reach_an_http2_client() {
    // The fake accepts only HTTP/2 with prior knowledge: an HTTP/1.1 request would fail.
    let up = FakeUpstream::start(Wire::H2c).await;
    let agent = AgentBuilder::new().start(&h2c_config(&up)).await;

    let req = Request::builder()
        .method(Method::POST)
        .uri("http://grpc.test/trailers")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body::full(grpc_web_frame(0, b"request")))
        .expect("request");
    let r = send_h2(agent.proxy_addr(), req).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.version, Version::HTTP_2);
    assert_eq!(r.body, "hello from h2c");
    let trailers = r.trailers.expect("trailers arrive");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "ok");
    assert_eq!(up.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_route_serves_http1_clients_too() {
    let up = FakeUpstream::start(Wire::H2c).await;
    let agent = AgentBuilder::new().start(&h2c_config(&up)).await;
    let echo = client::get(agent.proxy_addr(), "grpc.test", "/echo?q=1", &[])
        .await
        .echoed();
    assert_eq!(echo.version, "HTTP/2.0", "the upstream hop is HTTP/2");
    assert_eq!(echo.uri, "/echo?q=1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upstream_gets_the_client_host_as_authority_without_a_second_host() {
    let up = FakeUpstream::start(Wire::H2c).await;
    let config = h2c_config(&up).raw(&format!(
        r#"
[[route]]
hostnames = ["own-host.test"]
upstream = "{}"
protocol = "h2c"
host_header = "upstream"

[[route]]
hostnames = ["rewritten.test"]
upstream = "{}"
protocol = "h2c"
filters = [{{ type = "URLRewrite", url_rewrite = {{ hostname = "internal.example" }} }}]
"#,
        up.url(),
        up.url()
    ));
    let agent = AgentBuilder::new().start(&config).await;
    let up_authority = up.url().trim_start_matches("http://").to_owned();
    for (host, expected) in [
        ("grpc.test", "grpc.test"),
        ("grpc.test:8443", "grpc.test:8443"),
        ("own-host.test", up_authority.as_str()),
        ("rewritten.test", "internal.example"),
    ] {
        let echo = client::get(agent.proxy_addr(), host, "/echo", &[]).await.echoed();
        assert_eq!(echo.version, "HTTP/2.0");
        assert_eq!(echo.authority.as_deref(), Some(expected), "for Host {host}");
        // RFC 9113 §8.3.1: no `host` header that differs from `:authority` (none at all here).
        assert_eq!(echo.header("host"), None, "for Host {host}: {:?}", echo.headers);
    }
    assert_eq!(up.requests(), 4, "every request reached the one upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_web_over_http1_is_byte_exact() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let agent = AgentBuilder::new()
        .start(&ConfigText::new().host("grpcweb.test", &up.url()))
        .await;
    let message = b"\x0a\x05hello\x12\x03web";
    // The request body goes in two chunks split inside the frame header.
    let frame = grpc_web_frame(0, message);
    let req = client::request(Method::POST, "grpcweb.test", "/grpc-web")
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .header("accept", "application/grpc-web+proto")
        .body(Frames::new().data(frame.slice(..2)).data(frame.slice(2..)).boxed_any())
        .expect("request");
    let r = send(agent.proxy_addr(), req).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.headers["content-type"], "application/grpc-web+proto");
    assert_eq!(r.body, Bytes::from(grpc_web_response_body(message)));
    assert!(
        r.trailers.is_none(),
        "gRPC-Web carries trailers in the body, not in HTTP"
    );
}

/// What the gateway controller pushes for a GRPCRoute: `hasGrpcRoute`, an `Exact` path per
/// gRPC method (`/package.Service/Method`), a header match, and an h2c backend (appProtocol
/// `kubernetes.io/h2c`). The gRPC status must still arrive in HTTP/2 trailers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_route_pushed_by_the_controller_keeps_trailers_end_to_end() {
    let up = FakeUpstream::start(Wire::H2c).await;
    let cfg = ConfigText::new()
        .env_secret("config_token", "GRPC_PUSH_TOKEN")
        .routes("source = \"config-api\"")
        .raw("[config_api]\nlisten = \"127.0.0.1:0\"\nauth_secret = \"config_token\"\npersist = false\n");
    let agent = AgentBuilder::new()
        .env("GRPC_PUSH_TOKEN", "grpc-push")
        .start(&cfg)
        .await;
    let push = serde_json::json!({
        "version": 1,
        "hasGrpcRoute": true,
        "rules": [{
            "hostnames": ["grpc.test"],
            "matches": [{ "path": { "type": "Exact", "value": "/trailers" },
                          "headers": [{ "type": "Exact", "name": "x-tenant", "value": "a" }],
                          "queryParams": null }],
            "filters": null,
            "backends": [{ "url": up.url(), "weight": 1, "protocol": "h2c", "filters": null }],
        }],
    });
    let r = reqwest::Client::new()
        .put(format!("http://{}/config", agent.config_api_addr()))
        .bearer_auth("grpc-push")
        .json(&push)
        .send()
        .await
        .expect("config api answers");
    assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap_or_default());

    let grpc = |tenant: &'static str| {
        Request::builder()
            .method(Method::POST)
            .uri("http://grpc.test/trailers")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("x-tenant", tenant)
            .body(body::full(grpc_web_frame(0, b"request")))
            .expect("request")
    };
    let r = send_h2(agent.proxy_addr(), grpc("a")).await;
    assert_eq!((r.status, r.version), (StatusCode::OK, Version::HTTP_2), "{}", r.text());
    let trailers = r.trailers.expect("trailers arrive through the pushed route");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "ok");
    let r = send_h2(agent.proxy_addr(), grpc("b")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "the header match is part of the route");
}
