//! What a pushed table may name and reach (SPEC §9: the controller is trusted with routes, not
//! with the host): a push carries CA certificates as PEM, never a local path; a backend or
//! mirror cannot be the metadata server or a link-local address; identity tokens never travel
//! over plain http. And the local file the host's admin names (`proxy.ca_file`) is read with
//! bounds: a regular file of bounded size, never a FIFO or a device.

mod common;

use std::process::Command;
use std::time::Duration;

use common::client::get;
use common::{Agent, AgentBuilder, ConfigText, DEADLINE};
use serde_json::{json, Value};

const API_TOKEN: &str = "push-trust-api-token";

fn api_config() -> ConfigText {
    ConfigText::new()
        .env_secret("config_token", "PUSH_TRUST_API_TOKEN")
        .routes("source = \"config-api\"")
        .raw("[config_api]\nlisten = \"127.0.0.1:0\"\nauth_secret = \"config_token\"\n")
}

async fn start_api(config: &ConfigText) -> Agent {
    AgentBuilder::new()
        .env("PUSH_TRUST_API_TOKEN", API_TOKEN)
        .start(config)
        .await
}

/// `PUT /config` with `body`: the status and the JSON answer. Bounded in time: a push that
/// makes the agent block must fail the test, not hang it.
async fn push(agent: &Agent, body: &Value) -> (u16, Value) {
    agent.put_config(API_TOKEN, body, Duration::from_secs(10)).await
}

