//! One connection's bytes through the real server and proxy: `server::serve` (head timeout,
//! header limit, the bare-LF guard, hyper's HTTP/1.1 and HTTP/2) and `proxy::Worker::handle`
//! (auth header stripping, routing, filters, redirects, CORS, rewrites, mirrors, forwarding to a
//! loopback upstream and streaming its answer back), under a route table pushed as JSON.
//! No request may panic the agent, grow its memory without bound or hang a worker.
//!
//! Input: the bytes a client sends on one connection; or a push's JSON body, a NUL byte, then
//! those bytes (the push replaces the default table; `UPSTREAM` in it is the loopback
//! upstream's `host:port`).

#![no_main]

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::HeaderName;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tunnel_agent::config::Config;
use tunnel_agent::gcp::{IdTokenCache, MetadataClient};
use tunnel_agent::proxy::{LiveSettings, Proxy};
use tunnel_agent::routing::config_api::PushedConfig;
use tunnel_agent::routing::table::RouteTable;
use tunnel_agent::server::{self, Limits, ServerHandle};
use tunnel_agent::telemetry::Metrics;
use tunnel_agent_fuzz::{block_on, runtime, RawPeer};

/// The table every input without its own push is served with: one rule per kind of filter.
const DEFAULT_PUSH: &str = include_str!("../push_default.json");

/// The most of an answer read back; the rest is left unread (the server then sees a reset).
const MAX_ANSWER: usize = 1 << 20;

struct Agent {
    config: Config,
    metrics: Arc<Metrics>,
    proxy: Arc<Proxy>,
    _server: ServerHandle,
    addr: std::net::SocketAddr,
    upstream: String,
    default_table: Arc<RouteTable>,
}

fn agent() -> &'static Agent {
    static AGENT: OnceLock<Agent> = OnceLock::new();
    AGENT.get_or_init(|| {
        let upstream = RawPeer::start();
        upstream
            .answer(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
        let upstream_addr = upstream.addr.to_string();
        // The peer lives as long as the process.
        std::mem::forget(upstream);
        let config =
            tunnel_agent::routing::parse_config(Path::new("fuzz.toml"), "").expect("the empty config is valid");
        let metrics = Arc::new(Metrics::default());
        let _rt = runtime().enter();
        let metadata =
            MetadataClient::new(format!("http://{upstream_addr}"), Duration::from_secs(1)).expect("a client");
        let tokens = IdTokenCache::new(
            metadata,
            Duration::from_secs(300),
            metrics.clone(),
            runtime().handle().clone(),
        );
        let default_table = Arc::new(
            compile(&config, &metrics, DEFAULT_PUSH.as_bytes(), &upstream_addr).expect("the default push compiles"),
        );
        let live = LiveSettings {
            routes: default_table.clone(),
            auth: None,
            auth_header: HeaderName::from_bytes(config.proxy.auth_header.as_bytes()).expect("the default header name"),
            max_body_bytes: Some(64 * 1024),
            access_log: None,
        };
        let proxy = Proxy::new(&config.proxy, live, tokens, metrics.clone()).expect("a proxy");
        let limits = Limits {
            header_read_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(4),
            max_header_bytes: config.proxy.max_header_bytes,
            http2_keep_alive_interval: Duration::from_secs(60),
            max_connections: None,
        };
        let worker = proxy.worker();
        let listener = runtime()
            .block_on(server::bind("127.0.0.1:0".parse().expect("an address"), "fuzz"))
            .expect("a loopback port");
        let server =
            server::serve(listener, limits, move |peer, req| worker.clone().handle(peer, req)).expect("serving");
        Agent {
            addr: server.local_addr,
            _server: server,
            config,
            metrics,
            proxy,
            upstream: upstream_addr,
            default_table,
        }
    })
}

fn compile(config: &Config, metrics: &Metrics, push: &[u8], upstream: &str) -> Option<RouteTable> {
    let push = String::from_utf8_lossy(push).replace("UPSTREAM", upstream);
    PushedConfig::parse(push.as_bytes()).ok()?.compile(config, metrics).ok()
}

fuzz_target!(|data: &[u8]| {
    let a = agent();
    let (table, bytes) = match data.iter().position(|&b| b == 0) {
        Some(i) => match compile(&a.config, &a.metrics, &data[..i], &a.upstream) {
            Some(t) => (Arc::new(t), &data[i + 1..]),
            None => return,
        },
        None => (a.default_table.clone(), data),
    };
    let live = a.proxy.live.load().with_routes(table);
    a.proxy.live.store(Arc::new(live));
    let _ = block_on(async {
        let mut conn = tokio::net::TcpStream::connect(a.addr).await.ok()?;
        // The server may close before reading everything (a refused head): not an error here.
        let _ = conn.write_all(bytes).await;
        let _ = conn.shutdown().await;
        let mut answer = Vec::new();
        let _ = (&mut conn).take(MAX_ANSWER as u64).read_to_end(&mut answer).await;
        Some(answer)
    });
});
