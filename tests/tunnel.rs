//! cloudflared supervision against `tests/fakes/cloudflared`: dependency order, the token never in
//! argv or logs, restarts with backoff, crash loops, a hung child, a stuck tunnel, reloads, and
//! the systemd notify sequence.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::{eventually, Agent, AgentBuilder, ConfigText, FakeCloudflared, NotifySocket, DEADLINE};
use nix::sys::signal::Signal;

const TOKEN: &str = "eyJhIjoiZmFrZS10dW5uZWwtdG9rZW4tZG8tbm90LWxlYWsifQ";

fn config(cf: &FakeCloudflared, extra: &[&str]) -> ConfigText {
    ConfigText::new()
        .env_secret("tunnel_token", "TUNNEL_TOKEN_FOR_TEST")
        .host("app.example.com", "http://127.0.0.1:9")
        .raw(&cf.section(extra))
}

async fn start(extra: &[&str]) -> (Agent, FakeCloudflared) {
    start_with(extra, &[]).await
}

/// Starts the agent with the fake set up by `settings` (see `FakeCloudflared::set`).
async fn start_with(extra: &[&str], settings: &[(&str, &str)]) -> (Agent, FakeCloudflared) {
    let builder = AgentBuilder::new();
    let cf = FakeCloudflared::new(builder.dir());
    for (k, v) in settings {
        cf.set(k, v);
    }
    let builder = builder.env("TUNNEL_TOKEN_FOR_TEST", TOKEN);
    let agent = builder.start(&config(&cf, extra)).await;
    (agent, cf)
}

async fn get_json(agent: &Agent, path: &str) -> (u16, serde_json::Value) {
    let resp = reqwest::get(agent.health_url(path))
        .await
        .expect("health listener answers");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(serde_json::Value::Null))
}

