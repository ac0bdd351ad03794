//! Why the proxy answered a request itself instead of with the upstream's response.
//!
//! Three tiers, as the status says: the request's fault (4xx), the route's configuration (500),
//! the upstream's (502/503/504). Each variant knows its status, its JSON `error` code and, for
//! upstream failures, the metric it counts under; [`super::Proxy`] logs and counts it in one
//! place.

use std::borrow::Cow;
use std::time::Duration;

use http::{HeaderName, Response, StatusCode};

use super::{error, ProxyBody};
use crate::telemetry::UpstreamErrorKind;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("missing or wrong {header}")]
    Unauthorized { header: HeaderName },
    /// A path that cannot be normalised safely (routing/path.rs).
    #[error("{0}")]
    BadPath(crate::routing::path::PathError),
    /// A redirect that takes its host from the request, whose `Host` is not a host name.
    #[error("the Host header is not a host name to redirect to")]
    BadHost,
    /// `CONNECT`: the proxy routes requests by hostname and path, never tunnels; cloudflared
    /// sends one for an `https://` service of its remote ingress (`cloudflared.remote_ingress`).
    #[error("CONNECT is not served")]
    Connect,
    #[error("no route for host {host:?} and path {path:?}")]
    NoRoute { host: String, path: String },
    /// The declared `Content-Length` is over the limit.
    #[error("request body of {len} bytes exceeds the limit of {limit}")]
    DeclaredBodyTooLarge { len: u64, limit: u64 },
    /// The streamed body went over the limit.
    #[error("request body exceeds the configured limit")]
    BodyTooLarge,
    #[error("cannot build upstream URI: {0}")]
    BadUpstreamUri(String),

    /// A fail-closed rule or backend (`unavailableStatus`), with the table's status.
    #[error("this route cannot be served as configured")]
    Unavailable { status: StatusCode },
    #[error("the redirect target is not a valid Location")]
    BadRedirect,
    #[error("this route has no backend with a weight above 0")]
    NoBackend,
    #[error("rewritten path is invalid: {0}")]
    BadRewrite(String),

    /// No identity token for the upstream; the message is the cache's reason.
    #[error("{reason}")]
    TokenUnavailable { upstream: String, reason: String },
    #[error("the upstream did not answer in time")]
    UpstreamTimeout { upstream: String, timeout: Duration },
    /// The client stopped sending the request body (`proxy.body_read_timeout`).
    #[error("no request body bytes within {limit:?}")]
    BodyReadTimeout { limit: Duration },
    #[error("no response within the route's request timeout")]
    RequestTimeout { limit: Duration },
    /// The upstream's name resolved only to link-local or metadata addresses (the destination
    /// rule, `proxy::destination`); `why` is for the log.
    #[error("the upstream's address is not allowed")]
    DestinationRefused { upstream: String, why: String },
    /// The connection to the upstream failed; `cause` is the whole error chain, for the log.
    #[error("{}", if *connect { "cannot connect to the upstream" } else { "the upstream connection failed" })]
    Upstream {
        upstream: String,
        cause: String,
        connect: bool,
    },
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            ProxyError::BadPath(_) | ProxyError::BadHost => StatusCode::BAD_REQUEST,
            ProxyError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ProxyError::Connect => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::DeclaredBodyTooLarge { .. } | ProxyError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::BadUpstreamUri(_) => StatusCode::BAD_REQUEST,
            ProxyError::BodyReadTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ProxyError::Unavailable { status } => *status,
            ProxyError::BadRedirect | ProxyError::NoBackend | ProxyError::BadRewrite(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            ProxyError::TokenUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamTimeout { .. } | ProxyError::RequestTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Upstream { .. } | ProxyError::DestinationRefused { .. } => StatusCode::BAD_GATEWAY,
        }
    }

    /// The JSON body's `error` field.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::Unauthorized { .. } => "unauthorized",
            ProxyError::BadPath(_) => "bad_path",
            ProxyError::BadHost => "bad_host",
            ProxyError::NoRoute { .. } => "no_route",
            ProxyError::Connect => "connect_refused",
            ProxyError::DeclaredBodyTooLarge { .. } | ProxyError::BodyTooLarge => "body_too_large",
            ProxyError::BadUpstreamUri(_) => "bad_request",
            ProxyError::Unavailable { .. } => "unavailable",
            ProxyError::BadRedirect => "bad_redirect",
            ProxyError::NoBackend => "no_backend",
            ProxyError::BadRewrite(_) => "bad_rewrite",
            ProxyError::TokenUnavailable { .. } => "token_unavailable",
            ProxyError::UpstreamTimeout { .. } => "upstream_timeout",
            ProxyError::RequestTimeout { .. } => "request_timeout",
            ProxyError::BodyReadTimeout { .. } => "body_read_timeout",
            ProxyError::DestinationRefused { .. } => "destination_refused",
            ProxyError::Upstream { connect: true, .. } => "upstream_unreachable",
            ProxyError::Upstream { connect: false, .. } => "upstream_error",
        }
    }

    /// The upstream URL (credentials redacted) the failure is about, if any.
    pub fn upstream(&self) -> Option<&str> {
        match self {
            ProxyError::TokenUnavailable { upstream, .. }
            | ProxyError::UpstreamTimeout { upstream, .. }
            | ProxyError::Upstream { upstream, .. }
            | ProxyError::DestinationRefused { upstream, .. } => Some(upstream),
            _ => None,
        }
    }

    /// The upstream-error metric this counts under, if it is the upstream's failure.
    pub fn upstream_kind(&self) -> Option<UpstreamErrorKind> {
        match self {
            ProxyError::TokenUnavailable { .. } => Some(UpstreamErrorKind::Token),
            ProxyError::UpstreamTimeout { .. } | ProxyError::RequestTimeout { .. } => Some(UpstreamErrorKind::Timeout),
            ProxyError::Upstream { connect: true, .. } | ProxyError::DestinationRefused { .. } => {
                Some(UpstreamErrorKind::Connect)
            }
            ProxyError::Upstream { connect: false, .. } => Some(UpstreamErrorKind::Other),
            _ => None,
        }
    }

    /// What the client is told. The internet reaches the proxy through the tunnel, so nothing
    /// of the inside goes out: no upstream URL, metadata server reply or internal error text
    /// (those are in [`std::fmt::Display`], for the log line `Worker::failed` writes).
    pub fn client_message(&self) -> Cow<'static, str> {
        match self {
            ProxyError::TokenUnavailable { .. } => "no credentials for the upstream are available".into(),
            ProxyError::BadUpstreamUri(_) => "the request cannot be addressed to the upstream".into(),
            ProxyError::BadRewrite(_) => "the rewritten path is invalid".into(),
            // The rest name only what the client sent or a fixed reason.
            other => other.to_string().into(),
        }
    }

    /// The short JSON answer: `{"error": code, "message": …}`.
    pub fn response(&self) -> Response<ProxyBody> {
        error(self.status(), self.code(), &self.client_message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_tier_has_its_status_and_code() {
        let cases = [
            (ProxyError::NoBackend, 500, "no_backend", None),
            (
                ProxyError::DeclaredBodyTooLarge { len: 10, limit: 5 },
                413,
                "body_too_large",
                None,
            ),
            (
                ProxyError::Upstream {
                    upstream: "http://u".into(),
                    cause: "refused".into(),
                    connect: true,
                },
                502,
                "upstream_unreachable",
                Some(UpstreamErrorKind::Connect),
            ),
            (
                ProxyError::RequestTimeout {
                    limit: Duration::from_secs(1),
                },
                504,
                "request_timeout",
                Some(UpstreamErrorKind::Timeout),
            ),
        ];
        for (e, status, code, kind) in cases {
            assert_eq!((e.status().as_u16(), e.code()), (status, code), "{e}");
            assert_eq!(e.upstream_kind(), kind, "{e}");
        }
        let e = ProxyError::DeclaredBodyTooLarge { len: 10, limit: 5 };
        assert_eq!(e.to_string(), "request body of 10 bytes exceeds the limit of 5");
        // The upstream's error chain is for the log, never the client.
        let e = ProxyError::Upstream {
            upstream: "http://u".into(),
            cause: "tcp connect error: refused".into(),
            connect: false,
        };
        assert_eq!(e.to_string(), "the upstream connection failed");
    }

    #[test]
    fn the_client_never_sees_upstream_urls_or_metadata_errors() {
        let inside = [
            ProxyError::TokenUnavailable {
                upstream: "https://private.internal/".into(),
                reason: "metadata server answered 404 for /computeMetadata/v1/...?audience=https://private.internal/"
                    .into(),
            },
            ProxyError::BadUpstreamUri("http://10.0.0.7:8080/x: invalid uri".into()),
            ProxyError::BadRewrite("invalid uri character in http://10.0.0.7".into()),
        ];
        for e in inside {
            let message = e.client_message();
            for secret in ["internal", "metadata", "10.0.0.7", "http"] {
                assert!(!message.contains(secret), "{message:?} shows {secret:?}");
            }
        }
    }
}
