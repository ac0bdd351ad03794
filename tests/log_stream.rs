//! `agent.log_stream` and `TUNNEL_AGENT_LOG_STREAM` through the real binary: every line the
//! agent logs (its own events, cloudflared's lines re-emitted, the access log, the error that
//! ends a run) arrives on the chosen stream and nothing on the other. The harness reads stdout
//! and stderr apart, so a line on the wrong stream fails the test whichever way it strays.
//! `TUNNEL_AGENT_LOG_FORMAT`, the image's other variable, gives `agent.log_format` the same way.

mod common;

use common::client::get;
use common::{Agent, AgentBuilder, ConfigText, FakeCloudflared, FakeUpstream, Wire, DEADLINE};
use nix::sys::signal::Signal;

const TOKEN: &str = "eyJhIjoiZmFrZS10dW5uZWwtdG9rZW4tbG9nLXN0cmVhbSJ9";

/// A config whose run logs all three kinds of line: the agent's, cloudflared's and the access
/// log's.
fn config(cf: &FakeCloudflared, up: &FakeUpstream) -> ConfigText {
    ConfigText::new()
        .env_secret("tunnel_token", "TUNNEL_TOKEN_FOR_TEST")
        .proxy("access_log = { enabled = true }")
        .host("app.test", &up.url())
        .raw(&cf.section(&[]))
}

/// Serves one request, waits for its access line and a line of cloudflared's in the log, then
/// stops the agent (SIGTERM) and returns every line of the log once it exited 0.
async fn run_and_stop(mut agent: Agent) -> (Agent, Vec<String>) {
    let reply = get(agent.proxy_addr(), "app.test", "/log-stream-probe", &[]).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    agent.wait_for_log(&[" access: ", "/log-stream-probe"], DEADLINE).await;
    agent
        .wait_for_log(&[" cloudflared: ", "Registered tunnel connection"], DEADLINE)
        .await;
    agent.signal(Signal::SIGTERM);
    let status = agent.wait_exit(DEADLINE).await;
    assert!(status.success(), "{status}:\n{}", agent.logs().join("\n"));
    let log = agent.logs();
    (agent, log)
}

/// The lines of a whole run: the start line, ready, cloudflared's (from start to its drain),
/// the access log's, the shutdown.
fn assert_whole_run(log: &[String]) {
    for needle in [
        " starting with ",
        ": ready",
        "Registered tunnel connection",
        "Initiating graceful shutdown",
        " access: ",
        "stopped",
    ] {
        assert!(
            log.iter().any(|l| l.contains(needle)),
            "no {needle:?} in the log:\n{}",
            log.join("\n")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asked_for_stdout_every_line_is_there_and_none_on_stderr() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let builder = AgentBuilder::new();
    let cf = FakeCloudflared::new(builder.dir());
    let agent = builder
        .log_on_stdout()
        .env("TUNNEL_TOKEN_FOR_TEST", TOKEN)
        .start(&config(&cf, &up).agent("log_stream = \"stdout\""))
        .await;
    let (agent, log) = run_and_stop(agent).await;
    assert_whole_run(&log);
    assert_eq!(agent.other_stream(), Vec::<String>::new(), "stderr");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_every_line_is_on_stderr_and_none_on_stdout() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let builder = AgentBuilder::new();
    let cf = FakeCloudflared::new(builder.dir());
    let agent = builder
        .env("TUNNEL_TOKEN_FOR_TEST", TOKEN)
        .start(&config(&cf, &up))
        .await;
    let (agent, log) = run_and_stop(agent).await;
    assert_whole_run(&log);
    assert_eq!(agent.other_stream(), Vec::<String>::new(), "stdout");
}

/// The image's way: the variable, no key in the file, the gateway controller's environment mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_variable_sends_the_environment_mode_to_stdout() {
    let mut agent = AgentBuilder::new()
        .log_on_stdout()
        .with_env_mode()
        .env("TUNNEL_AGENT_LOG_STREAM", "stdout")
        .env("PROXY_ADDR", "127.0.0.1:0")
        .env("PROXY_CONFIG_ADDR", "127.0.0.1:0")
        .env("PROXY_AUTH_TOKEN", "log-stream-config-token")
        .start(&ConfigText::new())
        .await;
    agent.wait_for_log(&["config api up"], DEADLINE).await;
    agent.signal(Signal::SIGTERM);
    assert!(agent.wait_exit(DEADLINE).await.success());
    assert_eq!(agent.other_stream(), Vec::<String>::new(), "stderr");
}

/// The file's key wins over the variable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_files_key_decides_over_the_variable() {
    let mut agent = AgentBuilder::new()
        .env("TUNNEL_AGENT_LOG_STREAM", "stdout")
        .start(&ConfigText::new().agent("log_stream = \"stderr\""))
        .await;
    agent.signal(Signal::SIGTERM);
    assert!(agent.wait_exit(DEADLINE).await.success());
    assert_eq!(agent.other_stream(), Vec::<String>::new(), "stdout");
}

