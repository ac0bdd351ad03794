//! Hostile input beyond what the other tests enumerate, with proptest: random TOML at the config
//! loader, at `check` and at a running agent's reload; random JSON at a running agent's
//! `PUT /config`. Never a panic; every rejection names a key (or, for broken syntax, a line and
//! column); a rejected change leaves what was serving exactly as it was.
//!
//! proptest (a dev-dependency only) rather than another hand-rolled generator like
//! `agent/routing/randomized.rs`: these inputs are deep trees (TOML documents, JSON tables), and
//! proptest shrinks a failing one to a minimal case, which a seed-and-replay loop cannot. It is
//! built without its `std` feature: that one pulls `regex-syntax` with Unicode classes, and
//! Cargo's feature unification would then give the agent's own `regex` Unicode `\d` in test
//! builds only (the route matcher promises RE2's ASCII classes; `routing::tests` checks it).
//! `PROPTEST_CASES=N` runs more cases than the defaults chosen here for a shared 2-core machine.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{AgentBuilder, ConfigText, FakeUpstream, Wire, DEADLINE};
use nix::sys::signal::Signal;
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, RngAlgorithm, TestRng, TestRunner};
use serde_json::{json, Value};
use tunnel_agent::telemetry::Metrics;

/// A sentinel no error about `cloudflared.extra_args` may echo: it stands for a token given
/// as `--token=…` there. (Elsewhere, e.g. as a secret's *name*, echoing it is right.)
const SENTINEL: &str = "SENTINEL-tok-3f9c";

fn leaks_token(text: &str) -> bool {
    text.lines().any(|l| l.contains("extra_args") && l.contains(SENTINEL))
}

/// A runner with `default_cases` cases (`PROPTEST_CASES` overrides) and a fresh random seed,
/// printed so a failure can be replayed with `PROPTEST_SEED=<hex>`. (Without its `std`
/// feature, see above, proptest would otherwise use one fixed seed on every run.)
fn runner(default_cases: u32) -> TestRunner {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    let config = RunnerConfig {
        cases,
        ..RunnerConfig::default()
    };
    let seed = std::env::var("PROPTEST_SEED")
        .ok()
        .and_then(|s| u128::from_str_radix(&s, 16).ok())
        .unwrap_or_else(|| {
            u128::from(tunnel_agent::random::random_u64()) << 64 | u128::from(tunnel_agent::random::random_u64())
        });
    eprintln!("proptest seed: PROPTEST_SEED={seed:032x}");
    TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::XorShift, &seed.to_le_bytes()))
}

// ---------------------------------------------------------------------------------------------
// Random TOML documents, built from the real schema's sections and keys (so most lines reach
// validation, not only the parser) mixed with unknown keys, wrong types and plain garbage.

const SECTIONS: &[&str] = &[
    "",
    "[agent]",
    "[proxy]",
    "[health]",
    "[routes]",
    "[routes.hosts]",
    "[gcp]",
    "[cloudflared]",
    "[config_api]",
    "[role_watch]",
    "[secrets.tok]",
    "[secrets.\"bad name\"]",
    "[[route]]",
    "[bogus]",
];

const KEYS: &[&str] = &[
    "role",
    "runtime_dir",
    "state_dir",
    "shutdown_grace",
    "log_format",
    "log_level",
    "boot_timeout",
    "listen",
    "auth_secret",
    "auth_header",
    "max_header_bytes",
    "max_body_bytes",
    "header_read_timeout",
    "upstream_timeout",
    "source",
    "file",
    "attribute",
    "\"a.example.com\"",
    "\"bad host\"",
    "metadata_url",
    "secret_manager_endpoint",
    "enabled",
    "token_secret",
    "extra_args",
    "metrics",
    "crash_loop_exits",
    "token_delivery",
    "var",
    "path",
    "name",
    "refresh",
    "hostnames",
    "upstream",
    "unknown_key",
];

