//! The destination rule at connect time: every upstream connection resolves its name through
//! [`GuardedResolver`], which drops link-local and metadata addresses (`routing::destination`)
//! unless `proxy.allow_link_local_upstreams`. A table is checked when compiled, but a name's
//! addresses can change afterwards (or be written so only the system resolver reads them as an
//! address, like `2852039166` for 169.254.169.254); this is the check that holds then.
//! Address literals never reach a resolver: the table refused those already.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};

use crate::routing::destination::{refused_host, refused_ip, ALLOW_LINK_LOCAL};

/// hyper-util's connector, resolving through [`GuardedResolver`].
pub type HttpConnector = hyper_util::client::legacy::connect::HttpConnector<GuardedResolver>;

/// A connection refused because every address of its name is a refused destination. Found in
/// the error chain by the proxy, which answers 502 `destination_refused`.
#[derive(Debug)]
pub struct RefusedDestination {
    pub name: String,
    /// The first refused address, for the log (`None`: the name itself is refused).
    pub addr: Option<SocketAddr>,
}

impl std::fmt::Display for RefusedDestination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.addr {
            Some(addr) => write!(
                f,
                "{} resolves to {}, a link-local or metadata-server address ({ALLOW_LINK_LOCAL} is off)",
                self.name,
                addr.ip()
            ),
            None => write!(f, "{} is a metadata-server name ({ALLOW_LINK_LOCAL} is off)", self.name),
        }
    }
}

impl std::error::Error for RefusedDestination {}

/// The system resolver (getaddrinfo on a blocking thread, as hyper-util's default), with
/// refused addresses removed. A name with some allowed addresses keeps those; a name with
/// only refused ones fails with [`RefusedDestination`].
#[derive(Clone)]
pub struct GuardedResolver {
    inner: GaiResolver,
    /// `proxy.allow_link_local_upstreams`, shared by every connector so a reload changes it.
    allow: Arc<AtomicBool>,
}

impl GuardedResolver {
    pub fn new(allow_link_local: bool) -> GuardedResolver {
        GuardedResolver {
            inner: GaiResolver::new(),
            allow: Arc::new(AtomicBool::new(allow_link_local)),
        }
    }

    /// Applies a reloaded `proxy.allow_link_local_upstreams` to every connector sharing this
    /// resolver.
    pub fn set_allow_link_local(&self, allow: bool) {
        self.allow.store(allow, Ordering::Relaxed);
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let allow = self.allow.load(Ordering::Relaxed);
        if !allow && refused_host(name.as_str()) {
            let refused = RefusedDestination {
                name: name.as_str().to_owned(),
                addr: None,
            };
            return Box::pin(std::future::ready(Err(refused.into())));
        }
        let host = name.as_str().to_owned();
        let resolving = self.inner.call(name);
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = resolving.await?.collect();
            if allow {
                return Ok(addrs.into_iter());
            }
            keep_allowed(&host, addrs).map(Vec::into_iter).map_err(Into::into)
        })
    }
}

/// `addrs` without refused addresses; an error when none is left.
fn keep_allowed(name: &str, addrs: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, RefusedDestination> {
    let first_refused = addrs.iter().copied().find(|a| refused_ip(a.ip()));
    let kept: Vec<SocketAddr> = addrs.into_iter().filter(|a| !refused_ip(a.ip())).collect();
    match (kept.is_empty(), first_refused) {
        (true, Some(addr)) => Err(RefusedDestination {
            name: name.to_owned(),
            addr: Some(addr),
        }),
        _ => Ok(kept),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    #[test]
    fn refused_addresses_are_dropped_and_a_name_with_only_those_fails() {
        let mixed = vec![addr("169.254.169.254:80"), addr("10.0.0.7:80"), addr("[fe80::1]:80")];
        assert_eq!(
            keep_allowed("app", mixed).expect("one allowed"),
            vec![addr("10.0.0.7:80")]
        );
        let only = vec![addr("169.254.169.254:80"), addr("[fd00:ec2::254]:80")];
        let e = keep_allowed("sneaky", only).expect_err("all refused");
        assert_eq!(e.addr, Some(addr("169.254.169.254:80")));
        assert!(e.to_string().contains("sneaky resolves to 169.254.169.254"), "{e}");
        assert!(keep_allowed("none", Vec::new()).expect("empty stays empty").is_empty());
    }

    /// The resolver itself, through the system's getaddrinfo (nothing is dialled): glibc reads
    /// `2852039166` as the number of 169.254.169.254, a name the table's literal check cannot
    /// see, so the connect-time check is what refuses it; `localhost` still resolves. This is
    /// in-process on purpose: a black-box request through the proxy would, on a regression,
    /// send traffic to the metadata address.
    #[tokio::test]
    async fn the_system_resolver_path_refuses_a_number_that_names_link_local() {
        use std::str::FromStr;
        use tower_service::Service;
        let mut resolver = GuardedResolver::new(false);
        let name = Name::from_str("2852039166").expect("a name");
        let e = resolver.call(name).await.expect_err("refused");
        let refused = e.downcast_ref::<RefusedDestination>().expect("a RefusedDestination");
        assert_eq!(
            refused.addr.map(|a| a.ip().to_string()).as_deref(),
            Some("169.254.169.254")
        );
        let local = resolver.call(Name::from_str("localhost").expect("a name")).await;
        assert!(local.expect("localhost resolves").all(|a| a.ip().is_loopback()));
        resolver.set_allow_link_local(true);
        let allowed = resolver.call(Name::from_str("2852039166").expect("a name")).await;
        assert_eq!(
            allowed.expect("allowed").next().map(|a| a.ip().to_string()).as_deref(),
            Some("169.254.169.254")
        );
    }
}
