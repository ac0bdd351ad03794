//! `[cloudflared]`: the supervised tunnel, its token, restarts, readiness and sandbox.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TokenDelivery {
    /// `TUNNEL_TOKEN` in cloudflared's environment: works on every version.
    #[default]
    Env,
    /// `--token-file` in the runtime dir, mode 0600 (cloudflared >= 2025.4).
    File,
}

/// The transport cloudflared uses towards the edge (`--protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TunnelProtocol {
    /// cloudflared's own choice (QUIC, falling back to HTTP/2), except that a route table with
    /// gRPC routes (`hasGrpcRoute`) runs it with `--protocol http2`: cloudflared drops HTTP
    /// trailers over QUIC, and gRPC carries its status in them.
    #[default]
    Auto,
    Http2,
    Quic,
}

impl TunnelProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            TunnelProtocol::Auto => "auto",
            TunnelProtocol::Http2 => "http2",
            TunnelProtocol::Quic => "quic",
        }
    }
}

/// Whether cloudflared runs confined by Landlock (`tunnel::sandbox`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Sandbox {
    /// Landlock when the kernel has it; otherwise unconfined, said once in the log.
    #[default]
    Auto,
    /// Landlock or cloudflared does not start.
    Landlock,
    /// Unconfined.
    Off,
}

/// Where cloudflared sends a request that its *remote* ingress (configured at Cloudflare, by a
/// dashboard, Terraform or a controller) gives to an `http(s)://` service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RemoteIngress {
    /// Through the agent's proxy, routed by the table like every other request: cloudflared is
    /// given the proxy as its `HTTP_PROXY`/`HTTPS_PROXY`, which Go's HTTP client uses for every
    /// service not on loopback. An `https://` service arrives as `CONNECT` and is refused.
    #[default]
    ViaProxy,
    /// Where the remote ingress says: cloudflared reaches those services itself, around the
    /// proxy's filters, authentication and weights (reported, see `tunnel::remote_ingress`).
    Direct,
}

/// cloudflared, supervised. Either a remotely-managed tunnel (`token_secret`) or a
/// locally-managed one (`credentials_file` + `tunnel`, ingress written from the route table).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CloudflaredSection {
    pub enabled: bool,
    /// The executable; looked up in `PATH` when not absolute.
    pub path: PathBuf,
    /// Name of the secret holding the connector token (remotely-managed tunnel).
    pub token_secret: Option<String>,
    pub token_delivery: TokenDelivery,
    /// Locally-managed tunnel: the credentials JSON from `cloudflared tunnel create`.
    pub credentials_file: Option<PathBuf>,
    /// Locally-managed tunnel: its name or UUID.
    pub tunnel: Option<String>,
    /// Where cloudflared serves `/ready` and `/metrics`: moved off `:2000`, which the agent owns.
    pub metrics: SocketAddr,
    /// cloudflared's `--grace-period`: how long it drains on SIGTERM. The agent waits this plus
    /// `stop_margin` before SIGKILL.
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::HOUR }>")]
    pub grace_period: Duration,
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::HOUR }>")]
    pub stop_margin: Duration,
    /// `--protocol`: `auto` (gRPC tables switch to `http2`), `http2` or `quic`.
    pub protocol: TunnelProtocol,
    /// What becomes of a request the remote ingress sends to a service other than the proxy.
    pub remote_ingress: RemoteIngress,
    /// Extra arguments placed before `run` (e.g. `["--edge-ip-version", "4"]`).
    pub extra_args: Vec<String>,
    /// Restart backoff after an unrequested exit.
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::HOUR }>")]
    pub restart_backoff: Duration,
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::DAY }>")]
    pub restart_backoff_max: Duration,
    /// Running and connected this long resets the backoff and the exit count.
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::DAY }>")]
    pub stable_after: Duration,
    /// `crash_loop_exits` exits within `crash_loop_window` is a crash loop: `/ready` fails.
    pub crash_loop_exits: u32,
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::DAY }>")]
    pub crash_loop_window: Duration,
    /// After this many exits without a stable period the agent itself exits non-zero, handing
    /// the problem to systemd's restart policy. 0 = never.
    pub give_up_after_exits: u32,
    /// How often cloudflared's `/ready` is polled.
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::HOUR }>")]
    pub poll_interval: Duration,
    /// A tunnel that was connected and has had 0 connections this long is restarted.
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::DAY }>")]
    pub disconnected_restart_after: Duration,
    /// `/ready` keeps answering 200 this long after the tunnel loses its last connection, so a
    /// brief reconnect does not flap the verdict.
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::HOUR }>")]
    pub ready_grace: Duration,
    /// Landlock confinement: no access to the credentials directory, the secret files, the
    /// state and runtime directories.
    pub sandbox: Sandbox,
    /// Absolute paths cloudflared may read, write and execute beneath besides the system's
    /// (e.g. for `--logfile`); at most [`MAX_SANDBOX_ALLOW`]. A protected path beneath one
    /// stays out of reach.
    pub sandbox_allow: Vec<PathBuf>,
}

