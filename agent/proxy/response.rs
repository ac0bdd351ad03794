//! The response phase: the head the client gets from a backend's answer, the rule's response
//! filters on every answer once a rule matched, and the answers the proxy writes itself.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{Either, Full};

use super::headers::strip_hop_by_hop;
use super::ProxyBody;
use crate::routing::table::{Backend, Rule};

/// A backend's answer as the client gets it: hop-by-hop headers removed, then the backend's
/// response filters and CORS headers (the rule's come after, in [`rule_filters`]).
pub(super) fn from_backend<B>(backend: &Backend, origin: Option<&HeaderValue>, resp: &mut Response<B>) {
    strip_hop_by_hop(resp.headers_mut());
    if let Some(m) = &backend.filters.response_headers {
        m.apply(resp.headers_mut());
    }
    if let Some(cors) = &backend.filters.cors {
        cors.decorate(origin, resp.headers_mut());
    }
}

/// The rule's CORS headers, then its response header filters, on whatever answers a request
/// the rule matched: the backend, a local answer or the proxy's own error.
pub(super) fn rule_filters<B>(rule: &Rule, origin: Option<&HeaderValue>, resp: &mut Response<B>) {
    if let Some(cors) = &rule.filters.cors {
        cors.decorate(origin, resp.headers_mut());
    }
    if let Some(m) = &rule.filters.response_headers {
        m.apply(resp.headers_mut());
    }
}

/// A short JSON error body.
pub fn error(status: StatusCode, code: &str, message: &str) -> Response<ProxyBody> {
    let body = serde_json::json!({ "error": code, "message": message }).to_string();
    json(status, body)
}

pub fn json(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

#[cfg(test)]
mod tests {
    use http::header::{CONNECTION, TRANSFER_ENCODING};

    use super::*;
    use crate::proxy::test_support::table;
    use crate::routing::RequestHead;

    #[test]
    fn the_upstream_head_becomes_the_client_head() {
        let toml = r#"
[[route]]
hostnames = ["app.example.com"]
filters = [
  { type = "ResponseHeaderModifier", response_header_modifier = { set = [{ name = "x-by", value = "rule" }] } },
  { type = "CORS", cors = { allow_origins = ["https://shop.example.org"] } },
]
backends = [{ url = "http://10.0.0.9:8080", filters = [
  { type = "ResponseHeaderModifier", response_header_modifier = { set = [{ name = "x-by", value = "backend" }, { name = "x-backend", value = "1" }], remove = ["x-secret"] } },
] }]
"#;
        let t = table(toml);
        let req = http::Request::builder().uri("/").body(()).unwrap();
        let rule = t.route("app.example.com", &RequestHead::of(&req)).unwrap().rule;
        let backend = rule.pick_backend().unwrap();
        let mut resp = Response::builder()
            .header(CONNECTION, "close, x-hop")
            .header("x-hop", "1")
            .header(TRANSFER_ENCODING, "chunked")
            .header("x-secret", "s")
            .header("x-kept", "1")
            .body(())
            .unwrap();
        let origin = HeaderValue::from_static("https://shop.example.org");
        from_backend(backend, Some(&origin), &mut resp);
        let mut names: Vec<&str> = resp.headers().keys().map(|n| n.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["x-backend", "x-by", "x-kept"], "{resp:?}");
        assert_eq!(resp.headers()["x-by"], "backend");

        rule_filters(rule, Some(&origin), &mut resp);
        assert_eq!(resp.headers()["x-by"], "rule", "the rule's filters come last");
        assert_eq!(resp.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN], origin);
        let mut other = Response::new(());
        rule_filters(
            rule,
            Some(&HeaderValue::from_static("https://evil.example")),
            &mut other,
        );
        assert_eq!(other.headers().get(header::ACCESS_CONTROL_ALLOW_ORIGIN), None);
        assert_eq!(other.headers()["x-by"], "rule", "on every answer of the rule");
    }
}
