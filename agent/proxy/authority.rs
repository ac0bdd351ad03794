//! A request authority other than the upstream's address, for HTTP/2.
//!
//! When a backend keeps the client's `Host` (or a URLRewrite names one), HTTP/1.1 carries it in
//! the `Host` header. HTTP/2 carries it in `:authority`, which hyper takes from the request URI,
//! and RFC 9113 §8.3.1 forbids a `host` header that differs from it. hyper-util's client also
//! connects (and pools) by the URI's authority, so such requests go through a pool whose
//! connector always dials the upstream, whatever authority the URI names: one pool per upstream
//! address and TLS settings, in each worker.

use std::task::{Context, Poll};

use http::uri::{Authority, Scheme};
use http::Uri;
use tower_service::Service;

/// A connector that dials `target` (the upstream's scheme and address) for every URI.
#[derive(Debug, Clone)]
pub struct ToUpstream<C> {
    inner: C,
    target: Uri,
}

impl<C> ToUpstream<C> {
    /// `None` when scheme and authority do not make a URI (they come from a compiled table's
    /// upstream, so they always do).
    pub fn new(inner: C, scheme: &Scheme, upstream: &Authority) -> Option<ToUpstream<C>> {
        let target = Uri::builder()
            .scheme(scheme.clone())
            .authority(upstream.clone())
            .path_and_query("/")
            .build()
            .ok()?;
        Some(ToUpstream { inner, target })
    }
}

impl<C: Service<Uri>> Service<Uri> for ToUpstream<C> {
    type Response = C::Response;
    type Error = C::Error;
    type Future = C::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, _authority_of_the_request: Uri) -> Self::Future {
        self.inner.call(self.target.clone())
    }
}

/// Which pool a request with its own authority takes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AuthorityPoolKey {
    pub scheme: Scheme,
    pub upstream: Authority,
    /// The address of the backend's compiled TLS settings, when it has its own.
    pub tls: Option<usize>,
    pub h2c: bool,
}
