//! Active / standby: only the active node runs cloudflared. The real binary, the fake cloudflared
//! (tests/fakes/cloudflared), `tunnel-agent promote|demote|status` run as an operator would, and
//! a fake metadata server for the watched role attribute.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::agent::{control_command, run_command, ControlRun};
use common::client::{self, get};
use common::{
    eventually, Agent, AgentBuilder, ConfigText, FakeCloudflared, FakeMetadata, FakeUpstream, Wire, DEADLINE,
};
use http::StatusCode;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use nix::sys::signal::Signal;
use tokio::time::Instant;

/// The connector token the fake cloudflared receives (through the agent, never argv).
const TUNNEL_TOKEN: &str = "eyJhIjoiZmFrZS1hY2NvdW50IiwidCI6ImZha2UtdHVubmVsIn0";

const ROLE_ATTRIBUTE: &str = "project/attributes/tunnel-active-host";

/// A builder whose environment carries the tunnel token and the fake cloudflared's control dir.
fn node() -> (AgentBuilder, FakeCloudflared) {
    let builder = AgentBuilder::new();
    let cf = FakeCloudflared::new(builder.dir());
    let builder = builder.env("TA_TUNNEL_TOKEN", TUNNEL_TOKEN);
    (builder, cf)
}

/// One route to `up`, cloudflared supervised, and the config file's `role`.
fn node_config(cf: &FakeCloudflared, up: &FakeUpstream, role: &str) -> ConfigText {
    node_config_with(cf, up, role, &[])
}

/// [`node_config`] with `cloudflared` keys added or overridden.
fn node_config_with(cf: &FakeCloudflared, up: &FakeUpstream, role: &str, cloudflared: &[&str]) -> ConfigText {
    ConfigText::new()
        .top(&format!("role = \"{role}\""))
        .env_secret("tunnel_token", "TA_TUNNEL_TOKEN")
        .host("app.test", &up.url())
        .raw(&cf.section(cloudflared))
}

async fn health(agent: &Agent, path: &str) -> StatusCode {
    get(agent.health_addr(), "localhost", path, &[]).await.status
}

async fn status(agent: &Agent) -> serde_json::Value {
    get(agent.health_addr(), "localhost", "/status", &[]).await.json()
}

/// Polls `path` on the health listener until it answers `want`.
async fn wait_health(agent: &Agent, path: &str, want: StatusCode) {
    eventually(DEADLINE, &format!("{path} to answer {want}"), || async {
        (health(agent, path).await == want).then_some(())
    })
    .await;
}

