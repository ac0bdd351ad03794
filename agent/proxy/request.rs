//! The request phases: answers given here before any backend (a redirect, a CORS preflight),
//! then the client's request turned into the one a backend gets: the header policy of the hop,
//! forwarding headers, the rule's and backend's filters, a URLRewrite, and finally its address
//! (URI, HTTP version, identity token).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Version};
use http_body_util::{Either, Full};

use super::headers::{
    append_forwarded_for, client_host, content_length, strip_hop_by_hop, te_has_trailers, X_SERVERLESS_AUTHORIZATION,
};
use super::upgrade::upgrade_protocol;
use super::{LiveSettings, ProxyBody, ProxyError};
use crate::config::{AuthHeaderKind, HostHeader, UpstreamAuthKind, UpstreamProtocol};
use crate::gcp::IdTokenCache;
use crate::routing::cors::CorsVerdict;
use crate::routing::filters::{client_scheme, is_host_and_port, request_host, PathModifier};
use crate::routing::table::{Backend, Routed};
use crate::routing::Filters;

/// A redirect or a CORS preflight answer from `filters`, when they give one for this request.
pub(super) fn answer_here<B>(
    filters: &Filters,
    routed: Routed<'_>,
    req: &Request<B>,
) -> Option<Result<Response<ProxyBody>, ProxyError>> {
    if let Some(redirect) = &filters.redirect {
        if redirect.uses_request_host() && !is_host_and_port(request_host(req)) {
            return Some(Err(ProxyError::BadHost));
        }
        let location = redirect.location(
            client_scheme(req.headers()),
            request_host(req),
            req.uri().path(),
            req.uri().query(),
            routed.matched.prefix(),
        );
        return Some(
            HeaderValue::try_from(location)
                .map_err(|_| ProxyError::BadRedirect)
                .map(|location| {
                    let mut resp = Response::new(Either::Right(Full::new(Bytes::new())));
                    *resp.status_mut() = redirect.status;
                    resp.headers_mut().insert(header::LOCATION, location);
                    resp
                }),
        );
    }
    match filters.cors.as_ref()?.on_request(req.method(), req.headers()) {
        CorsVerdict::Forward => None,
        CorsVerdict::Preflight(headers) => {
            let mut resp = Response::new(Either::Right(Full::new(Bytes::new())));
            *resp.status_mut() = StatusCode::NO_CONTENT;
            *resp.headers_mut() = headers;
            Some(Ok(resp))
        }
    }
}

/// What the request phase decided besides the head it rewrote in place.
#[derive(Debug)]
pub(super) struct Forwarding {
    /// The path and query the upstream gets: a URLRewrite's, else the client's.
    pub path_and_query: Option<PathAndQuery>,
    /// The protocol the client asked to upgrade to, forwarded as `Upgrade`.
    pub upgrade: Option<HeaderValue>,
}

/// The request phase: turns the client's request, in place, into the one `backend` gets, all
/// but its address ([`UpstreamTarget::address`]). A declared body over `proxy.max_body_bytes`
/// is refused here, before anything is sent.
pub(super) fn upstream_request<B>(
    req: &mut Request<B>,
    routed: Routed<'_>,
    backend: &Backend,
    live: &LiveSettings,
    peer: SocketAddr,
) -> Result<Forwarding, ProxyError> {
    if let (Some(limit), Some(len)) = (live.max_body_bytes, content_length(req.headers())) {
        if len > limit {
            return Err(ProxyError::DeclaredBodyTooLarge { len, limit });
        }
    }
    // The Host rule (docs/routing.md): the client's, unless this backend wants its own
    // (then hyper writes the upstream URI's authority) or a URLRewrite names one.
    let host = match backend.host_header {
        HostHeader::Client => client_host(req),
        HostHeader::Upstream => None,
    };
    let upgrade = upgrade_protocol(req.headers());
    hop_headers(req.headers_mut(), host, &live.auth_header, upgrade.as_ref(), peer);
    let rule = routed.rule;
    // Rule filters, then the chosen backend's (Gateway API: backend filters apply only
    // when that backend is chosen).
    for filters in [&rule.filters, &backend.filters] {
        if let Some(m) = &filters.request_headers {
            m.apply(req.headers_mut());
        }
    }
    let rewrite = backend.filters.rewrite.as_ref().or(rule.filters.rewrite.as_ref());
    if let Some(host) = rewrite.and_then(|r| r.hostname.as_ref()) {
        req.headers_mut().insert(header::HOST, host.clone());
    }
    let path_and_query = match rewrite.and_then(|r| r.path.as_ref()) {
        Some(m) => Some(rewritten(req.uri(), m, routed.matched.prefix())?),
        None => req.uri().path_and_query().cloned(),
    };
    Ok(Forwarding {
        path_and_query,
        upgrade,
    })
}

