//! L7 routing against the real binary: matching and precedence, filters, weights, timeouts,
//! mirroring and the config API, through real HTTP to echo upstreams that report what they saw.
//!
//! The agent runs under the shared harness (tests/common: its process, directory and log); the
//! echo upstreams and the request helpers below are this file's own.

mod common;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::time::Instant;

const API_TOKEN: &str = "test-config-token";

/// An agent's directory (config, state and runtime dirs), kept across a restart.
struct TempDir(common::AgentBuilder);

impl TempDir {
    fn new() -> TempDir {
        TempDir(common::AgentBuilder::new())
    }
}

/// The agent binary, running with a generated config.
struct Agent {
    process: common::Agent,
    proxy: SocketAddr,
    health: SocketAddr,
    api: Option<SocketAddr>,
    client: reqwest::Client,
}

impl Agent {
    /// Starts the agent with `routes_toml` appended to a config that listens on ephemeral
    /// loopback ports and keeps its files in `dir`. With `api`, routes come from the config API.
    async fn start(dir: &TempDir, routes_toml: &str, api: bool) -> Agent {
        let builder = dir.0.clone();
        let dir = builder.dir().to_owned();
        let mut toml = format!(
            r#"
[agent]
runtime_dir = "{d}/run"
state_dir = "{d}/state"
shutdown_grace = "2s"
log_format = "text"
log_level = "info"

[proxy]
listen = "127.0.0.1:0"
upstream_timeout = "10s"

[health]
listen = "127.0.0.1:0"
"#,
            d = dir.display()
        );
        if api {
            toml.push_str(
                r#"
[secrets.config_token]
source = "env"
var = "L7_TEST_CONFIG_TOKEN"

[routes]
source = "config-api"

[config_api]
listen = "127.0.0.1:0"
auth_secret = "config_token"
"#,
            );
        }
        toml.push_str(routes_toml);
        let mut process = builder.env("L7_TEST_CONFIG_TOKEN", API_TOKEN).spawn(&toml);
        process.wait_ready().await;
        Agent {
            proxy: process.proxy_addr(),
            health: process.health_addr(),
            api: api.then(|| process.config_api_addr()),
            process,
            client: reqwest::Client::builder()
                .no_proxy()
                .redirect(reqwest::redirect::Policy::none())
                .pool_max_idle_per_host(16)
                .build()
                .unwrap(),
        }
    }

    /// `GET target` with `Host: host` through the proxy.
    async fn get(&self, host: &str, target: &str, headers: &[(&str, &str)]) -> Reply {
        let mut req = self
            .client
            .get(format!("http://{}{target}", self.proxy))
            .header("host", host);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        Reply::read(req.send().await.expect("proxy answers")).await
    }

    async fn post(&self, host: &str, target: &str, body: Vec<u8>) -> Reply {
        let req = self
            .client
            .post(format!("http://{}{target}", self.proxy))
            .header("host", host)
            .body(body);
        Reply::read(req.send().await.expect("proxy answers")).await
    }

    async fn put_config(&self, token: Option<&str>, content_type: &str, body: impl Into<reqwest::Body>) -> Reply {
        let mut req = self
            .client
            .put(format!("http://{}/config", self.api.expect("config api")))
            .header("content-type", content_type)
            .body(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        Reply::read(req.send().await.expect("config api answers")).await
    }

    async fn push(&self, config: &Value) -> Reply {
        self.put_config(Some(API_TOKEN), "application/json", config.to_string())
            .await
    }

    /// `GET /config`, with the bearer `PUT` takes (the peer requires it on both).
    async fn get_config(&self) -> Reply {
        let url = format!("http://{}/config", self.api.expect("config api"));
        Reply::read(
            self.client
                .get(url)
                .bearer_auth(API_TOKEN)
                .send()
                .await
                .expect("answers"),
        )
        .await
    }

    async fn get_url(&self, url: String) -> Reply {
        Reply::read(self.client.get(url).send().await.expect("answers")).await
    }

    /// Waits until no mirrored copy is waiting or being sent (`tunnel_agent_mirrors_in_flight`).
    async fn mirrors_settled(&self) {
        let url = format!("http://{}/metrics", self.health);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let metrics = self.get_url(url.clone()).await.body;
            if metrics.lines().any(|l| l == "tunnel_agent_mirrors_in_flight 0") {
                return;
            }
            assert!(Instant::now() < deadline, "mirrors still in flight:\n{metrics}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn log(&self) -> String {
        self.process.logs().join("\n")
    }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Reply {
    async fn read(resp: reqwest::Response) -> Reply {
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.text().await.unwrap_or_default();
        Reply { status, headers, body }
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Which echo upstream answered.
    fn upstream(&self) -> &str {
        self.header("x-upstream-id").unwrap_or("none")
    }
}

/// What an echo upstream received.
#[derive(Debug, Clone)]
struct Seen {
    target: String,
    headers: BTreeMap<String, Vec<String>>,
    body: Vec<u8>,
}

/// An HTTP/1.1 upstream that answers with a JSON description of the request it saw.
/// `/slow?ms=N` waits N ms before answering; `/stream` sends its head and a first chunk at
/// once and a second chunk 700 ms later.
struct Echo {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

/// A response body fed from a channel, to stream chunks with gaps.
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b))))
    }
}

