//! The local control socket (`<runtime_dir>/control.sock`) behind `tunnel-agent promote`,
//! `demote` and `status`.
//!
//! Access: the socket file is mode 0600 (owner only), and each connection's peer credentials
//! (`SO_PEERCRED`) must be root or the agent's own user, so a permissive umask or a bind-mounted
//! runtime dir cannot widen it. Protocol: one JSON request line, one JSON reply line.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Command {
    Promote,
    Demote,
    Status,
    /// Re-execute in place into the binary on disk (an upgrade).
    Upgrade,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    pub command: Command,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    /// Whether the command changed anything (a promote on an active node does not).
    pub changed: bool,
    pub message: String,
    /// The agent's `/status` (`null` when the command was refused before reaching the node).
    pub status: Option<crate::health::Status>,
}

/// A command on its way to the supervision loop, with where to send the answer.
pub type Incoming = (Command, oneshot::Sender<Reply>);

pub fn socket_path(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("control.sock")
}

/// Binds the socket at [`socket_path`] (replacing a stale one), owner-only.
pub fn bind(runtime_dir: &Path) -> anyhow::Result<std::os::unix::net::UnixListener> {
    let path = socket_path(runtime_dir);
    std::fs::create_dir_all(runtime_dir)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", runtime_dir.display()))?;
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => anyhow::bail!("cannot remove stale {}: {e}", path.display()),
    }
    let listener = std::os::unix::net::UnixListener::bind(&path)
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| anyhow::anyhow!("cannot restrict {}: {e}", path.display()))?;
    Ok(listener)
}

/// Serves the control socket on `listener` (bound by [`bind`], or adopted from the previous
/// image, non-blocking) until the task is aborted.
pub fn serve(
    listener: std::os::unix::net::UnixListener,
    tx: mpsc::Sender<Incoming>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = UnixListener::from_std(listener)?;
    let me = nix::unistd::geteuid().as_raw();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Err(e) = handle(stream, me, tx).await {
                    tracing::debug!(error = %e, "control connection failed: {e}");
                }
            });
        }
    });
    Ok(task)
}

async fn handle(stream: UnixStream, me: u32, tx: mpsc::Sender<Incoming>) -> std::io::Result<()> {
    let peer = stream.peer_cred()?;
    let (read, mut write) = stream.into_split();
    // The request line is read even from a caller about to be refused: answering and closing
    // before it was written would fail the client's write (EPIPE), and it would never read why.
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(4096));
    tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request"))??;
    let reply = if peer.uid() != 0 && peer.uid() != me {
        tracing::warn!(
            uid = peer.uid(),
            "control socket: refused a caller (uid {}) that is neither root nor the agent's user",
            peer.uid()
        );
        refusal(format!(
            "permission denied: uid {} may not control this agent",
            peer.uid()
        ))
    } else {
        match serde_json::from_str::<Request>(&line) {
            Err(e) => refusal(format!("bad request: {e}")),
            Ok(req) => {
                let (answer, rx) = oneshot::channel();
                if tx.send((req.command, answer)).await.is_err() {
                    refusal("the agent is shutting down".into())
                } else {
                    rx.await
                        .unwrap_or_else(|_| refusal("the agent is shutting down".into()))
                }
            }
        }
    };
    let mut out = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await
}

fn refusal(message: String) -> Reply {
    Reply {
        ok: false,
        changed: false,
        message,
        status: None,
    }
}

/// Why the client side got no answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("the agent is not running (no control socket at {})", .0.display())]
    NotRunning(PathBuf),
    #[error("permission denied on {}: run as root or as the agent's user", .0.display())]
    PermissionDenied(PathBuf),
    #[error("cannot connect to {}: {source}", path.display())]
    Connect { path: PathBuf, source: std::io::Error },
    /// The request could not be sent, or the answer read.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the agent did not answer within 120 s")]
    Timeout,
    #[error("unreadable answer from the agent: {0}")]
    Unreadable(serde_json::Error),
}

/// The client side: sends `command` to the agent listening at `path`.
pub async fn call(path: &Path, command: Command) -> Result<Reply, CallError> {
    let mut stream = UnixStream::connect(path).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => CallError::NotRunning(path.to_owned()),
        std::io::ErrorKind::PermissionDenied => CallError::PermissionDenied(path.to_owned()),
        _ => CallError::Connect {
            path: path.to_owned(),
            source: e,
        },
    })?;
    let mut req = serde_json::to_vec(&Request { command }).map_err(std::io::Error::other)?;
    req.push(b'\n');
    stream.write_all(&req).await?;
    let mut line = String::new();
    let mut reader = BufReader::new(stream);
    tokio::time::timeout(Duration::from_secs(120), reader.read_line(&mut line))
        .await
        .map_err(|_| CallError::Timeout)??;
    serde_json::from_str(&line).map_err(CallError::Unreadable)
}

/// How long `tunnel-agent upgrade` waits for the outcome: the preflight, the drain
/// (`agent.upgrade_drain`, at most a minute) and the new image's boot.
const UPGRADE_WAIT: Duration = Duration::from_secs(120);

/// The client side of `upgrade`: asks the agent at `path`, and, when it goes ahead, polls
/// `status` until an image answers whose upgrade counters moved (the new one, or the previous
/// one back after a rollback). The reply says how it went: `ok` only for a completed upgrade.
pub async fn upgrade(path: &Path) -> Result<Reply, CallError> {
    let asked = call(path, Command::Upgrade).await?;
    let Some(before) = asked.status.as_ref().filter(|_| asked.ok).map(|s| s.agent.clone()) else {
        return Ok(asked);
    };
    let counts = |a: &crate::health::AgentStatus| (a.upgrades, a.rolled_back);
    let deadline = tokio::time::Instant::now() + UPGRADE_WAIT;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if tokio::time::Instant::now() >= deadline {
            return Err(CallError::Timeout);
        }
        // Between images the socket queues the connection (it never closes), or the old image
        // answers still. Refused or gone: no image is left to answer.
        let reply = match call(path, Command::Status).await {
            Ok(reply) => reply,
            Err(CallError::NotRunning(_)) => {
                return Ok(refusal(
                    "the agent exited during the upgrade (its control socket is gone); see its journal".to_owned(),
                ))
            }
            Err(_) => continue,
        };
        let Some(status) = reply.status.as_ref() else { continue };
        if counts(&status.agent) == counts(&before) {
            continue;
        }
        let last = status.agent.last_upgrade.clone();
        let completed = last
            .as_ref()
            .is_some_and(|u| u.result == crate::health::UpgradeResult::Completed);
        let message = match &last {
            Some(u) if completed => format!(
                "upgraded in place: {} -> {} (new connections waited {} ms)",
                u.from,
                u.to,
                u.held_ms.unwrap_or(0)
            ),
            Some(u) => format!(
                "upgrade to {} rolled back: {}; {} serves again",
                u.to,
                u.error.as_deref().unwrap_or("unknown reason"),
                u.from
            ),
            None => "the agent restarted without recording the upgrade".to_owned(),
        };
        return Ok(Reply {
            ok: completed,
            changed: true,
            message,
            status: reply.status,
        });
    }
}
