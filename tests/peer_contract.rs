//! A drop-in for the gateway controller's proxy pods (lexfrei/cloudflare-tunnel-gateway-
//! controller, issue 21): the real binary started by the peer's environment variables
//! (`run --from-env`), its config port driven by a client that behaves like the controller's
//! pusher (`internal/proxy/pusher.go`: PUT; on 409, GET /config and, when the proxy is ahead of
//! the controller's counter, retry above it), and every status code and readiness rule of the
//! peer's `internal/proxy/api.go`. The config file given with `-c` holds only what the peer has
//! no variable for (directories, the health listener, cloudflared's path and metrics port);
//! everything the contract covers comes from the environment. All traffic is on loopback.

mod common;

use std::time::Duration;

use common::cloudflared::valid_shaped_token;
use common::{eventually, Agent, AgentBuilder, ConfigText, FakeCloudflared, FakeUpstream, Wire, DEADLINE};
use reqwest::StatusCode;
use serde_json::{json, Value};

const AUTH: &str = "config-api-token-for-peer-test";

/// The base file: listeners and directories for a test, nothing of the contract.
fn base() -> ConfigText {
    ConfigText::new()
}

/// The peer's variables for a test: both listeners on loopback port 0 (the harness reads the
/// real ports from the log).
fn peer_env(builder: AgentBuilder) -> AgentBuilder {
    builder
        .with_env_mode()
        .env("PROXY_ADDR", "127.0.0.1:0")
        .env("PROXY_CONFIG_ADDR", "127.0.0.1:0")
}

/// A standalone agent (no `TUNNEL_TOKEN`) whose config API takes `AUTH`.
async fn standalone() -> Agent {
    peer_env(AgentBuilder::new())
        .env("PROXY_AUTH_TOKEN", AUTH)
        .start(&base())
        .await
}

/// The controller's pusher, as `ConfigPusher` does it: one version counter per controller
/// process, `Content-Type: application/json`, the bearer when it has a token.
struct Pusher {
    url: String,
    token: Option<String>,
    /// `configVersionCounter`.
    counter: u64,
}

#[derive(Debug, PartialEq, Eq)]
enum Pushed {
    /// 200, first time or after the retry.
    Applied {
        version: u64,
    },
    /// 409, and the proxy's version is not above the counter: a push of this same process
    /// won (`ErrLostConfigPushRace`), nothing to retry.
    LostRace,
    Failed(u16),
}

impl Pusher {
    fn new(agent: &Agent, token: Option<&str>, counter: u64) -> Pusher {
        Pusher {
            url: format!("http://{}/config", agent.config_api_addr()),
            token: token.map(str::to_owned),
            counter,
        }
    }

    /// The next version, as the controller numbers the configs it builds.
    fn next(&mut self) -> u64 {
        self.counter += 1;
        self.counter
    }

    async fn put(&self, body: &Value) -> u16 {
        let mut req = reqwest::Client::new()
            .put(&self.url)
            .header("content-type", "application/json")
            .body(body.to_string())
            .timeout(DEADLINE);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        req.send().await.expect("the config API answers").status().as_u16()
    }

    /// `fetchProxyVersion`: GET /config with the same bearer; anything but 200 is an error.
    async fn proxy_version(&self) -> Result<u64, u16> {
        let mut req = reqwest::Client::new().get(&self.url).timeout(DEADLINE);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.expect("the config API answers");
        if resp.status() != StatusCode::OK {
            return Err(resp.status().as_u16());
        }
        let status: Value = resp.json().await.expect("GET /config is JSON");
        Ok(status["version"].as_u64().expect("a numeric version"))
    }

    /// `pushToEndpoint`: the push, and on 409 the recovery.
    async fn push(&mut self, mut config: Value) -> Pushed {
        let version = config["version"].as_u64().expect("the config has a version");
        match self.put(&config).await {
            200 => return Pushed::Applied { version },
            409 => {}
            other => return Pushed::Failed(other),
        }
        let proxy = match self.proxy_version().await {
            Ok(v) => v,
            Err(status) => return Pushed::Failed(status),
        };
        if proxy <= self.counter {
            return Pushed::LostRace;
        }
        // `bumpVersionCounter(proxy)`, then `configVersionCounter.Add(1)`.
        self.counter = self.counter.max(proxy + 1);
        let retry = self.next();
        config["version"] = json!(retry);
        match self.put(&config).await {
            200 => Pushed::Applied { version: retry },
            other => Pushed::Failed(other),
        }
    }
}