/// Any characters, controls and astral planes included (`any::<String>()` needs proptest's
/// `std` feature).
fn any_string() -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>(), 0..32).prop_map(|v| v.into_iter().collect())
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn toml_value() -> impl Strategy<Value = String> {
    let word = prop::sample::select(vec![
        "30s",
        "0s",
        "1ms",
        "-5s",
        "forever",
        "",
        "127.0.0.1:0",
        "0.0.0.0:2000",
        "[::1]:0",
        "1.2.3.4:99999",
        "http://127.0.0.1:1",
        "https://svc.example.run.app",
        "ftp://x",
        "not a url",
        "inline",
        "file",
        "env",
        "gcp-secret-manager",
        "config-api",
        "gcp-metadata",
        "active",
        "standby",
        "json",
        "text",
        "tok",
        "info,hyper=warn",
        "projects/p/secrets/s/versions/latest",
        "X-Internal-Auth-Token",
        "bad header",
        "--token=SENTINEL-tok-3f9c",
        "--metrics",
    ])
    .prop_map(toml_string);
    prop_oneof![
        4 => word.clone(),
        1 => any_string().prop_map(|s| toml_string(&s)),
        1 => any::<i64>().prop_map(|i| i.to_string()),
        1 => (0u32..70_000).prop_map(|i| i.to_string()),
        1 => any::<bool>().prop_map(|b| b.to_string()),
        1 => prop::collection::vec(word.clone(), 0..3).prop_map(|v| format!("[{}]", v.join(", "))),
        1 => (word.clone(), word).prop_map(|(a, b)| format!("{{ url = {a}, weight = {b} }}")),
    ]
}

/// One line of a document: a table header, a `key = value`, or noise.
fn toml_line() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => prop::sample::select(SECTIONS).prop_map(str::to_owned),
        6 => (prop::sample::select(KEYS), toml_value()).prop_map(|(k, v)| format!("{k} = {v}")),
        1 => any_string().prop_map(|s| s.replace(['\n', '\r'], " ").chars().take(24).collect()),
    ]
}

fn toml_document() -> impl Strategy<Value = String> {
    prop::collection::vec(toml_line(), 0..24).prop_map(|lines| lines.join("\n"))
}

/// Every way a config error can be unhelpful: empty, a line without a key or position, a
/// reason that is blank, a line not led by the file's name, an echoed token.
fn assert_error_is_located(path: &Path, e: &tunnel_agent::config::ConfigError) -> Result<(), TestCaseError> {
    prop_assert!(
        !e.parse.is_empty() || !e.problems.is_empty(),
        "an error with nothing in it"
    );
    for p in &e.parse {
        prop_assert!(
            p.key.is_some() || p.position.is_some(),
            "parse problem without key or position: {p:?}"
        );
        prop_assert!(!p.reason.trim().is_empty(), "{p:?}");
    }
    for p in &e.problems {
        prop_assert!(!p.key.trim().is_empty() && !p.reason.trim().is_empty(), "{p:?}");
    }
    let text = e.to_string();
    let prefix = format!("{}:", path.display());
    for line in text.lines() {
        prop_assert!(line.starts_with(&prefix), "a line without the file: {line:?}");
    }
    prop_assert!(!leaks_token(&text), "a token in an error:\n{text}");
    Ok(())
}

