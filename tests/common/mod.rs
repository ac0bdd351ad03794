//! Shared harness for the integration tests: the real `tunnel-agent` binary, driven from the
//! outside (config file, signals, sockets, stderr), against in-process fakes that speak the real
//! wire protocols (GCE metadata server, HTTP/1.1 and h2c upstreams, WebSocket, gRPC-Web).
//!
//! Every wait is a poll with a deadline, never a bare sleep: the suite shares 2 cores with other
//! builds, so deadlines are generous and nothing assumes a scheduling order.

// Each test crate uses a different subset of the harness.
#![allow(dead_code, unused_imports)]

pub mod agent;
pub mod body;
pub mod client;
pub mod cloudflared;
pub mod etcd;
pub mod kube_api;
pub mod metadata;
pub mod notify;
pub mod pki;
pub mod sampler;
pub mod secret_manager;
pub mod upstream;
pub mod ws;

use std::future::Future;
use std::time::Duration;

pub use agent::{Agent, AgentBuilder, ConfigText};
pub use client::Reply;
pub use cloudflared::FakeCloudflared;
pub use metadata::{FakeMetadata, Fault};
pub use notify::NotifySocket;
pub use secret_manager::FakeSecretManager;
pub use upstream::{FakeUpstream, Wire};

/// How long any "this should happen soon" wait may take before the test fails. Generous: a
/// loaded 2-core machine can stall a debug build for seconds.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Polls `check` every 10 ms until it yields `Some`, failing the test after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Serves `handle(state, request)` on every connection `listener` accepts (HTTP/1.1 or h2c),
/// until the returned task is aborted. The accept loop the in-process fakes share.
pub fn serve_fake<S, F, Fut, E>(
    listener: tokio::net::TcpListener,
    state: std::sync::Arc<S>,
    handle: F,
) -> tokio::task::JoinHandle<()>
where
    S: Send + Sync + 'static,
    F: Fn(std::sync::Arc<S>, http::Request<hyper::body::Incoming>) -> Fut + Copy + Send + Sync + 'static,
    Fut: Future<Output = Result<http::Response<http_body_util::Full<bytes::Bytes>>, E>> + Send + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
{
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let state = state.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| handle(state.clone(), req));
                let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    })
}
