//! `[proxy]`: the origin proxy's listener, limits, timeouts, upstream trust and access log.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxySection {
    pub listen: SocketAddr,
    /// PEM CA bundle that anchors every `https://` upstream instead of the built-in webpki
    /// (Mozilla) roots; a backend's own `tls` CA takes precedence for that backend.
    pub ca_file: Option<PathBuf>,
    /// Where the trust anchors come from when `ca_file` is not given. Unset: webpki's roots,
    /// compiled in, so an upstream is trusted the same on every host whatever its packages.
    pub trust: Option<TrustStore>,
    /// Lets backends and mirrors be link-local (169.254.0.0/16, fe80::/10) or a metadata
    /// server (`metadata.google.internal`), which serves the VM's credentials. Local config
    /// only: a push cannot set it. See `routing::destination`.
    pub allow_link_local_upstreams: bool,
    /// Lets identity tokens go to `http://` (and h2c) upstreams, in clear text.
    pub allow_id_tokens_over_http: bool,
    /// Header cloudflared's ingress adds with the shared internal token.
    pub auth_header: String,
    /// Name of the secret holding the internal token. Unset: no auth on this listener (for a
    /// host where cloudflared and the app share the machine).
    pub auth_secret: Option<String>,
    /// After the internal token rotates (secret `refresh`), the previous value is still accepted
    /// this long, so requests signed with it during the rollout do not get 401s.
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::DAY }>")]
    pub auth_overlap: Duration,
    /// Largest request head accepted; larger gets 431. hyper's floor is 8 KiB.
    pub max_header_bytes: usize,
    /// Largest request body accepted; larger gets 413. Unset: no limit (bodies stream, so a
    /// large upload costs no memory).
    pub max_body_bytes: Option<u64>,
    /// A client that starts a request must finish sending its head within this (slowloris).
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::HOUR }>")]
    pub header_read_timeout: Duration,
    /// An idle keep-alive client connection is closed after this. Must exceed cloudflared's
    /// 90 s origin keep-alive, or cloudflared reuses a connection we are closing.
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::DAY }>")]
    pub idle_timeout: Duration,
    /// A request body that brings no bytes for this long (the client is silent, not the
    /// upstream slow to read) gets 408 before the response has started; after, the upload is
    /// reset. nginx's `client_body_timeout`.
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::HOUR }>")]
    pub body_read_timeout: Duration,
    /// An upgraded connection (WebSocket) with no byte either way for this long is closed on
    /// both sides: the bound on a long-lived stream, so its application must ping.
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::DAY }>")]
    pub upgrade_idle_timeout: Duration,
    /// HTTP/2 client connections get a PING this often; one not answered within 20 s closes
    /// the connection (a peer gone without a FIN).
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::HOUR }>")]
    pub http2_keep_alive_interval: Duration,
    /// Concurrent client connections on `listen`, over all workers; beyond it a new one is
    /// accepted and closed at once.
    pub max_connections: usize,
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::HOUR }>")]
    pub connect_timeout: Duration,
    /// How long the upstream may take to send its response head, counted from the end of the
    /// request body (a slow upload is not a slow upstream); then 504. An upstream that stops
    /// reading an upload also gets 504 after this long.
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::DAY }>")]
    pub upstream_timeout: Duration,
    /// Idle pooled upstream connections are closed after this.
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::DAY }>")]
    pub pool_idle_timeout: Duration,
    /// Idle pooled connections kept per upstream, in each worker's pool.
    pub pool_max_idle_per_host: usize,
    /// One line per request, for "which requests got that 502?".
    pub access_log: AccessLogSection,
    /// Worker threads serving the proxy, each with its own listening socket and upstream pools.
    /// `0`: one per CPU the agent may run on.
    pub workers: usize,
}

/// `[proxy.access_log]`: an optional line per proxied request (target `access`), written
/// wherever the agent's own log goes. Applied on reload.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessLogSection {
    pub enabled: bool,
    pub format: AccessLogFormat,
    /// Share of requests logged, 0 to 1. Responses >= 500 and proxy errors are always logged:
    /// they are what an operator looks for.
    pub sample: f64,
    /// Include the query string. Off by default: queries carry tokens and personal data.
    pub query: bool,
}

impl Default for AccessLogSection {
    fn default() -> Self {
        AccessLogSection {
            enabled: false,
            format: AccessLogFormat::Json,
            sample: 1.0,
            query: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    /// One JSON object per line.
    Json,
    /// `key=value` pairs after `METHOD PATH STATUS`.
    Text,
}

impl ProxySection {
    /// The number of proxy worker threads to start: `workers`, or one per CPU the process may
    /// run on (its affinity mask and cgroup quota, as `std::thread::available_parallelism` reads
    /// them).
    pub fn worker_threads(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

impl Default for ProxySection {
    fn default() -> Self {
        ProxySection {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            ca_file: None,
            trust: None,
            allow_link_local_upstreams: false,
            allow_id_tokens_over_http: false,
            auth_header: "X-Internal-Auth-Token".to_owned(),
            auth_secret: None,
            auth_overlap: Duration::from_secs(600),
            max_header_bytes: 16 * 1024,
            max_body_bytes: None,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            body_read_timeout: Duration::from_secs(60),
            upgrade_idle_timeout: Duration::from_secs(300),
            http2_keep_alive_interval: Duration::from_secs(60),
            max_connections: 16_384,
            connect_timeout: Duration::from_secs(5),
            upstream_timeout: Duration::from_secs(60),
            pool_idle_timeout: Duration::from_secs(60),
            pool_max_idle_per_host: 64,
            access_log: AccessLogSection::default(),
            workers: 0,
        }
    }
}

/// `proxy.trust`: the trust anchors for `https://` upstreams without a CA of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrustStore {
    /// Mozilla's roots as packaged by webpki-roots, compiled into the binary.
    Webpki,
    /// The operating system's store (Debian: `/etc/ssl/certs`, from `ca-certificates`), read
    /// at boot and at each reload; `SSL_CERT_FILE` / `SSL_CERT_DIR` override where it is read.
    /// What a BackendTLSPolicy's `wellKnownCACertificates: System` asks for.
    System,
}

impl TrustStore {
    /// The spelling in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            TrustStore::Webpki => "webpki",
            TrustStore::System => "system",
        }
    }
}
