//! What an internet client can make the proxy say or believe, through the real binary: the
//! opaque `null` origin under a credentialed CORS `*`, a forged `X-Forwarded-Proto`, a `Host`
//! a redirect would write into its `Location`, and the inside (upstream URLs, metadata server
//! errors) in an error body.

mod common;

use std::net::{IpAddr, SocketAddr, UdpSocket};

use common::client::{get, raw_exchange, RawReply};
use common::upstream::Echo;
use common::{AgentBuilder, ConfigText, FakeMetadata, FakeUpstream, Fault, Wire, DEADLINE};

fn echo_of(reply: &RawReply) -> Echo {
    assert_eq!(reply.status, 200, "{}", reply.text());
    serde_json::from_slice(&reply.body).expect("echo JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credentialed_wildcard_cors_policy_never_echoes_the_null_origin() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let routes = format!(
        r#"
[[route]]
hostnames = ["cors.test"]
upstream = "{}"
filters = [{{ type = "CORS", cors = {{ allow_origins = ["*"], allow_credentials = true, allow_methods = ["GET"] }} }}]
"#,
        up.url()
    );
    let agent = AgentBuilder::new().start(&ConfigText::new().raw(&routes)).await;
    let addr = agent.proxy_addr();
    let preflight = |origin: &str| {
        format!(
            "OPTIONS /data HTTP/1.1\r\nHost: cors.test\r\nOrigin: {origin}\r\n\
             Access-Control-Request-Method: GET\r\nConnection: close\r\n\r\n"
        )
    };
    // Any real origin is echoed, as Gateway API's CORS conformance wants.
    let reply = raw_exchange(addr, preflight("https://app.example").as_bytes()).await;
    assert_eq!(reply.status, 204);
    assert_eq!(reply.header("access-control-allow-origin"), Some("https://app.example"));
    assert_eq!(reply.header("access-control-allow-credentials"), Some("true"));
    // A sandboxed iframe, a data: or file: page sends `null`: any page can.
    let reply = raw_exchange(addr, preflight("null").as_bytes()).await;
    assert_eq!(reply.status, 204);
    assert_eq!(reply.header("access-control-allow-origin"), None, "{:?}", reply.headers);
    assert_eq!(reply.header("access-control-allow-credentials"), None);
    let reply = get(addr, "cors.test", "/data", &[("origin", "null")]).await;
    assert_eq!(reply.status, 200);
    assert!(
        !reply.headers.contains_key("access-control-allow-origin"),
        "{:?}",
        reply.headers
    );
    assert!(!reply.headers.contains_key("access-control-allow-credentials"));
}

/// A local address other than loopback that this host can reach itself on, or `None`.
fn non_loopback_address() -> Option<IpAddr> {
    // Connecting a UDP socket sends nothing; it only picks the source address of the route.
    let socket = UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.1:9").ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_proto_is_the_proxys_word_unless_the_local_cloudflared_relays_it() {
    let Some(ip) = non_loopback_address() else {
        eprintln!("skipped: this host has no non-loopback IPv4 address to connect from");
        return;
    };
    let up = FakeUpstream::start(Wire::Http1).await;
    let routes = format!(
        r#"
[[route]]
hostnames = ["app.test"]
upstream = "{}"

[[route]]
hostnames = ["old.test"]
filters = [{{ type = "RequestRedirect", request_redirect = {{ hostname = "new.test" }} }}]
"#,
        up.url()
    );
    let config = ConfigText::new().proxy("listen = \"0.0.0.0:0\"").raw(&routes);
    let agent = AgentBuilder::new().start(&config).await;
    let port = agent.proxy_addr().port();
    let request = |host: &str| {
        format!("GET /p HTTP/1.1\r\nHost: {host}\r\nX-Forwarded-Proto: https\r\nConnection: close\r\n\r\n")
    };
    // From another address: a client, not cloudflared. Its claim is replaced.
    let remote = SocketAddr::new(ip, port);
    let echo = echo_of(&raw_exchange(remote, request("app.test").as_bytes()).await);
    assert_eq!(echo.header_all("x-forwarded-proto"), vec!["http"]);
    let reply = raw_exchange(remote, request("old.test").as_bytes()).await;
    assert_eq!(reply.status, 302, "{}", reply.text());
    assert_eq!(reply.header("location"), Some("http://new.test/p"));
    // From loopback (where cloudflared runs), the edge's word is kept.
    let local = SocketAddr::from(([127, 0, 0, 1], port));
    let echo = echo_of(&raw_exchange(local, request("app.test").as_bytes()).await);
    assert_eq!(echo.header_all("x-forwarded-proto"), vec!["https"]);
    let reply = raw_exchange(local, request("old.test").as_bytes()).await;
    assert_eq!(reply.header("location"), Some("https://new.test/p"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_to_the_request_host_refuses_a_host_that_is_not_one() {
    let routes = r#"
[[route]]
name = "to-https"
filters = [{ type = "RequestRedirect", request_redirect = { scheme = "https", status_code = 301 } }]
"#;
    let agent = AgentBuilder::new().start(&ConfigText::new().raw(routes)).await;
    let addr = agent.proxy_addr();
    let request = |host: &str| format!("GET /p?q=1 HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let reply = raw_exchange(addr, request("app.example:8080").as_bytes()).await;
    assert_eq!(reply.status, 301, "{}", reply.text());
    assert_eq!(reply.header("location"), Some("https://app.example/p?q=1"));
    for host in ["user@evil.example", "evil.example/x", "evil.example?", "evil.example#"] {
        let reply = raw_exchange(addr, request(host).as_bytes()).await;
        assert_eq!(
            reply.status,
            400,
            "{host}: {:?} {}",
            reply.header("location"),
            reply.text()
        );
        assert_eq!(reply.header("location"), None);
        let body: serde_json::Value = serde_json::from_slice(&reply.body).expect("JSON");
        assert_eq!(body["error"], "bad_host");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_bodies_name_no_upstream_and_no_metadata_error() {
    let meta = FakeMetadata::start().await;
    meta.set_fault(Fault::ServerError);
    let up = FakeUpstream::start(Wire::Http1).await;
    let upstream = format!("{}/private-service", up.url());
    let config = ConfigText::new()
        .gcp(&format!("metadata_url = {:?}", meta.url()))
        .gcp("metadata_timeout = \"500ms\"")
        .routes("upstream_auth = \"gcp-id-token\"")
        .proxy("allow_id_tokens_over_http = true")
        .host("app.test", &upstream);
    let agent = AgentBuilder::new().start(&config).await;
    let reply = get(agent.proxy_addr(), "app.test", "/", &[]).await;
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(reply.json()["error"], "token_unavailable");
    let body = reply.text();
    let meta_addr = meta.url().trim_start_matches("http://").to_owned();
    let up_addr = up.addr().to_string();
    for inside in [
        up_addr.as_str(),
        "private-service",
        meta_addr.as_str(),
        "metadata",
        "500",
    ] {
        assert!(!body.contains(inside), "the body shows {inside:?}: {body}");
    }
    // The operator still learns why, from the log.
    agent.wait_for_log(&["no identity token", &upstream], DEADLINE).await;
}
