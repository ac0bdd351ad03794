//! Runs the real binary: writes its config into a fresh directory, starts `run -c FILE` with a
//! chosen environment, collects its log (stderr, or stdout when the test says so) and the other
//! stream apart, and learns the real listen addresses from the log.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::DEADLINE;

/// A config file's text, assembled section by section so a test only writes what it cares
/// about. Listeners are always `127.0.0.1:0`; the harness reads the real ports from the log.
#[derive(Debug, Clone)]
pub struct ConfigText {
    /// Top-level keys (e.g. `role`), which TOML needs before the first table.
    top: Vec<String>,
    agent: Vec<String>,
    secrets: String,
    proxy: Vec<String>,
    gcp: Vec<String>,
    routes: Vec<String>,
    hosts: Vec<(String, String)>,
    tail: String,
}

impl Default for ConfigText {
    fn default() -> Self {
        ConfigText {
            top: Vec::new(),
            agent: vec![
                "shutdown_grace = \"10s\"".into(),
                "log_format = \"text\"".into(),
                "log_level = \"info\"".into(),
            ],
            secrets: String::new(),
            proxy: Vec::new(),
            gcp: Vec::new(),
            routes: Vec::new(),
            hosts: Vec::new(),
            tail: String::new(),
        }
    }
}

impl ConfigText {
    pub fn new() -> ConfigText {
        ConfigText::default()
    }

    /// A top-level line, e.g. `role = "standby"`.
    pub fn top(mut self, line: &str) -> Self {
        replace_key(&mut self.top, line);
        self
    }

    /// A line in `[agent]`; a later key replaces an earlier one of the same name.
    pub fn agent(mut self, line: &str) -> Self {
        replace_key(&mut self.agent, line);
        self
    }

    /// `[agent]` without `key`, for a test of the key's default (the harness sets
    /// `log_format` and `log_level`).
    pub fn without_agent_key(mut self, key: &str) -> Self {
        self.agent.retain(|l| l.split('=').next().unwrap_or("").trim() != key);
        self
    }

    /// A line in `[proxy]`.
    pub fn proxy(mut self, line: &str) -> Self {
        replace_key(&mut self.proxy, line);
        self
    }

    /// A line in `[gcp]`.
    pub fn gcp(mut self, line: &str) -> Self {
        replace_key(&mut self.gcp, line);
        self
    }

    /// A line in `[routes]` (before `[routes.hosts]`).
    pub fn routes(mut self, line: &str) -> Self {
        replace_key(&mut self.routes, line);
        self
    }

    /// `[secrets.NAME]` read from environment variable `var`.
    pub fn env_secret(mut self, name: &str, var: &str) -> Self {
        let _ = write!(self.secrets, "[secrets.{name}]\nsource = \"env\"\nvar = \"{var}\"\n");
        self
    }

    /// Turns on the internal auth header, checked against the secret in env `var`.
    pub fn internal_auth(self, var: &str) -> Self {
        self.env_secret("internal_token", var)
            .proxy("auth_secret = \"internal_token\"")
    }

    /// One `[routes.hosts]` entry.
    pub fn host(mut self, hostname: &str, url: &str) -> Self {
        self.hosts.push((hostname.to_owned(), url.to_owned()));
        self
    }

    /// Raw TOML appended at the end (for `[[route]]` entries).
    pub fn raw(mut self, toml: &str) -> Self {
        self.tail.push_str(toml);
        self.tail.push('\n');
        self
    }