/// The `(key, reason)` pairs of a 400's problem list.
fn problems(answer: &Value) -> Vec<(String, String)> {
    answer["problems"]
        .as_array()
        .unwrap_or_else(|| panic!("no problem list in {answer}"))
        .iter()
        .map(|p| {
            (
                p["key"].as_str().unwrap_or_default().to_owned(),
                p["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn table(version: u64, backend: Value) -> Value {
    json!({ "version": version, "rules": [{ "hostnames": ["p.example.com"], "backends": [backend] }] })
}

/// A pushed `ca_file` (either spelling), on a backend or a mirror, is refused before anything
/// is read: the answer names the field, says to send PEM, and is the same whatever the path
/// is (absent, unreadable, a device, a FIFO that would block the read for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_cannot_name_a_local_file() {
    let agent = start_api(&api_config()).await;
    let fifo = agent.dir().join("ca.fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo (coreutils)");
    assert!(made.success());
    let fifo = fifo.display().to_string();
    let mut answers = Vec::new();
    for path in ["/nonexistent/ca.pem", "/etc/shadow", "/dev/zero", fifo.as_str()] {
        for field in ["ca_file", "caFile"] {
            let backend = json!({ "url": "https://127.0.0.1:1", "tls": { field: path } });
            let (status, answer) = push(&agent, &table(1, backend)).await;
            assert_eq!(status, 400, "{field} = {path}: {answer}");
            let got = problems(&answer);
            assert_eq!(got.len(), 1, "{got:?}");
            assert_eq!(got[0].0, "rules[0].backends[0].tls.caFile", "{got:?}");
            assert!(got[0].1.contains("caBundle"), "says what to send instead: {got:?}");
            answers.push(got[0].1.clone());
        }
    }
    assert!(
        answers.windows(2).all(|w| w[0] == w[1]),
        "the answer does not depend on the host's files: {answers:?}"
    );
    assert!(
        !answers[0].contains("/etc") && !answers[0].contains("No such file"),
        "{answers:?}"
    );

    let mirror = json!({ "version": 1, "rules": [{ "hostnames": ["p.example.com"],
        "backends": [{ "url": "http://127.0.0.1:9" }],
        "filters": [{ "type": "RequestMirror", "requestMirror": {
            "backendUrl": "https://127.0.0.1:1", "tls": { "caFile": fifo } } }] }] });
    let (status, answer) = push(&agent, &mirror).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(
        problems(&answer)[0].0,
        "rules[0].filters[0].requestMirror.tls.caFile",
        "{answer}"
    );

    // A CA bundle is PEM text of bounded size.
    let huge = "A".repeat(600 * 1024);
    let backend = json!({ "url": "https://127.0.0.1:1", "tls": { "caBundle": huge } });
    let (status, answer) = push(&agent, &table(1, backend)).await;
    assert_eq!(status, 400, "{answer}");
    let got = problems(&answer);
    assert_eq!(got[0].0, "rules[0].backends[0].tls.caBundle", "{got:?}");
    assert!(got[0].1.contains("bytes"), "{got:?}");

    // The agent is still whole: it takes a good push and its probe answers.
    let (status, answer) = push(&agent, &table(2, json!({ "url": "http://127.0.0.1:9" }))).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(get(agent.health_addr(), "localhost", "/ready", &[]).await.status, 200);
}

/// `tunnel-agent check` on `toml`: exit code and stderr, within `limit` (a read that blocks
/// fails the test instead of hanging it).
fn check_within(dir: &std::path::Path, toml: &str, limit: Duration) -> (Option<i32>, String) {
    let path = dir.join("agent.toml");
    std::fs::write(&path, toml).expect("write config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tunnel-agent"))
        .args(["check", "-c"])
        .arg(&path)
        .env_clear()
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run tunnel-agent check");
    let start = tokio::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait check") {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err).expect("stderr");
            return (status.code(), err);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("check on {toml:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The admin's own `ca_file` (global or a TOML backend's) is read only when it is a regular
/// file of bounded size: a FIFO does not block, a device does not grow memory.
#[test]
fn a_local_ca_file_is_read_with_bounds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("ca.fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().expect("mkfifo").success());
    let big = dir.path().join("big.pem");
    std::fs::write(&big, vec![b'A'; 2 << 20]).expect("write");
    let limit = Duration::from_secs(10);
    for (path, why) in [
        (fifo.display().to_string(), "not a regular file"),
        ("/dev/zero".to_owned(), "not a regular file"),
        (big.display().to_string(), "larger than"),
    ] {
        let global = format!("[proxy]\nca_file = {path:?}\n");
        let (code, err) = check_within(dir.path(), &global, limit);
        assert_eq!(code, Some(78), "{path}: {err}");
        assert!(err.contains("proxy.ca_file") && err.contains(why), "{path}: {err}");
        let backend = format!(
            "[[route]]\nhostnames = [\"a.example.com\"]\nbackends = [{{ url = \"https://127.0.0.1:1\", tls = {{ ca_file = {path:?} }} }}]\n"
        );
        let (code, err) = check_within(dir.path(), &backend, limit);
        assert_eq!(code, Some(78), "{path}: {err}");
        assert!(err.contains("tls.caFile") && err.contains(why), "{path}: {err}");
    }
}

/// Link-local and metadata destinations are refused for backends and mirrors, pushed or
/// written in TOML, unless `proxy.allow_link_local_upstreams`; identity tokens over plain http
/// unless `proxy.allow_id_tokens_over_http`. Only the local TOML can set either key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_cannot_reach_the_metadata_server() {
    let agent = start_api(&api_config()).await;
    for url in [
        "http://169.254.169.254/",
        "http://169.254.169.254:80/computeMetadata/v1/",
        "http://169.254.1.1:8080",
        "http://[fe80::1]:8080",
        "http://[fd00:ec2::254]/",
        "http://[::ffff:169.254.169.254]/",
        "http://metadata.google.internal/",
        "http://METADATA.google.internal./",
        "http://metadata/",
    ] {
        let (status, answer) = push(&agent, &table(1, json!({ "url": url }))).await;
        assert_eq!(status, 400, "{url}: {answer}");
        let got = problems(&answer);
        assert_eq!(got[0].0, "rules[0].backends[0].url", "{url}: {got:?}");
        assert!(
            got[0].1.contains("allow_link_local_upstreams"),
            "names the key: {got:?}"
        );
        let mirror = json!({ "version": 1, "rules": [{ "hostnames": ["p.example.com"],
            "backends": [{ "url": "http://127.0.0.1:9" }],
            "filters": [{ "type": "RequestMirror", "requestMirror": { "backendUrl": url } }] }] });
        let (status, answer) = push(&agent, &mirror).await;
        assert_eq!(status, 400, "mirror {url}: {answer}");
        assert_eq!(problems(&answer)[0].0, "rules[0].filters[0]", "{answer}");
    }
    let token_over_http = json!({ "url": "http://127.0.0.1:9", "upstreamAuth": "gcp-id-token" });
    let (status, answer) = push(&agent, &table(1, token_over_http)).await;
    assert_eq!(status, 400, "{answer}");
    let got = problems(&answer);
    assert_eq!(got[0].0, "rules[0].backends[0].upstreamAuth", "{got:?}");
    assert!(got[0].1.contains("allow_id_tokens_over_http"), "{got:?}");
    let token_over_https = json!({ "url": "https://127.0.0.1:9", "upstreamAuth": "gcp-id-token" });
    let (status, answer) = push(&agent, &table(2, token_over_https)).await;
    assert_eq!(status, 200, "{answer}");
}

/// With the keys set in the local TOML, the same destinations are accepted.
#[test]
fn the_local_keys_allow_link_local_upstreams_and_tokens_over_http() {
    let dir = tempfile::tempdir().expect("tempdir");
    let routes = "[[route]]\nhostnames = [\"a.example.com\"]\nupstream = \"http://169.254.169.254\"\n\
                  upstream_auth = \"gcp-id-token\"\n";
    let (code, err) = check_within(dir.path(), routes, Duration::from_secs(10));
    assert_eq!(code, Some(78), "{err}");
    assert!(err.contains("allow_link_local_upstreams"), "{err}");
    assert!(err.contains("allow_id_tokens_over_http"), "{err}");
    let allowed = format!("[proxy]\nallow_link_local_upstreams = true\nallow_id_tokens_over_http = true\n{routes}");
    let (code, err) = check_within(dir.path(), &allowed, Duration::from_secs(10));
    assert_eq!(code, Some(0), "{err}");
}

// The connect-time check (a name that only the system resolver reads as 169.254.169.254) is
// tested in-process in `proxy::destination`: through the proxy, a regression would send a
// request to the metadata address, which a test on this machine must never do.

/// The status of a `PUT /config` with `token` and a body that is not a table: 401 when the
/// token is refused, 400 when it is accepted.
async fn auth_status(agent: &Agent, token: &str) -> u16 {
    reqwest::Client::new()
        .put(format!("http://{}/config", agent.config_api_addr()))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body("[]")
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("the config API answers")
        .status()
        .as_u16()
}

/// The config API's bearer secret rotates like the proxy's internal token: the new value is
/// accepted once the refresh reads it, the old one for `proxy.auth_overlap`, then refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_api_takes_a_rotated_secret_and_drops_the_old_one_after_the_overlap() {
    let builder = AgentBuilder::new();
    let file = builder.file("api-token", "token-v1");
    let config = ConfigText::new()
        .proxy("auth_overlap = \"3s\"")
        .routes("source = \"config-api\"")
        .raw(&format!(
            "[secrets.config_token]\nsource = \"file\"\npath = {:?}\nrefresh = \"1s\"\n\
             [config_api]\nlisten = \"127.0.0.1:0\"\nauth_secret = \"config_token\"\n",
            file.display().to_string()
        ));
    let agent = builder.start(&config).await;
    assert_eq!(auth_status(&agent, "token-v1").await, 400);
    assert_eq!(auth_status(&agent, "token-v2").await, 401);

    std::fs::write(&file, "token-v2").expect("rotate");
    common::eventually(DEADLINE, "the rotated token accepted", || async {
        (auth_status(&agent, "token-v2").await == 400).then_some(())
    })
    .await;
    let rotated_at = tokio::time::Instant::now();
    assert_eq!(auth_status(&agent, "token-v1").await, 400, "v1 during the overlap");
    common::eventually(DEADLINE, "v1 refused after the overlap", || async {
        (auth_status(&agent, "token-v1").await == 401).then_some(())
    })
    .await;
    assert!(
        rotated_at.elapsed() >= Duration::from_millis(1500),
        "overlap ended early"
    );
    assert_eq!(auth_status(&agent, "token-v2").await, 400);
}

/// After a SIGHUP a push compiles under the reloaded settings, not the boot-time ones: here
/// `routes.protocol = "h2c"`, under which an `https://` backend without its own protocol is
/// invalid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_after_a_reload_compiles_under_the_reloaded_settings() {
    let agent = start_api(&api_config()).await;
    let https = json!({ "url": "https://127.0.0.1:9" });
    let (status, answer) = push(&agent, &table(1, json!({ "url": "http://127.0.0.1:9" }))).await;
    assert_eq!(status, 200, "{answer}");

    agent.rewrite_config(&api_config().routes("protocol = \"h2c\""));
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    agent.wait_for_log(&["configuration reloaded"], DEADLINE).await;
    let (status, answer) = push(&agent, &table(2, https)).await;
    assert_eq!(status, 400, "compiled under the boot-time settings: {answer}");
    assert!(problems(&answer)[0].1.contains("h2c"), "{answer}");
}