/// Polls `/status` until it reports `role` from `source`. A change driven by the watched
/// attribute is published once cloudflared was started or stopped, so it shows a moment after
/// the fake's events and `/active` do.
async fn wait_role(agent: &Agent, role: &str, source: &str) {
    let mut last = serde_json::Value::Null;
    let reached = tokio::time::timeout(DEADLINE, async {
        loop {
            last = status(agent).await;
            if last["role"] == role && last["role_source"] == source {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(reached.is_ok(), "role never became {role} ({source}): {last}");
}

async fn assert_proxy_serves(agent: &Agent) {
    let r = get(agent.proxy_addr(), "app.test", "/still-serving", &[]).await;
    assert_eq!(r.echoed().uri, "/still-serving");
}

/// What one measured promotion took.
struct Promotion {
    pid: u32,
    /// Command issued → the fake cloudflared recorded its start.
    to_spawned: Duration,
    /// Command issued → `/active` answered 200.
    to_active: Duration,
    run: ControlRun,
}

/// Runs `tunnel-agent promote` and times it against what the fake and `/active` report.
async fn promote_measured(agent: &Agent, cf: &FakeCloudflared) -> Promotion {
    let before = cf.started_pids().len();
    let issued = Instant::now();
    let command = tokio::spawn(control_command(agent.control_args("promote")));
    let pids = cf.wait_starts(before + 1, DEADLINE).await;
    let to_spawned = issued.elapsed();
    wait_health(agent, "/active", StatusCode::OK).await;
    let to_active = issued.elapsed();
    let run = command.await.expect("promote task");
    assert!(run.ok(), "promote failed: {run:?}");
    assert!(run.stdout.contains("promoted to active"), "{run:?}");
    Promotion {
        pid: pids[before],
        to_spawned,
        to_active,
        run,
    }
}

/// Runs `tunnel-agent demote` and checks that `pid` got exactly one SIGTERM and exited by itself.
async fn demote_checked(agent: &Agent, cf: &FakeCloudflared, pid: u32) -> ControlRun {
    let run = agent.control("demote").await;
    assert!(run.ok(), "demote failed: {run:?}");
    assert!(run.stdout.contains("demoted to standby"), "{run:?}");
    // `demote` answers once cloudflared was reaped, so the fake's record is complete.
    assert_eq!(cf.exit_code(pid), Some(0), "cloudflared {pid} exit: {:?}", cf.events());
    assert_eq!(cf.sigterms(pid), 1, "exactly one SIGTERM for {pid}: {:?}", cf.events());
    assert_eq!(health(agent, "/active").await, StatusCode::SERVICE_UNAVAILABLE);
    run
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_boot_serves_but_never_starts_cloudflared() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let (builder, cf) = node();
    let agent = builder.start(&node_config(&cf, &up, "standby")).await;

    assert_proxy_serves(&agent).await;
    let ready = get(agent.health_addr(), "localhost", "/ready", &[]).await;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.text());
    assert_eq!(ready.json()["role"], "standby");
    assert_eq!(ready.json()["components"]["cloudflared"], "standby (not running)");
    let active = get(agent.health_addr(), "localhost", "/active", &[]).await;
    assert_eq!(active.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(active.json()["active"], false);

    let s = status(&agent).await;
    assert_eq!(s["role"], "standby", "{s}");
    assert_eq!(s["role_source"], "config", "{s}");
    assert_eq!(s["cloudflared"]["wanted"], false, "{s}");
    assert_eq!(s["cloudflared"]["pid"], serde_json::Value::Null, "{s}");
    // An active node spawns cloudflared before it logs `ready`: by now a start would show.
    assert!(
        !agent.logs().iter().any(|l| l.contains("cloudflared started")),
        "{:#?}",
        agent.logs()
    );
    assert!(cf.events().is_empty(), "the fake was run: {:?}", cf.events());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promote_and_demote_through_the_cli() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let (builder, cf) = node();
    let agent = builder.start(&node_config(&cf, &up, "standby")).await;
    assert_eq!(health(&agent, "/active").await, StatusCode::SERVICE_UNAVAILABLE);

    let p = promote_measured(&agent, &cf).await;
    println!(
        "promotion: command -> cloudflared spawned {:.0} ms, command -> /active 200 {:.0} ms, command exit {:.0} ms (agent says: {})",
        p.to_spawned.as_secs_f64() * 1000.0,
        p.to_active.as_secs_f64() * 1000.0,
        p.run.took.as_secs_f64() * 1000.0,
        p.run.stdout.lines().next().unwrap_or("")
    );
    let s = status(&agent).await;
    assert_eq!(s["role"], "active", "{s}");
    assert_eq!(s["role_source"], "cli", "{s}");
    assert_eq!(s["cloudflared"]["pid"], p.pid, "{s}");
    assert_eq!(health(&agent, "/ready").await, StatusCode::OK);
    // The token reached cloudflared outside argv.
    let start = cf
        .events()
        .into_iter()
        .find(|e| e.kind == "start")
        .expect("start event");
    assert!(!start.rest.contains(TUNNEL_TOKEN), "token in argv: {}", start.rest);
    assert_eq!(cf.count("token"), 1);
    assert_proxy_serves(&agent).await;

    let again = agent.control("promote").await;
    assert!(again.ok(), "a second promote is not an error: {again:?}");
    assert!(again.output().contains("already"), "{again:?}");
    assert_eq!(
        cf.started_pids(),
        vec![p.pid],
        "a second promote must not restart cloudflared"
    );
    assert_eq!(cf.count("sigterm"), 0);

    let d = demote_checked(&agent, &cf, p.pid).await;
    println!(
        "demotion: command -> cloudflared stopped and reaped {:.0} ms (agent says: {})",
        d.took.as_secs_f64() * 1000.0,
        d.stdout.lines().next().unwrap_or("")
    );
    assert_proxy_serves(&agent).await;
    let s = status(&agent).await;
    assert_eq!(s["role"], "standby", "{s}");
    assert_eq!(s["role_source"], "cli", "{s}");
    assert_eq!(health(&agent, "/ready").await, StatusCode::OK);

    let again = agent.control("demote").await;
    assert!(again.ok() && again.output().contains("already"), "{again:?}");

    let st = agent.control("status").await;
    assert!(st.ok(), "{st:?}");
    assert!(st.stdout.contains("standby (cli)"), "{st:?}");
}

/// Counts of a request load's outcome.
#[derive(Default)]
struct LoadCounts {
    ok: AtomicU64,
    failed: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl LoadCounts {
    fn fail(&self, why: String) {
        self.failed.fetch_add(1, Ordering::SeqCst);
        self.errors.lock().unwrap().push(why);
    }
}

/// One client: a keep-alive HTTP/1.1 connection (as cloudflared keeps to its origin), a request
/// every few milliseconds; a failed request is counted and the connection replaced.
async fn client_loop(addr: std::net::SocketAddr, counts: Arc<LoadCounts>, stop: Arc<AtomicBool>) {
    let mut pace = tokio::time::interval(Duration::from_millis(5));
    while !stop.load(Ordering::SeqCst) {
        let stream = match tokio::net::TcpStream::connect(addr).await {
            Ok(s) => s,
            Err(e) => {
                counts.fail(format!("connect: {e}"));
                pace.tick().await;
                continue;
            }
        };
        let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
            Ok(pair) => pair,
            Err(e) => {
                counts.fail(format!("handshake: {e}"));
                continue;
            }
        };
        tokio::spawn(conn);
        while !stop.load(Ordering::SeqCst) {
            pace.tick().await;
            let req = client::request(http::Method::GET, "app.test", "/load")
                .body(common::body::empty())
                .expect("request");
            let outcome = tokio::time::timeout(DEADLINE, async {
                sender.ready().await.map_err(|e| client::chain(&e))?;
                let resp = sender.send_request(req).await.map_err(|e| client::chain(&e))?;
                let status = resp.status();
                resp.into_body().collect().await.map_err(|e| client::chain(&e))?;
                Ok::<_, String>(status)
            })
            .await
            .unwrap_or_else(|_| Err(format!("no response within {DEADLINE:?}")));
            match outcome {
                Ok(StatusCode::OK) => {
                    counts.ok.fetch_add(1, Ordering::SeqCst);
                }
                Ok(other) => counts.fail(format!("status {other}")),
                Err(e) => {
                    counts.fail(e);
                    break;
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotions_under_load_drop_no_proxy_requests() {
    const CLIENTS: usize = 4;
    const CYCLES: usize = 5;
    let up = FakeUpstream::start(Wire::Http1).await;
    let (builder, cf) = node();
    let agent = builder.start(&node_config(&cf, &up, "standby")).await;

    let counts = Arc::new(LoadCounts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| tokio::spawn(client_loop(agent.proxy_addr(), counts.clone(), stop.clone())))
        .collect();
    eventually(DEADLINE, "the load to get going", || async {
        (counts.ok.load(Ordering::SeqCst) >= 20).then_some(())
    })
    .await;

    let mut promotions = Vec::new();
    let mut demotions = Vec::new();
    for _ in 0..CYCLES {
        let served_before = counts.ok.load(Ordering::SeqCst);
        let p = promote_measured(&agent, &cf).await;
        let d = demote_checked(&agent, &cf, p.pid).await;
        promotions.push((p.to_spawned, p.to_active));
        demotions.push(d.took);
        // Requests kept flowing across the cycle, not just before and after.
        eventually(DEADLINE, "requests served during the cycle", || async {
            (counts.ok.load(Ordering::SeqCst) > served_before).then_some(())
        })
        .await;
    }
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.expect("client task");
    }

    let ok = counts.ok.load(Ordering::SeqCst);
    let failed = counts.failed.load(Ordering::SeqCst);
    let ms = |d: &Duration| format!("{:.0}", d.as_secs_f64() * 1000.0);
    println!(
        "{CYCLES} promote/demote cycles under load: {ok} proxy requests ok, {failed} failed; \
         command -> spawned ms {:?}; command -> /active ms {:?}; demote ms {:?}",
        promotions.iter().map(|p| ms(&p.0)).collect::<Vec<_>>(),
        promotions.iter().map(|p| ms(&p.1)).collect::<Vec<_>>(),
        demotions.iter().map(ms).collect::<Vec<_>>(),
    );
    assert_eq!(failed, 0, "failed requests: {:?}", counts.errors.lock().unwrap());
    assert!(ok > 100, "only {ok} requests in {CYCLES} cycles");
    assert_eq!(cf.started_pids().len(), CYCLES);
    assert_eq!(cf.count("sigterm"), CYCLES, "{:?}", cf.events());
    // No retry hid a failure: the upstream saw each request exactly once.
    assert_eq!(up.requests(), ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promotion_survives_a_restart() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let (builder, cf) = node();
    let config = node_config(&cf, &up, "standby");
    let mut first = builder.start(&config).await;
    let p = promote_measured(&first, &cf).await;

    first.signal(Signal::SIGTERM);
    let exit = first.wait_exit(DEADLINE).await;
    assert_eq!(exit.code(), Some(0), "{exit}");
    assert_eq!(cf.sigterms(p.pid), 1, "shutdown stops cloudflared: {:?}", cf.events());
    assert_eq!(cf.exit_code(p.pid), Some(0), "{:?}", cf.events());

    let mut second = first.successor().start(&config).await;
    let s = status(&second).await;
    assert_eq!(s["role"], "active", "{s}");
    assert_eq!(s["role_source"], "persisted", "{s}");
    // The first line names the role this start is in, not only the file's.
    let first_line = second.logs().into_iter().next().unwrap_or_default();
    assert!(
        first_line.contains("(role active, kept from an earlier promote; configured role standby)")
            && first_line.contains("role_source=\"persisted\""),
        "first log line: {first_line}"
    );
    let pids = cf.wait_starts(2, DEADLINE).await;
    assert_ne!(pids[1], p.pid);
    wait_health(&second, "/active", StatusCode::OK).await;

    // The file's role changing since the promotion wins over the persisted one.
    second.signal(Signal::SIGTERM);
    assert_eq!(second.wait_exit(DEADLINE).await.code(), Some(0));
    let edited = node_config(&cf, &up, "active");
    let third = second.successor().start(&edited).await;
    let s = status(&third).await;
    assert_eq!(
        (s["role"].as_str(), s["role_source"].as_str()),
        (Some("active"), Some("config")),
        "{s}"
    );
    let first_line = third.logs().into_iter().next().unwrap_or_default();
    assert!(
        first_line.contains("(role active, as configured; configured role active)"),
        "first log line: {first_line}"
    );
}

/// A reload whose file changes `role` takes the one role path every other source takes:
/// cloudflared follows, the fence holds when it leaves, `/status` names the file, and a role a
/// `promote` kept for the next start is dropped once the file says the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_the_role_through_the_one_path() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let (builder, cf) = node();
    let agent = builder.start(&node_config(&cf, &up, "standby")).await;
    agent.rewrite_config(&node_config(&cf, &up, "active"));
    agent.signal(Signal::SIGHUP);
    let pid = cf.wait_starts(1, DEADLINE).await[0];
    wait_role(&agent, "active", "config").await;
    wait_health(&agent, "/active", StatusCode::OK).await;

    agent.rewrite_config(&node_config(&cf, &up, "standby"));
    agent.signal(Signal::SIGHUP);
    wait_role(&agent, "standby", "config").await;
    assert_eq!(health(&agent, "/active").await, StatusCode::SERVICE_UNAVAILABLE);
    eventually(DEADLINE, "cloudflared stopped by the reload", || async {
        cf.exit_code(pid).map(|_| ())
    })
    .await;
    assert_eq!(cf.sigterms(pid), 1, "exactly one SIGTERM for {pid}: {:?}", cf.events());

    let kept = agent.dir().join("state").join("role.json");
    let p = promote_measured(&agent, &cf).await;
    assert!(kept.exists(), "promote keeps the role in {}", kept.display());
    agent.rewrite_config(&node_config(&cf, &up, "active"));
    agent.signal(Signal::SIGHUP);
    wait_role(&agent, "active", "config").await;
    assert!(!kept.exists(), "the file's role took over; {} is left", kept.display());
    assert_eq!(
        cf.started_pids(),
        vec![pid, p.pid],
        "a file agreeing with the role must not restart cloudflared"
    );
    assert_eq!(health(&agent, "/active").await, StatusCode::OK);
}

fn watched_config(cf: &FakeCloudflared, up: &FakeUpstream, meta: &FakeMetadata) -> ConfigText {
    watched_config_with(cf, up, meta, &[])
}

fn watched_config_with(
    cf: &FakeCloudflared,
    up: &FakeUpstream,
    meta: &FakeMetadata,
    cloudflared: &[&str],
) -> ConfigText {
    node_config_with(cf, up, "standby", cloudflared)
        .gcp(&format!("metadata_url = {:?}", meta.url()))
        .raw(
            "[role_watch]\nattribute = \"tunnel-active-host\"\nattribute_scope = \"project\"\nhost_name = \"node-a\"\n",
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watched_attribute_decides_the_role() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let meta = FakeMetadata::start().await;
    meta.set_attribute(ROLE_ATTRIBUTE, "node-a");
    let (builder, cf) = node();
    // The file says standby; the attribute names this host, and it is authoritative.
    let agent = builder.start(&watched_config(&cf, &up, &meta)).await;
    let first = cf.wait_starts(1, DEADLINE).await[0];
    wait_health(&agent, "/active", StatusCode::OK).await;
    wait_role(&agent, "active", "watched-attribute").await;
    let first_line = agent.logs().into_iter().next().unwrap_or_default();
    assert!(
        first_line.contains("(role from the metadata attribute ")
            && first_line.contains("tunnel-active-host, standby until it answers; configured role standby)"),
        "first log line: {first_line}"
    );

    meta.set_attribute(ROLE_ATTRIBUTE, "node-b");
    eventually(DEADLINE, "cloudflared to stop after the attribute moved", || async {
        cf.exit_code(first).map(|_| ())
    })
    .await;
    assert_eq!(cf.sigterms(first), 1, "{:?}", cf.events());
    assert_eq!(cf.exit_code(first), Some(0));
    wait_health(&agent, "/active", StatusCode::SERVICE_UNAVAILABLE).await;
    wait_role(&agent, "standby", "watched-attribute").await;
    assert_proxy_serves(&agent).await;
    assert_eq!(health(&agent, "/ready").await, StatusCode::OK);

    // A manual promote would fight the attribute: refused, naming it.
    for command in ["promote", "demote"] {
        let run = agent.control(command).await;
        assert!(!run.ok(), "{command} must be refused: {run:?}");
        assert!(run.stderr.contains("tunnel-active-host"), "{command}: {run:?}");
    }
    assert_eq!(cf.started_pids().len(), 1, "a refused promote started cloudflared");

    meta.set_attribute(ROLE_ATTRIBUTE, "node-a");
    let pids = cf.wait_starts(2, DEADLINE).await;
    assert_ne!(pids[1], first);
    wait_health(&agent, "/active", StatusCode::OK).await;
    wait_role(&agent, "active", "watched-attribute").await;
}

/// How to run a command as another user, if this machine has a way.
fn as_user_wrapper(user: &str) -> Option<Vec<String>> {
    let exists = |p: &str| std::path::Path::new(p).exists();
    if let Some(runuser) = ["/usr/sbin/runuser", "/sbin/runuser", "/usr/bin/runuser"]
        .into_iter()
        .find(|p| exists(p))
    {
        return Some(vec![runuser.into(), "-u".into(), user.into(), "--".into()]);
    }
    let setpriv = ["/usr/bin/setpriv", "/bin/setpriv"].into_iter().find(|p| exists(p))?;
    let u = nix::unistd::User::from_name(user).ok()??;
    Some(vec![
        setpriv.into(),
        format!("--reuid={}", u.uid),
        format!("--regid={}", u.gid),
        "--clear-groups".into(),
    ])
}

async fn run_as(wrapper: &[String], args: &[&str]) -> ControlRun {
    let mut argv: Vec<String> = wrapper[1..].to_vec();
    argv.push(env!("CARGO_BIN_EXE_tunnel-agent").to_owned());
    argv.extend(args.iter().map(|a| (*a).to_owned()));
    run_command(wrapper[0].clone(), argv).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_socket_is_owner_only() {
    let agent = AgentBuilder::new().start(&ConfigText::new()).await;
    let socket = agent.dir().join("run/control.sock");
    let meta = std::fs::metadata(&socket).expect("control socket exists once ready");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{socket:?}");
    let own = agent.control("status").await;
    assert!(own.ok(), "the agent's own user may: {own:?}");

    if !nix::unistd::geteuid().is_root() {
        println!("SKIPPED the other-user half: not root, so cannot run a command as another user");
        return;
    }
    let Some(nobody) = nix::unistd::User::from_name("nobody").ok().flatten() else {
        println!("SKIPPED the other-user half: no user \"nobody\" on this machine");
        return;
    };
    let Some(wrapper) = as_user_wrapper("nobody") else {
        println!("SKIPPED the other-user half: neither runuser nor setpriv is installed");
        return;
    };
    // Only the socket's own mode may stop `nobody`: the directories on the way are searchable.
    for dir in [agent.dir(), &agent.dir().join("run")] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    }
    let version = run_as(&wrapper, &["--version"]).await;
    if !version.ok() {
        println!("SKIPPED the other-user half: nobody cannot run the binary here: {version:?}");
        return;
    }
    let socket_arg = socket.display().to_string();

    let denied = run_as(&wrapper, &["status", "--socket", &socket_arg]).await;
    assert!(!denied.ok(), "nobody got through a 0600 socket: {denied:?}");
    assert!(denied.stderr.contains("permission denied"), "{denied:?}");
    assert!(
        !agent.logs().iter().any(|l| l.contains("refused a caller")),
        "the file mode alone should have stopped it"
    );

    // Widened by accident (a umask, a bind mount): the peer-credential check still refuses.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).expect("chmod socket");
    let refused = run_as(&wrapper, &["status", "--socket", &socket_arg]).await;
    assert!(!refused.ok(), "nobody controlled the agent: {refused:?}");
    assert!(refused.stderr.contains("permission denied"), "{refused:?}");
    assert!(
        refused.stderr.contains("may not control this agent"),
        "the agent itself must answer the refusal: {refused:?}"
    );
    let line = agent.wait_for_log(&["refused a caller"], DEADLINE).await;
    assert!(line.contains(&format!("uid={}", nobody.uid)), "{line}");
    let promote = run_as(&wrapper, &["promote", "--socket", &socket_arg]).await;
    assert!(
        !promote.ok() && promote.stderr.contains("permission denied"),
        "{promote:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_without_a_running_agent_says_not_running() {
    let builder = AgentBuilder::new();
    let config = builder.file("agent.toml", &ConfigText::new().render(builder.dir()));
    let run = control_command(vec!["status".into(), "-c".into(), config.display().to_string()]).await;
    assert!(!run.ok(), "{run:?}");
    assert!(run.stderr.contains("not running"), "{run:?}");

    // A crashed agent leaves its socket file behind; nobody listens on it.
    let mut agent = builder.start(&ConfigText::new()).await;
    agent.signal(Signal::SIGKILL);
    agent.wait_exit(DEADLINE).await;
    assert!(
        agent.dir().join("run/control.sock").exists(),
        "SIGKILL leaves the socket file"
    );
    let run = agent.control("status").await;
    assert!(!run.ok(), "{run:?}");
    assert!(run.stderr.contains("not running"), "{run:?}");
}

/// A node whose fake cloudflared drains for `drain_ms` after its SIGTERM (grace 10 s).
fn draining_node(drain_ms: u64) -> (AgentBuilder, FakeCloudflared) {
    let (builder, cf) = node();
    cf.set("drain_ms", &drain_ms.to_string());
    (builder, cf)
}

/// Polls `/active` until it fails, then checks that it failed *while* `pid` still drains (it
/// has had its SIGTERM and not exited), with the reason in the body, and that `/ready` holds.
async fn assert_inactive_while_draining(agent: &Agent, cf: &FakeCloudflared, pid: u32) {
    let reply = eventually(DEADLINE, "/active to fail after the demotion", || async {
        let r = get(agent.health_addr(), "localhost", "/active", &[]).await;
        (r.status == StatusCode::SERVICE_UNAVAILABLE).then_some(r)
    })
    .await;
    assert_eq!(reply.json()["reason"], "draining after demotion", "{}", reply.text());
    let ready = get(agent.health_addr(), "localhost", "/ready", &[]).await;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.text());
    assert_eq!(ready.json()["components"]["cloudflared"], "draining after demotion");
    // The SIGTERM goes out with the decision; the fake records it when its handler runs, which
    // on a loaded machine can be after /active already answers.
    eventually(DEADLINE, "the fake to record its SIGTERM", || async {
        (cf.sigterms(pid) > 0).then_some(())
    })
    .await;
    assert_eq!(cf.sigterms(pid), 1, "{:?}", cf.events());
    assert_eq!(
        cf.exit_code(pid),
        None,
        "cloudflared finished its drain before /active failed: {:?}",
        cf.events()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_fails_the_moment_demote_is_decided() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let (builder, cf) = draining_node(4000);
    let config = node_config_with(&cf, &up, "active", &["grace_period = \"10s\""]);
    let agent = builder.start(&config).await;
    let pid = cf.wait_starts(1, DEADLINE).await[0];
    wait_health(&agent, "/active", StatusCode::OK).await;

    // `demote` answers only after the drain; /active must not wait for it.
    let demote = tokio::spawn(control_command(agent.control_args("demote")));
    assert_inactive_while_draining(&agent, &cf, pid).await;
    let run = demote.await.expect("demote task");
    assert!(run.ok(), "{run:?}");
    assert_eq!(cf.exit_code(pid), Some(0), "{:?}", cf.events());
    assert_eq!(cf.sigterms(pid), 1, "one SIGTERM in all: {:?}", cf.events());
    let active = get(agent.health_addr(), "localhost", "/active", &[]).await;
    assert_eq!(active.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(health(&agent, "/ready").await, StatusCode::OK);

    // Promoted again, /active follows the new tunnel.
    let _ = promote_measured(&agent, &cf).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_fails_the_moment_the_watched_attribute_moves() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let meta = FakeMetadata::start().await;
    meta.set_attribute(ROLE_ATTRIBUTE, "node-a");
    let (builder, cf) = draining_node(4000);
    let config = watched_config_with(&cf, &up, &meta, &["grace_period = \"10s\""]);
    let agent = builder.start(&config).await;
    let pid = cf.wait_starts(1, DEADLINE).await[0];
    wait_health(&agent, "/active", StatusCode::OK).await;

    meta.set_attribute(ROLE_ATTRIBUTE, "node-b");
    assert_inactive_while_draining(&agent, &cf, pid).await;
    eventually(DEADLINE, "the drain to end", || async { cf.exit_code(pid) }).await;
    wait_role(&agent, "standby", "watched-attribute").await;
    assert_eq!(health(&agent, "/active").await, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_during_a_metadata_outage_comes_back_standby() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let meta = FakeMetadata::start().await;
    meta.set_attribute(ROLE_ATTRIBUTE, "node-a");
    let (builder, cf) = node();
    let config = watched_config(&cf, &up, &meta);
    // Active from the attribute at boot, then moved away and back while running: neither role
    // may outlive this run.
    let mut first = builder.start(&config).await;
    let pid = cf.wait_starts(1, DEADLINE).await[0];
    wait_role(&first, "active", "watched-attribute").await;
    meta.set_attribute(ROLE_ATTRIBUTE, "node-b");
    eventually(DEADLINE, "the first cloudflared to stop", || async {
        cf.exit_code(pid)
    })
    .await;
    meta.set_attribute(ROLE_ATTRIBUTE, "node-a");
    cf.wait_starts(2, DEADLINE).await;
    wait_role(&first, "active", "watched-attribute").await;
    first.signal(Signal::SIGTERM);
    assert_eq!(first.wait_exit(DEADLINE).await.code(), Some(0));

    meta.set_attributes_down(true);
    let second = first.successor().start(&config).await;
    let s = status(&second).await;
    assert_eq!(s["role"], "standby", "a metadata outage at boot must mean standby: {s}");
    assert_eq!(health(&second, "/active").await, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        cf.started_pids().len(),
        2,
        "cloudflared started during the outage: {:?}",
        cf.events()
    );

    // Once the attribute answers again, the node follows it.
    meta.set_attributes_down(false);
    cf.wait_starts(3, DEADLINE).await;
    wait_role(&second, "active", "watched-attribute").await;
}

/// Runs the binary with `args` and its stdout a pipe whose reading end is already closed, as
/// `tunnel-agent status | head -1` leaves it once `head` has exited.
fn run_with_closed_stdout(args: &[String]) -> std::process::Output {
    let (read, write) = nix::unistd::pipe().expect("pipe");
    drop(read);
    std::process::Command::new(env!("CARGO_BIN_EXE_tunnel-agent"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::from(write))
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("run tunnel-agent")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_into_a_closed_pipe_exits_quietly() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let (builder, cf) = node();
    let agent = builder.start(&node_config(&cf, &up, "standby")).await;
    for extra in [None, Some("--json")] {
        let mut args = agent.control_args("status");
        args.extend(extra.map(str::to_owned));
        let out = tokio::task::spawn_blocking(move || run_with_closed_stdout(&args))
            .await
            .expect("status task");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(0),
            "status {extra:?}: {:?} {stderr}",
            out.status
        );
        assert!(stderr.is_empty(), "status {extra:?} wrote to stderr: {stderr}");
    }
}