#[test]
fn random_toml_never_panics_and_every_error_names_a_key_or_position() {
    let path = Path::new("/etc/tunnel-agent/agent.toml");
    let metrics = Metrics::default();
    let mut runner = runner(512);
    runner
        .run(&toml_document(), |text| {
            match tunnel_agent::routing::parse_config(path, &text) {
                Ok(config) => {
                    prop_assert!(config
                        .validate(&tunnel_agent::routing::validate::route_problems)
                        .is_empty());
                    // What `check` does next must not panic either.
                    let _ = tunnel_agent::secrets::resolve::load_local(&config, &metrics);
                    let _ = tunnel_agent::routing::source::load_local(&config, &metrics);
                }
                Err(e) => assert_error_is_located(path, &e)?,
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn check_on_random_toml_exits_0_or_78_with_located_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    let mut runner = runner(48);
    runner
        .run(&toml_document(), |text| {
            std::fs::write(&path, &text).unwrap();
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_tunnel-agent"))
                .args(["check", "-c"])
                .arg(&path)
                .env_remove("GCE_METADATA_HOST")
                .env_remove("CREDENTIALS_DIRECTORY")
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            prop_assert!(matches!(out.status.code(), Some(0 | 78)), "{:?}:\n{stderr}", out.status);
            prop_assert!(!stderr.contains("panicked"), "{stderr}");
            prop_assert!(!leaks_token(&stderr), "{stderr}");
            let prefix = format!("{}:", path.display());
            for line in stderr.lines() {
                prop_assert!(line.starts_with(&prefix), "{line:?} in:\n{stderr}");
            }
            Ok(())
        })
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Reload: restart-only settings never half-apply.

/// Valid configurations that differ in both restart-only and live settings.
fn valid_config() -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec!["127.0.0.1:0", "127.0.0.1:8080", "127.0.0.1:8081"]),
        prop::sample::select(vec!["127.0.0.1:2000", "127.0.0.1:2001"]),
        prop::sample::select(vec!["/run/a", "/run/b"]),
        prop::sample::select(vec!["info", "debug"]),
        prop::sample::select(vec!["10s", "30s"]),
        prop::sample::select(vec!["1s", "5s"]),
        1024u64..1_000_000,
        prop::sample::select(vec!["X-Internal-Auth-Token", "X-Other"]),
        prop::sample::select(vec!["http://127.0.0.1:1", "https://svc.example.run.app"]),
        prop::sample::select(vec!["2s", "9s"]),
    )
        .prop_map(
            |(listen, health, run, level, upstream, restart, body, header, url, backoff)| {
                format!(
                    "[agent]\nruntime_dir = \"{run}\"\nlog_level = \"{level}\"\n\
                 [proxy]\nlisten = \"{listen}\"\nupstream_timeout = \"{upstream}\"\n\
                 header_read_timeout = \"{restart}\"\nmax_body_bytes = {body}\nauth_header = \"{header}\"\n\
                 [health]\nlisten = \"{health}\"\n\
                 [cloudflared]\nrestart_backoff = \"{backoff}\"\n\
                 [routes.hosts]\n\"a.example.com\" = \"{url}\"\n"
                )
            },
        )
}

#[test]
fn a_reloaded_config_keeps_every_restart_only_setting_and_takes_every_live_one() {
    let path = Path::new("agent.toml");
    let mut runner = runner(256);
    runner
        .run(&(valid_config(), valid_config()), |(running, edited)| {
            let running = tunnel_agent::routing::parse_config(path, &running).unwrap();
            let edited = tunnel_agent::routing::parse_config(path, &edited).unwrap();
            let mut reloaded = edited.clone();
            reloaded.keep_restart_only(&running);
            prop_assert_eq!(running.restart_only_differences(&reloaded), Vec::<&str>::new());
            // Live settings come from the edited file.
            prop_assert_eq!(reloaded.proxy.upstream_timeout, edited.proxy.upstream_timeout);
            prop_assert_eq!(reloaded.proxy.max_body_bytes, edited.proxy.max_body_bytes);
            prop_assert_eq!(&reloaded.proxy.auth_header, &edited.proxy.auth_header);
            prop_assert_eq!(&reloaded.routes.hosts, &edited.routes.hosts);
            Ok(())
        })
        .unwrap();
}

/// The upstream `a.example.com` reaches now, by which fake counted the request.
async fn which_upstream(agent: &common::Agent, host: &str, a: &FakeUpstream, b: &FakeUpstream) -> &'static str {
    let (before_a, before_b) = (a.requests(), b.requests());
    let r = common::client::get(agent.proxy_addr(), host, "/probe", &[]).await;
    match (a.requests() - before_a, b.requests() - before_b, r.status.as_u16()) {
        (1, 0, 200) => "a",
        (0, 1, 200) => "b",
        (_, _, status) => panic!("{host}: status {status}, body {}", r.text()),
    }
}

fn reload_outcomes(agent: &common::Agent) -> Vec<String> {
    agent
        .logs()
        .into_iter()
        .filter(|l| l.contains("configuration reloaded") || l.contains("reload rejected"))
        .collect()
}

/// Sends SIGHUP and waits for the reload's outcome line.
async fn reload(agent: &common::Agent) -> String {
    let seen = reload_outcomes(agent).len();
    agent.signal(Signal::SIGHUP);
    common::eventually(DEADLINE, "a reload outcome", || async {
        reload_outcomes(agent).get(seen).cloned()
    })
    .await
}

async fn status(agent: &common::Agent) -> Value {
    common::client::get(agent.health_addr(), "localhost", "/status", &[])
        .await
        .json()
}