    pub fn render(&self, dir: &Path) -> String {
        let mut out = String::new();
        for l in &self.top {
            let _ = writeln!(out, "{l}");
        }
        let _ = writeln!(out, "[agent]");
        let _ = writeln!(
            out,
            "runtime_dir = {}",
            toml_str(&dir.join("run").display().to_string())
        );
        let _ = writeln!(
            out,
            "state_dir = {}",
            toml_str(&dir.join("state").display().to_string())
        );
        for l in &self.agent {
            let _ = writeln!(out, "{l}");
        }
        let _ = writeln!(out, "\n{}", self.secrets);
        let _ = writeln!(out, "[proxy]");
        if !self
            .proxy
            .iter()
            .any(|l| l.split('=').next().unwrap_or("").trim() == "listen")
        {
            let _ = writeln!(out, "listen = \"127.0.0.1:0\"");
        }
        for l in &self.proxy {
            let _ = writeln!(out, "{l}");
        }
        if !self.gcp.is_empty() {
            let _ = writeln!(out, "\n[gcp]");
            for l in &self.gcp {
                let _ = writeln!(out, "{l}");
            }
        }
        let _ = writeln!(out, "\n[health]\nlisten = \"127.0.0.1:0\"");
        let _ = writeln!(out, "\n[routes]");
        for l in &self.routes {
            let _ = writeln!(out, "{l}");
        }
        if !self.hosts.is_empty() {
            let _ = writeln!(out, "[routes.hosts]");
            for (h, u) in &self.hosts {
                let _ = writeln!(out, "{} = {}", toml_str(h), toml_str(u));
            }
        }
        let _ = writeln!(out, "\n{}", self.tail);
        out
    }
}

/// `s` as a TOML string literal, quoted and escaped by the toml crate itself.
pub fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn replace_key(lines: &mut Vec<String>, line: &str) {
    let key = |l: &str| l.split('=').next().unwrap_or("").trim().to_owned();
    let k = key(line);
    lines.retain(|l| key(l) != k);
    lines.push(line.to_owned());
}

/// Prepares an agent's directory and environment before starting it. A clone shares the
/// directory: the agent it starts finds its predecessor's state and runtime directories.
#[derive(Clone)]
pub struct AgentBuilder {
    /// Shared with the agents started from it (and their successors), so a restarted agent
    /// finds its predecessor's state and runtime directories.
    dir: Arc<tempfile::TempDir>,
    env: Vec<(String, String)>,
    /// Run the agent as this uid and gid (the test runs as root), owning its directory.
    user: Option<u32>,
    /// A command the agent is started under (its argv comes after these), e.g. `unshare` to
    /// make it PID 1 of a new PID namespace. Empty: started directly.
    launcher: Vec<String>,
    /// `run --from-env`: the gateway controller's variables over the config file.
    from_env: bool,
    /// The binary to run instead of the one cargo built (an upgrade test replaces it).
    program: Option<PathBuf>,
    /// The agent logs to stdout (`agent.log_stream`): the harness reads its log there.
    log_on_stdout: bool,
}

impl Default for AgentBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentBuilder {
    pub fn new() -> AgentBuilder {
        AgentBuilder {
            dir: Arc::new(
                tempfile::Builder::new()
                    .prefix("tunnel-agent-test-")
                    .tempdir()
                    .expect("create temp dir"),
            ),
            env: Vec::new(),
            user: None,
            launcher: Vec::new(),
            from_env: false,
            program: None,
            log_on_stdout: false,
        }
    }

    /// Reads the agent's log from its stdout, for an agent told to log there
    /// (`agent.log_stream`); stderr is then [`Agent::other_stream`].
    pub fn log_on_stdout(mut self) -> Self {
        self.log_on_stdout = true;
        self
    }

