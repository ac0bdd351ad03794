//! The health listener: `/ready` with its per-component JSON, and `/metrics` counting what the
//! proxy did.

mod common;

use std::collections::BTreeMap;

use common::client::get;
use common::{AgentBuilder, ConfigText, FakeMetadata, FakeUpstream, Wire};
use http::StatusCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_lists_every_component() {
    let agent = AgentBuilder::new().start(&ConfigText::new()).await;
    let r = get(agent.health_addr(), "localhost", "/ready", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["content-type"], "application/json");
    let body = r.json();
    assert_eq!(body["ready"], true, "{body}");
    assert_eq!(body["draining"], false, "{body}");
    for component in ["config", "secrets", "routes", "proxy"] {
        assert_eq!(body["components"][component], "ok", "{component}: {body}");
    }
}

/// What runs, from which file, in which role: in the first log line, `/status` and `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_facts_are_in_the_first_log_line_status_and_metrics() {
    let agent = AgentBuilder::new()
        .start(&ConfigText::new().top("role = \"standby\""))
        .await;
    let version = env!("CARGO_PKG_VERSION");
    let config_file = agent.config_path().display().to_string();
    let first = agent.logs().into_iter().next().unwrap_or_default();
    assert!(
        first.contains(&format!("tunnel-agent {version} (commit "))
            && first.contains(&config_file)
            && first.contains("configured role standby"),
        "first log line: {first}"
    );

    let status = get(agent.health_addr(), "localhost", "/status", &[]).await.json();
    assert_eq!(status["version"], version, "{status}");
    assert_eq!(status["config_file"], config_file.as_str(), "{status}");
    assert_eq!(status["role"], "standby", "{status}");
    let commit = status["commit"].as_str().unwrap_or_default().to_owned();
    assert!(!commit.is_empty() && first.contains(&commit), "{status} vs {first}");
    assert!(status["build_date"].as_str().is_some_and(|d| d.len() == 10), "{status}");

    let text = get(agent.health_addr(), "localhost", "/metrics", &[]).await.text();
    let m = parse_metrics(&text);
    let series = format!(r#"tunnel_agent_build_info{{version="{version}",commit="{commit}"}}"#);
    assert_eq!(m.get(&series), Some(&1.0), "{series} in:\n{text}");
    // The agent's own process, under names cloudflared's re-exported `process_*` cannot take.
    let rss = m["tunnel_agent_process_resident_memory_bytes"];
    // It is this process's RSS (as the harness reads it from /proc/PID), not some other's.
    let seen = agent.memory().rss_kib as f64 * 1024.0;
    assert!(
        rss > seen / 2.0 && rss < seen * 2.0,
        "{rss} bytes exported, {seen} seen"
    );
    assert!(m["tunnel_agent_process_open_fds"] >= 3.0, "{text}");
    assert!(m.contains_key("tunnel_agent_process_cpu_seconds_total"), "{text}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let start = m["tunnel_agent_process_start_time_seconds"];
    assert!(start <= now + 1.0 && start > now - 600.0, "start {start}, now {now}");
    assert!(!m.keys().any(|k| k.starts_with("process_")), "{text}");
}

/// `/metrics` as `series → value`, where a series is the name with its label set.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("bad metrics line {l:?}"));
            (
                series.to_owned(),
                value.parse().unwrap_or_else(|_| panic!("bad value in {l:?}")),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_latency_errors_and_tokens() {
    let meta = FakeMetadata::start().await;
    let up = FakeUpstream::start(Wire::Http1).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let config = ConfigText::new()
        .gcp(&format!("metadata_url = {:?}", meta.url()))
        .proxy("allow_id_tokens_over_http = true")
        .host("ok.test", &up.url())
        .host("down.test", &format!("http://{closed}"))
        .raw(&format!(
            r#"
[[route]]
name = "slow"
hostnames = ["slow.test"]
upstream = "{0}"
timeout = "200ms"

[[route]]
name = "run"
hostnames = ["run.test"]
upstream = "{0}/run"
upstream_auth = "gcp-id-token"
"#,
            up.url()
        ));
    let agent = AgentBuilder::new().start(&config).await;
    let addr = agent.proxy_addr();

    for _ in 0..3 {
        assert_eq!(get(addr, "ok.test", "/", &[]).await.status, StatusCode::OK);
        assert_eq!(get(addr, "run.test", "/", &[]).await.status, StatusCode::OK);
    }
    assert_eq!(get(addr, "down.test", "/", &[]).await.status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        get(addr, "slow.test", "/?delay_ms=3000", &[]).await.status,
        StatusCode::GATEWAY_TIMEOUT
    );
    assert_eq!(get(addr, "nowhere.test", "/", &[]).await.status, StatusCode::NOT_FOUND);

    let r = get(agent.health_addr(), "localhost", "/metrics", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.headers["content-type"]
            .to_str()
            .unwrap_or("")
            .starts_with("text/plain"),
        "{:?}",
        r.headers
    );
    let text = r.text();
    let m = parse_metrics(&text);
    let get = |series: &str| {
        *m.get(series)
            .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
    };

    assert_eq!(get(r#"tunnel_agent_requests_total{route="ok.test",code="2xx"}"#), 3.0);
    assert_eq!(get(r#"tunnel_agent_requests_total{route="run",code="2xx"}"#), 3.0);
    assert_eq!(get(r#"tunnel_agent_requests_total{route="down.test",code="5xx"}"#), 1.0);
    assert_eq!(get(r#"tunnel_agent_requests_total{route="slow",code="5xx"}"#), 1.0);
    assert!(
        m.keys()
            .any(|k| k.starts_with("tunnel_agent_requests_total{") && k.contains("code=\"4xx\"")),
        "the 404 is counted:\n{text}"
    );

    // Latency histogram: cumulative buckets ending in +Inf = count, and a sum.
    let buckets: Vec<f64> = m
        .iter()
        .filter(|(k, _)| k.starts_with(r#"tunnel_agent_request_duration_seconds_bucket{route="ok.test","#))
        .map(|(_, v)| *v)
        .collect();
    assert!(buckets.len() > 5, "{text}");
    assert_eq!(
        get(r#"tunnel_agent_request_duration_seconds_bucket{route="ok.test",le="+Inf"}"#),
        3.0
    );
    assert_eq!(
        get(r#"tunnel_agent_request_duration_seconds_count{route="ok.test"}"#),
        3.0
    );
    assert!(get(r#"tunnel_agent_request_duration_seconds_sum{route="ok.test"}"#) > 0.0);
    assert!(
        get(r#"tunnel_agent_request_duration_seconds_bucket{route="slow",le="0.1"}"#) == 0.0
            && get(r#"tunnel_agent_request_duration_seconds_bucket{route="slow",le="+Inf"}"#) == 1.0,
        "the 504 took at least the 200 ms timeout:\n{text}"
    );

    assert_eq!(
        get(r#"tunnel_agent_upstream_errors_total{route="down.test",kind="connect"}"#),
        1.0
    );
    assert_eq!(
        get(r#"tunnel_agent_upstream_errors_total{route="slow",kind="timeout"}"#),
        1.0
    );
    assert_eq!(
        get(r#"tunnel_agent_upstream_errors_total{route="ok.test",kind="connect"}"#),
        0.0
    );

    assert_eq!(get("tunnel_agent_id_token_fetches_total"), 1.0);
    assert_eq!(get("tunnel_agent_id_token_cache_hits_total"), 2.0);
    assert_eq!(get("tunnel_agent_id_token_fetch_failures_total"), 0.0);
    assert_eq!(meta.total_fetches(), 1);
}

/// A local address that is not loopback (this host's own, from the kernel's routing table), to
/// reach the health listener the way a remote prober would; `None` on a host with loopback only.
fn non_loopback_address() -> Option<std::net::IpAddr> {
    let trie = std::fs::read_to_string("/proc/net/fib_trie").ok()?;
    let lines: Vec<&str> = trie.lines().collect();
    lines.windows(2).find_map(|w| {
        if !w[1].trim_start().starts_with("/32 host LOCAL") {
            return None;
        }
        let ip: std::net::IpAddr = w[0].trim_start().trim_start_matches("|-- ").trim().parse().ok()?;
        (!ip.is_loopback()).then_some(ip)
    })
}

/// `/status` says what the node follows and why the last check failed: never with the
/// credentials a URL carries (`user:password@`, `?token=`), and by default only to clients on
/// the host itself. `/metrics` likewise; the probe paths stay open to every client (MIG
/// autohealing and load-balancer probes come from Google's ranges).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_hides_url_credentials_and_is_served_to_loopback_only() {
    let port = common::cloudflared::closed_port();
    let url = format!("http://watcher:hunter2@127.0.0.1:{port}/primary?token=s3cr3t&db=main");
    let config = ConfigText::new().raw(&format!(
        "[role_follow]\nurl = {url:?}\ninterval = \"100ms\"\ntimeout = \"50ms\"\nrise = 1\nfall = 1\n"
    ));
    let builder = AgentBuilder::new();
    let text = config
        .render(builder.dir())
        .replace("[health]\nlisten = \"127.0.0.1:0\"", "[health]\nlisten = \"0.0.0.0:0\"");
    let mut agent = builder.spawn(&text);
    agent.wait_ready().await;
    let port = agent.health_addr().port();
    let local = std::net::SocketAddr::from(([127, 0, 0, 1], port));

    let status = common::eventually(common::DEADLINE, "a failed follow check in /status", || async {
        let s = get(local, "localhost", "/status", &[]).await.json();
        s["follow"]["last"].as_str().is_some_and(|l| !l.is_empty()).then_some(s)
    })
    .await;
    let shown = status.to_string();
    assert!(!shown.contains("hunter2") && !shown.contains("s3cr3t"), "{shown}");
    assert_eq!(
        status["follow"]["url"],
        format!(
            "http://[redacted]@127.0.0.1:{}/primary?token=[redacted]&db=main",
            url_port(&url)
        ),
        "{status}"
    );
    let logs = agent.logs().join("\n");
    assert!(!logs.contains("hunter2") && !logs.contains("s3cr3t"), "{logs}");

    let Some(ip) = non_loopback_address() else {
        println!("SKIP the remote half: this host has no address but loopback");
        return;
    };
    let remote = std::net::SocketAddr::new(ip, port);
    for path in ["/status", "/metrics"] {
        let r = get(remote, "agent", path, &[]).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{path} from {ip}: {}", r.text());
        assert!(r.text().contains("health.details_from"), "{}", r.text());
    }
    assert_eq!(get(remote, "agent", "/healthz", &[]).await.status, StatusCode::OK);
    let ready = get(remote, "agent", "/ready", &[]).await.status;
    assert!(
        ready == StatusCode::OK || ready == StatusCode::SERVICE_UNAVAILABLE,
        "{ready}"
    );
    assert_ne!(get(remote, "agent", "/active", &[]).await.status, StatusCode::FORBIDDEN);
    assert_eq!(get(local, "localhost", "/metrics", &[]).await.status, StatusCode::OK);
}

fn url_port(url: &str) -> u16 {
    url.rsplit_once(':')
        .and_then(|(_, rest)| rest.split('/').next()?.parse().ok())
        .expect("a port in the URL")
}

/// `health.details_from = "anywhere"` opens `/status` and `/metrics` to remote scrapers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn details_from_anywhere_serves_status_to_remote_clients() {
    let Some(ip) = non_loopback_address() else {
        println!("SKIP: this host has no address but loopback");
        return;
    };
    let builder = AgentBuilder::new();
    let text = ConfigText::new().render(builder.dir()).replace(
        "[health]\nlisten = \"127.0.0.1:0\"",
        "[health]\nlisten = \"0.0.0.0:0\"\ndetails_from = \"anywhere\"",
    );
    let mut agent = builder.spawn(&text);
    agent.wait_ready().await;
    let remote = std::net::SocketAddr::new(ip, agent.health_addr().port());
    assert_eq!(get(remote, "agent", "/status", &[]).await.status, StatusCode::OK);
    assert_eq!(get(remote, "agent", "/metrics", &[]).await.status, StatusCode::OK);
}