async fn wait_ready(agent: &Agent) -> serde_json::Value {
    eventually(DEADLINE, "/ready 200 with a connected tunnel", || async {
        let (code, body) = get_json(agent, "/ready").await;
        (code == 200).then_some(body)
    })
    .await
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

fn environ(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', "\n"))
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn starts_after_the_proxy_with_the_token_only_in_its_environment() {
    let builder = AgentBuilder::new();
    let notify = NotifySocket::bind(builder.dir());
    let cf = FakeCloudflared::new(builder.dir());
    // The fake exits 3 if the proxy did not accept connections when it started. A remotely
    // managed tunnel's ingress lives at Cloudflare, so the test tells the fake where the proxy
    // is (its `origin` setting).
    let proxy_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    cf.set("origin", &format!("http://127.0.0.1:{proxy_port}"));
    let agent = builder
        .env("TUNNEL_TOKEN_FOR_TEST", TOKEN)
        .env("NOTIFY_SOCKET", &notify.path.display().to_string())
        .env("WATCHDOG_USEC", "30000000")
        .start(&config(&cf, &[]).proxy(&format!("listen = \"127.0.0.1:{proxy_port}\"")))
        .await;
    let ready = wait_ready(&agent).await;
    assert_eq!(ready["components"]["cloudflared"], "connected (4)", "{ready}");

    assert_eq!(cf.count("origin-down"), 0, "{:?}", cf.events());
    let pids = cf.started_pids();
    assert_eq!(pids.len(), 1, "{:?}", cf.events());
    let pid = pids[0];
    assert_eq!(cf.count("token"), 1);
    assert!(
        cf.events().iter().any(|e| e.kind == "token" && e.rest == "env"),
        "{:?}",
        cf.events()
    );
    assert_eq!(
        cf.count("notify-socket-leaked"),
        0,
        "NOTIFY_SOCKET/WATCHDOG_* must not reach cloudflared"
    );
    let env = environ(pid);
    assert!(
        !env.contains("NOTIFY_SOCKET=") && !env.contains("WATCHDOG_USEC="),
        "{env}"
    );
    assert!(env.contains(&format!("TUNNEL_TOKEN={TOKEN}")), "env delivery: {env}");
    assert!(
        !env.contains("TUNNEL_TOKEN_FOR_TEST="),
        "the source variable is scrubbed: {env}"
    );
    assert!(
        !env.contains("TUNNEL_AGENT_"),
        "no test hook in the production cloudflared's environment: {env}"
    );
    let home = format!("HOME={}", agent.dir().join("state").display());
    assert!(
        env.lines().any(|l| l == home),
        "cloudflared's HOME is the state dir: {env}"
    );

    // Never in argv: not cloudflared's, not the agent's.
    let argv = cmdline(pid);
    assert!(argv.contains("tunnel --no-autoupdate --metrics"), "{argv}");
    assert!(!argv.contains(TOKEN), "token in cloudflared's argv: {argv}");
    assert!(!cmdline(agent.pid().as_raw() as u32).contains(TOKEN));

    // cloudflared's lines come back through the agent's log with their level.
    agent
        .wait_for_log(&["INFO", "cloudflared", "Registered tunnel connection"], DEADLINE)
        .await;
    let (code, status) = get_json(&agent, "/status").await;
    assert_eq!(code, 200);
    assert_eq!(status["cloudflared"]["pid"], pid);
    assert_eq!(status["cloudflared"]["version"], "2026.8.2", "{status}");
    assert_eq!(status["cloudflared"]["connector_id"], format!("fake-{pid}"), "{status}");
    assert!(
        agent
            .logs()
            .iter()
            .any(|l| l.contains("INFO") && l.contains("cloudflared version 2026.8.2 (")),
        "the boot log names cloudflared's version: {:#?}",
        agent.logs()
    );
    assert!(!status.to_string().contains(TOKEN));
    let (code, _) = get_json(&agent, "/active").await;
    assert_eq!(code, 200);
    let metrics = reqwest::get(agent.health_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("tunnel_agent_cloudflared_connections 4"), "{metrics}");
    assert!(
        metrics.contains("tunnel_agent_cloudflared_info{version=\"2026.8.2\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cloudflared_tunnel_ha_connections 4"),
        "cloudflared's own metrics re-exported"
    );
    assert!(
        agent.logs().iter().all(|l| !l.contains(TOKEN)),
        "token in the agent's log"
    );
    assert!(notify.lines().contains(&"READY=1".to_owned()));
}

/// cloudflared runs under the agent's uid but gets none of its environment: not the variables
/// the agent's own secrets come from, not `CREDENTIALS_DIRECTORY`, not whatever else the unit or
/// an operator set. Only an allow-list (PATH, locale, TZ), its HOME and its token.
#[tokio::test(flavor = "multi_thread")]
async fn cloudflared_gets_only_the_environment_it_needs() {
    let builder = AgentBuilder::new();
    let cf = FakeCloudflared::new(builder.dir());
    let creds = builder.dir().join("credentials");
    std::fs::create_dir_all(&creds).unwrap();
    let agent = builder
        .env("TUNNEL_TOKEN_FOR_TEST", TOKEN)
        .env("INTERNAL_AUTH_TOKEN", "internal-secret-never-in-the-child")
        .env("CREDENTIALS_DIRECTORY", &creds.display().to_string())
        .env("AWS_SECRET_ACCESS_KEY", "operator-secret-never-in-the-child")
        .env("PATH", "/usr/bin:/bin")
        .env("LANG", "C.UTF-8")
        .env("TZ", "UTC")
        .start(&config(&cf, &[]).internal_auth("INTERNAL_AUTH_TOKEN"))
        .await;
    wait_ready(&agent).await;
    let pid = cf.started_pids()[0];
    let env = cf.env_of(Some(pid));
    let keys: Vec<&str> = env.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "HOME",
            "HTTPS_PROXY",
            "HTTP_PROXY",
            "LANG",
            "PATH",
            "TUNNEL_TOKEN",
            "TZ"
        ],
        "{env:?}"
    );
    let proxy = format!("http://{}", agent.proxy_addr());
    assert_eq!(
        (&env["HTTP_PROXY"], &env["HTTPS_PROXY"]),
        (&proxy, &proxy),
        "cloudflared.remote_ingress"
    );
    assert_eq!(env["TUNNEL_TOKEN"], TOKEN);
    assert_eq!(env["PATH"], "/usr/bin:/bin");
    let version = cf.env_of(None);
    let keys: Vec<&str> = version.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        ["LANG", "PATH", "TZ"],
        "`cloudflared --version`'s environment: {version:?}"
    );
}

