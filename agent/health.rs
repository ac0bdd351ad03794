//! `:2000`: `/healthz`, `/ready`, `/metrics`, `/status`, for MIG autohealing, load balancers
//! and humans.
//!
//! Every answer comes from cached state; probing never blocks on a component. The proxy's
//! liveness is measured by a background self-probe (a real `GET /healthz` over TCP every
//! second), so `/ready` reflects a proxy that actually answers, not one that merely started.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::routes::RouteSummary;
use crate::telemetry::Metrics;

/// Facts for `/status`, replaced whole on each change.
#[derive(Debug, Clone, Default)]
pub struct StatusInfo {
    pub config_file: String,
    pub route_source: String,
    pub routes: Vec<RouteSummary>,
    /// Bumped on every applied route table.
    pub routes_version: u64,
    pub last_reload_error: Option<String>,
    /// Settings changed in the file that need a restart to apply.
    pub pending_restart: Vec<String>,
    pub secrets: Vec<String>,
}

/// The agent's cached health.
#[derive(Debug)]
pub struct Health {
    pub config_loaded: AtomicBool,
    pub secrets_loaded: AtomicBool,
    pub routes_loaded: AtomicBool,
    pub proxy_answering: AtomicBool,
    /// Set first thing on shutdown, so probes fail before anything stops.
    pub draining: AtomicBool,
    pub status: ArcSwap<StatusInfo>,
    pub metrics: Arc<Metrics>,
    started: Instant,
}

impl Health {
    pub fn new(metrics: Arc<Metrics>) -> Arc<Health> {
        Arc::new(Health {
            config_loaded: AtomicBool::new(false),
            secrets_loaded: AtomicBool::new(false),
            routes_loaded: AtomicBool::new(false),
            proxy_answering: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            status: ArcSwap::default(),
            metrics,
            started: Instant::now(),
        })
    }

    pub fn update_status(&self, f: impl FnOnce(&mut StatusInfo)) {
        let mut next = StatusInfo::clone(&self.status.load());
        f(&mut next);
        self.status.store(Arc::new(next));
    }

    /// The readiness verdict and the per-component detail behind it.
    pub fn readiness(&self) -> (bool, serde_json::Value) {
        let flag = |b: &AtomicBool| b.load(Ordering::Acquire);
        let components = [
            ("config", flag(&self.config_loaded)),
            ("secrets", flag(&self.secrets_loaded)),
            ("routes", flag(&self.routes_loaded)),
            ("proxy", flag(&self.proxy_answering)),
        ];
        let draining = flag(&self.draining);
        let ready = !draining && components.iter().all(|(_, ok)| *ok);
        let mut detail = serde_json::Map::new();
        for (name, ok) in components {
            detail.insert(name.to_owned(), json!(if ok { "ok" } else { "not ready" }));
        }
        let body = json!({
            "ready": ready,
            "draining": draining,
            "components": detail,
        });
        (ready, body)
    }

    fn status_json(&self) -> serde_json::Value {
        let s = self.status.load();
        let (ready, readiness) = self.readiness();
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": self.started.elapsed().as_secs(),
            "ready": ready,
            "readiness": readiness["components"],
            "config_file": s.config_file,
            "routes": {
                "source": s.route_source,
                "version": s.routes_version,
                "count": s.routes.len(),
                "table": s.routes.iter().map(|r| json!({
                    "name": r.name, "hostnames": r.hostnames, "upstreams": r.upstreams,
                })).collect::<Vec<_>>(),
            },
            "last_reload_error": s.last_reload_error,
            "pending_restart": s.pending_restart,
            // Names only: values never leave the process.
            "secrets": s.secrets,
        })
    }

    /// Answers one request on the health listener.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "application/json",
                r#"{"error":"method not allowed"}"#.into(),
            );
        }
        match req.uri().path() {
            "/healthz" => reply(StatusCode::OK, "application/json", r#"{"status":"ok"}"#.into()),
            "/ready" => {
                let (ready, body) = self.readiness();
                let status = if ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                reply(status, "application/json", body.to_string())
            }
            "/metrics" => {
                let mut out = String::with_capacity(8192);
                self.metrics.render(&mut out);
                reply(StatusCode::OK, "text/plain; version=0.0.4", out)
            }
            "/status" => reply(StatusCode::OK, "application/json", self.status_json().to_string()),
            _ => reply(
                StatusCode::NOT_FOUND,
                "application/json",
                r#"{"error":"not found"}"#.into(),
            ),
        }
    }

    /// Probes the proxy's `/healthz` every `interval` and records whether it answered.
    pub fn watch_proxy(self: &Arc<Self>, addr: SocketAddr, interval: Duration) -> tokio::task::JoinHandle<()> {
        let health = Arc::downgrade(self);
        let target = probe_address(addr);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let ok = probe(target, interval).await;
                let Some(health) = health.upgrade() else { return };
                let was = health.proxy_answering.swap(ok, Ordering::AcqRel);
                if was != ok {
                    if ok {
                        tracing::info!(%target, "proxy answers its health probe");
                    } else {
                        tracing::warn!(%target, "proxy stopped answering its health probe");
                    }
                }
            }
        })
    }
}

/// Where to reach a listener bound to a wildcard address.
fn probe_address(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(a) if a.ip().is_unspecified() => SocketAddr::from((Ipv4Addr::LOCALHOST, a.port())),
        SocketAddr::V6(a) if a.ip().is_unspecified() => SocketAddr::from((Ipv6Addr::LOCALHOST, a.port())),
        a => a,
    }
}

/// One `GET /healthz` over a fresh connection; true on a 200.
pub async fn probe(addr: SocketAddr, timeout: Duration) -> bool {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: tunnel-agent-probe\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut buf = [0u8; 16];
        let mut n = 0;
        while n < 12 {
            let m = s.read(&mut buf[n..]).await.ok()?;
            if m == 0 {
                break;
            }
            n += m;
        }
        Some(buf[..n].starts_with(b"HTTP/1.1 200"))
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}