    /// Runs `program` (a copy of the built binary, say) instead of the built binary itself.
    pub fn program(mut self, program: &Path) -> Self {
        self.program = Some(program.to_owned());
        self
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `contents` to `name` inside the agent's directory; returns the path.
    pub fn file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, contents).expect("write test file");
        path
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Starts the agent with `run --from-env -c FILE`: the file is the base (directories,
    /// health listener, cloudflared's path), the environment the gateway controller's contract.
    pub fn with_env_mode(mut self) -> Self {
        self.from_env = true;
        self
    }

    /// Runs the agent as `id` (uid and gid), as the unit's `DynamicUser=` does, rather than as
    /// the root the tests run as; its directory is handed over to that user when it starts.
    pub fn run_as(mut self, id: u32) -> Self {
        self.user = Some(id);
        self
    }

    /// Starts the agent as an argument of `launcher` (program and its arguments): `spawn`'s child
    /// and `Agent::pid` are then the launcher's.
    pub fn launched_by(mut self, launcher: &[&str]) -> Self {
        self.launcher = launcher.iter().map(|&a| a.to_owned()).collect();
        self
    }

    /// Starts the agent with `config` and waits until it logs `ready`.
    pub async fn start(self, config: &ConfigText) -> Agent {
        let text = config.render(self.dir.path());
        let mut agent = self.spawn(&text);
        agent.wait_ready().await;
        agent
    }

    /// Writes `config_text` verbatim and starts the agent without waiting for anything.
    pub fn spawn(self, config_text: &str) -> Agent {
        let config_path = self.dir.path().join("agent.toml");
        std::fs::write(&config_path, config_text).expect("write config");
        let agent = self
            .program
            .clone()
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_tunnel-agent")));
        let mut cmd = match self.launcher.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(agent);
                cmd
            }
            None => Command::new(agent),
        };
        cmd.arg("run");
        if self.from_env {
            cmd.arg("--from-env");
        }
        cmd.arg("-c")
            .arg(&config_path)
            // Only what the test chooses: no GCE_METADATA_HOST, JOURNAL_STREAM or NOTIFY_SOCKET
            // from the developer's shell or CI.
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if let Some(id) = self.user {
            chown_tree(self.dir.path(), id);
            std::os::unix::process::CommandExt::uid(&mut cmd, id);
            std::os::unix::process::CommandExt::gid(&mut cmd, id);
        }
        let mut child = cmd.spawn().expect("spawn tunnel-agent");
        let stdout: Box<dyn Read + Send> = Box::new(child.stdout.take().expect("stdout is piped"));
        let stderr: Box<dyn Read + Send> = Box::new(child.stderr.take().expect("stderr is piped"));
        let (log_stream, other_stream) = if self.log_on_stdout {
            (stdout, stderr)
        } else {
            (stderr, stdout)
        };
        let (log, other) = (Arc::default(), Arc::default());
        let closed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        collect_lines(log_stream, &log, &closed);
        collect_lines(other_stream, &other, &closed);
        Agent {
            child,
            dir: self.dir,
            env: self.env,
            config_path,
            log,
            other,
            closed,
            log_on_stdout: self.log_on_stdout,
            proxy_addr: None,
            health_addr: None,
            exit: None,
        }
    }
}

/// Appends each line of `stream` to `sink` on a thread of its own; counts `closed` up at EOF.
fn collect_lines(
    stream: Box<dyn Read + Send>,
    sink: &Arc<Mutex<Vec<String>>>,
    closed: &Arc<std::sync::atomic::AtomicUsize>,
) {
    let (sink, closed) = (sink.clone(), closed.clone());
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
        }
        closed.fetch_add(1, std::sync::atomic::Ordering::Release);
    });
}

/// Gives `dir` and everything under it to `id` (uid and gid).
fn chown_tree(dir: &Path, id: u32) {
    std::os::unix::fs::lchown(dir, Some(id), Some(id)).expect("chown the agent's directory");
    for entry in std::fs::read_dir(dir).expect("read the agent's directory").flatten() {
        let path = entry.path();
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            chown_tree(&path, id);
        } else {
            std::os::unix::fs::lchown(&path, Some(id), Some(id)).expect("chown a file");
        }
    }
}

/// A running `tunnel-agent run`. Killed (SIGKILL) and reaped on drop; its log is printed when
/// the test is failing, so a failure shows what the agent said.
pub struct Agent {
    child: Child,
    dir: Arc<tempfile::TempDir>,
    env: Vec<(String, String)>,
    config_path: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
    /// The lines of the stream the log is not on.
    other: Arc<Mutex<Vec<String>>>,
    /// How many of stdout and stderr reached EOF: at 2 every line the agent wrote is collected.
    closed: Arc<std::sync::atomic::AtomicUsize>,
    log_on_stdout: bool,
    proxy_addr: Option<SocketAddr>,
    health_addr: Option<SocketAddr>,
    exit: Option<ExitStatus>,
}