/// The agent holds every secret in memory and its environment holds the `source = "env"` ones:
/// it is not dumpable, so no core file carries them and a process of its own uid (cloudflared)
/// cannot read `/proc/<agent>/environ` or `mem`. Run as a non-root user, as under the unit's
/// `DynamicUser=`: the kernel then gives a non-dumpable process's `/proc/PID/*` files to root.
#[tokio::test(flavor = "multi_thread")]
async fn the_agent_is_not_dumpable_and_its_child_cannot_read_its_environment() {
    const NOBODY: u32 = 65534;
    if !nix::unistd::Uid::effective().is_root() {
        println!("SKIP: needs root to start the agent as another user");
        return;
    }
    let builder = AgentBuilder::new();
    let cf = FakeCloudflared::new(builder.dir());
    let agent = builder
        .env("TUNNEL_TOKEN_FOR_TEST", TOKEN)
        .run_as(NOBODY)
        .start(&config(&cf, &[]))
        .await;
    wait_ready(&agent).await;
    let pid = agent.pid().as_raw();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.contains(&NOBODY.to_string())),
        "{status}"
    );
    use std::os::unix::fs::MetadataExt;
    let owner = std::fs::metadata(format!("/proc/{pid}/status")).unwrap();
    assert_eq!(
        (owner.uid(), owner.gid()),
        (0, 0),
        "a dumpable process's /proc entries belong to its own uid, a non-dumpable one's to root"
    );
    let child = cf.started_pids()[0];
    let probe = cf
        .events()
        .into_iter()
        .find(|e| e.kind == "parent-environ" && e.pid == child)
        .expect("the fake probed its parent");
    assert!(
        probe.rest.starts_with("denied"),
        "cloudflared read the agent's environment: {probe:?}"
    );
}

/// cloudflared shares the agent's uid, so only Landlock keeps it from the agent's files: a
/// compromised one tries to read a `file` secret and the persisted state, and to plant a file in
/// the state directory (a route table, a role). It is denied each, and still runs: `/ready`
/// through it, its token, its metrics.
#[tokio::test(flavor = "multi_thread")]
async fn cloudflared_cannot_read_the_agents_secret_files_nor_write_its_state() {
    if tunnel_agent::tunnel::sandbox::abi() == 0 {
        println!("SKIP: this kernel offers no Landlock (landlock_create_ruleset answers ABI 0)");
        return;
    }
    let builder = AgentBuilder::new();
    let cf = FakeCloudflared::new(builder.dir());
    let secret_file = builder.file("internal-secret", "do-not-let-cloudflared-read-this");
    let state = builder.dir().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let state_file = state.join("existing");
    std::fs::write(&state_file, "state").unwrap();
    let control_socket_dir = builder.dir().join("run");
    cf.set(
        "probe_read",
        &format!("{}\n{}\n", secret_file.display(), state_file.display()),
    );
    cf.set(
        "probe_write",
        &format!("{}\n{}\n", state.display(), control_socket_dir.display()),
    );
    let config = config(&cf, &["token_delivery = \"file\""]).raw(&format!(
        "[secrets.internal]\nsource = \"file\"\npath = {:?}\n",
        secret_file.display().to_string()
    ));
    let agent = builder.env("TUNNEL_TOKEN_FOR_TEST", TOKEN).start(&config).await;
    let ready = wait_ready(&agent).await;
    assert_eq!(ready["components"]["cloudflared"], "connected (4)", "{ready}");
    let pid = cf.started_pids()[0];
    let probes: Vec<String> = cf
        .events()
        .into_iter()
        .filter(|e| e.kind == "probe" && e.pid == pid)
        .map(|e| e.rest)
        .collect();
    assert_eq!(probes.len(), 4, "{probes:?}");
    for probe in &probes {
        // EACCES (13): Landlock's answer.
        assert!(probe.contains("denied 13"), "cloudflared got through: {probe}");
    }
    let planted = std::fs::read_dir(&state).unwrap().count();
    assert_eq!(planted, 1, "nothing planted in the state directory");
    let token = cf
        .events()
        .into_iter()
        .find(|e| e.kind == "token")
        .expect("the fake read its token");
    assert_eq!(token.rest, "file", "read from its token file: {token:?}");
    let metrics = reqwest::get(format!("http://{}/metrics", cf.metrics)).await.unwrap();
    assert_eq!(metrics.status(), 200);
    let lines = agent.logs().join("\n");
    assert!(!lines.contains("runs unconfined"), "{lines}");
}

