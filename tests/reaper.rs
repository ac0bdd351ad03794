//! agent/reaper.rs without a container: the agent as PID 1 of a new PID namespace, made with
//! util-linux's `unshare --pid --fork --mount-proc` as a container runtime makes one, and the
//! agent started the usual way, where nothing may change.
//!
//! As PID 1 it must start itself again as its only child (the agent proper, with no signal
//! blocked), reap the orphans cloudflared's children leave behind
//! (tests/image/orphaning-cloudflared makes one), pass SIGTERM on so the agent drains and the
//! namespace's PID 1 exits 0, and exit with the agent's status. Not as PID 1 there must be one
//! process, no init. The PID-namespace tests need root (or unprivileged user namespaces) and
//! `unshare`; without them they print why and skip.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{eventually, Agent, AgentBuilder, ConfigText, FakeCloudflared, DEADLINE};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const TOKEN: &str = "eyJhIjoiZmFrZS10dW5uZWwtdG9rZW4tZG8tbm90LWxlYWsifQ";

/// `unshare` and the flags that give its command a PID namespace of its own here, or why there
/// is none: run as root it needs no more; otherwise an unprivileged user namespace must be
/// allowed. `--kill-child`: a test that fails and kills `unshare` takes the namespace with it.
fn pid_namespace() -> Result<Vec<String>, String> {
    let unshare = ["/usr/bin/unshare", "/bin/unshare"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .ok_or("util-linux's unshare is not installed")?;
    let mut tried = Vec::new();
    for extra in [&[][..], &["--user", "--map-root-user"][..]] {
        let mut argv = vec![unshare.to_owned()];
        argv.extend(extra.iter().map(|&a| a.to_owned()));
        argv.extend(["--pid", "--fork", "--mount-proc", "--kill-child"].map(str::to_owned));
        let out = Command::new(&argv[0])
            .args(&argv[1..])
            .arg("true")
            .output()
            .map_err(|e| format!("cannot run {unshare}: {e}"))?;
        if out.status.success() {
            return Ok(argv);
        }
        tried.push(format!(
            "{}: {}",
            argv[1..].join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Err(format!("no PID namespace here ({})", tried.join("; ")))
}

/// The children of `pid` (every thread's), from /proc.
fn children(pid: u32) -> Vec<u32> {
    let mut kids = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let text = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        kids.extend(text.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
    }
    kids
}

fn exe(pid: u32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/exe")).ok()
}

/// The `/proc/PID/stat` state letter (`Z`: a zombie), `None` once it is gone.
fn state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) S ...`: comm may hold spaces and parentheses, the state follows the last ')'.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// A `/proc/PID/status` field's value.
fn status_field(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(|v| v.trim().to_owned())
        .unwrap_or_default()
}

/// An agent whose cloudflared is tests/image/orphaning-cloudflared in front of the fake.
fn orphaning_agent(builder: &AgentBuilder) -> ConfigText {
    let cf = FakeCloudflared::new(builder.dir());
    // Copied into the fake's control directory, which the Landlock sandbox lets cloudflared read.
    let wrapper = cf.dir().join("orphaning-cloudflared");
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/image/orphaning-cloudflared");
    std::fs::copy(&source, &wrapper).expect("copy the orphaning wrapper");
    std::os::unix::fs::symlink(FakeCloudflared::script(), cf.dir().join("fake-cloudflared")).expect("link the fake");
    let path = format!("path = {:?}", wrapper.display().to_string());
    ConfigText::new()
        .env_secret("tunnel_token", "TUNNEL_TOKEN_FOR_TEST")
        .host("app.example.com", "http://127.0.0.1:9")
        .raw(&cf.section(&[&path]))
}

/// The pid of `launcher`'s only child: PID 1 of the namespace, seen from here.
async fn namespace_init(agent: &Agent) -> u32 {
    let launcher = agent.pid().as_raw().unsigned_abs();
    eventually(DEADLINE, "unshare's child", || async {
        match children(launcher)[..] {
            [init] => Some(init),
            _ => None,
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_pid1_it_reaps_orphans_and_drains_on_sigterm() {
    let launcher = match pid_namespace() {
        Ok(argv) => argv,
        Err(why) => return println!("SKIP as_pid1_it_reaps_orphans_and_drains_on_sigterm: {why}"),
    };
    let launcher: Vec<&str> = launcher.iter().map(String::as_str).collect();
    let builder = AgentBuilder::new().env("TUNNEL_TOKEN_FOR_TEST", TOKEN);
    let config = orphaning_agent(&builder);
    let mut agent = builder.launched_by(&launcher).start(&config).await;
    let init = namespace_init(&agent).await;
    let binary = exe(init).expect("PID 1's program");
    assert!(binary.ends_with("tunnel-agent"), "PID 1 runs {binary:?}");

    // The orphan said it exited; until PID 1 waits for it, it is a zombie child of PID 1. And
    // the fake is up (its SIGTERM handler too, so the drain below is cloudflared's).
    agent
        .wait_for_log(&["orphaning-cloudflared: orphan", "exiting"], DEADLINE)
        .await;
    agent.wait_for_log(&["tunnel connected"], DEADLINE).await;
    let agent_pid = eventually(DEADLINE, "PID 1 with one child, the agent, and no zombie", || async {
        let kids = children(init);
        let live: Vec<u32> = kids
            .iter()
            .copied()
            .filter(|&k| state(k).is_some_and(|s| s != 'Z'))
            .collect();
        (kids.len() == 1 && live.len() == 1).then(|| live[0])
    })
    .await;
    assert_eq!(
        exe(agent_pid),
        Some(binary.clone()),
        "PID 1's child is the agent itself"
    );
    let cloudflared = children(agent_pid);
    assert_eq!(
        cloudflared.len(),
        1,
        "cloudflared is the agent's child, not PID 1's: {cloudflared:?}"
    );
    // std's spawn empties the signal mask: the agent does not inherit the init's blocked SIGTERM.
    let blocked = u64::from_str_radix(&status_field(agent_pid, "SigBlk:"), 16).expect("SigBlk is hex");
    assert_eq!(
        blocked & (1 << (libc::SIGTERM - 1)),
        0,
        "SIGTERM blocked in the agent: {blocked:x}"
    );

    // SIGTERM to PID 1 (as `podman stop` and the kubelet send it) reaches the agent: it drains
    // cloudflared and exits 0, and PID 1 exits with that status.
    kill(Pid::from_raw(i32::try_from(init).expect("pid")), Signal::SIGTERM).expect("signal PID 1");
    let status = agent.wait_exit(DEADLINE).await;
    assert_eq!(status.code(), Some(0), "{status}: {}", agent.logs().join("\n"));
    agent
        .wait_for_log(&["Initiating graceful shutdown"], Duration::ZERO)
        .await;
}

#[test]
fn as_pid1_the_exit_status_and_output_are_the_agents() {
    let launcher = match pid_namespace() {
        Ok(argv) => argv,
        Err(why) => return println!("SKIP as_pid1_the_exit_status_and_output_are_the_agents: {why}"),
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let bad = dir.path().join("agent.toml");
    std::fs::write(&bad, "[agent]\nlog_format = \"xml\"\n").expect("write config");
    let agent = env!("CARGO_BIN_EXE_tunnel-agent");
    for args in [
        vec!["--version"],
        vec!["check", "-c", bad.to_str().expect("utf-8 path")],
    ] {
        let direct = Command::new(agent).args(&args).output().expect("run the agent");
        let as_pid1 = Command::new(&launcher[0])
            .args(&launcher[1..])
            .arg(agent)
            .args(&args)
            .output()
            .expect("run the agent under unshare");
        assert_eq!(as_pid1.status.code(), direct.status.code(), "{args:?}");
        assert_eq!(as_pid1.stdout, direct.stdout, "{args:?}");
        assert_eq!(as_pid1.stderr, direct.stderr, "{args:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_pid1_there_is_no_init() {
    let builder = AgentBuilder::new().env("TUNNEL_TOKEN_FOR_TEST", TOKEN);
    let config = orphaning_agent(&builder);
    let agent = builder.start(&config).await;
    let pid = agent.pid().as_raw().unsigned_abs();
    // The process the test started is the agent: its children are cloudflared (python) only, never
    // a second tunnel-agent.
    let cloudflared = eventually(DEADLINE, "the agent's one child, cloudflared", || async {
        match children(pid)[..] {
            [one] => Some(one),
            _ => None,
        }
    })
    .await;
    assert_ne!(
        exe(cloudflared),
        exe(pid),
        "the agent started itself again, not being PID 1"
    );
    assert!(
        agent.logs().iter().any(|l| l.contains("proxy up")),
        "the started process serves"
    );
}