/// Memory figures from `/proc/PID/status`, in KiB.
#[derive(Debug, Clone, Copy)]
pub struct Memory {
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

impl Agent {
    /// Waits for `ready` and reads the listener addresses from the log.
    pub async fn wait_ready(&mut self) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let lines = self.logs();
            for line in &lines {
                if self.health_addr.is_none() && line.contains("health listener up") {
                    self.health_addr = Some(listen_field(line));
                }
                if self.proxy_addr.is_none() && line.contains("proxy up") {
                    self.proxy_addr = Some(listen_field(line));
                }
            }
            if lines
                .iter()
                .any(|l| l.trim_end().ends_with(": ready") || l.contains(r#""fields":{"message":"ready"}"#))
            {
                assert!(
                    self.proxy_addr.is_some() && self.health_addr.is_some(),
                    "ready before listeners: {lines:#?}"
                );
                return;
            }
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.exit = Some(status);
                panic!("agent exited with {status} before ready:\n{}", lines.join("\n"));
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "agent not ready within {DEADLINE:?}:\n{}",
                lines.join("\n")
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_addr.expect("agent is ready")
    }

    pub fn health_addr(&self) -> SocketAddr {
        self.health_addr.expect("agent is ready")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// A builder for the next agent on this host: the same directory (config, state and runtime
    /// dirs) and environment, as after `systemctl restart`.
    pub fn successor(&self) -> AgentBuilder {
        AgentBuilder {
            dir: self.dir.clone(),
            env: self.env.clone(),
            user: None,
            launcher: Vec::new(),
            from_env: false,
            program: None,
            log_on_stdout: self.log_on_stdout,
        }
    }

    /// Runs `tunnel-agent COMMAND -c CONFIG` (`promote`, `demote`, `status`) as an operator
    /// would, timing it from just before the process is spawned.
    pub async fn control(&self, command: &str) -> ControlRun {
        control_command(self.control_args(command)).await
    }

    /// The arguments of [`Agent::control`], for running it in a task of its own.
    pub fn control_args(&self, command: &str) -> Vec<String> {
        vec![
            command.to_owned(),
            "-c".to_owned(),
            self.config_path.display().to_string(),
        ]
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits in i32"))
    }

    pub fn signal(&self, sig: Signal) {
        kill(self.pid(), sig).expect("signal the agent");
    }

    /// Waits for the agent to exit, failing the test after `within`.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        if let Some(s) = self.exit {
            return s;
        }
        let deadline = tokio::time::Instant::now() + within;
        loop {
            // Exited, and its last lines collected (stdout and stderr are read on other threads).
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.exit = Some(status);
            }
            if let Some(status) = self.exit {
                if self.closed.load(std::sync::atomic::Ordering::Acquire) == 2 {
                    return status;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "agent did not exit within {within:?}:\n{}",
                self.logs().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Current and peak resident memory of the agent process.
    pub fn memory(&self) -> Memory {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).expect("read /proc status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or_else(|| panic!("{name} missing in /proc status"))
        };
        Memory {
            rss_kib: field("VmRSS:"),
            hwm_kib: field("VmHWM:"),
        }
    }

    /// Replaces the config file (the agent sees it on the next SIGHUP).
    pub fn rewrite_config(&self, config: &ConfigText) {
        std::fs::write(&self.config_path, config.render(self.dir.path())).expect("rewrite config");
    }

    /// Writes a file in the agent's directory (e.g. a routes file) and returns its path.
    pub fn write_file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        // Write-then-rename, as an operator's tooling would: the agent never reads half a file.
        let tmp = self.dir.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, contents).expect("write file");
        std::fs::rename(&tmp, &path).expect("rename file");
        path
    }