#[tokio::test(flavor = "multi_thread")]
async fn token_file_is_private_and_kept_out_of_the_environment() {
    let (agent, cf) = start(&["token_delivery = \"file\""]).await;
    wait_ready(&agent).await;
    let file = agent.dir().join("run/cloudflared.token");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), TOKEN);
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    let pid = cf.started_pids()[0];
    assert!(
        cf.events().iter().any(|e| e.kind == "token" && e.rest == "file"),
        "{:?}",
        cf.events()
    );
    let env = environ(pid);
    assert!(
        !env.contains("TUNNEL_TOKEN="),
        "token file delivery must not also set TUNNEL_TOKEN"
    );
    assert!(
        !env.contains(TOKEN),
        "the agent's env-sourced secrets must not leak into cloudflared: {env}"
    );
    assert!(cmdline(pid).contains("run --token-file"), "{}", cmdline(pid));
}

/// Go's flag package reads `-token`, `--token=…` and `-token-file` alike, and
/// `--credentials-contents` carries a tunnel's secret: none may reach cloudflared's argv through
/// `extra_args`. The agent refuses the file (78) naming the flag, never its value.
#[tokio::test(flavor = "multi_thread")]
async fn extra_args_cannot_put_a_token_in_argv_in_any_spelling() {
    for arg in ["-token=eyJ-LEAKED", "--credentials-contents={\"s\":\"LEAKED\"}"] {
        let builder = AgentBuilder::new();
        let cf = FakeCloudflared::new(builder.dir());
        let extra = format!("extra_args = [{}]", toml_string(arg));
        let text = config(&cf, &[&extra]).render(builder.dir());
        let mut agent = builder.env("TUNNEL_TOKEN_FOR_TEST", TOKEN).spawn(&text);
        let status = agent.wait_exit(DEADLINE).await;
        let logs = agent.logs().join("\n");
        assert_eq!(status.code(), Some(78), "{arg}: {logs}");
        let flag = arg.split('=').next().unwrap_or(arg);
        assert!(
            logs.contains(&format!("cloudflared.extra_args: \"{flag}\" is managed by the agent")),
            "{logs}"
        );
        assert!(!logs.contains("LEAKED"), "{logs}");
        assert_eq!(cf.count("start"), 0, "{:?}", cf.events());
    }
}