/// A running agent gets random files on SIGHUP: a rejected one leaves routes, status and the
/// proxy as they were; the agent keeps serving throughout.
#[test]
fn random_toml_on_reload_is_applied_whole_or_not_at_all() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (a, b) = rt.block_on(async {
        (
            FakeUpstream::start(Wire::Http1).await,
            FakeUpstream::start(Wire::Http1).await,
        )
    });
    let base = ConfigText::new().host("a.example.com", &a.url());
    let agent = rt.block_on(AgentBuilder::new().start(&base));
    // What serves; replaced when a random file was valid and the base was put back.
    let before = std::cell::RefCell::new(rt.block_on(status(&agent)));
    let mut runner = runner(12);
    runner
        .run(&toml_document(), |text| {
            rt.block_on(async {
                std::fs::write(agent.config_path(), &text).unwrap();
                let outcome = reload(&agent).await;
                let now = status(&agent).await;
                let before_routes = before.borrow()["routes"].clone();
                if outcome.contains("reload rejected") {
                    prop_assert_eq!(&now["routes"], &before_routes, "{}", text);
                    prop_assert!(now["last_reload_error"].is_string(), "{now}");
                    prop_assert!(!leaks_token(&outcome), "{outcome}");
                    prop_assert_eq!(which_upstream(&agent, "a.example.com", &a, &b).await, "a");
                } else {
                    // Accepted (rare: the text was a valid config). Put the base back.
                    std::fs::write(agent.config_path(), base.render(agent.dir())).unwrap();
                    let back = reload(&agent).await;
                    prop_assert!(back.contains("configuration reloaded"), "{back}");
                    let restored = status(&agent).await;
                    prop_assert_eq!(&restored["routes"]["table"], &before_routes["table"]);
                    *before.borrow_mut() = restored;
                }
                Ok(())
            })
        })
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Random JSON at `PUT /config`.

const API_TOKEN: &str = "properties-config-api-token";

/// Pushed tables shaped like the controller's (so most reach the compiler) with random values,
/// unknown fields, `null`s and wrong types.
fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (0u64..200).prop_map(Value::from),
        any_string().prop_map(Value::from),
        prop::sample::select(vec![
            "push.example.com",
            "*.example.com",
            "bad host",
            "/",
            "/x",
            "/(",
            "Exact",
            "PathPrefix",
            "RegularExpression",
            "GET",
            "FETCH",
            "RequestHeaderModifier",
            "URLRewrite",
            "ftp://x",
            "http://",
        ])
        .prop_map(Value::from),
    ]
}