    /// Every log line so far (stderr's, or stdout's with [`AgentBuilder::log_on_stdout`]).
    pub fn logs(&self) -> Vec<String> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Every line so far on the stream the log is not on.
    pub fn other_stream(&self) -> Vec<String> {
        self.other.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits for a log line containing every one of `needles`, returning it.
    pub async fn wait_for_log(&self, needles: &[&str], within: Duration) -> String {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(line) = self.logs().into_iter().find(|l| needles.iter().all(|n| l.contains(n))) {
                return line;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no log line with {needles:?} within {within:?}:\n{}",
                self.logs().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The config API's address (`routes.source = "config-api"`), from its log line.
    /// `PUT /config` with `body` and the bearer `token`: the status and the JSON answer (`Null`
    /// when it is not JSON). Bounded by `timeout`: a push that blocks the agent fails the test
    /// instead of hanging it.
    pub async fn put_config(
        &self,
        token: &str,
        body: &serde_json::Value,
        timeout: Duration,
    ) -> (u16, serde_json::Value) {
        let resp = reqwest::Client::new()
            .put(format!("http://{}/config", self.config_api_addr()))
            .bearer_auth(token)
            .timeout(timeout)
            .json(body)
            .send()
            .await
            .expect("the config API answers in time");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(serde_json::Value::Null))
    }

    pub fn config_api_addr(&self) -> SocketAddr {
        let lines = self.logs();
        let line = lines
            .iter()
            .find(|l| l.contains("config api up"))
            .unwrap_or_else(|| panic!("no config api in the log: {lines:#?}"));
        listen_field(line)
    }

    /// `http://ADDR/PATH` on the health listener.
    pub fn health_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.health_addr())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.exit.is_none() {
            // Stop it as an operator would, so it stops its cloudflared (a SIGKILLed agent leaves
            // its children running, holding their ports, until the next test run trips on them).
            // SIGKILL only if it does not exit within cloudflared's test grace and some slack.
            let _ = kill(self.pid(), Signal::SIGTERM);
            for _ in 0..800 {
                if let Ok(Some(_)) = self.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- agent log ----\n{}\n-------------------", self.logs().join("\n"));
            let other = self.other_stream();
            if !other.is_empty() {
                let name = if self.log_on_stdout { "stderr" } else { "stdout" };
                eprintln!("---- agent {name} ----\n{}\n-------------------", other.join("\n"));
            }
        }
    }
}

/// One finished `tunnel-agent promote|demote|status` run.
#[derive(Debug)]
pub struct ControlRun {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// From just before spawning the command to its exit.
    pub took: Duration,
    pub issued_at: Instant,
}

impl ControlRun {
    pub fn ok(&self) -> bool {
        self.status.success()
    }

    /// stdout and stderr together, for "the message says ..." assertions.
    pub fn output(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs the binary with `args` and a cleared environment, failing the test after `DEADLINE`.
pub async fn control_command(args: Vec<String>) -> ControlRun {
    run_command(env!("CARGO_BIN_EXE_tunnel-agent").to_owned(), args).await
}

/// Runs `program args` with a cleared environment (PATH kept, for `runuser`/`setpriv` wrappers),
/// failing the test after `DEADLINE`.
pub async fn run_command(program: String, args: Vec<String>) -> ControlRun {
    let issued_at = Instant::now();
    let mut cmd = tokio::process::Command::new(&program);
    cmd.args(&args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(DEADLINE, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} did not finish within {DEADLINE:?}"))
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    ControlRun {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took: issued_at.elapsed(),
        issued_at,
    }
}

/// `listen=ADDR` from a text log line, or `"listen":"ADDR"` from a JSON one.
fn listen_field(line: &str) -> SocketAddr {
    let json = serde_json::from_str::<serde_json::Value>(line).ok();
    let from_json = json.as_ref().and_then(|v| v["fields"]["listen"].as_str());
    from_json
        .or_else(|| line.split_whitespace().find_map(|w| w.strip_prefix("listen=")))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no listen=ADDR in {line:?}"))
}
