//! Before anything stops: does the new binary run, take our state's format, and accept the
//! configuration in effect? A "no" refuses the upgrade with nothing changed.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt as _;

use super::state::FORMAT;
use super::{PREVIOUS_VAR, ROLLED_BACK_VAR, STATE_VAR};

/// What `tunnel-agent handover-probe` prints: the binary's version and the state formats it
/// can take over from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Probe {
    pub version: String,
    pub formats: Vec<u32>,
}

impl Probe {
    /// This binary's answer.
    pub fn mine() -> Probe {
        Probe {
            version: crate::build_info::LONG_VERSION.to_owned(),
            formats: super::state::FORMATS_READ.to_vec(),
        }
    }
}

/// A new binary that passed: exec it.
#[derive(Debug, Clone)]
pub struct Plan {
    pub binary: PathBuf,
    /// Its `--version`.
    pub to: String,
}

/// How long each preflight command may take (`check` resolves secrets, which may wait on
/// Secret Manager).
const TIMEOUT: Duration = Duration::from_secs(60);
/// The most of a command's output kept, for the refusal's message.
const OUTPUT_LIMIT: u64 = 64 * 1024;

/// Runs `binary` with `args`, without the variables only this process may see (systemd's
/// notify socket and watchdog, the hand-over's); returns its exit success and output.
async fn run(binary: &Path, args: &[&str]) -> Result<(bool, String), String> {
    let mut cmd = tokio::process::Command::new(binary);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for var in [
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        STATE_VAR,
        PREVIOUS_VAR,
        ROLLED_BACK_VAR,
    ] {
        cmd.env_remove(var);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
    let (Some(out), Some(err)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(format!("cannot read the output of {}", binary.display()));
    };
    let read = async {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let (mut out, mut err) = (out.take(OUTPUT_LIMIT), err.take(OUTPUT_LIMIT));
        let (a, b) = tokio::join!(out.read_to_end(&mut stdout), err.read_to_end(&mut stderr));
        a.and(b).map_err(|e| e.to_string())?;
        let status = child.wait().await.map_err(|e| e.to_string())?;
        stdout.extend_from_slice(&stderr);
        Ok::<_, String>((status.success(), String::from_utf8_lossy(&stdout).into_owned()))
    };
    match tokio::time::timeout(TIMEOUT, read).await {
        Ok(r) => r.map_err(|e| format!("{} {}: {e}", binary.display(), args.join(" "))),
        Err(_) => Err(format!(
            "{} {} did not finish within {TIMEOUT:?}",
            binary.display(),
            args.join(" ")
        )),
    }
}

/// The last lines of a command's output, for a one-paragraph refusal.
fn tail(output: &str) -> String {
    let lines: Vec<&str> = output.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(5);
    let text = lines[start..].join("; ");
    match text.char_indices().nth(600) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

/// The preflight: `binary handover-probe` takes our format, and `binary check` accepts the
/// configuration this agent was started with (`config_path`, or the environment mode).
pub async fn check(binary: &Path, config_path: &Path, from_env: bool) -> Result<Plan, String> {
    let (ok, output) = run(binary, &["handover-probe"]).await?;
    if !ok {
        return Err(format!(
            "{} cannot take over: its self-test failed: {}",
            binary.display(),
            tail(&output)
        ));
    }
    let probe: Probe = serde_json::from_str(output.lines().next().unwrap_or_default()).map_err(|e| {
        format!(
            "{} cannot take over: unreadable self-test answer ({e}): {}",
            binary.display(),
            tail(&output)
        )
    })?;
    if !probe.formats.contains(&FORMAT) {
        return Err(format!(
            "{} ({}) cannot take over: it reads hand-over formats {:?}, this agent writes {FORMAT}; restart the service instead",
            binary.display(),
            probe.version,
            probe.formats
        ));
    }
    let config = config_path.to_string_lossy();
    let mut args = vec!["check"];
    if !config_path.as_os_str().is_empty() {
        args.extend(["-c", &config]);
    }
    if from_env {
        args.push("--from-env");
    }
    let (ok, output) = run(binary, &args).await?;
    if !ok {
        return Err(format!(
            "{} ({}) rejects the configuration: {}",
            binary.display(),
            probe.version,
            tail(&output)
        ));
    }
    Ok(Plan {
        binary: binary.to_owned(),
        to: probe.version,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_keeps_the_last_lines_bounded() {
        let out = (1..=20).map(|i| format!("line {i}")).collect::<Vec<_>>().join("\n");
        assert_eq!(tail(&out), "line 16; line 17; line 18; line 19; line 20");
        let long = "é".repeat(2000);
        assert!(tail(&long).chars().count() <= 601);
    }

    #[tokio::test]
    async fn a_binary_that_is_not_there_is_refused_with_its_path() {
        let e = check(Path::new("/nonexistent/tunnel-agent"), Path::new("/etc/x.toml"), false)
            .await
            .unwrap_err();
        assert!(e.contains("/nonexistent/tunnel-agent"), "{e}");
    }

    #[tokio::test]
    async fn a_binary_that_is_not_ours_is_refused() {
        // `true` exits 0 with no output: no self-test answer.
        let e = check(Path::new("/bin/true"), Path::new("/etc/x.toml"), false)
            .await
            .unwrap_err();
        assert!(e.contains("unreadable self-test answer"), "{e}");
        let e = check(Path::new("/bin/false"), Path::new("/etc/x.toml"), false)
            .await
            .unwrap_err();
        assert!(e.contains("self-test failed"), "{e}");
    }
}