fn json_tree() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(
                prop::sample::select(vec![
                    "path", "type", "value", "headers", "name", "method", "url", "weight", "filters", "bogus"
                ])
                .prop_map(str::to_owned),
                inner,
                0..4
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn pushed_body(a: String, b: String) -> impl Strategy<Value = Value> {
    let url = prop_oneof![Just(Value::from(a)), Just(Value::from(b)), json_leaf()];
    let backend =
        (url, prop_oneof![Just(Value::from(1)), json_leaf()], json_tree()).prop_map(|(url, weight, extra)| {
            let mut b = json!({ "url": url, "weight": weight });
            if let Value::Object(extra) = extra {
                b.as_object_mut().unwrap().extend(extra);
            }
            b
        });
    let rule = (
        prop_oneof![Just(json!(["push.example.com"])), json_tree()],
        prop_oneof![Just(json!([])), json_tree()],
        prop::collection::vec(backend, 0..3),
    )
        .prop_map(|(hostnames, matches, backends)| json!({ "hostnames": hostnames, "matches": matches, "backends": backends }));
    prop_oneof![
        8 => (0u64..30, prop::collection::vec(rule, 0..3)).prop_map(|(v, rules)| json!({ "version": v, "rules": rules })),
        1 => json_tree(),
    ]
}

#[test]
fn random_json_on_put_config_is_applied_whole_or_not_at_all() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (a, b) = rt.block_on(async {
        (
            FakeUpstream::start(Wire::Http1).await,
            FakeUpstream::start(Wire::Http1).await,
        )
    });
    let config = ConfigText::new()
        .env_secret("config_token", "PROPERTIES_CONFIG_TOKEN")
        .routes("source = \"config-api\"")
        .raw("[config_api]\nlisten = \"127.0.0.1:0\"\nauth_secret = \"config_token\"");
    let agent = rt.block_on(
        AgentBuilder::new()
            .env("PROPERTIES_CONFIG_TOKEN", API_TOKEN)
            .start(&config),
    );
    let api: std::net::SocketAddr = agent
        .logs()
        .iter()
        .find(|l| l.contains("config api up"))
        .and_then(|l| l.split("listen=").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .expect("the config api's address in the log");
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let put = |body: String| {
        let client = client.clone();
        async move {
            let r = client
                .put(format!("http://{api}/config"))
                .bearer_auth(API_TOKEN)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .expect("config api answers");
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let baseline = |version: u64| {
        json!({ "version": version, "rules": [{ "hostnames": ["push.example.com"], "backends": [{ "url": a.url() }] }] })
            .to_string()
    };
    let version = Arc::new(std::sync::atomic::AtomicU64::new(10));
    assert_eq!(rt.block_on(put(baseline(10))).0, 200);

    let mut runner = runner(64);
    runner
        .run(&pushed_body(a.url(), b.url()), |body| {
            rt.block_on(async {
                let current = version.load(std::sync::atomic::Ordering::SeqCst);
                let (status, reply) = put(body.to_string()).await;
                match status {
                    200 => {
                        // Applied: a version not below the table's, or version 0 (unversioned,
                        // applied over anything, as the gateway controller's proxy does).
                        let pushed = body["version"].as_u64();
                        prop_assert!(
                            pushed.is_some_and(|p| p == 0 || p >= current),
                            "applied {body}: {reply}"
                        );
                        // Back to the baseline, at the version just applied (an equal one is
                        // re-applied), or at the last one after an unversioned push.
                        let restored = pushed.filter(|p| *p > 0).unwrap_or(current);
                        version.store(restored, std::sync::atomic::Ordering::SeqCst);
                        prop_assert_eq!(put(baseline(restored)).await.0, 200);
                    }
                    400 => {
                        let problems = reply["problems"].as_array().cloned().unwrap_or_default();
                        prop_assert!(!problems.is_empty(), "{reply}");
                        for p in &problems {
                            let key = p["key"].as_str().unwrap_or_default();
                            let reason = p["reason"].as_str().unwrap_or_default();
                            prop_assert!(!key.is_empty() && !reason.is_empty(), "{p} for {body}");
                        }
                    }
                    409 => prop_assert!(body["version"].as_u64().is_some_and(|v| 0 < v && v < current), "{body}"),
                    other => prop_assert!(false, "status {other}: {reply} for {body}"),
                }
                // Whatever happened, the baseline serves at the recorded version: nothing half-applied.
                let now = version.load(std::sync::atomic::Ordering::SeqCst);
                let got = client
                    .get(format!("http://{api}/config"))
                    .bearer_auth(API_TOKEN)
                    .send()
                    .await
                    .unwrap();
                prop_assert_eq!(
                    got.json::<Value>().await.unwrap(),
                    json!({ "version": now, "ready": true })
                );
                prop_assert_eq!(which_upstream(&agent, "push.example.com", &a, &b).await, "a");
                Ok(())
            })
        })
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Path normalisation (agent/routing/path.rs): request paths built from the pieces that make
// paths ambiguous (dot-segments raw and encoded, empty segments, encoded unreserved and
// reserved characters, separators, controls, broken `%`).

use std::borrow::Cow;

use tunnel_agent::routing::matching::PathMatcher;
use tunnel_agent::routing::path::normalise;
use tunnel_agent::routing::PathModifier;

const PATH_PIECES: &[&str] = &[
    "/", "/", "/", ".", "..", "a", "b", "adm", "in", "%2e", "%2E", "%61", "%41", "%7e", "%7E", "%25", "%3f", "%c3%a9",
    "%C3%A9", "é", "~", "-", ";", "=", "%2f", "%5C", "\\", "%00", "%0a", "%", "%4", "%zz",
];

/// A raw path as a client may send it: always starting with `/`.
fn raw_path() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(PATH_PIECES), 0..14).prop_map(|pieces| format!("/{}", pieces.concat()))
}

/// A path in normal form built only from unreserved segments: a rule's prefix or replacement.
fn normal_path() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(&["a", "b", "adm", "in", "x.y", "~u"][..]), 0..4)
        .prop_map(|segments| segments.iter().map(|s| format!("/{s}")).collect::<String>())
}

