//! Drives `tests/fakes/cloudflared` (see its docstring): where it is, how to switch its mode and
//! settings, and what it recorded (starts with their argv and environment, signals, exits).
//!
//! The agent starts cloudflared with none of its own environment, so the fake finds its control
//! directory from its program path: each `FakeCloudflared` links the fake into its own directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub struct FakeCloudflared {
    /// The control directory: `mode` and settings in, `events` and `env.<pid>` out.
    dir: PathBuf,
    /// Where the fake serves `/ready` and `/metrics`.
    pub metrics: std::net::SocketAddr,
}

/// One line of the fake's `events` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: String,
    pub pid: u32,
    pub rest: String,
}

impl FakeCloudflared {
    /// A fake controlled from `dir` (created), with a free loopback port for its metrics.
    pub fn new(dir: &Path) -> FakeCloudflared {
        let dir = dir.join("fake-cloudflared");
        std::fs::create_dir_all(&dir).expect("create fake cloudflared dir");
        std::fs::write(dir.join("control"), "").expect("mark the control dir");
        let link = dir.join("cloudflared");
        if !link.exists() {
            std::os::unix::fs::symlink(Self::script(), &link).expect("link the fake cloudflared");
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port");
        FakeCloudflared { dir, metrics: port }
    }

    /// The fake itself, in the source tree. Run from there it has no control directory unless
    /// `FAKE_CF_DIR` names one.
    pub fn script() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fakes/cloudflared")
    }

    /// The program the agent runs: the fake, linked into this fake's control directory.
    pub fn program(&self) -> PathBuf {
        self.dir.join("cloudflared")
    }

    /// The control directory, for a wrapper script to pass on as `FAKE_CF_DIR`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A `[cloudflared]` section with fast test timings; `extra` lines override or add keys.
    pub fn section(&self, extra: &[&str]) -> String {
        let mut lines = vec![
            "enabled = true".to_owned(),
            format!("path = {:?}", self.program().display().to_string()),
            "token_secret = \"tunnel_token\"".to_owned(),
            format!("metrics = \"{}\"", self.metrics),
            "grace_period = \"2s\"".to_owned(),
            "stop_margin = \"500ms\"".to_owned(),
            "poll_interval = \"100ms\"".to_owned(),
            "restart_backoff = \"100ms\"".to_owned(),
            "restart_backoff_max = \"400ms\"".to_owned(),
            "ready_grace = \"0s\"".to_owned(),
            format!("sandbox_allow = {}", toml_paths(&self.sandbox_allow())),
        ];
        for e in extra {
            let key = e.split('=').next().unwrap_or("").trim();
            lines.retain(|l| l.split('=').next().unwrap_or("").trim() != key);
            lines.push((*e).to_owned());
        }
        format!("[cloudflared]\n{}\n", lines.join("\n"))
    }

    /// What the fake needs besides the system's under the agent's Landlock sandbox: its control
    /// directory (it writes its events there), its script, and the Python that runs it.
    pub fn sandbox_allow(&self) -> Vec<PathBuf> {
        let mut paths = vec![self.dir.clone()];
        paths.extend(Self::script().parent().map(Path::to_owned));
        paths.extend(python_dirs());
        paths
    }