/// The headers of the hop: hop-by-hop ones and the client's credentials (`Authorization`, the
/// serverless one, the internal auth header) removed, `host` as `Host`, `TE: trailers` kept
/// when asked for, the upgrade asked for, the peer appended to `X-Forwarded-For`.
fn hop_headers(
    headers: &mut HeaderMap,
    host: Option<HeaderValue>,
    auth_header: &HeaderName,
    upgrade: Option<&HeaderValue>,
    peer: SocketAddr,
) {
    let wants_trailers = te_has_trailers(headers);
    strip_hop_by_hop(headers);
    headers.remove(header::HOST);
    if let Some(host) = host {
        headers.insert(header::HOST, host);
    }
    headers.remove(header::AUTHORIZATION);
    headers.remove(X_SERVERLESS_AUTHORIZATION);
    headers.remove(auth_header);
    if wants_trailers {
        // gRPC servers use `te: trailers` to detect proxies that would drop trailers.
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if let Some(proto) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, proto.clone());
    }
    append_forwarded_for(headers, peer);
}

/// The path and query after a URLRewrite's path modifier (the query is kept).
fn rewritten(uri: &http::Uri, modifier: &PathModifier, prefix: Option<&str>) -> Result<PathAndQuery, ProxyError> {
    let mut pq = modifier.apply(uri.path(), prefix);
    if let Some(q) = uri.query() {
        pq.push('?');
        pq.push_str(q);
    }
    PathAndQuery::try_from(pq).map_err(|e| ProxyError::BadRewrite(e.to_string()))
}

/// One upstream as a request is sent to it: the request itself and each of its mirror copies.
pub(super) struct UpstreamTarget<'a> {
    pub upstream: &'a crate::routing::table::Upstream,
    pub protocol: UpstreamProtocol,
    pub auth: UpstreamAuthKind,
    pub auth_header: AuthHeaderKind,
}