/// What an upstream that normalises reads (nginx, Go's `path.Clean`, Tomcat): every `%XX`
/// decoded once, then empty and dot-segments resolved, a trailing `/` kept. Written apart from
/// the agent's own (which decodes only unreserved characters) on purpose.
fn upstream_reading(raw: &str) -> Vec<u8> {
    let bytes = raw.as_bytes();
    let mut decoded = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                decoded.push(u8::try_from(h * 16 + l).unwrap());
                i += 3;
            }
            (b, _, _) => {
                decoded.push(b);
                i += 1;
            }
        }
    }
    let segments: Vec<&[u8]> = decoded.split(|&b| b == b'/').skip(1).collect();
    let mut kept: Vec<&[u8]> = Vec::new();
    for s in &segments {
        match *s {
            b"" | b"." => {}
            b".." => {
                kept.pop();
            }
            s => kept.push(s),
        }
    }
    let trailing = matches!(segments.last(), Some(&(b"" | b"." | b"..")));
    let mut out = Vec::new();
    for s in &kept {
        out.push(b'/');
        out.extend_from_slice(s);
    }
    if trailing || kept.is_empty() {
        out.push(b'/');
    }
    out
}

fn prefix_matches(prefix: &str, path: &[u8]) -> bool {
    let p = prefix.trim_end_matches('/').as_bytes();
    p.is_empty() || (path.starts_with(p) && matches!(path.get(p.len()), None | Some(b'/')))
}

#[test]
fn normalised_paths_are_fixed_points_without_dot_segments_and_read_as_the_upstream_reads_them() {
    let mut runner = runner(4096);
    runner
        .run(&(raw_path(), normal_path()), |(raw, prefix)| {
            let Ok(normal) = normalise(&raw) else {
                return Ok(());
            };
            // Idempotent, and the second pass finds nothing to do (no allocation).
            prop_assert!(
                matches!(normalise(&normal), Ok(Cow::Borrowed(p)) if p == normal),
                "{raw:?} → {normal:?}"
            );
            for bad in ["//", "/./", "/../", "\\", "%2F", "%5C"] {
                prop_assert!(!normal.contains(bad), "{raw:?} → {normal:?} contains {bad:?}");
            }
            prop_assert!(
                !normal.ends_with("/.") && !normal.ends_with("/.."),
                "{raw:?} → {normal:?}"
            );
            // The upstream reads the forwarded path as it would have read the raw one: the
            // same resource, and so the same rule.
            let upstream = upstream_reading(&raw);
            prop_assert_eq!(&upstream_reading(&normal), &upstream, "{:?} → {:?}", raw, normal);
            let ours = PathMatcher::Prefix(prefix.trim_end_matches('/').into()).matches(&normal);
            prop_assert_eq!(ours, prefix_matches(&prefix, &upstream), "{:?} under {:?}", raw, prefix);
            Ok(())
        })
        .unwrap();
}

#[test]
fn a_prefix_rewrite_of_a_normalised_path_stays_inside_its_replacement() {
    let mut runner = runner(4096);
    runner
        .run(
            &(raw_path(), normal_path(), normal_path()),
            |(raw, prefix, replacement)| {
                let Ok(normal) = normalise(&raw) else {
                    return Ok(());
                };
                let matched = prefix.trim_end_matches('/');
                if !PathMatcher::Prefix(matched.into()).matches(&normal) {
                    return Ok(());
                }
                for modifier in [
                    PathModifier::Prefix(replacement.as_str().into()),
                    PathModifier::Full(if replacement.is_empty() {
                        "/".into()
                    } else {
                        replacement.as_str().into()
                    }),
                ] {
                    let out = modifier.apply(&normal, Some(matched));
                    // Normal: nothing for the upstream to resolve, so nothing to climb out with.
                    prop_assert!(matches!(normalise(&out), Ok(Cow::Borrowed(_))), "{raw:?} → {out:?}");
                    prop_assert!(
                        prefix_matches(&replacement, upstream_reading(&out).as_slice()),
                        "{raw:?} → {out:?} left {replacement:?}"
                    );
                }
                Ok(())
            },
        )
        .unwrap();
}