fn table(version: u64, host: &str, url: &str) -> Value {
    json!({
        "version": version,
        "rules": [{ "hostnames": [host], "backends": [{ "url": url, "weight": 1 }] }],
    })
}

async fn get(agent: &Agent, path: &str, token: Option<&str>) -> (u16, String) {
    let mut req = reqwest::Client::new()
        .get(format!("http://{}{path}", agent.config_api_addr()))
        .timeout(DEADLINE);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("the config API answers");
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

async fn put_raw(agent: &Agent, content_type: &str, body: Vec<u8>, token: Option<&str>) -> (u16, String) {
    let mut req = reqwest::Client::new()
        .put(format!("http://{}/config", agent.config_api_addr()))
        .header("content-type", content_type)
        .body(body)
        .timeout(DEADLINE);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("the config API answers");
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

/// `/readyz`: the status and the reason of a 503.
async fn readyz(agent: &Agent) -> (u16, String) {
    let (status, body) = get(agent, "/readyz", None).await;
    let reason =
        serde_json::from_str::<Value>(&body).map_or(body.clone(), |v| v["reason"].as_str().unwrap_or("").to_owned());
    (status, reason)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_controller_catches_up_through_get_config_and_a_lost_race_is_not_retried() {
    let agent = standalone().await;
    let up = FakeUpstream::start(Wire::Http1).await;
    let mut first = Pusher::new(&agent, Some(AUTH), 9);
    let v = first.next();
    assert_eq!(
        first.push(table(v, "a.example.com", &up.url())).await,
        Pushed::Applied { version: 10 }
    );

    // A new controller process starts its counter again: its first push is older than the
    // proxy's table, gets 409, reads the proxy's version and retries above it.
    let mut restarted = Pusher::new(&agent, Some(AUTH), 0);
    let v = restarted.next();
    let outcome = restarted.push(table(v, "b.example.com", &up.url())).await;
    assert_eq!(outcome, Pushed::Applied { version: 12 });
    assert_eq!(restarted.proxy_version().await, Ok(12));
    let served = common::client::get(agent.proxy_addr(), "b.example.com", "/", &[]).await;
    assert_eq!(served.status, 200, "the retried table serves: {}", served.text());

    // A push of the same process that lost the race: the proxy is not ahead of the counter.
    let mut same = Pusher::new(&agent, Some(AUTH), 12);
    assert_eq!(same.push(table(11, "c.example.com", &up.url())).await, Pushed::LostRace);
    assert_eq!(same.proxy_version().await, Ok(12), "nothing was applied");

    // The recovery needs GET /config, which takes the same bearer as PUT.
    let mut wrong = Pusher::new(&agent, Some("not-the-token"), 0);
    assert_eq!(
        wrong.push(table(1, "d.example.com", &up.url())).await,
        Pushed::Failed(401)
    );

    // A reload re-reads the file under the same variables: the token still comes from
    // PROXY_AUTH_TOKEN (without the variables the reload would drop the config API's secret).
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    agent.wait_for_log(&["configuration reloaded"], DEADLINE).await;
    assert_eq!(same.proxy_version().await, Ok(12));
    let v = same.next();
    assert_eq!(
        same.push(table(v, "e.example.com", &up.url())).await,
        Pushed::Applied { version: 13 }
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_config_port_answers_with_the_peers_status_codes() {
    let agent = standalone().await;
    let up = FakeUpstream::start(Wire::Http1).await;
    let json_body = |v: &Value| v.to_string().into_bytes();

    assert_eq!(get(&agent, "/healthz", None).await.0, 200);
    assert_eq!(readyz(&agent).await, (503, "no config loaded".to_owned()));
    assert_eq!(
        get(&agent, "/config", None).await.0,
        401,
        "GET /config needs the bearer"
    );
    assert_eq!(get(&agent, "/config", Some("wrong")).await.0, 401);
    let (status, body) = get(&agent, "/config", Some(AUTH)).await;
    assert_eq!(
        (status, serde_json::from_str::<Value>(&body).ok()),
        (200, Some(json!({"version": 0, "ready": false})))
    );

    let t = table(5, "app.example.com", &up.url());
    assert_eq!(put_raw(&agent, "application/json", json_body(&t), None).await.0, 401);
    assert_eq!(put_raw(&agent, "text/plain", json_body(&t), Some(AUTH)).await.0, 415);
    let over = vec![b' '; (1 << 20) + 1];
    assert_eq!(put_raw(&agent, "application/json", over, Some(AUTH)).await.0, 413);
    assert_eq!(
        put_raw(&agent, "application/json", b"{".to_vec(), Some(AUTH)).await.0,
        400
    );
    // Ours: an unknown field is refused (the peer's decoder drops it), naming the key.
    let unknown = json!({"version": 5, "rules": [{"backends": [{"url": up.url(), "retries": 3}]}]});
    let (status, body) = put_raw(&agent, "application/json", json_body(&unknown), Some(AUTH)).await;
    assert_eq!(status, 400);
    assert!(body.contains("rules[0].backends[0].retries"), "{body}");

    // Version 0 is applied, with a warning, and is not a loaded config.
    let unversioned = table(0, "zero.example.com", &up.url());
    assert_eq!(
        put_raw(
            &agent,
            "application/json; charset=utf-8",
            json_body(&unversioned),
            Some(AUTH)
        )
        .await
        .0,
        200
    );
    assert_eq!(readyz(&agent).await, (503, "no config loaded".to_owned()));
    agent.wait_for_log(&["unversioned table (version 0)"], DEADLINE).await;
    let served = common::client::get(agent.proxy_addr(), "zero.example.com", "/", &[]).await;
    assert_eq!(served.status, 200, "version 0 serves all the same");

    assert_eq!(
        put_raw(&agent, "application/json", json_body(&t), Some(AUTH)).await.0,
        200
    );
    // Standalone (no TUNNEL_TOKEN): nothing to wait for but the table.
    assert_eq!(readyz(&agent).await, (200, String::new()));
    let (_, body) = get(&agent, "/config", Some(AUTH)).await;
    assert_eq!(
        serde_json::from_str::<Value>(&body).ok(),
        Some(json!({"version": 5, "ready": true}))
    );
    assert_eq!(
        put_raw(&agent, "application/json", json_body(&t), Some(AUTH)).await.0,
        200,
        "an equal version is applied"
    );
    let older = table(4, "app.example.com", &up.url());
    let (status, body) = put_raw(&agent, "application/json", json_body(&older), Some(AUTH)).await;
    assert_eq!(status, 409, "{body}");
    // Version 0 over a versioned table too.
    assert_eq!(
        put_raw(&agent, "application/json", json_body(&unversioned), Some(AUTH))
            .await
            .0,
        200
    );
    assert_eq!(readyz(&agent).await, (503, "no config loaded".to_owned()));
    assert_eq!(get(&agent, "/healthz", None).await.0, 200);

    // /metrics on the config port, without a token (the chart's ServiceMonitor scrapes it).
    let (status, text) = get(&agent, "/metrics", None).await;
    assert_eq!(status, 200);
    assert!(
        text.contains("# TYPE tunnel_agent_route_reloads_total counter"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn without_proxy_auth_token_the_config_port_is_open_and_says_so_once() {
    let agent = peer_env(AgentBuilder::new())
        .env("PROXY_METRICS_ENABLED", "false")
        .env("PROXY_FROBNICATE", "1")
        .env("PROXY_TRACING_ENABLED", "true")
        .start(&base())
        .await;
    let mut pusher = Pusher::new(&agent, None, 0);
    let v = pusher.next();
    assert_eq!(
        pusher.push(table(v, "a.example.com", "http://127.0.0.1:9")).await,
        Pushed::Applied { version: 1 }
    );
    assert_eq!(pusher.proxy_version().await, Ok(1));
    assert_eq!(
        get(&agent, "/metrics", None).await.0,
        404,
        "PROXY_METRICS_ENABLED=false"
    );
    let logs = agent.logs().join("\n");
    let count = |needle: &str| logs.matches(needle).count();
    assert_eq!(
        count("PROXY_FROBNICATE is not a variable of the gateway controller's proxy"),
        1,
        "{logs}"
    );
    assert_eq!(count("PROXY_TRACING_ENABLED is ignored"), 1, "{logs}");
    assert_eq!(count("WITHOUT authentication"), 1, "{logs}");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_a_tunnel_token_readyz_waits_for_the_edge_and_grpc_moves_cloudflared_to_http2() {
    let builder = AgentBuilder::new();
    let cf = FakeCloudflared::new(builder.dir());
    cf.set_mode("disconnected");
    // cloudflared's path, metrics port and test timings from the file; enabling it and its
    // token are the environment's.
    let section = cf
        .section(&[])
        .replace("enabled = true\n", "")
        .replace("token_secret = \"tunnel_token\"\n", "");
    let token = valid_shaped_token();
    let mut agent = peer_env(builder)
        .env("TUNNEL_TOKEN", &token)
        .env("PROXY_AUTH_TOKEN", AUTH)
        .env("PROXY_GRACE_PERIOD", "2s")
        .start(&base().raw(&section))
        .await;
    let pids = cf.wait_starts(1, DEADLINE).await;
    let argv = start_argv(&cf, pids[0]);
    assert!(argv.windows(2).any(|w| w == ["--grace-period", "2s"]), "{argv:?}");
    assert!(argv.iter().any(|a| a == "--token-file"), "{argv:?}");
    assert!(!argv.iter().any(|a| a == "--protocol"), "auto without gRPC: {argv:?}");
    assert!(!argv.iter().any(|a| a.contains(&token)), "{argv:?}");
    let env = cf.env_of(Some(pids[0]));
    assert!(
        !env.values().any(|v| v.contains(&token) || v.contains(AUTH)) && !env.contains_key("TUNNEL_TOKEN"),
        "{env:?}"
    );

    let mut pusher = Pusher::new(&agent, Some(AUTH), 0);
    let v = pusher.next();
    assert_eq!(
        pusher.push(table(v, "a.example.com", "http://127.0.0.1:9")).await,
        Pushed::Applied { version: 1 }
    );
    let (status, reason) = readyz(&agent).await;
    assert_eq!(status, 503);
    assert!(reason.starts_with("tunnel not connected to edge"), "{reason}");
    let (_, body) = get(&agent, "/config", Some(AUTH)).await;
    assert_eq!(
        serde_json::from_str::<Value>(&body).ok(),
        Some(json!({"version": 1, "ready": false}))
    );

    cf.set_mode("connected");
    eventually(DEADLINE, "/readyz 200 once the tunnel connects", || async {
        (readyz(&agent).await.0 == 200).then_some(())
    })
    .await;

    // A table with gRPC routes: cloudflared drops trailers over QUIC, so under auto it is
    // restarted on HTTP/2 (the peer dials http2 when its first push has a GRPCRoute).
    let mut grpc = table(pusher.next(), "grpc.example.com", "http://127.0.0.1:9");
    grpc["hasGrpcRoute"] = json!(true);
    assert_eq!(pusher.push(grpc).await, Pushed::Applied { version: 2 });
    let pids = cf.wait_starts(2, DEADLINE).await;
    let argv = start_argv(&cf, pids[1]);
    assert!(argv.windows(2).any(|w| w == ["--protocol", "http2"]), "{argv:?}");
    assert_eq!(cf.sigterms(pids[0]), 1, "the first cloudflared drained once");

    let logs = agent.logs().join("\n");
    assert!(
        !logs.contains(&token) && !logs.contains(AUTH),
        "a secret in the log:\n{logs}"
    );
    let status = reqwest::get(agent.health_url("/status"))
        .await
        .expect("/status answers");
    let status = status.text().await.unwrap_or_default();
    assert!(
        !status.contains(&token) && !status.contains(AUTH),
        "a secret in /status: {status}"
    );
    assert!(status.contains("agent.toml + environment"), "{status}");
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    let status = agent.wait_exit(Duration::from_secs(15)).await;
    assert!(status.success(), "{status}");
}

/// The argv the fake recorded for the start of `pid`.
fn start_argv(cf: &FakeCloudflared, pid: u32) -> Vec<String> {
    let event = cf
        .events()
        .into_iter()
        .find(|e| e.kind == "start" && e.pid == pid)
        .unwrap_or_else(|| panic!("no start event for {pid}"));
    serde_json::from_str(&event.rest).unwrap_or_else(|e| panic!("start argv is JSON ({e}): {}", event.rest))
}

/// `tunnel-agent ARGS` with only `vars` in its environment: the exit code and stderr.
/// Runs the binary once: its exit code, stdout and stderr.
async fn run(args: &[&str], vars: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tunnel-agent"));
    cmd.args(args)
        .env_clear()
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(DEADLINE, cmd.output())
        .await
        .expect("finishes in time")
        .expect("runs");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

#[tokio::test(flavor = "multi_thread")]
async fn check_reads_the_environment_as_start_up_does_and_names_each_variable() {
    let (code, _, stderr) = run(
        &["check", "--from-env"],
        &[
            ("PROXY_AUTH_TOKEN", ""),
            ("PROXY_GRACE_PERIOD", "soon"),
            ("PROXY_TUNNEL_PROTOCOL", "h3"),
        ],
    )
    .await;
    assert_eq!(code, Some(78), "{stderr}");
    for needle in [
        "(environment): PROXY_AUTH_TOKEN: set but empty",
        "(environment): PROXY_GRACE_PERIOD: \"soon\" is not a duration",
        "(environment): PROXY_TUNNEL_PROTOCOL: \"h3\" is not one of auto, http2, quic",
    ] {
        assert!(stderr.contains(needle), "{needle:?} in:\n{stderr}");
    }
    // A listener clash is named by the variable behind it.
    let (code, _, stderr) = run(
        &["check", "--from-env"],
        &[
            ("PROXY_AUTH_TOKEN", "t"),
            ("PROXY_ADDR", ":7000"),
            ("PROXY_CONFIG_ADDR", ":7000"),
        ],
    )
    .await;
    assert_eq!(code, Some(78), "{stderr}");
    assert!(
        stderr.contains("config_api.listen (PROXY_CONFIG_ADDR): 0.0.0.0:7000 is already used"),
        "{stderr}"
    );

    let (code, stdout, stderr) = run(
        &["check", "--from-env"],
        &[
            ("PROXY_AUTH_TOKEN", "t"),
            ("TUNNEL_TOKEN", "eyJhIjoiZmFrZSJ9"),
            ("PROXY_BOGUS", "1"),
        ],
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    // No file: the report names the environment, as its problems do.
    assert_eq!(stdout.trim(), "(environment): ok (0 routes)", "{stdout}");
    assert!(stderr.contains("warning: PROXY_BOGUS is not a variable"), "{stderr}");
    assert!(!stderr.contains("eyJhIjoiZmFrZSJ9"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_the_switch_the_environment_is_only_pointed_at() {
    if std::path::Path::new("/etc/tunnel-agent/agent.toml").exists() {
        eprintln!("skipped: /etc/tunnel-agent/agent.toml exists on this host, so `check` reads it");
        return;
    }
    let (code, _, stderr) = run(&["check"], &[("PROXY_ADDR", ":8080")]).await;
    assert_eq!(code, Some(78), "{stderr}");
    assert!(stderr.contains("run with --from-env"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_a_config_file_the_config_port_behaves_the_same() {
    // No environment mode: the peer's contract is the config API's with a file too.
    let cfg = ConfigText::new()
        .routes("source = \"config-api\"")
        .raw("[config_api]\nlisten = \"127.0.0.1:0\"\nallow_unauthenticated = true\npersist = false\n");
    let agent = AgentBuilder::new().start(&cfg).await;
    let mut pusher = Pusher::new(&agent, None, 4);
    let v = pusher.next();
    let t = table(v, "a.example.com", "http://127.0.0.1:9");
    assert_eq!(pusher.push(t).await, Pushed::Applied { version: 5 });
    assert_eq!(pusher.put(&table(3, "a.example.com", "http://127.0.0.1:9")).await, 409);
    assert_eq!(readyz(&agent).await, (200, String::new()));
    let (status, text) = get(&agent, "/metrics", None).await;
    assert_eq!(status, 200);
    assert!(text.contains("tunnel_agent_route_reloads_total"), "{text}");
    let logs = agent.logs().join("\n");
    assert_eq!(logs.matches("takes pushes WITHOUT authentication").count(), 1, "{logs}");
}
