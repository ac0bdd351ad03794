//! The trust of `https://` upstreams without TLS settings of their own (`proxy.ca_file`, else
//! `proxy.trust`), and the pools that use it. A reload that changes those anchors (another
//! file, or the same file with a CA removed) swaps in a new [`DefaultTrust`]; each worker notices
//! on its next request and rebuilds its default pools, dropping their connections, so a CA
//! taken out of the bundle is no longer trusted by any new request.

use std::sync::Arc;

use hyper_util::client::legacy::Client;
use rustls::pki_types::TrustAnchor;

use super::destination::GuardedResolver;
use super::upstream::{http_connector, HttpsConnector, MirrorClient};
use super::{CappedBody, Proxy, Worker};
use crate::config::ProxySection;
use crate::routing::tls;

/// The default anchors, and the connector that verifies with them.
pub struct DefaultTrust {
    connector: HttpsConnector,
    /// To tell whether a reload changed them.
    anchors: Vec<TrustAnchor<'static>>,
}

impl DefaultTrust {
    /// Loads the anchors `settings` name (reading `proxy.ca_file` with its bounds), for
    /// connections opened with the proxy's own (restart-only) connector settings.
    pub(super) fn load(
        settings: &ProxySection,
        running: &ProxySection,
        resolver: &GuardedResolver,
    ) -> anyhow::Result<DefaultTrust> {
        let roots = tls::DefaultRoots::new(settings)
            .get()
            .map_err(|(key, reason)| anyhow::anyhow!("{key}: {reason}"))?;
        let roots = Arc::unwrap_or_clone(roots);
        let anchors = roots.roots.clone();
        // ring is the only rustls provider compiled in (no C toolchain or cmake needed).
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls::client_config(roots).map_err(|e| anyhow::anyhow!(e))?)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http_connector(running, resolver));
        Ok(DefaultTrust { connector, anchors })
    }
}

/// One worker's pools that verify with a [`DefaultTrust`].
pub(super) struct WorkerDefaults {
    trust: Arc<DefaultTrust>,
    /// HTTP/1.1 or HTTP/2 (ALPN) to `https://`; upgrades to `http://`.
    pub client: Client<HttpsConnector, CappedBody>,
    /// `RequestMirror` copies, apart so a slow mirror cannot take connections from traffic.
    pub mirror_client: MirrorClient,
}

impl WorkerDefaults {
    pub(super) fn new(proxy: &Proxy) -> WorkerDefaults {
        let trust = proxy.default_trust.load_full();
        WorkerDefaults {
            client: proxy.builder.build(trust.connector.clone()),
            mirror_client: proxy.builder.build(trust.connector.clone()),
            trust,
        }
    }
}

impl Proxy {
    /// Loads the default anchors of reloaded `settings`: `None` when they are the ones in use,
    /// an error (naming the key) when they cannot be loaded. Nothing changes until
    /// [`Proxy::use_default_trust`].
    pub fn reloaded_trust(&self, settings: &ProxySection) -> anyhow::Result<Option<DefaultTrust>> {
        let loaded = DefaultTrust::load(settings, &self.settings, &self.resolver)?;
        Ok((loaded.anchors != self.default_trust.load().anchors).then_some(loaded))
    }

    /// Swaps in new default anchors; every worker rebuilds its default pools on its next request.
    pub fn use_default_trust(&self, trust: DefaultTrust) {
        tracing::info!(
            anchors = trust.anchors.len(),
            "the default upstream trust anchors changed ({} now); the shared https pools are rebuilt",
            trust.anchors.len()
        );
        self.default_trust.store(Arc::new(trust));
    }

    /// The connector of the default anchors in use.
    pub(super) fn default_https(&self) -> HttpsConnector {
        self.default_trust.load().connector.clone()
    }
}

impl Worker {
    /// This worker's default pools, rebuilt when the proxy's default trust changed since they
    /// were built (then the pools for other authorities, some built on the old trust, go too).
    pub(super) fn defaults(&self) -> Arc<WorkerDefaults> {
        let current = self.defaults.load_full();
        if Arc::ptr_eq(&current.trust, &self.shared.default_trust.load()) {
            return current;
        }
        let _guard = self.tls_pools_insert.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = Arc::new(WorkerDefaults::new(&self.shared));
        self.defaults.store(fresh.clone());
        self.authority_pools.store(Arc::default());
        fresh
    }
}