/// The image's way for the format: with the variable and no key, the gateway controller's
/// environment mode logs one JSON object per line (as that controller's proxy does), every
/// line of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_format_variable_gives_json_lines_and_the_files_key_decides() {
    let start = |config: ConfigText| async move {
        let mut agent = AgentBuilder::new()
            .log_on_stdout()
            .with_env_mode()
            .env("TUNNEL_AGENT_LOG_STREAM", "stdout")
            .env("TUNNEL_AGENT_LOG_FORMAT", "json")
            .env("PROXY_ADDR", "127.0.0.1:0")
            .env("PROXY_CONFIG_ADDR", "127.0.0.1:0")
            .start(&config)
            .await;
        agent.wait_for_log(&["config api up"], DEADLINE).await;
        agent.signal(Signal::SIGTERM);
        assert!(agent.wait_exit(DEADLINE).await.success());
        assert_eq!(agent.other_stream(), Vec::<String>::new(), "stderr");
        agent.logs()
    };
    let log = start(ConfigText::new().without_agent_key("log_format")).await;
    assert!(log.len() >= 3, "{log:?}");
    for line in &log {
        let parsed: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(parsed["level"].is_string() && parsed["fields"].is_object(), "{line}");
    }
    // The harness's file says `log_format = "text"`: that wins over the variable.
    let log = start(ConfigText::new()).await;
    assert!(log.iter().all(|l| !l.starts_with('{')), "{log:?}");
}

/// The error that ends a run once logging is set up (here: the proxy's port is taken) is said
/// where the log goes, not on stderr.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_error_that_ends_a_run_follows_the_log() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let port = taken.local_addr().expect("its address").port();
    let builder = AgentBuilder::new()
        .log_on_stdout()
        .env("TUNNEL_AGENT_LOG_STREAM", "stdout");
    let config = ConfigText::new()
        .proxy(&format!("listen = \"127.0.0.1:{port}\""))
        .render(builder.dir());
    let mut agent = builder.spawn(&config);
    let status = agent.wait_exit(DEADLINE).await;
    assert!(!status.success(), "started on a taken port");
    let log = agent.logs();
    for needle in [" starting with ", "tunnel-agent failed", "tunnel-agent: "] {
        assert!(
            log.iter().any(|l| l.contains(needle)),
            "no {needle:?} on stdout:\n{}",
            log.join("\n")
        );
    }
    assert_eq!(agent.other_stream(), Vec::<String>::new(), "stderr");
    drop(taken);
}

/// In JSON, the error that ends a run is its JSON event alone: no plain line after it, which
/// would be the one line on the stream a JSON reader cannot parse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_json_the_error_that_ends_a_run_is_a_json_line_too() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let port = taken.local_addr().expect("its address").port();
    let builder = AgentBuilder::new().log_on_stdout();
    let config = ConfigText::new()
        .agent("log_format = \"json\"")
        .agent("log_stream = \"stdout\"")
        .proxy(&format!("listen = \"127.0.0.1:{port}\""))
        .render(builder.dir());
    let mut agent = builder.spawn(&config);
    assert!(!agent.wait_exit(DEADLINE).await.success(), "started on a taken port");
    let log = agent.logs();
    assert!(log.iter().any(|l| l.contains("tunnel-agent failed")), "{log:#?}");
    for line in &log {
        let parsed: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(parsed.is_object(), "{line}");
    }
    assert_eq!(agent.other_stream(), Vec::<String>::new(), "stderr");
    drop(taken);
}

/// `check` does what start-up does: a bad key names the file, line, key and both streams; a bad
/// variable names the variable. Both exit 78.
#[test]
fn check_refuses_a_bad_stream_in_the_file_or_the_variable() {
    let builder = AgentBuilder::new();
    let path = builder.file(
        "agent.toml",
        "[agent]\nlog_level = \"info\"\nlog_stream = \"journal\"\n",
    );
    let check = |var: Option<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tunnel-agent"));
        cmd.arg("check").arg("-c").arg(&path).env_clear();
        if let Some(v) = var {
            cmd.env("TUNNEL_AGENT_LOG_STREAM", v);
        }
        let out = cmd.output().expect("run tunnel-agent check");
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, stderr) = check(None);
    assert_eq!(code, Some(78), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{}:3:14: agent.log_stream: unknown variant `journal`, expected `stderr` or `stdout`",
            path.display()
        )),
        "{stderr}"
    );
    std::fs::write(&path, "[agent]\nlog_level = \"info\"\n").expect("rewrite the file");
    assert_eq!(check(Some("stdout")).0, Some(0));
    let (code, stderr) = check(Some("journal"));
    assert_eq!(code, Some(78), "{stderr}");
    assert!(
        stderr.contains("TUNNEL_AGENT_LOG_STREAM: \"journal\" is not one of stderr, stdout"),
        "{stderr}"
    );
}

/// A format variable the key would not take is refused by `check` (which loads the file as a
/// start does), naming the variable and the formats.
#[test]
fn check_refuses_a_bad_format_variable() {
    let builder = AgentBuilder::new();
    let path = builder.file("agent.toml", "[agent]\nlog_level = \"info\"\n");
    let check = |var: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tunnel-agent"))
            .arg("check")
            .arg("-c")
            .arg(&path)
            .env_clear()
            .env("TUNNEL_AGENT_LOG_FORMAT", var)
            .output()
            .expect("run tunnel-agent");
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    assert_eq!(check("json").0, Some(0));
    let (code, stderr) = check("logfmt");
    assert_eq!(code, Some(78), "{stderr}");
    assert!(
        stderr.contains(
            "TUNNEL_AGENT_LOG_FORMAT: \"logfmt\" is not one of auto, text, json, journald (the default of agent.log_format)"
        ),
        "{stderr}"
    );
}
