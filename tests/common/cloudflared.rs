//! Drives `tests/fakes/cloudflared` (see its docstring): where it is, how to switch its mode,
//! and what it recorded (starts with their argv, SIGTERMs, exits).

use std::path::{Path, PathBuf};
use std::time::Duration;

pub struct FakeCloudflared {
    /// The control directory (`FAKE_CF_DIR`): `mode` in, `events` out.
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
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port");
        FakeCloudflared { dir, metrics: port }
    }

    pub fn program() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fakes/cloudflared")
    }

    /// The environment entry the agent must pass on to the fake.
    pub fn env(&self) -> (&'static str, String) {
        ("FAKE_CF_DIR", self.dir.display().to_string())
    }

    /// A `[cloudflared]` section with fast test timings; `extra` lines override or add keys.
    pub fn section(&self, extra: &[&str]) -> String {
        let mut lines = vec![
            "enabled = true".to_owned(),
            format!("path = {:?}", Self::program().display().to_string()),
            "token_secret = \"tunnel_token\"".to_owned(),
            format!("metrics = \"{}\"", self.metrics),
            "grace_period = \"2s\"".to_owned(),
            "stop_margin = \"500ms\"".to_owned(),
            "poll_interval = \"100ms\"".to_owned(),
            "restart_backoff = \"100ms\"".to_owned(),
            "restart_backoff_max = \"400ms\"".to_owned(),
            "ready_grace = \"0s\"".to_owned(),
        ];
        for e in extra {
            let key = e.split('=').next().unwrap_or("").trim();
            lines.retain(|l| l.split('=').next().unwrap_or("").trim() != key);
            lines.push((*e).to_owned());
        }
        format!("[cloudflared]\n{}\n", lines.join("\n"))
    }

    pub fn set_mode(&self, mode: &str) {
        let tmp = self.dir.join(".mode.tmp");
        std::fs::write(&tmp, mode).expect("write mode");
        std::fs::rename(&tmp, self.dir.join("mode")).expect("rename mode");
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

/// The real cloudflared from the shared folder next to the clone (`../shared/cloudflared/*.xz`,
/// see its README), unpacked once into `target/cloudflared-real/`. `Err` says why it is not
/// available, for the test to print when it skips.
pub fn real_cloudflared() -> Result<PathBuf, String> {
    // Once per test binary (its tests run in parallel threads).
    static UNPACKED: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    UNPACKED.get_or_init(unpack_real_cloudflared).clone()
}

fn unpack_real_cloudflared() -> Result<PathBuf, String> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let shared = repo.join("../shared/cloudflared");
    let xz = std::fs::read_dir(&shared)
        .map_err(|e| format!("no real cloudflared: cannot read {}: {e}", shared.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.starts_with("cloudflared-") && name.ends_with("-linux-amd64.xz")
        })
        .ok_or_else(|| {
            format!(
                "no real cloudflared: no cloudflared-*-linux-amd64.xz in {}",
                shared.display()
            )
        })?;
    let dir = repo.join("target/cloudflared-real");
    let bin = dir.join("cloudflared");
    let stamp = dir.join("unpacked-from");
    let source = xz.display().to_string();
    if bin.exists() && std::fs::read_to_string(&stamp).is_ok_and(|s| s == source) {
        return Ok(bin);
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    // Test binaries run in parallel: each unpacks to its own file, then renames into place.
    let tmp = dir.join(format!(".cloudflared.{}", std::process::id()));
    let out = std::fs::File::create(&tmp).map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
    let status = std::process::Command::new("xz")
        .arg("-dc")
        .arg(&xz)
        .stdout(out)
        .status()
        .map_err(|e| format!("no real cloudflared: cannot run xz (xz-utils): {e}"))?;
    if !status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("xz -dc {source} failed: {status}"));
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, &bin).map_err(|e| e.to_string())?;
    std::fs::write(&stamp, &source).map_err(|e| e.to_string())?;
    Ok(bin)
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