    /// Sets one of the fake's settings (`version`, `drain_ms`, `flood`, `origin`).
    pub fn set(&self, name: &str, value: &str) {
        let tmp = self.dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, value).expect("write setting");
        std::fs::rename(&tmp, self.dir.join(name)).expect("rename setting");
    }

    /// The environment the fake process `pid` started with (`None`: the last `--version` run).
    pub fn env_of(&self, pid: Option<u32>) -> BTreeMap<String, String> {
        let name = pid.map_or_else(|| "env.version".to_owned(), |pid| format!("env.{pid}"));
        let text = std::fs::read_to_string(self.dir.join(name)).expect("the fake wrote its env");
        serde_json::from_str(&text).expect("env is a JSON object of strings")
    }

    pub fn set_mode(&self, mode: &str) {
        self.set("mode", mode);
    }

    pub fn events(&self) -> Vec<Event> {
        let text = std::fs::read_to_string(self.dir.join("events")).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let mut parts = l.splitn(3, ' ');
                let kind = parts.next()?.to_owned();
                let second = parts.next().unwrap_or("");
                let (pid, rest) = match second.parse::<u32>() {
                    Ok(pid) => (pid, parts.next().unwrap_or("").to_owned()),
                    Err(_) => (0, [second, parts.next().unwrap_or("")].join(" ").trim().to_owned()),
                };
                Some(Event { kind, pid, rest })
            })
            .collect()
    }

    pub fn count(&self, kind: &str) -> usize {
        self.events().iter().filter(|e| e.kind == kind).count()
    }

    /// Pids of every start, oldest first.
    pub fn started_pids(&self) -> Vec<u32> {
        self.events()
            .iter()
            .filter(|e| e.kind == "start")
            .map(|e| e.pid)
            .collect()
    }

    /// SIGTERMs the process `pid` received.
    pub fn sigterms(&self, pid: u32) -> usize {
        self.events()
            .iter()
            .filter(|e| e.kind == "sigterm" && e.pid == pid)
            .count()
    }

    /// The exit code `pid` recorded, once it exited by itself (not when it was SIGKILLed).
    pub fn exit_code(&self, pid: u32) -> Option<i32> {
        self.events()
            .iter()
            .find(|e| e.kind == "exit" && e.pid == pid)
            .and_then(|e| e.rest.trim().parse().ok())
    }

    /// Waits until at least `n` starts were recorded; returns their pids.
    pub async fn wait_starts(&self, n: usize, within: Duration) -> Vec<u32> {
        super::eventually(within, &format!("{n} cloudflared starts"), || async {
            let pids = self.started_pids();
            (pids.len() >= n).then_some(pids)
        })
        .await
    }
}

/// A real cloudflared, named by `CLOUDFLARED_BIN` (none ships with the tests: the project's
/// copy under `../shared/cloudflared/` is gone). `Err` says why there is none, for the test to
/// print when it skips.
pub fn real_cloudflared() -> Result<PathBuf, String> {
    let Some(bin) = std::env::var_os("CLOUDFLARED_BIN") else {
        return Err(
            "no real cloudflared: set CLOUDFLARED_BIN to a cloudflared binary to run this test \
                    (none ships with the tests; the fake is held to the recorded contract instead)"
                .to_owned(),
        );
    };
    let bin = PathBuf::from(bin);
    match std::fs::metadata(&bin) {
        Ok(m) if m.is_file() => Ok(bin),
        Ok(_) => Err(format!("CLOUDFLARED_BIN={} is not a file", bin.display())),
        Err(e) => Err(format!("CLOUDFLARED_BIN={}: {e}", bin.display())),
    }
}

/// A connector token of the shape cloudflared accepts (base64 of `{"a","t","s"}`), for a tunnel
/// that does not exist: the real binary parses it and then tries to reach the edge.
pub fn valid_shaped_token() -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let json = serde_json::json!({
        "a": "0123456789abcdef0123456789abcdef",
        "t": "6ff42ae2-765d-4adf-8112-31c55c1551ef",
        "s": b64.encode([7u8; 32]),
    });
    b64.encode(json.to_string())
}

/// A loopback port where nothing listens: cloudflared's `--edge` there keeps it retrying.
pub fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Where the `python3` that `/usr/bin/env` finds lives, when outside the system directories
/// the sandbox already allows (a pyenv or virtualenv): each such `PATH` entry's parent, and
/// the interpreter's prefix.
fn python_dirs() -> Vec<PathBuf> {
    let system = ["/usr", "/bin", "/sbin", "/lib"];
    let outside = |p: &Path| !system.iter().any(|s| p.starts_with(s));
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter(|d| d.join("python3").exists() && outside(d))
        .filter_map(|d| d.parent().map(Path::to_owned))
        .collect();
    let prefix = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.base_prefix)"])
        .output()
        .ok()
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    dirs.extend(prefix.filter(|p| p.is_absolute() && outside(p)));
    dirs
}

/// A TOML array of path strings.
fn toml_paths(paths: &[PathBuf]) -> String {
    let quoted: Vec<String> = paths.iter().map(|p| format!("{:?}", p.display().to_string())).collect();
    format!("[{}]", quoted.join(", "))
}