fn toml_string(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_is_restarted_within_the_backoff() {
    let (agent, cf) = start(&[]).await;
    wait_ready(&agent).await;
    let first = cf.started_pids()[0];
    let killed_at = tokio::time::Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(first as i32), Signal::SIGKILL).unwrap();
    let pids = cf.wait_starts(2, DEADLINE).await;
    let restart = killed_at.elapsed();
    assert_ne!(pids[1], first);
    // Backoff is 100 ms here (50-100 ms with jitter) plus the fake's Python start-up.
    assert!(restart < Duration::from_secs(2), "restart took {restart:?}");
    println!("cloudflared kill -> restarted (start event): {restart:?}");
    agent
        .wait_for_log(
            &["cloudflared exited unexpectedly", "killed by signal SIGKILL"],
            DEADLINE,
        )
        .await;
    let status = eventually(DEADLINE, "restart counted", || async {
        let (_, s) = get_json(&agent, "/status").await;
        (s["cloudflared"]["restarts"] == 1).then_some(s)
    })
    .await;
    assert_eq!(status["cloudflared"]["last_exit"], "killed by signal SIGKILL");
    wait_ready(&agent).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn exit_zero_is_a_failure_too() {
    // The real cloudflared prints usage and exits 0 on an unknown flag.
    let (agent, _cf) = start(&["extra_args = [\"--no-such-flag\"]"]).await;
    agent
        .wait_for_log(&["cloudflared exited unexpectedly", "exited with code 0"], DEADLINE)
        .await;
    eventually(DEADLINE, "a restart after exit 0", || async {
        let (_, s) = get_json(&agent, "/status").await;
        (s["cloudflared"]["restarts"].as_u64() >= Some(1)).then_some(())
    })
    .await;
    let (code, body) = get_json(&agent, "/ready").await;
    assert_eq!(code, 503, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_loop_fails_ready_then_the_agent_gives_up() {
    let builder = AgentBuilder::new();
    let cf = FakeCloudflared::new(builder.dir());
    cf.set_mode("crash");
    let extra = [
        "crash_loop_exits = 3",
        "crash_loop_window = \"1m\"",
        "give_up_after_exits = 6",
        "restart_backoff = \"50ms\"",
        "restart_backoff_max = \"150ms\"",
    ];
    let mut agent = builder
        .env("TUNNEL_TOKEN_FOR_TEST", TOKEN)
        .start(&config(&cf, &extra))
        .await;
    // Ready is reached (an edge outage or a bad connector must not become a systemd restart
    // loop by itself), but /ready says why the node is unhealthy.
    let body = eventually(DEADLINE, "/ready 503 with crash loop", || async {
        let (code, body) = get_json(&agent, "/ready").await;
        (code == 503 && body["components"]["cloudflared"] == "crash loop").then_some(body)
    })
    .await;
    assert_eq!(body["ready"], false);
    let status = agent.wait_exit(DEADLINE).await;
    assert_eq!(
        status.code(),
        Some(1),
        "the agent exits non-zero so systemd's restart policy takes over"
    );
    assert_eq!(cf.count("start"), 6, "{:?}", cf.events());
    assert!(
        agent.logs().iter().any(|l| l.contains("giving up")),
        "{:#?}",
        agent.logs()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_cloudflared_gets_one_sigterm_then_sigkill_after_its_grace() {
    let (mut agent, cf) = start(&["grace_period = \"1s\"", "stop_margin = \"300ms\""]).await;
    wait_ready(&agent).await;
    cf.set_mode("ignore-term");
    let pid = cf.started_pids()[0];
    let t = tokio::time::Instant::now();
    agent.signal(Signal::SIGTERM);
    let status = agent.wait_exit(DEADLINE).await;
    let took = t.elapsed();
    assert!(status.success(), "{status}");
    assert!(
        took >= Duration::from_millis(1300),
        "SIGKILL came before grace + margin: {took:?}"
    );
    let sigterms = cf
        .events()
        .iter()
        .filter(|e| e.kind == "sigterm" && e.pid == pid)
        .count();
    assert_eq!(
        sigterms,
        1,
        "exactly one SIGTERM (a second skips cloudflared's drain): {:?}",
        cf.events()
    );
    assert_eq!(cf.count("exit"), 0, "it was killed, not exited: {:?}", cf.events());
    assert!(agent.logs().iter().any(|l| l.contains("sending SIGKILL")));
    assert!(
        std::fs::metadata(format!("/proc/{pid}")).is_err()
            || std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| s.contains(") Z ")),
        "cloudflared still running after the agent exited"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_stops_cloudflared_before_the_proxy() {
    let (mut agent, cf) = start(&[]).await;
    wait_ready(&agent).await;
    agent.signal(Signal::SIGTERM);
    assert!(agent.wait_exit(DEADLINE).await.success());
    let logs = agent.logs();
    let pos = |needle: &str| {
        logs.iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in {logs:#?}"))
    };
    assert!(pos("cloudflared stopped") < pos("proxy stopped"), "{logs:#?}");
    assert_eq!(cf.count("sigterm"), 1);
    assert_eq!(cf.count("exit"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tunnel_stuck_disconnected_is_restarted() {
    let (agent, cf) = start(&["disconnected_restart_after = \"1s\""]).await;
    wait_ready(&agent).await;
    cf.set_mode("disconnected");
    // With no ready grace, /ready fails as soon as a poll sees no connection...
    eventually(DEADLINE, "/ready 503 while disconnected", || async {
        let (code, body) = get_json(&agent, "/ready").await;
        (code == 503 && body["components"]["cloudflared"] == "no connections").then_some(())
    })
    .await;
    // ...and after disconnected_restart_after cloudflared is restarted (gracefully).
    cf.wait_starts(2, DEADLINE).await;
    assert_eq!(cf.count("sigterm"), 1, "{:?}", cf.events());
    agent
        .wait_for_log(&["tunnel stayed disconnected; restarting cloudflared"], DEADLINE)
        .await;
    cf.set_mode("connected");
    wait_ready(&agent).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ready_grace_rides_out_a_brief_reconnect() {
    let (agent, cf) = start(&["ready_grace = \"30s\""]).await;
    wait_ready(&agent).await;
    cf.set_mode("disconnected");
    let body = eventually(DEADLINE, "disconnect seen within grace", || async {
        let (code, body) = get_json(&agent, "/ready").await;
        (body["components"]["cloudflared"] == "reconnecting (within grace)").then_some((code, body))
    })
    .await;
    assert_eq!(body.0, 200, "{}", body.1);
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_restarts_cloudflared_only_when_its_command_changes() {
    let (agent, cf) = start(&[]).await;
    wait_ready(&agent).await;
    agent.signal(Signal::SIGHUP);
    agent.wait_for_log(&["configuration reloaded"], DEADLINE).await;
    assert_eq!(cf.count("start"), 1, "same arguments and token: no restart");

    agent.rewrite_config(&config(&cf, &["extra_args = [\"--protocol\", \"http2\"]"]));
    agent.signal(Signal::SIGHUP);
    let pids = cf.wait_starts(2, DEADLINE).await;
    assert!(
        cmdline(pids[1]).contains("--protocol http2 run"),
        "{}",
        cmdline(pids[1])
    );
    assert_eq!(cf.count("sigterm"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_locally_managed_tunnel_gets_an_ingress_written_from_the_routes() {
    let builder = AgentBuilder::new();
    let cf = FakeCloudflared::new(builder.dir());
    let creds = builder.file("creds.json", r#"{"AccountTag":"a","TunnelSecret":"s","TunnelID":"t"}"#);
    let section = cf.section(&[
        "token_secret = \"\"",
        &format!("credentials_file = {:?}", creds.display().to_string()),
        "tunnel = \"6ff42ae2-765d-4adf-8112-31c55c1551ef\"",
    ]);
    // No token secret in this configuration: drop the line the helper added.
    let section = section.replace("token_secret = \"\"\n", "");
    let cfg = ConfigText::new()
        .host("app.example.com", "http://127.0.0.1:9")
        .host("*.wild.example.com", "http://127.0.0.1:9")
        .raw(&section);
    let agent = builder.start(&cfg).await;
    wait_ready(&agent).await;
    let yaml = std::fs::read_to_string(agent.dir().join("run/cloudflared.yml")).unwrap();
    let origin = format!("service: http://{}", agent.proxy_addr());
    assert!(
        yaml.contains("tunnel: \"6ff42ae2-765d-4adf-8112-31c55c1551ef\""),
        "{yaml}"
    );
    assert!(yaml.contains("- hostname: \"app.example.com\""), "{yaml}");
    assert!(yaml.contains("- hostname: \"*.wild.example.com\""), "{yaml}");
    assert_eq!(yaml.matches(&origin).count(), 2, "{yaml}");
    assert!(yaml.trim_end().ends_with("- service: http_status:404"), "{yaml}");
    let argv = cmdline(cf.started_pids()[0]);
    assert!(
        argv.contains("--config") && argv.trim_end().ends_with("run 6ff42ae2-765d-4adf-8112-31c55c1551ef"),
        "{argv}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn systemd_hears_ready_status_watchdog_reloading_and_stopping_in_order() {
    let builder = AgentBuilder::new();
    let notify = NotifySocket::bind(builder.dir());
    let cf = FakeCloudflared::new(builder.dir());
    let spawned = tokio::time::Instant::now();
    let mut agent = builder
        .env("TUNNEL_TOKEN_FOR_TEST", TOKEN)
        .env("NOTIFY_SOCKET", &notify.path.display().to_string())
        .env("WATCHDOG_USEC", "200000")
        .start(&config(&cf, &[]))
        .await;
    notify.wait_for("READY=1", 1, DEADLINE).await;
    let ready_after = notify.arrival("READY=1").unwrap() - spawned;
    println!("spawn -> READY=1: {ready_after:?}");
    notify.wait_for("WATCHDOG=1", 3, DEADLINE).await;
    agent.signal(Signal::SIGHUP);
    notify.wait_for("RELOADING=1", 1, DEADLINE).await;
    notify.wait_for("READY=1", 2, DEADLINE).await;
    agent.signal(Signal::SIGTERM);
    assert!(agent.wait_exit(DEADLINE).await.success());
    notify.wait_for("STOPPING=1", 1, DEADLINE).await;

    let lines = notify.lines();
    let first = |l: &str| {
        lines
            .iter()
            .position(|x| x == l)
            .unwrap_or_else(|| panic!("{l} missing: {lines:#?}"))
    };
    let last = |l: &str| lines.iter().rposition(|x| x == l).unwrap();
    assert!(
        lines.iter().any(|l| l.starts_with("STATUS=fetching secrets")),
        "{lines:#?}"
    );
    assert!(
        lines[..first("READY=1")]
            .iter()
            .any(|l| l == "STATUS=starting cloudflared"),
        "{lines:#?}"
    );
    assert!(first("READY=1") < first("WATCHDOG=1"));
    assert!(first("RELOADING=1") < last("READY=1"));
    assert!(last("READY=1") < first("STOPPING=1"));
    assert!(lines.iter().all(|l| !l.contains(TOKEN)));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cloudflared_without_token_file_support_is_refused_at_boot() {
    // cloudflared before 2025.4 has no --token-file: it would print usage and exit 0 at every
    // start. The agent says so and exits EX_CONFIG (78), which the unit does not restart.
    let builder = AgentBuilder::new();
    let cf = FakeCloudflared::new(builder.dir());
    cf.set("version", "2024.12.1");
    let text = config(&cf, &["token_delivery = \"file\""]).render(builder.dir());
    let mut agent = builder.env("TUNNEL_TOKEN_FOR_TEST", TOKEN).spawn(&text);
    let status = agent.wait_exit(DEADLINE).await;
    assert_eq!(status.code(), Some(78), "{:#?}", agent.logs());
    let logs = agent.logs().join("\n");
    assert!(
        logs.contains("token_delivery = \"file\" needs cloudflared 2025.4 or later") && logs.contains("is 2024.12.1"),
        "{logs}"
    );
    assert_eq!(cf.count("start"), 0, "never started: {:?}", cf.events());
    assert!(!logs.contains(TOKEN));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_old_cloudflared_still_runs_with_the_token_in_its_environment() {
    let (agent, cf) = start_with(&[], &[("version", "2024.12.1")]).await;
    wait_ready(&agent).await;
    let (_, status) = get_json(&agent, "/status").await;
    assert_eq!(status["cloudflared"]["version"], "2024.12.1", "{status}");
    assert!(cf.events().iter().any(|e| e.kind == "token" && e.rest == "env"));
}

#[tokio::test(flavor = "multi_thread")]
async fn status_shows_the_connector_id_before_any_connection() {
    // cloudflared reports its connector id on /ready from the start, 503 included.
    let builder = AgentBuilder::new();
    let cf = FakeCloudflared::new(builder.dir());
    cf.set_mode("disconnected");
    let agent = builder
        .env("TUNNEL_TOKEN_FOR_TEST", TOKEN)
        .start(&config(&cf, &[]))
        .await;
    let pid = cf.wait_starts(1, DEADLINE).await[0];
    let status = eventually(DEADLINE, "connector_id in /status", || async {
        let (_, s) = get_json(&agent, "/status").await;
        (!s["cloudflared"]["connector_id"].is_null()).then_some(s)
    })
    .await;
    assert_eq!(status["cloudflared"]["connector_id"], format!("fake-{pid}"), "{status}");
    assert_eq!(status["cloudflared"]["connections"], 0, "{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flooding_cloudflared_cannot_drown_the_agents_own_lines() {
    // 40000 lines at once, half one repeated message: what reaches the agent's log is capped
    // by the rate limit (tunnel::log_limit: burst 200, then 50/s), the rest counted and summarised.
    let flood = 40_000;
    let builder = AgentBuilder::new();
    let cf = FakeCloudflared::new(builder.dir());
    cf.set_mode("flood");
    cf.set("flood", &flood.to_string());
    let started = tokio::time::Instant::now();
    let mut agent = builder
        .env("TUNNEL_TOKEN_FOR_TEST", TOKEN)
        .start(&config(&cf, &[]))
        .await;
    wait_ready(&agent).await;
    eventually(DEADLINE, "the flood written", || async {
        (cf.count("flooded") == 1).then_some(())
    })
    .await;
    // The summaries come at the end of the limiter's 10 s window.
    agent.wait_for_log(&["cloudflared repeated a line"], DEADLINE).await;
    agent
        .wait_for_log(&["lines in the last 10s were dropped"], DEADLINE)
        .await;
    // The agent's own lines still come through after the flood.
    agent.signal(Signal::SIGTERM);
    assert!(agent.wait_exit(DEADLINE).await.success());
    let elapsed = started.elapsed().as_secs() + 1;
    let logs = agent.logs();
    let from_cf = logs.iter().filter(|l| l.contains(" cloudflared:")).count() as u64;
    let cap = 200 + 50 * elapsed + 20;
    assert!(
        from_cf <= cap,
        "{from_cf} cloudflared lines reached the log in {elapsed} s (cap {cap})"
    );
    let dropped: u64 = logs
        .iter()
        .filter(|l| l.contains("lines in the last 10s were dropped"))
        .filter_map(|l| {
            l.split(" dropped=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    let repeated: u64 = logs
        .iter()
        .filter(|l| l.contains("cloudflared repeated a line"))
        .filter_map(|l| {
            l.split(" repeated=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    assert_eq!(
        repeated,
        flood / 2 - 1,
        "the repeated message is written once, then counted"
    );
    assert!(dropped > 0, "distinct lines past the limit are counted: {logs:#?}");
    assert!(
        from_cf + dropped + repeated >= flood,
        "every flood line is written or counted: {from_cf} + {dropped} + {repeated}"
    );
    for own in ["ready", "shutting down", "cloudflared stopped", "proxy stopped"] {
        assert!(logs.iter().any(|l| l.contains(own)), "agent line {own:?} missing");
    }
    println!("flood of {flood}: {from_cf} cloudflared lines written, {repeated} repeats and {dropped} drops counted");
}

/// A reload that points `cloudflared.path` at another binary asks that one its version: the
/// token delivery is checked against it, and `/status` and the metrics name what runs.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_to_another_cloudflared_asks_its_version_again() {
    let (agent, cf) = start(&[]).await;
    wait_ready(&agent).await;
    let wrapper = |name: &str, version: &str| {
        let path = agent.write_file(
            name,
            &format!(
                "#!/bin/sh\nFAKE_CF_DIR={} FAKE_CF_VERSION={version} exec {} \"$@\"\n",
                cf.dir().display(),
                FakeCloudflared::script().display()
            ),
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        format!("path = {:?}", path.display().to_string())
    };

    let newer = wrapper("cloudflared-newer", "2026.9.0");
    agent.rewrite_config(&config(&cf, &[&newer]));
    agent.signal(Signal::SIGHUP);
    agent.wait_for_log(&["configuration reloaded"], DEADLINE).await;
    let (_, status) = get_json(&agent, "/status").await;
    assert_eq!(status["cloudflared"]["version"], "2026.9.0", "{status}");
    let metrics = reqwest::get(agent.health_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("tunnel_agent_cloudflared_info{version=\"2026.9.0\"} 1"),
        "{metrics}"
    );
    agent
        .wait_for_log(&["cloudflared version 2026.9.0 (", "cloudflared-newer"], DEADLINE)
        .await;

    // Too old for the token file: refused, and the running one keeps its version.
    let old = wrapper("cloudflared-old", "2024.12.1");
    agent.rewrite_config(&config(&cf, &[&old, "token_delivery = \"file\""]));
    agent.signal(Signal::SIGHUP);
    agent
        .wait_for_log(
            &["reload rejected", "needs cloudflared 2025.4 or later", "is 2024.12.1"],
            DEADLINE,
        )
        .await;
    // A path that names nothing: refused too, instead of a crash loop.
    agent.rewrite_config(&config(&cf, &["path = \"/nonexistent/cloudflared\""]));
    agent.signal(Signal::SIGHUP);
    agent
        .wait_for_log(
            &[
                "reload rejected",
                "cloudflared.path: cannot ask /nonexistent/cloudflared",
            ],
            DEADLINE,
        )
        .await;
    let (_, status) = get_json(&agent, "/status").await;
    assert_eq!(status["cloudflared"]["version"], "2026.9.0", "{status}");
    assert_eq!(
        cf.count("start"),
        2,
        "started at boot and for the newer path only: {:?}",
        cf.events()
    );
}