impl<'a> UpstreamTarget<'a> {
    pub(super) fn of(backend: &'a Backend) -> UpstreamTarget<'a> {
        UpstreamTarget {
            upstream: &backend.upstream,
            protocol: backend.protocol,
            auth: backend.auth,
            auth_header: backend.auth_header,
        }
    }

    /// Points `parts` at the upstream: its URI for `path_and_query`, an identity token when the
    /// upstream wants one (`upstream_auth = "gcp-id-token"`), the HTTP version of its protocol.
    pub(super) async fn address(
        &self,
        tokens: &Arc<IdTokenCache>,
        parts: &mut http::request::Parts,
        path_and_query: Option<&PathAndQuery>,
    ) -> Result<(), ProxyError> {
        let url = &self.upstream.url;
        if self.auth == UpstreamAuthKind::GcpIdToken {
            let token = tokens.header(url).await.map_err(|e| ProxyError::TokenUnavailable {
                upstream: url.to_string(),
                reason: e.to_string(),
            })?;
            let name = match self.auth_header {
                AuthHeaderKind::Authorization => header::AUTHORIZATION,
                AuthHeaderKind::XServerlessAuthorization => X_SERVERLESS_AUTHORIZATION,
            };
            parts.headers.insert(name, token);
        }
        parts.uri = self
            .upstream
            .uri_for(path_and_query)
            .map_err(|e| ProxyError::BadUpstreamUri(e.to_string()))?;
        parts.version = match self.protocol {
            UpstreamProtocol::H2c => Version::HTTP_2,
            UpstreamProtocol::Auto => Version::HTTP_11,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::header::{AUTHORIZATION, CONNECTION, CONTENT_LENGTH, HOST, LOCATION, TE, UPGRADE};

    use super::*;
    use crate::proxy::test_support::{live, table};
    use crate::routing::RequestHead;
    use crate::telemetry::Metrics;

    const PEER: &str = "10.1.2.3:5000";

    /// The request phase for `req` on the table of `toml`: the forwarding decided, or the error.
    fn phase(toml: &str, req: &mut Request<()>, max_body_bytes: Option<u64>) -> Result<Forwarding, ProxyError> {
        let live = live(table(toml), max_body_bytes);
        let host = request_host(req).to_owned();
        let routed = live.routes.route(&host, &RequestHead::of(req)).expect("a rule matches");
        let backend = routed.rule.pick_backend().expect("a backend");
        upstream_request(req, routed, backend, &live, PEER.parse().unwrap())
    }

    fn names(h: &HeaderMap) -> Vec<&str> {
        let mut names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        names
    }

    #[test]
    fn the_client_head_becomes_the_upstream_head() {
        let toml = r#"
[[route]]
hostnames = ["app.example.com"]
matches = [{ path = { type = "PathPrefix", value = "/api" } }]
upstream = "http://10.0.0.9:8080"
filters = [
  { type = "RequestHeaderModifier", request_header_modifier = { set = [{ name = "x-set", value = "rule" }] } },
  { type = "URLRewrite", url_rewrite = { path = { type = "ReplacePrefixMatch", replace_prefix_match = "/v2" } } },
]
"#;
        let mut req = Request::builder()
            .uri("/api/items?page=2")
            .header(HOST, "app.example.com")
            .header(CONNECTION, "keep-alive, x-hop")
            .header("x-hop", "1")
            .header("keep-alive", "timeout=5")
            .header(AUTHORIZATION, "Bearer client")
            .header("x-serverless-authorization", "Bearer client")
            .header("x-internal-auth-token", "for this hop only")
            .header(TE, "trailers")
            .header("x-forwarded-for", "198.51.100.1")
            .header("x-set", "client")
            .header("x-kept", "1")
            .body(())
            .unwrap();
        let out = phase(toml, &mut req, None).unwrap();
        assert_eq!(out.path_and_query.unwrap(), "/v2/items?page=2");
        assert_eq!(out.upgrade, None);
        let h = req.headers();
        assert_eq!(names(h), ["host", "te", "x-forwarded-for", "x-kept", "x-set"], "{h:?}");
        assert_eq!(h[HOST], "app.example.com", "[[route]] keeps the client's Host");
        assert_eq!(h[TE], "trailers");
        assert_eq!(h["x-forwarded-for"], "198.51.100.1, 10.1.2.3");
        assert_eq!(h["x-set"], "rule");
        assert_eq!(req.uri(), "/api/items?page=2", "the URI is the address step's");
    }

    #[test]
    fn the_host_is_the_upstreams_or_the_rewrites_when_asked() {
        let toml = r#"
[[route]]
hostnames = ["app.example.com"]
backends = [{ url = "http://10.0.0.9:8080", host_header = "upstream" }]
[[route]]
hostnames = ["rewrite.example.com"]
upstream = "http://10.0.0.9:8080"
filters = [{ type = "URLRewrite", url_rewrite = { hostname = "internal.example" } }]
"#;
        let mut req = Request::builder()
            .uri("/x")
            .header(HOST, "app.example.com")
            .body(())
            .unwrap();
        phase(toml, &mut req, None).unwrap();
        assert_eq!(req.headers().get(HOST), None, "hyper writes the upstream's");
        let mut req = Request::builder()
            .uri("/x")
            .header(HOST, "rewrite.example.com")
            .body(())
            .unwrap();
        phase(toml, &mut req, None).unwrap();
        assert_eq!(req.headers()[HOST], "internal.example");
    }

    #[test]
    fn an_upgrade_asked_for_is_forwarded_alone() {
        let toml = "[[route]]\nhostnames = [\"ws.example.com\"]\nupstream = \"http://10.0.0.9:8080\"\n";
        let mut req = Request::builder()
            .uri("/chat")
            .header(HOST, "ws.example.com")
            .header(CONNECTION, "keep-alive, Upgrade")
            .header(UPGRADE, "h2c, websocket")
            .body(())
            .unwrap();
        let out = phase(toml, &mut req, None).unwrap();
        assert_eq!(out.upgrade.unwrap(), "websocket");
        assert_eq!(req.headers()[CONNECTION], "upgrade");
        assert_eq!(req.headers()[UPGRADE], "websocket");
    }

    #[test]
    fn a_declared_body_over_the_limit_is_refused_before_sending() {
        let toml = "[[route]]\nhostnames = [\"up.example.com\"]\nupstream = \"http://10.0.0.9:8080\"\n";
        let request = |len: u64| {
            let b = Request::builder().uri("/").header(HOST, "up.example.com");
            b.header(CONTENT_LENGTH, len).body(()).unwrap()
        };
        let e = phase(toml, &mut request(11), Some(10)).unwrap_err();
        assert!(
            matches!(e, ProxyError::DeclaredBodyTooLarge { len: 11, limit: 10 }),
            "{e:?}"
        );
        assert!(phase(toml, &mut request(10), Some(10)).is_ok());
        assert!(phase(toml, &mut request(11), None).is_ok(), "no limit");
    }

    #[test]
    fn a_redirect_answers_here() {
        let toml = r#"
[[route]]
hostnames = ["old.example.com"]
filters = [{ type = "RequestRedirect", request_redirect = { hostname = "new.example.com", status_code = 301 } }]
"#;
        let live = live(table(toml), None);
        let req = Request::builder()
            .uri("/a?b=1")
            .header(HOST, "old.example.com")
            .body(())
            .unwrap();
        let routed = live.routes.route("old.example.com", &RequestHead::of(&req)).unwrap();
        let resp = answer_here(&routed.rule.filters, routed, &req)
            .expect("answered")
            .unwrap();
        assert_eq!(resp.status(), StatusCode::MOVED_PERMANENTLY);
        assert_eq!(resp.headers()[LOCATION], "http://new.example.com/a?b=1");
        let req = Request::builder()
            .uri("/a")
            .header(HOST, "old.example.com")
            .body(())
            .unwrap();
        let backend_filters = Filters::default();
        assert!(
            answer_here(&backend_filters, routed, &req).is_none(),
            "no filter, no answer"
        );
    }

    #[tokio::test]
    async fn the_address_is_the_upstreams_uri_and_protocol() {
        let toml = r#"
[[route]]
hostnames = ["app.example.com"]
backends = [{ url = "http://10.0.0.9:8080/base", protocol = "h2c" }]
"#;
        let live = live(table(toml), None);
        let req = Request::builder()
            .uri("/x")
            .header(HOST, "app.example.com")
            .body(())
            .unwrap();
        let routed = live.routes.route("app.example.com", &RequestHead::of(&req)).unwrap();
        let backend = routed.rule.pick_backend().unwrap();
        let metadata = crate::gcp::MetadataClient::new("http://127.0.0.1:9".into(), Duration::from_secs(1)).unwrap();
        let tokens = IdTokenCache::new(
            metadata,
            Duration::from_secs(60),
            Arc::new(Metrics::default()),
            tokio::runtime::Handle::current(),
        );
        let (mut parts, ()) = req.into_parts();
        let pq = PathAndQuery::from_static("/x?y=1");
        UpstreamTarget::of(backend)
            .address(&tokens, &mut parts, Some(&pq))
            .await
            .unwrap();
        assert_eq!(parts.uri, "http://10.0.0.9:8080/base/x?y=1");
        assert_eq!(parts.version, Version::HTTP_2);
        assert_eq!(parts.headers.get(AUTHORIZATION), None, "no identity token asked for");
    }
}
