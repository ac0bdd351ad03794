//! The request path through the real binary: matched and forwarded in its normalised form
//! (docs/routing.md, "Path normalisation"), so a rule cannot be walked around with a spelling
//! the upstream reads as the same path, and a rewrite cannot climb out of its prefix.

mod common;

use common::client::{raw_exchange, RawReply};
use common::upstream::Echo;
use common::{AgentBuilder, ConfigText, FakeUpstream, Wire};

/// `GET target` with `Host: app.test`, on a raw socket so the path arrives exactly as written.
async fn raw_get(agent: &common::Agent, target: &str) -> RawReply {
    let request = format!("GET {target} HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n");
    raw_exchange(agent.proxy_addr(), request.as_bytes()).await
}

fn echo_of(reply: &RawReply) -> Echo {
    assert_eq!(reply.status, 200, "{}", reply.text());
    serde_json::from_slice(&reply.body).expect("echo JSON")
}

/// `PathPrefix /admin` → a private backend, `PathPrefix /` → the app, as in issue 18.
async fn admin_and_app() -> (FakeUpstream, FakeUpstream, common::Agent) {
    let admin = FakeUpstream::start(Wire::Http1).await;
    let app = FakeUpstream::start(Wire::Http1).await;
    let routes = format!(
        r#"
[[route]]
name = "admin"
hostnames = ["app.test"]
upstream = "{admin}"
matches = [{{ path = {{ type = "PathPrefix", value = "/admin" }} }}]

[[route]]
name = "app"
hostnames = ["app.test"]
upstream = "{app}"

[[route]]
name = "static"
hostnames = ["static.test"]
upstream = "{app}"
matches = [{{ path = {{ type = "PathPrefix", value = "/static" }} }}]
filters = [{{ type = "URLRewrite", url_rewrite = {{ path = {{ type = "ReplacePrefixMatch", replace_prefix_match = "/public/static" }} }} }}]
"#,
        admin = admin.url(),
        app = app.url()
    );
    let agent = AgentBuilder::new().start(&ConfigText::new().raw(&routes)).await;
    (admin, app, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spellings_of_a_protected_path_reach_its_rule_in_normal_form() {
    let (admin, app, agent) = admin_and_app().await;
    for target in [
        "//admin/x",
        "/./admin/x",
        "/x/../admin/x",
        "/%61dmin/x",
        "/admin//x",
        "/%2e/admin/x",
    ] {
        let echo = echo_of(&raw_get(&agent, target).await);
        assert_eq!(echo.uri, "/admin/x", "{target} reached the upstream as {}", echo.uri);
    }
    assert_eq!(admin.requests(), 6, "every spelling went to the admin rule");
    assert_eq!(app.requests(), 0, "no spelling of /admin reached the app");

    // The query is not the path: kept byte for byte.
    let echo = echo_of(&raw_get(&agent, "/a/./b?next=/../admin&x=%2F").await);
    assert_eq!(echo.uri, "/a/b?next=/../admin&x=%2F");
    assert_eq!(app.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_that_cannot_be_normalised_safely_get_400_and_reach_no_upstream() {
    let (admin, app, agent) = admin_and_app().await;
    for target in [
        "/admin%2Fx",
        "/x%2fadmin",
        "/x%5Cadmin",
        "/x\\admin",
        "/x%00",
        "/x%0d%0a",
        "/x%zz",
        "/x%4",
        "/../admin/x",
        "/x/../../admin",
    ] {
        let reply = raw_get(&agent, target).await;
        assert_eq!(reply.status, 400, "{target}: {}", reply.text());
        let body: serde_json::Value = serde_json::from_slice(&reply.body).expect("JSON error");
        assert_eq!(body["error"], "bad_path", "{target}: {body}");
    }
    assert_eq!(admin.requests() + app.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_rewrite_never_resolves_outside_its_prefix() {
    let (_admin, app, agent) = admin_and_app().await;
    let request =
        |target: &str| format!("GET {target} HTTP/1.1\r\nHost: static.test\r\nConnection: close\r\n\r\n").into_bytes();
    // Spliced as text, this was /public/static/../../internal: /internal at the upstream.
    let reply = raw_exchange(agent.proxy_addr(), &request("/static/../../internal")).await;
    assert_eq!(reply.status, 400, "{}", reply.text());
    // Resolved first, it no longer matches /static at all.
    let reply = raw_exchange(agent.proxy_addr(), &request("/static/../internal")).await;
    assert_eq!(reply.status, 404, "{}", reply.text());
    assert_eq!(app.requests(), 0, "nothing outside /public/static reached the upstream");
    // Inside the prefix, the rewrite gets the resolved path.
    let reply = raw_exchange(agent.proxy_addr(), &request("/static/css/../img/%7Ea.png")).await;
    assert_eq!(echo_of(&reply).uri, "/public/static/img/~a.png");
}