impl CloudflaredSection {
    /// The `--protocol` value `extra_args` sets, as Go's flag package reads it (one or two
    /// dashes, the value after `=` or in the next argument).
    pub fn protocol_in_extra_args(&self) -> Option<&str> {
        let args = &self.extra_args;
        args.iter().enumerate().find_map(|(i, a)| {
            let name = a.strip_prefix("--").or_else(|| a.strip_prefix('-'))?;
            match name.split_once('=') {
                Some(("protocol", value)) => Some(value),
                None if name == "protocol" => args.get(i + 1).map(String::as_str),
                _ => None,
            }
        })
    }

    /// The `--protocol` cloudflared runs with for a table with (`grpc`) or without gRPC routes:
    /// `extra_args`' own, else [`CloudflaredSection::protocol`]'s, where `auto` is cloudflared's
    /// default (no flag) unless the table has gRPC routes.
    pub fn effective_protocol(&self, grpc: bool) -> Option<&str> {
        if let Some(p) = self.protocol_in_extra_args() {
            return Some(p);
        }
        match self.protocol {
            TunnelProtocol::Auto if grpc => Some("http2"),
            TunnelProtocol::Auto => None,
            p => Some(p.as_str()),
        }
    }
}

/// Most entries of `cloudflared.sandbox_allow`.
pub const MAX_SANDBOX_ALLOW: usize = 32;

impl Default for CloudflaredSection {
    fn default() -> Self {
        CloudflaredSection {
            enabled: false,
            path: PathBuf::from("cloudflared"),
            token_secret: None,
            token_delivery: TokenDelivery::Env,
            credentials_file: None,
            tunnel: None,
            metrics: SocketAddr::from(([127, 0, 0, 1], 20241)),
            grace_period: Duration::from_secs(30),
            stop_margin: Duration::from_secs(5),
            protocol: TunnelProtocol::Auto,
            remote_ingress: RemoteIngress::ViaProxy,
            extra_args: Vec::new(),
            restart_backoff: Duration::from_millis(200),
            restart_backoff_max: Duration::from_secs(30),
            stable_after: Duration::from_secs(60),
            crash_loop_exits: 5,
            crash_loop_window: Duration::from_secs(120),
            // With a cloudflared that fails within seconds of starting, 10 exits take 45-90 s (the
            // backoff's jitter), so 5 agent runs fit in the unit's StartLimitIntervalSec=10min and
            // the unit ends `failed` (tunnel/restart_story.rs checks the sum).
            give_up_after_exits: 10,
            poll_interval: Duration::from_secs(1),
            disconnected_restart_after: Duration::from_secs(120),
            ready_grace: Duration::from_secs(10),
            sandbox: Sandbox::Auto,
            sandbox_allow: Vec::new(),
        }
    }
}
