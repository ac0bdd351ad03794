//! Upstream identity tokens from the metadata server: header and audience, one fetch per
//! audience under a burst, serving through a metadata outage, 503 when there is no token,
//! background refresh.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::client::get;
use common::metadata::claims;
use common::{eventually, AgentBuilder, ConfigText, FakeMetadata, FakeUpstream, Fault, Wire, DEADLINE};
use http::StatusCode;

/// A config whose host-map routes all use identity tokens from `meta`.
fn token_config(meta: &FakeMetadata) -> ConfigText {
    ConfigText::new()
        .gcp(&format!("metadata_url = {:?}", meta.url()))
        .gcp("metadata_timeout = \"1s\"")
        .routes("upstream_auth = \"gcp-id-token\"")
        // The fake upstreams speak plain http; tokens to http:// are refused without it.
        .proxy("allow_id_tokens_over_http = true")
}

fn bearer_jwt(value: &str) -> &str {
    value
        .strip_prefix("Bearer ")
        .unwrap_or_else(|| panic!("not a bearer token: {value:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_receives_a_token_for_its_own_url() {
    let meta = FakeMetadata::start().await;
    let run = FakeUpstream::start(Wire::Http1).await;
    let serverless = FakeUpstream::start(Wire::Http1).await;
    let config = token_config(&meta).host("run.test", &run.url()).raw(&format!(
        r#"
[[route]]
hostnames = ["serverless.test"]
upstream = "{}"
upstream_auth = "gcp-id-token"
auth_header = "x-serverless-authorization"
"#,
        serverless.url()
    ));
    let agent = AgentBuilder::new().start(&config).await;
    let addr = agent.proxy_addr();

    let mut seen = Vec::new();
    for _ in 0..3 {
        let echo = get(addr, "run.test", "/", &[("authorization", "Bearer caller")])
            .await
            .echoed();
        let auth = echo.header_all("authorization");
        assert_eq!(auth.len(), 1, "exactly one Authorization line: {auth:?}");
        let jwt = bearer_jwt(auth[0]).to_owned();
        let c = claims(&jwt);
        assert_eq!(c["aud"], run.url(), "audience is the upstream URL");
        seen.push(jwt);
    }
    assert!(seen.windows(2).all(|w| w[0] == w[1]), "the cached token is reused");
    assert_eq!(meta.fetches(&run.url()), 1);

    let echo = get(addr, "serverless.test", "/", &[("authorization", "Bearer app-level")])
        .await
        .echoed();
    let token = echo
        .header("x-serverless-authorization")
        .expect("X-Serverless-Authorization set");
    assert_eq!(claims(bearer_jwt(token))["aud"], serverless.url());
    assert!(
        !echo.has("authorization"),
        "the caller's Authorization is never forwarded: {:?}",
        echo.headers
    );
    assert_eq!(meta.fetches(&serverless.url()), 1);
    assert_eq!(
        meta.refused(),
        0,
        "every metadata request carried Metadata-Flavor: Google"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_burst_fetches_one_token_per_audience() {
    let meta = FakeMetadata::start().await;
    // Slow enough that the whole burst is queued behind the first fetch.
    meta.set_delay(Duration::from_millis(500));
    let a = FakeUpstream::start(Wire::Http1).await;
    let b = FakeUpstream::start(Wire::Http1).await;
    let config = token_config(&meta)
        .gcp("metadata_timeout = \"10s\"")
        .host("a.test", &a.url())
        .host("b.test", &b.url());
    let agent = AgentBuilder::new().start(&config).await;
    let addr = agent.proxy_addr();

    let gate = Arc::new(tokio::sync::Barrier::new(500));
    let mut tasks = Vec::new();
    for i in 0..500 {
        let gate = gate.clone();
        let host = if i % 2 == 0 { "a.test" } else { "b.test" };
        tasks.push(tokio::spawn(async move {
            gate.wait().await;
            get(addr, host, "/", &[]).await.status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("request task"), StatusCode::OK);
    }
    assert_eq!(meta.fetches(&a.url()), 1, "one fetch for audience a");
    assert_eq!(meta.fetches(&b.url()), 1, "one fetch for audience b");
    assert_eq!(a.requests() + b.requests(), 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_outage_keeps_serving_the_cached_token() {
    let meta = FakeMetadata::start().await;
    // Refresh falls due about 2 s after the fetch, long before exp.
    meta.set_token_lifetime(Duration::from_secs(60));
    let up = FakeUpstream::start(Wire::Http1).await;
    let config = token_config(&meta)
        .gcp("id_token_refresh_margin = \"58s\"")
        .host("app.test", &up.url());
    let agent = AgentBuilder::new().start(&config).await;
    let addr = agent.proxy_addr();

    let first = get(addr, "app.test", "/", &[]).await.echoed();
    let token = first.header("authorization").expect("token").to_owned();
    meta.set_fault(Fault::ServerError);
    // The background refresh runs into the outage (and retries).
    eventually(DEADLINE, "a failed background refresh", || async {
        (meta.fetches(&up.url()) >= 2).then_some(())
    })
    .await;
    for _ in 0..5 {
        let echo = get(addr, "app.test", "/", &[]).await.echoed();
        assert_eq!(
            echo.header("authorization"),
            Some(token.as_str()),
            "still the cached token"
        );
    }
    agent
        .wait_for_log(&["identity token fetch failed", &up.url()], DEADLINE)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_usable_token_answers_503_and_recovers() {
    let meta = FakeMetadata::start().await;
    let up = FakeUpstream::start(Wire::Http1).await;
    // One audience per failure mode (a base path makes a distinct upstream URL), so each case
    // starts from a cold cache.
    let cases = [
        ("error.test", Fault::ServerError),
        ("hang.test", Fault::Hang),
        ("drop.test", Fault::Drop),
        ("impostor.test", Fault::NotGoogle),
    ];
    let mut config = token_config(&meta).gcp("metadata_timeout = \"500ms\"");
    for (host, _) in &cases {
        config = config.host(host, &format!("{}/{}", up.url(), host.trim_end_matches(".test")));
    }
    let agent = AgentBuilder::new().start(&config).await;
    let addr = agent.proxy_addr();

    for (host, fault) in cases {
        meta.set_fault(fault);
        let started = tokio::time::Instant::now();
        let r = get(addr, host, "/", &[]).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{fault:?}: {}", r.text());
        assert_eq!(r.headers["content-type"], "application/json");
        assert_eq!(r.json()["error"], "token_unavailable", "{fault:?}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{fault:?}: a failing metadata server must not hang the request"
        );
    }
    assert_eq!(up.requests(), 0, "no request went upstream without its token");

    meta.set_fault(Fault::None);
    eventually(
        DEADLINE,
        "requests succeed once the metadata server recovers",
        || async { (get(addr, "error.test", "/", &[]).await.status == StatusCode::OK).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_is_refreshed_in_the_background_before_expiry() {
    let meta = FakeMetadata::start().await;
    meta.set_token_lifetime(Duration::from_secs(60));
    let up = FakeUpstream::start(Wire::Http1).await;
    let config = token_config(&meta)
        .gcp("id_token_refresh_margin = \"58s\"")
        .host("app.test", &up.url());
    let agent = AgentBuilder::new().start(&config).await;
    let addr = agent.proxy_addr();

    let first = get(addr, "app.test", "/", &[]).await.echoed();
    let first_jwt = bearer_jwt(first.header("authorization").expect("token")).to_owned();
    assert_eq!(meta.fetches(&up.url()), 1);
    // No request is made while waiting: the refresh is the agent's own doing.
    eventually(DEADLINE, "a background refresh", || async {
        (meta.fetches(&up.url()) >= 2).then_some(())
    })
    .await;
    // The fake counts a fetch when it arrives; the agent swaps the token in when the answer
    // has been read. Requests keep being served (with the old token) in between.
    let jwt = eventually(DEADLINE, "the refreshed token in use", || async {
        let echo = get(addr, "app.test", "/", &[]).await.echoed();
        let jwt = bearer_jwt(echo.header("authorization").expect("token")).to_owned();
        (jwt != first_jwt).then_some(jwt)
    })
    .await;
    assert_eq!(claims(&jwt)["aud"], up.url());
    assert!(meta.issued()[1..].contains(&jwt), "a token issued by the refresh");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn margin_as_long_as_the_token_does_not_spin() {
    let meta = FakeMetadata::start().await;
    meta.set_token_lifetime(Duration::from_secs(300));
    let up = FakeUpstream::start(Wire::Http1).await;
    let config = token_config(&meta)
        .gcp("id_token_refresh_margin = \"300s\"")
        .host("app.test", &up.url());
    let agent = AgentBuilder::new().start(&config).await;
    get(agent.proxy_addr(), "app.test", "/", &[]).await.echoed();
    // A margin >= the token's life means "refresh at half-life" (150 s), not "refresh now,
    // again and again". Give a spinning refresher time to show itself.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(meta.fetches(&up.url()), 1, "refresh loop hammered the metadata server");
}
