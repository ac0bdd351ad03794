//! `RequestMirror` copies: a task per sampled mirror, each waiting for the body copy
//! (`routing::mirror::MirrorTee`) and sending it through the mirror pools, so a slow mirror
//! backend can neither delay the real request nor take its connections.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::uri::PathAndQuery;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;

use super::destination::HttpConnector;
use super::request::UpstreamTarget;
use super::upstream::MirrorClient;
use super::Worker;
use crate::config::{AuthHeaderKind, UpstreamAuthKind, UpstreamProtocol};
use crate::gcp::IdTokenCache;
use crate::routing::filters::Mirror;
use crate::routing::mirror::MirrorTee;
use crate::routing::table::Rule;
use crate::telemetry::Metrics;

impl Worker {
    /// Starts a task per sampled mirror, each waiting for the body copy. Returns the tee that
    /// feeds them, or `None` when nothing is mirrored or the body was empty (sent already).
    pub(super) fn start_mirrors<'m>(
        &self,
        rule: &Rule,
        mirrors: impl Iterator<Item = &'m Mirror>,
        method: &http::Method,
        path_and_query: Option<PathAndQuery>,
        headers: &HeaderMap,
        body_is_empty: bool,
    ) -> Option<MirrorTee> {
        let mut waiting = Vec::new();
        for mirror in mirrors.filter(|m| m.sampled()) {
            let Ok(permit) = self.shared.mirror_slots.clone().try_acquire_owned() else {
                tracing::debug!(route = %rule.route, mirror = %mirror.upstream.url, "route {}: mirror to {} skipped: too many mirrored requests in flight", rule.route, mirror.upstream.url);
                continue;
            };
            let slot = MirrorSlot::new(permit, self.shared.metrics.clone());
            let (tx, rx) = tokio::sync::oneshot::channel::<Bytes>();
            waiting.push(tx);
            let mut req = Request::new(());
            *req.method_mut() = method.clone();
            *req.headers_mut() = headers.clone();
            req.headers_mut().remove(header::HOST);
            let task = MirrorTask {
                upstream: mirror.upstream.clone(),
                protocol: mirror.protocol,
                auth: mirror.auth,
                auth_header: mirror.auth_header,
                path_and_query: path_and_query.clone(),
                head: req,
                client: match &mirror.tls {
                    Some(t) => self.tls_pool(&self.mirror_tls_pools, t),
                    None => self.defaults().mirror_client.clone(),
                },
                h2c: self.mirror_h2c.clone(),
                tokens: self.shared.tokens.clone(),
                timeout: rule.backend_timeout.unwrap_or(Duration::from_secs(30)),
                route: rule.route.clone(),
            };
            tokio::spawn(async move {
                let _slot = slot;
                // The sender is dropped without sending when the body is too large or the
                // real request ends early: then there is nothing whole to mirror.
                if let Ok(body) = rx.await {
                    task.send(body).await;
                }
            });
        }
        if waiting.is_empty() {
            return None;
        }
        let tee = MirrorTee::new(waiting);
        if body_is_empty {
            tee.finish();
            return None;
        }
        Some(tee)
    }
}

/// A mirror's place among the `MIRROR_MAX_IN_FLIGHT`, counted in `mirrors_in_flight` while
/// its task holds it.
struct MirrorSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl MirrorSlot {
    fn new(permit: tokio::sync::OwnedSemaphorePermit, metrics: Arc<Metrics>) -> MirrorSlot {
        metrics.mirrors_in_flight.inc();
        MirrorSlot {
            _permit: permit,
            metrics,
        }
    }
}

impl Drop for MirrorSlot {
    fn drop(&mut self) {
        self.metrics.mirrors_in_flight.dec();
    }
}

struct MirrorTask {
    upstream: crate::routing::table::Upstream,
    protocol: UpstreamProtocol,
    auth: UpstreamAuthKind,
    auth_header: AuthHeaderKind,
    path_and_query: Option<PathAndQuery>,
    /// Method and headers of the copy.
    head: Request<()>,
    client: MirrorClient,
    h2c: Client<HttpConnector, Full<Bytes>>,
    tokens: Arc<IdTokenCache>,
    timeout: Duration,
    route: Arc<str>,
}

impl MirrorTask {
    async fn send(self, body: Bytes) {
        let url = &self.upstream.url;
        let (mut parts, ()) = self.head.into_parts();
        let target = UpstreamTarget {
            upstream: &self.upstream,
            protocol: self.protocol,
            auth: self.auth,
            auth_header: self.auth_header,
        };
        if let Err(e) = target
            .address(&self.tokens, &mut parts, self.path_and_query.as_ref())
            .await
        {
            tracing::debug!(route = %self.route, mirror = %url, error = %e, "route {}: mirror to {url} skipped: {e}", self.route);
            return;
        }
        let req = Request::from_parts(parts, Full::new(body));
        let sent = match self.protocol {
            UpstreamProtocol::Auto => self.client.request(req),
            UpstreamProtocol::H2c => self.h2c.request(req),
        };
        let outcome = tokio::time::timeout(self.timeout, async {
            let resp = sent.await.map_err(|e| crate::errors::error_chain(&e))?;
            let status = resp.status();
            // Read the answer to its end so the connection can be reused.
            resp.into_body().collect().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(status)
        })
        .await;
        match outcome {
            Ok(Ok(status)) => {
                tracing::debug!(route = %self.route, mirror = %url, %status, "route {}: mirrored to {url}: {status}", self.route)
            }
            Ok(Err(e)) => {
                tracing::debug!(route = %self.route, mirror = %url, error = %e, "route {}: mirror to {url} failed: {e}", self.route)
            }
            Err(_) => {
                tracing::debug!(route = %self.route, mirror = %url, "route {}: mirror to {url} timed out", self.route)
            }
        }
    }
}
