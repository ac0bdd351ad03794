//! The listening sockets: bound by a fresh start, adopted from the previous image by an
//! upgraded one, and in both cases a duplicate of each kept for the next image.
//!
//! The kept duplicate is what makes an upgrade lose no connection: when the old image stops
//! accepting, its servers drop their own descriptors, but the duplicate keeps the socket
//! listening, so the kernel goes on queueing connections until the new image accepts them.

use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::fds;

/// Which listener a carried socket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// One of the proxy's `SO_REUSEPORT` worker sockets.
    Proxy,
    /// `health.listen` (`:2000`).
    Health,
    /// `config_api.listen`.
    ConfigApi,
    /// The control socket.
    Control,
}

/// A listening socket as the state carries it: its number in the exec'd image, and where it
/// listens (what the new image checks against its configuration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Carried {
    pub kind: Kind,
    pub fd: i32,
    /// `ip:port`, or the control socket's path.
    pub addr: String,
}

/// The sockets of this image: what it inherited and has not used yet, and a duplicate of every
/// socket it serves, for the next image.
#[derive(Debug, Default)]
pub struct Sockets {
    inherited: Vec<Carried>,
    kept: Vec<(Kind, String, OwnedFd)>,
}

/// Whether a socket listening on `actual` serves a configured `wanted` address: the same, or
/// any port on the same address when the configuration asks for port 0.
fn serves(wanted: SocketAddr, actual: &str) -> bool {
    let Ok(actual) = actual.parse::<SocketAddr>() else {
        return false;
    };
    actual == wanted || (wanted.port() == 0 && actual.ip() == wanted.ip())
}

impl Sockets {
    /// A fresh start has nothing inherited; an upgraded one has the previous image's sockets.
    pub fn new(inherited: Vec<Carried>) -> Sockets {
        Sockets {
            inherited,
            kept: Vec::new(),
        }
    }

