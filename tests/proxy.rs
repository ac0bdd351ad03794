//! The proxy's front door: internal auth, host routing, `/healthz`.

mod common;

use common::client::{self, get};
use common::{AgentBuilder, ConfigText, FakeUpstream, Wire};
use http::StatusCode;

const INTERNAL_TOKEN: &str = "internal-7f3a9c1e-token";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_auth_header_gates_every_request() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let config = ConfigText::new()
        .internal_auth("TA_INTERNAL_TOKEN")
        .host("app.test", &up.url());
    let agent = AgentBuilder::new()
        .env("TA_INTERNAL_TOKEN", INTERNAL_TOKEN)
        .start(&config)
        .await;
    let addr = agent.proxy_addr();

    let missing = get(addr, "app.test", "/", &[]).await;
    assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
    assert_eq!(missing.json()["error"], "unauthorized");
    assert_eq!(missing.headers["content-type"], "application/json");

    let near_misses = [
        "",
        "internal-7f3a9c1e-toke",
        "internal-7f3a9c1e-tokenX",
        "INTERNAL-7F3A9C1E-TOKEN",
        "wrong",
    ];
    for wrong in near_misses {
        let r = get(addr, "app.test", "/", &[("x-internal-auth-token", wrong)]).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "token {wrong:?} must be refused");
    }
    assert_eq!(up.requests(), 0, "refused requests never reach the upstream");

    // Header names are case-insensitive on the wire.
    let ok = get(
        addr,
        "app.test",
        "/x?y=1",
        &[
            ("X-Internal-Auth-Token", INTERNAL_TOKEN),
            ("Authorization", "Bearer end-user-credential"),
        ],
    )
    .await;
    let echo = ok.echoed();
    assert_eq!(echo.uri, "/x?y=1");
    assert!(
        !echo.has("x-internal-auth-token"),
        "internal auth header forwarded: {:?}",
        echo.headers
    );
    assert!(
        !echo.has("authorization"),
        "incoming Authorization forwarded: {:?}",
        echo.headers
    );
    assert_eq!(up.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_auth_secret_no_header_is_needed() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let agent = AgentBuilder::new()
        .start(&ConfigText::new().host("app.test", &up.url()))
        .await;
    let r = get(
        agent.proxy_addr(),
        "app.test",
        "/open",
        &[
            ("authorization", "Basic dXNlcjpwYXNz"),
            ("x-internal-auth-token", "meant-for-this-hop"),
        ],
    )
    .await;
    let echo = r.echoed();
    assert_eq!(echo.uri, "/open");
    assert!(
        !echo.has("authorization"),
        "incoming Authorization forwarded: {:?}",
        echo.headers
    );
    assert!(
        !echo.has("x-internal-auth-token"),
        "the internal auth header is stripped even with auth off: {:?}",
        echo.headers
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_selects_the_route_ignoring_port_and_case() {
    let a = FakeUpstream::start(Wire::Http1).await;
    let b = FakeUpstream::start(Wire::Http1).await;
    let config = ConfigText::new()
        .host("a.example.test", &a.url())
        .host("b.example.test", &b.url());
    let agent = AgentBuilder::new().start(&config).await;
    let addr = agent.proxy_addr();

    for host in [
        "a.example.test",
        "A.Example.TEST:8443",
        "a.example.test:80",
        "a.example.test.",
    ] {
        let r = get(addr, host, "/", &[]).await;
        assert_eq!(r.status, StatusCode::OK, "Host {host:?}: {}", r.text());
    }
    assert_eq!(a.requests(), 4);
    get(addr, "B.EXAMPLE.test:1", "/", &[]).await.echoed();
    assert_eq!(b.requests(), 1);

    let unknown = get(addr, "c.example.test", "/", &[]).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(unknown.json()["error"], "no_route");
    assert_eq!(a.requests() + b.requests(), 5, "a 404 reaches no upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_healthz_answers_ok_without_auth_or_route() {
    let agent = AgentBuilder::new()
        .env("TA_INTERNAL_TOKEN", INTERNAL_TOKEN)
        .start(&ConfigText::new().internal_auth("TA_INTERNAL_TOKEN"))
        .await;
    let r = get(agent.proxy_addr(), "anything.test", "/healthz", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json(), serde_json::json!({"status": "ok"}));
    // The health port's own /healthz too.
    let h = client::get(agent.health_addr(), "localhost", "/healthz", &[]).await;
    assert_eq!(h.status, StatusCode::OK);
}