type EchoBody = Either<Full<Bytes>, ChannelBody>;

async fn echo_reply(
    id: &'static str,
    seen: Arc<Mutex<Vec<Seen>>>,
    req: hyper::Request<Incoming>,
) -> hyper::Response<EchoBody> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in &parts.headers {
        headers
            .entry(k.as_str().to_owned())
            .or_default()
            .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    let target = parts.uri.path_and_query().map_or("/".to_owned(), |pq| pq.to_string());
    seen.lock().unwrap().push(Seen {
        target: target.clone(),
        headers: headers.clone(),
        body: body.to_vec(),
    });
    let builder = hyper::Response::builder()
        .header("x-upstream-id", id)
        .header("x-echo-resp", "yes");
    if parts.uri.path() == "/stream" {
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tokio::spawn(async move {
            let _ = tx.send(Bytes::from_static(b"first,")).await;
            tokio::time::sleep(Duration::from_millis(700)).await;
            let _ = tx.send(Bytes::from_static(b"second")).await;
        });
        return builder.body(Either::Right(ChannelBody(rx))).unwrap();
    }
    if parts.uri.path() == "/slow" {
        let ms = parts
            .uri
            .query()
            .and_then(|q| q.strip_prefix("ms="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let described = json!({
        "id": id,
        "method": parts.method.as_str(),
        "target": target,
        "headers": headers,
        "body_len": body.len(),
    });
    builder
        .header("content-type", "application/json")
        .body(Either::Left(Full::new(Bytes::from(described.to_string()))))
        .unwrap()
}

async fn echo(id: &'static str) -> Echo {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorded = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let seen = recorded.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let seen = seen.clone();
                    async move { Ok::<_, Infallible>(echo_reply(id, seen, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Echo { addr, seen }
}

/// Polls `check` until it returns true or `within` passes.
async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    check()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matching_precedence_and_filters_over_http() {
    let (a, b) = (echo("a").await, echo("b").await);
    let dir = TempDir::new();
    let agent = Agent::start(&dir,
        &format!(
            r#"
[[route]]
name = "a"
hostnames = ["app.example.com"]
upstream = "http://{a}"
matches = [{{ path = {{ type = "Exact", value = "/foo" }} }}, {{ path = {{ type = "PathPrefix", value = "/" }} }}]

[[route]]
name = "b"
hostnames = ["app.example.com"]
upstream = "http://{b}"
matches = [{{ path = {{ type = "PathPrefix", value = "/bar" }} }}]

[[route]]
name = "api-v2"
hostnames = ["app.example.com"]
upstream = "http://{b}"
matches = [{{ path = {{ type = "Exact", value = "/api/v2/health" }}, headers = [{{ name = "X-API-Version", value = "2" }}], method = "GET" }}]
filters = [{{ type = "ResponseHeaderModifier", response_header_modifier = {{ add = [{{ name = "X-Proxy", value = "cloudflare-tunnel-gateway" }}], remove = ["X-Echo-Resp"] }} }}]

[[route]]
name = "mods"
hostnames = ["mods.example.com"]
upstream = "http://{a}"
filters = [{{ type = "RequestHeaderModifier", request_header_modifier = {{ set = [{{ name = "X-Set", value = "set" }}], add = [{{ name = "x-add", value = "added" }}], remove = ["X-Remove"] }} }}]

[[route]]
name = "rewrite"
hostnames = ["*.rw.example.com"]
upstream = "http://{a}"
matches = [{{ path = {{ type = "PathPrefix", value = "/api/" }} }}]
filters = [{{ type = "URLRewrite", url_rewrite = {{ hostname = "internal.example.com", path = {{ type = "ReplacePrefixMatch", replace_prefix_match = "/v1" }} }} }}]

[[route]]
name = "redirect"
hostnames = ["old.example.com"]
matches = [{{ path = {{ type = "PathPrefix", value = "/old" }} }}]
filters = [{{ type = "RequestRedirect", request_redirect = {{ scheme = "https", hostname = "new.example.com", status_code = 301, path = {{ type = "ReplacePrefixMatch", replace_prefix_match = "/new" }} }} }}]

[[route]]
name = "regex"
hostnames = ["app.example.com"]
upstream = "http://{b}"
matches = [{{ path = {{ type = "RegularExpression", value = "/items/[0-9]+" }}, query_params = [{{ name = "view", value = "full" }}] }}]
"#,
            a = a.addr,
            b = b.addr
        ),
        false,
    ).await;
    let app = "app.example.com";
    // Per-match precedence: PathPrefix /bar beats rule a's PathPrefix /, Exact /foo beats both.
    assert_eq!(agent.get(app, "/bar/x", &[]).await.upstream(), "b");
    assert_eq!(agent.get(app, "/foo", &[]).await.upstream(), "a");
    assert_eq!(agent.get(app, "/barn", &[]).await.upstream(), "a");
    assert_eq!(agent.get("APP.example.com:8443", "/bar", &[]).await.upstream(), "b");
    // The Gateway API `advanced-routing` HTTPRoute example (docs/routing.md's worked example):
    // exact path + header + method, response header added.
    let r = agent.get(app, "/api/v2/health", &[("x-api-version", "2")]).await;
    assert_eq!((r.status, r.upstream()), (200, "b"));
    assert_eq!(r.header("x-proxy"), Some("cloudflare-tunnel-gateway"));
    assert_eq!(r.header("x-echo-resp"), None, "removed by the response modifier");
    let r = agent.get(app, "/api/v2/health", &[("x-api-version", "3")]).await;
    assert_eq!((r.upstream(), r.header("x-proxy")), ("a", None));
    // Regex path anchored, AND query condition.
    assert_eq!(agent.get(app, "/items/42?view=full", &[]).await.upstream(), "b");
    assert_eq!(agent.get(app, "/items/42x?view=full", &[]).await.upstream(), "a");
    assert_eq!(agent.get(app, "/items/42?view=short", &[]).await.upstream(), "a");
    // Unknown host: 404.
    assert_eq!(agent.get("nowhere.example.com", "/", &[]).await.status, 404);

    // Request header modifier: set replaces, add appends, remove removes (names any case).
    let r = agent
        .get(
            "mods.example.com",
            "/",
            &[("x-set", "client"), ("X-Add", "client"), ("x-remove", "1")],
        )
        .await;
    let seen = r.json();
    assert_eq!(seen["headers"]["x-set"], json!(["set"]));
    assert_eq!(seen["headers"]["x-add"], json!(["client", "added"]));
    assert!(seen["headers"].get("x-remove").is_none(), "{seen}");

    // URL rewrite: prefix replaced per the spec table, query kept, Host rewritten.
    let r = agent.get("tenant.rw.example.com", "/api/users/7?x=1", &[]).await;
    let seen = r.json();
    assert_eq!(seen["target"], "/v1/users/7?x=1");
    assert_eq!(seen["headers"]["host"], json!(["internal.example.com"]));
    assert_eq!(
        agent.get("rw.example.com", "/api/users", &[]).await.status,
        404,
        "wildcard never matches the apex"
    );

    // Redirect: 301, scheme/host/prefix replaced, query preserved, no backend contacted.
    let before = a.seen.lock().unwrap().len() + b.seen.lock().unwrap().len();
    let r = agent.get("old.example.com", "/old/page?q=1", &[]).await;
    assert_eq!(r.status, 301);
    assert_eq!(r.header("location"), Some("https://new.example.com/new/page?q=1"));
    assert_eq!(a.seen.lock().unwrap().len() + b.seen.lock().unwrap().len(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_backends_split_traffic_within_tolerance() {
    let (a, b, c) = (echo("a").await, echo("b").await, echo("c").await);
    let dir = TempDir::new();
    let agent = Agent::start(&dir,
        &format!(
            r#"
[[route]]
hostnames = ["w.example.com"]
backends = [
  {{ url = "http://{a}", weight = 80 }},
  {{ url = "http://{b}", weight = 20, filters = [{{ type = "RequestHeaderModifier", request_header_modifier = {{ set = [{{ name = "x-canary", value = "1" }}] }} }}] }},
  {{ url = "http://{c}", weight = 0 }},
]

[[route]]
hostnames = ["zero.example.com"]
backends = [{{ url = "http://{a}", weight = 0 }}, {{ url = "http://{b}", weight = 0 }}]
"#,
            a = a.addr,
            b = b.addr,
            c = c.addr
        ),
        false,
    ).await;
    const N: usize = 1000;
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..N {
        let r = agent.get("w.example.com", "/", &[]).await;
        assert_eq!(r.status, 200);
        *counts.entry(r.upstream().to_owned()).or_default() += 1;
    }
    // Binomial(1000, 0.8): sd ≈ 12.6; ±6 sd keeps a false failure below one in 10^8.
    let got_a = counts.get("a").copied().unwrap_or(0);
    assert!((800 - 76..=800 + 76).contains(&got_a), "{counts:?}");
    assert_eq!(counts.get("c"), None, "weight 0 gets nothing: {counts:?}");
    // Backend filters apply only to that backend's requests.
    assert!(a
        .seen
        .lock()
        .unwrap()
        .iter()
        .all(|s| !s.headers.contains_key("x-canary")));
    assert!(b.seen.lock().unwrap().iter().all(|s| s.headers["x-canary"] == ["1"]));
    let r = agent.get("zero.example.com", "/", &[]).await;
    assert_eq!(r.status, 500, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_answer_504_but_never_cut_a_streaming_response() {
    let a = echo("a").await;
    let dir = TempDir::new();
    let agent = Agent::start(
        &dir,
        &format!(
            r#"
[[route]]
hostnames = ["backend.example.com"]
upstream = "http://{a}"
timeouts = {{ request = "2s", backend_request = "300ms" }}

[[route]]
hostnames = ["request.example.com"]
upstream = "http://{a}"
timeouts = {{ request = "300ms" }}
"#,
            a = a.addr
        ),
        false,
    )
    .await;
    for host in ["backend.example.com", "request.example.com"] {
        let started = Instant::now();
        let r = agent.get(host, "/slow?ms=3000", &[]).await;
        assert_eq!(r.status, 504, "{host}: {}", r.body);
        assert!(
            started.elapsed() < Duration::from_millis(2500),
            "{host} took {:?}",
            started.elapsed()
        );
        let want = if host.starts_with("backend") {
            "upstream_timeout"
        } else {
            "request_timeout"
        };
        assert_eq!(r.json()["error"], want);
        assert_eq!(agent.get(host, "/slow?ms=10", &[]).await.status, 200);
        // Head after a few ms, last chunk after 700 ms: longer than either timeout, still whole.
        let r = agent.get(host, "/stream", &[]).await;
        assert_eq!((r.status, r.body.as_str()), (200, "first,second"), "{host}");
    }
}

/// A pushed table: `/x` → rule A; on even versions also `Exact /x/y` → rule B. Every response
/// says which rule and which table version produced it.
fn parity_table(version: u64, upstream: SocketAddr) -> Value {
    let rule = |name: &str, path: Value| {
        json!({
            "hostnames": ["push.example.com"],
            "matches": [{ "path": path }],
            "filters": [{ "type": "ResponseHeaderModifier", "responseHeaderModifier": {
                "set": [{ "name": "x-rule", "value": name }, { "name": "x-table", "value": version.to_string() }]
            }}],
            "backends": [{ "url": format!("http://{upstream}"), "weight": 1 }],
        })
    };
    let mut rules = vec![rule("A", json!({ "type": "PathPrefix", "value": "/x" }))];
    if version % 2 == 0 {
        rules.push(rule("B", json!({ "type": "Exact", "value": "/x/y" })));
    }
    json!({ "version": version, "rules": rules })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_api_auth_media_type_size_validation_versions_and_readiness() {
    let a = echo("a").await;
    let dir = TempDir::new();
    let agent = Agent::start(&dir, "", true).await;
    let api = agent.api.unwrap();
    let ready = format!("http://{}/ready", agent.health);

    // Nothing pushed yet: not ready, nothing routed. GET /config takes the bearer too.
    assert_eq!(agent.get_url(ready.clone()).await.status, 503);
    assert_eq!(agent.get_url(format!("http://{api}/config")).await.status, 401);
    assert_eq!(agent.get_config().await.json(), json!({ "version": 0, "ready": false }));
    assert_eq!(agent.get_url(format!("http://{api}/readyz")).await.status, 503);
    assert_eq!(agent.get("push.example.com", "/x", &[]).await.status, 404);

    let valid = parity_table(5, a.addr).to_string();
    assert_eq!(
        agent.put_config(None, "application/json", valid.clone()).await.status,
        401
    );
    let r = agent.put_config(Some("wrong"), "application/json", valid.clone()).await;
    assert_eq!((r.status, r.header("www-authenticate")), (401, Some("Bearer")));
    assert_eq!(
        agent
            .put_config(Some(API_TOKEN), "text/plain", valid.clone())
            .await
            .status,
        415
    );
    let huge = format!(r#"{{"version": 1, "rules": [], "pad": "{}"}}"#, "x".repeat(1 << 20));
    assert_eq!(
        agent.put_config(Some(API_TOKEN), "application/json", huge).await.status,
        413
    );

    // Invalid: every problem named, nothing applied.
    let r = agent
        .push(&json!({ "version": 9, "rules": [{
            "hostnames": ["push.example.com"],
            "matches": [{ "path": { "type": "RegularExpression", "value": "/(" }, "method": "FETCH" }],
            "backends": [{ "url": "ftp://x" }],
        }]}))
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
    let keys: Vec<String> = r.json()["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["key"].as_str().unwrap().to_owned())
        .collect();
    for want in [
        "rules[0].matches[0].path",
        "rules[0].matches[0].method",
        "rules[0].backends[0].url",
    ] {
        assert!(keys.iter().any(|k| k == want), "{want} missing from {keys:?}");
    }
    let r = agent
        .push(&json!({ "version": 9, "rules": [{ "backends": [{ "url": "http://x", "retries": {} }] }] }))
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["problems"][0]["key"],
        "rules[0].backends[0].retries",
        "{}",
        r.body
    );
    assert!(r.body.contains("unknown field `retries`"), "{}", r.body);
    let r = agent
        .push(&json!({ "version": 9, "rules": [{ "backends": [{ "url": "http://x", "weight": "heavy" }] }] }))
        .await;
    assert_eq!(
        r.json()["problems"][0]["key"],
        "rules[0].backends[0].weight",
        "{}",
        r.body
    );
    // An array is not a table, though serde's derive would read `[version, rules]` from one.
    let r = agent.put_config(Some(API_TOKEN), "application/json", "[99, []]").await;
    assert_eq!(
        (r.status, r.json()["problems"][0]["key"].as_str()),
        (400, Some("(body)"))
    );
    let r = agent.put_config(Some(API_TOKEN), "application/json", "{not json").await;
    assert_eq!(
        (r.status, r.json()["problems"][0]["key"].as_str()),
        (400, Some("(body)"))
    );
    assert_eq!(agent.get("push.example.com", "/x", &[]).await.status, 404);

    // Valid: applied, ready, routed.
    let r = agent
        .put_config(Some(API_TOKEN), "application/json; charset=utf-8", valid)
        .await;
    assert_eq!((r.status, r.json()), (200, json!({ "version": 5, "rules": 1 })));
    assert_eq!(agent.get_config().await.json(), json!({ "version": 5, "ready": true }));
    assert_eq!(agent.get_url(ready.clone()).await.status, 200);
    assert_eq!(agent.get_url(format!("http://{api}/readyz")).await.status, 200);
    assert_eq!(
        agent.get("push.example.com", "/x/y", &[]).await.header("x-table"),
        Some("5")
    );

    // Older version: 409, table unchanged. Same version again: accepted (idempotent re-push).
    let r = agent.push(&parity_table(4, a.addr)).await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(r.json()["current"], 5);
    assert_eq!(
        agent.get("push.example.com", "/x/y", &[]).await.header("x-rule"),
        Some("A")
    );
    assert_eq!(agent.push(&parity_table(5, a.addr)).await.status, 200);
    let r = agent
        .put_config(Some(API_TOKEN), "application/json", parity_table(6, a.addr).to_string())
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        agent.get("push.example.com", "/x/y", &[]).await.header("x-rule"),
        Some("B")
    );

    // The peer's wire format, camelCase throughout (the `advanced-routing` example plus the rest).
    let b = echo("b").await;
    let peer = json!({ "version": 7, "rules": [
        {
            "hostnames": ["app.example.com"],
            "matches": [{ "path": { "type": "Exact", "value": "/api/v2/health" },
                          "headers": [{ "type": "Exact", "name": "X-API-Version", "value": "2" }],
                          "method": "GET" }],
            "filters": [{ "type": "ResponseHeaderModifier",
                          "responseHeaderModifier": { "add": [{ "name": "X-Proxy", "value": "cloudflare-tunnel-gateway" }] } }],
            "backends": [{ "url": format!("http://{}", a.addr), "weight": 80 },
                         { "url": format!("http://{}", b.addr), "weight": 20 }],
        },
        {
            "hostnames": ["app.example.com"],
            "matches": [{ "path": { "type": "PathPrefix", "value": "/legacy" },
                          "queryParams": [{ "type": "RegularExpression", "name": "v", "value": "[0-9]+" }] }],
            "filters": [{ "type": "RequestRedirect",
                          "requestRedirect": { "scheme": "https", "path": { "type": "ReplacePrefixMatch", "value": "/modern" }, "statusCode": 301 } }],
            "backends": [],
        },
        {
            "hostnames": ["app.example.com"],
            "matches": [{ "path": { "type": "PathPrefix", "value": "/svc" } }],
            "filters": [{ "type": "URLRewrite", "urlRewrite": { "path": { "type": "ReplacePrefixMatch", "replacePrefixMatch": "/" } } },
                        { "type": "RequestHeaderModifier", "requestHeaderModifier": { "set": [{ "name": "x-from", "value": "peer" }] } }],
            "backends": [{ "url": format!("http://{}", a.addr), "weight": 1, "websocket": false }],
            "timeouts": { "request": "10s", "backend": "1.5s" },
        },
    ]});
    let r = agent.push(&peer).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = agent
        .get("app.example.com", "/api/v2/health", &[("x-api-version", "2")])
        .await;
    assert_eq!(
        (r.status, r.header("x-proxy")),
        (200, Some("cloudflare-tunnel-gateway"))
    );
    let r = agent.get("app.example.com", "/legacy/a?v=2", &[]).await;
    assert_eq!(
        (r.status, r.header("location")),
        (301, Some("https://app.example.com/modern/a?v=2"))
    );
    let seen = agent.get("app.example.com", "/svc/users", &[]).await.json();
    assert_eq!(
        (seen["target"].as_str(), &seen["headers"]["x-from"]),
        (Some("/users"), &json!(["peer"]))
    );
    assert_eq!(agent.get("app.example.com", "/unmatched", &[]).await.status, 404);
    assert!(agent.log().contains("pushed config applied"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_config_survives_a_restart_with_its_version() {
    let a = echo("a").await;
    let dir = TempDir::new();
    {
        let agent = Agent::start(&dir, "", true).await;
        assert_eq!(agent.push(&parity_table(8, a.addr)).await.status, 200);
    }
    let agent = Agent::start(&dir, "", true).await;
    assert_eq!(agent.get_config().await.json(), json!({ "version": 8, "ready": true }));
    assert_eq!(
        agent.get_url(format!("http://{}/ready", agent.health)).await.status,
        200
    );
    assert_eq!(
        agent.get("push.example.com", "/x/y", &[]).await.header("x-rule"),
        Some("B")
    );
    assert_eq!(agent.push(&parity_table(7, a.addr)).await.status, 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_puts_leave_the_highest_version_whole() {
    let a = echo("a").await;
    let dir = TempDir::new();
    let agent = Arc::new(Agent::start(&dir, "", true).await);
    let mut tasks = Vec::new();
    for version in (1..=20u64).rev() {
        let agent = agent.clone();
        let body = parity_table(version, a.addr);
        tasks.push(tokio::spawn(async move { (version, agent.push(&body).await.status) }));
    }
    for t in tasks {
        let (version, status) = t.await.unwrap();
        assert!(status == 200 || status == 409, "v{version}: {status}");
    }
    assert_eq!(agent.get_config().await.json()["version"], 20);
    let r = agent.get("push.example.com", "/x/y", &[]).await;
    assert_eq!((r.header("x-table"), r.header("x-rule")), (Some("20"), Some("B")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_during_100_rapid_puts_see_only_whole_tables() {
    let a = echo("a").await;
    let dir = TempDir::new();
    let agent = Arc::new(Agent::start(&dir, "", true).await);
    assert_eq!(agent.push(&parity_table(1, a.addr)).await.status, 200);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = Vec::new();
    for _ in 0..3 {
        let (agent, stop) = (agent.clone(), stop.clone());
        readers.push(tokio::spawn(async move {
            let (mut seen, mut last) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let r = agent.get("push.example.com", "/x/y", &[]).await;
                assert_eq!(r.status, 200, "{}", r.body);
                let version: u64 = r.header("x-table").unwrap().parse().unwrap();
                let rule = r.header("x-rule").unwrap();
                // Even tables have rule B; a mix of tables would show B on odd or A on even.
                assert_eq!(rule == "B", version % 2 == 0, "rule {rule} from table {version}");
                assert!(version >= last, "table went back from {last} to {version}");
                last = version;
                seen += 1;
            }
            seen
        }));
    }
    let started = Instant::now();
    for version in 2..=101 {
        let r = agent.push(&parity_table(version, a.addr)).await;
        assert_eq!(r.status, 200, "v{version}: {}", r.body);
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for r in readers {
        total += r.await.unwrap();
    }
    assert!(total > 100, "only {total} requests ran during the pushes");
    println!("100 PUTs in {elapsed:?} with {total} requests in between");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_copies_requests_without_delaying_or_failing_them() {
    let (a, m) = (echo("a").await, echo("mirror").await);
    // A mirror backend that accepts connections and never answers.
    let blackhole = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let blackhole_addr = blackhole.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = blackhole.accept().await {
            held.push(s);
        }
    });
    // A port nobody listens on.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let dir = TempDir::new();
    let agent = Agent::start(&dir,
        &format!(
            r#"
[[route]]
hostnames = ["m.example.com"]
upstream = "http://{a}"
filters = [
  {{ type = "RequestHeaderModifier", request_header_modifier = {{ set = [{{ name = "x-filtered", value = "1" }}] }} }},
  {{ type = "RequestMirror", request_mirror = {{ backend_url = "http://{m}" }} }},
]

[[route]]
hostnames = ["half.example.com"]
upstream = "http://{a}"
filters = [{{ type = "RequestMirror", request_mirror = {{ backend_url = "http://{m}", fraction = {{ numerator = 1, denominator = 2 }} }} }}]

[[route]]
hostnames = ["dead.example.com"]
upstream = "http://{a}"
timeouts = {{ backend_request = "5s" }}
filters = [
  {{ type = "RequestMirror", request_mirror = {{ backend_url = "http://{blackhole_addr}" }} }},
  {{ type = "RequestMirror", request_mirror = {{ backend_url = "http://{closed}" }} }},
]
"#,
            a = a.addr,
            m = m.addr,
        ),
        false,
    ).await;
    // A body and a GET are both copied, filters applied, credentials not.
    let r = agent.post("m.example.com", "/submit?x=1", b"payload".to_vec()).await;
    assert_eq!((r.status, r.upstream()), (200, "a"));
    assert_eq!(
        agent
            .get("m.example.com", "/get", &[("authorization", "Bearer client")])
            .await
            .status,
        200
    );
    assert!(eventually(Duration::from_secs(5), || m.seen.lock().unwrap().len() == 2).await);
    {
        let seen = m.seen.lock().unwrap();
        let post = seen.iter().find(|s| s.target == "/submit?x=1").expect("POST mirrored");
        assert_eq!(post.body, b"payload");
        assert_eq!(post.headers["x-filtered"], ["1"]);
        let get = seen.iter().find(|s| s.target == "/get").expect("GET mirrored");
        assert!(!get.headers.contains_key("authorization"), "{:?}", get.headers);
    }
    // A body over the mirror cap (256 KiB) reaches the backend whole and is not mirrored.
    let big = vec![b'z'; 300 * 1024];
    let r = agent.post("m.example.com", "/big", big).await;
    assert_eq!((r.status, r.json()["body_len"].as_u64()), (200, Some(300 * 1024)));
    // A later small request is mirrored; by then the big one would have been too.
    assert_eq!(agent.get("m.example.com", "/after-big", &[]).await.status, 200);
    assert!(
        eventually(Duration::from_secs(5), || m
            .seen
            .lock()
            .unwrap()
            .iter()
            .any(|s| s.target == "/after-big"))
        .await
    );
    agent.mirrors_settled().await;
    assert!(
        m.seen.lock().unwrap().iter().all(|s| s.target != "/big"),
        "oversized body was mirrored"
    );

    // Half of the requests, within ±6 sd of a binomial(200, 0.5).
    m.seen.lock().unwrap().clear();
    for _ in 0..200 {
        assert_eq!(agent.get("half.example.com", "/h", &[]).await.status, 200);
    }
    // Every sampled copy took its slot before its request was answered: once none is in
    // flight, every copy has reached the mirror (or failed).
    agent.mirrors_settled().await;
    let mirrored = m.seen.lock().unwrap().iter().filter(|s| s.target == "/h").count();
    assert!((58..=142).contains(&mirrored), "{mirrored} of 200 mirrored");

    // Mirrors that hang or refuse connections change nothing for the real request.
    for _ in 0..20 {
        let started = Instant::now();
        let r = agent.post("dead.example.com", "/d", b"x".to_vec()).await;
        assert_eq!((r.status, r.upstream()), (200, "a"));
        // The mirrors' timeout is 5 s: a request that waited for the blackhole would take at
        // least that long. The bound leaves a loaded machine room below it.
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "took {:?}",
            started.elapsed()
        );
    }
}

/// The controller's push as its Go encoder writes it (`null` for nil slices), with the fields
/// it sends today, and what each must do to a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_push_fields_take_effect_over_http() {
    let (a, b) = (echo("a").await, echo("b").await);
    let dir = TempDir::new();
    let agent = Agent::start(&dir, "", true).await;
    let push = json!({ "version": 3, "hasGrpcRoute": true, "rules": [
        { "hostnames": ["old.example.com"], "matches": null, "backends": null, "filters": [
            { "type": "RequestRedirect", "requestRedirect": { "scheme": "https", "statusCode": 301 } }] },
        { "hostnames": ["broken.example.com"], "backends": [], "unavailableStatus": 500 },
        { "hostnames": ["gone.example.com"], "backends": [
            { "url": format!("http://{}", a.addr), "weight": 1, "unavailableStatus": 503 }] },
        { "hostnames": ["split.example.com"], "backends": [
            { "url": format!("http://{}", a.addr), "weight": 1, "filters": [
                { "type": "RequestRedirect", "requestRedirect": { "hostname": "moved.example.com", "statusCode": 302 } }] }] },
        { "hostnames": ["cors.example.com"], "filters": [
            { "type": "CORS", "cors": { "allowOrigins": ["https://*.example.org"], "allowMethods": ["GET", "PUT"],
              "allowHeaders": null, "exposeHeaders": ["x-total"], "allowCredentials": true, "maxAge": 600 } }],
          "backends": [{ "url": format!("http://{}", b.addr), "weight": 1, "websocket": true, "protocol": "" }] },
        { "hostnames": ["app.example.com"], "backends": [{ "url": format!("http://{}", b.addr), "weight": 1 }] },
        { "hostnames": ["rw.example.com"], "filters": [
            { "type": "URLRewrite", "urlRewrite": { "hostname": "internal.example.com" } }],
          "backends": [{ "url": format!("http://{}", b.addr), "weight": 1 }] },
    ]});
    let r = agent.push(&push).await;
    assert_eq!(r.status, 200, "{}", r.body);

    let r = agent.get("old.example.com", "/p?q=1", &[]).await;
    assert_eq!(
        (r.status, r.header("location")),
        (301, Some("https://old.example.com/p?q=1"))
    );
    assert_eq!(agent.get("broken.example.com", "/", &[]).await.status, 500);
    assert_eq!(agent.get("gone.example.com", "/", &[]).await.status, 503);
    assert!(
        a.seen.lock().unwrap().is_empty(),
        "fail-closed backends are never contacted"
    );
    let r = agent.get("split.example.com", "/x", &[]).await;
    assert_eq!(
        (r.status, r.header("location")),
        (302, Some("http://moved.example.com/x"))
    );

    // CORS: a preflight is answered here, a simple request is decorated.
    let before = b.seen.lock().unwrap().len();
    let r = Reply::read(
        agent
            .client
            .request(reqwest::Method::OPTIONS, format!("http://{}/items", agent.proxy))
            .header("host", "cors.example.com")
            .header("origin", "https://shop.example.org")
            .header("access-control-request-method", "PUT")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 204);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://shop.example.org")
    );
    assert_eq!(r.header("access-control-allow-methods"), Some("GET, PUT"));
    assert_eq!(r.header("access-control-max-age"), Some("600"));
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    assert_eq!(
        b.seen.lock().unwrap().len(),
        before,
        "a preflight never reaches the backend"
    );
    let r = agent
        .get("cors.example.com", "/items", &[("origin", "https://shop.example.org")])
        .await;
    assert_eq!((r.status, r.upstream()), (200, "b"));
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://shop.example.org")
    );
    assert_eq!(r.header("access-control-expose-headers"), Some("x-total"));
    let r = agent
        .get("cors.example.com", "/items", &[("origin", "https://evil.example.net")])
        .await;
    assert_eq!((r.status, r.header("access-control-allow-origin")), (200, None));

    // The Host rule for pushed tables: the client's Host, port included, unless rewritten.
    let seen = agent.get("app.example.com:8443", "/", &[]).await.json();
    assert_eq!(seen["headers"]["host"], json!(["app.example.com:8443"]));
    let seen = agent.get("rw.example.com", "/", &[]).await.json();
    assert_eq!(seen["headers"]["host"], json!(["internal.example.com"]));
    let status = agent.get_url(format!("http://{}/status", agent.health)).await.json();
    let table = status["routes"]["table"].as_array().unwrap().clone();
    assert_eq!(status["routes"]["grpc"], json!(true), "{status}");
    // Under `cloudflared.protocol = "auto"` a gRPC table runs cloudflared on HTTP/2 itself
    // (tests/peer_contract.rs): nothing to warn about.
    assert!(
        !agent.log().contains("gRPC status trailers may be lost"),
        "hasGrpcRoute under auto needs no warning"
    );
    let hosts: Vec<&Value> = table.iter().map(|r| &r["host_headers"]).collect();
    assert!(hosts.contains(&&json!(["client"])), "{status}");
    assert!(hosts.contains(&&json!(["rewrite:internal.example.com"])), "{status}");
}

/// Host maps send the upstream's own Host (Cloud Run routes on it); `[[route]]` the client's,
/// or the upstream's when it says `host_header = "upstream"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_header_is_a_per_route_choice() {
    let a = echo("a").await;
    let dir = TempDir::new();
    let agent = Agent::start(
        &dir,
        &format!(
            r#"
[routes.hosts]
"map.example.com" = "http://{a}"

[[route]]
hostnames = ["gw.example.com"]
upstream = "http://{a}"

[[route]]
hostnames = ["own.example.com"]
host_header = "upstream"
backends = [{{ url = "http://{a}" }}, {{ url = "http://{a}", weight = 0, host_header = "client" }}]
"#,
            a = a.addr
        ),
        false,
    )
    .await;
    let upstream_host = a.addr.to_string();
    let seen = agent.get("map.example.com", "/", &[]).await.json();
    assert_eq!(seen["headers"]["host"], json!([upstream_host]));
    let seen = agent.get("gw.example.com", "/", &[]).await.json();
    assert_eq!(seen["headers"]["host"], json!(["gw.example.com"]));
    let seen = agent.get("own.example.com", "/", &[]).await.json();
    assert_eq!(seen["headers"]["host"], json!([upstream_host]));
    let status = agent.get_url(format!("http://{}/status", agent.health)).await.json();
    let own = status["routes"]["table"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "own.example.com")
        .cloned()
        .unwrap();
    assert_eq!(own["host_headers"], json!(["upstream", "client"]), "{status}");
}