    /// Takes the inherited sockets of `kind` that `fits`, as duplicates. One of `kind` that does
    /// not fit (the address changed in the file since the last start) is not used: its carried
    /// number closes at commit, and the caller binds the configured address instead.
    fn adopt(&mut self, kind: Kind, fits: impl Fn(&str) -> bool) -> anyhow::Result<Vec<(String, OwnedFd)>> {
        let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.inherited)
            .into_iter()
            .partition(|c| c.kind == kind);
        self.inherited = rest;
        let mut adopted = Vec::new();
        for c in mine {
            if !fits(&c.addr) {
                tracing::warn!(kind = ?kind, addr = %c.addr, "the inherited {kind:?} socket on {} does not match the configuration; binding the configured address instead", c.addr);
                continue;
            }
            let fd =
                fds::dup(c.fd).map_err(|e| anyhow::anyhow!("cannot adopt the {kind:?} socket on {}: {e}", c.addr))?;
            adopted.push((c.addr, fd));
        }
        Ok(adopted)
    }

    /// Keeps a duplicate of `fd` for the next image.
    fn keep(&mut self, kind: Kind, addr: String, fd: impl AsFd) -> anyhow::Result<()> {
        let dup =
            fds::dup(fd.as_fd().as_raw_fd()).map_err(|e| anyhow::anyhow!("cannot keep the {kind:?} socket: {e}"))?;
        self.kept.push((kind, addr, dup));
        Ok(())
    }

    /// A TCP listener on `addr` (`what` names the setting in errors), adopted or bound.
    pub async fn tcp(&mut self, kind: Kind, addr: SocketAddr, what: &str) -> anyhow::Result<tokio::net::TcpListener> {
        let listener = match self.adopt(kind, |a| serves(addr, a))?.pop() {
            Some((_, fd)) => {
                let std = std::net::TcpListener::from(fd);
                std.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(std)?
            }
            None => crate::server::bind(addr, what).await?,
        };
        let local = listener.local_addr()?.to_string();
        self.keep(kind, local, &listener)?;
        Ok(listener)
    }

    /// The proxy's worker sockets: all the inherited ones on `addr` (their count, not
    /// `workers`: closing a `SO_REUSEPORT` socket drops the connections queued on it), or
    /// `workers` new ones.
    pub fn proxy(&mut self, addr: SocketAddr, workers: usize) -> anyhow::Result<Vec<std::net::TcpListener>> {
        let adopted = self.adopt(Kind::Proxy, |a| serves(addr, a))?;
        let sockets = if adopted.is_empty() {
            crate::server::bind_workers(addr, "proxy.listen", workers)?
        } else {
            if adopted.len() != workers {
                tracing::info!(
                    inherited = adopted.len(),
                    workers,
                    "serving the proxy with the {} inherited worker sockets (proxy.worker_threads = {workers} takes effect at the next restart)",
                    adopted.len()
                );
            }
            adopted
                .into_iter()
                .map(|(_, fd)| std::net::TcpListener::from(fd))
                .collect()
        };
        for s in &sockets {
            s.set_nonblocking(true)?;
            self.keep(Kind::Proxy, s.local_addr()?.to_string(), s)?;
        }
        Ok(sockets)
    }

    /// The control socket at `path`, adopted, or bound by `bind`.
    pub fn control(
        &mut self,
        path: &Path,
        bind: impl FnOnce() -> anyhow::Result<UnixListener>,
    ) -> anyhow::Result<UnixListener> {
        let wanted = path.display().to_string();
        let listener = match self.adopt(Kind::Control, |a| a == wanted && path.exists())?.pop() {
            Some((_, fd)) => UnixListener::from(fd),
            None => bind()?,
        };
        listener.set_nonblocking(true)?;
        self.keep(Kind::Control, wanted, &listener)?;
        Ok(listener)
    }

    /// What the state carries: each kept socket's number. The numbers are this image's
    /// duplicates, which the exec keeps open (their close-on-exec flag is cleared by
    /// [`super::exec`]) and nothing here closes.
    pub fn carry(&self) -> Vec<Carried> {
        self.kept
            .iter()
            .map(|(kind, addr, fd)| Carried {
                kind: *kind,
                fd: fd.as_raw_fd(),
                addr: addr.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configured_port_zero_takes_any_port_on_the_same_address() {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        assert!(serves(any, "127.0.0.1:4431"));
        assert!(!serves(any, "127.0.0.2:4431"));
        let fixed: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        assert!(serves(fixed, "0.0.0.0:8080"));
        assert!(!serves(fixed, "0.0.0.0:8081"));
        assert!(!serves(fixed, "not an address"));
    }

    #[tokio::test]
    async fn an_adopted_socket_is_the_same_socket_and_its_queue_survives_the_old_copy() {
        let mut first = Sockets::default();
        let listener = first
            .tcp(Kind::Health, "127.0.0.1:0".parse().unwrap(), "health.listen")
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        // The old image stops serving: its own descriptor goes, the kept duplicate stays.
        drop(listener);
        let waiting = std::net::TcpStream::connect(addr).expect("queued by the kernel");
        let mut second = Sockets::new(first.carry());
        let adopted = second
            .tcp(Kind::Health, "127.0.0.1:0".parse().unwrap(), "health.listen")
            .await
            .unwrap();
        assert_eq!(adopted.local_addr().unwrap(), addr);
        let (accepted, _) = adopted.accept().await.unwrap();
        assert_eq!(accepted.peer_addr().unwrap(), waiting.local_addr().unwrap());
    }

    #[tokio::test]
    async fn an_inherited_socket_on_another_address_is_not_adopted() {
        let mut first = Sockets::default();
        let _old = first
            .tcp(Kind::Health, "127.0.0.1:0".parse().unwrap(), "h")
            .await
            .unwrap();
        let mut second = Sockets::new(first.carry());
        let new = second.tcp(Kind::Health, "127.0.0.2:0".parse().unwrap(), "h").await;
        // 127.0.0.2 is loopback on Linux: bound fresh (the inherited one closes at commit).
        let new = new.unwrap();
        assert_eq!(new.local_addr().unwrap().ip().to_string(), "127.0.0.2");
        let kept = second.carry();
        assert_eq!(kept.len(), 1, "only the socket in use is kept for the next image");
        assert!(kept[0].addr.starts_with("127.0.0.2:"), "{kept:?}");
    }

    #[tokio::test]
    async fn every_proxy_worker_socket_is_adopted_whatever_the_configured_count() {
        let mut first = Sockets::default();
        let sockets = first.proxy("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        let addr = sockets[0].local_addr().unwrap();
        let mut second = Sockets::new(first.carry());
        let adopted = second.proxy("127.0.0.1:0".parse().unwrap(), 1).unwrap();
        assert_eq!(adopted.len(), 3);
        assert!(adopted.iter().all(|s| s.local_addr().unwrap() == addr));
        assert_eq!(second.carry().len(), 3);
    }
}
