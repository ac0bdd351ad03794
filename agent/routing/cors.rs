//! The `CORS` filter (Gateway API `HTTPCORSFilter`): a preflight (`OPTIONS` with
//! `Access-Control-Request-Method`, Fetch standard §3.2.2) is answered here, never forwarded; any
//! other request with an allowed `Origin` gets the `Access-Control-*` response headers.
//!
//! Semantics follow the gateway controller's own proxy, so a table means the same on both:
//! an allowed origin is echoed (never `*`, which would be wrong with credentials), a preflight
//! from an origin not allowed is answered 204 without CORS headers (the browser then refuses
//! the request), `*` in `allowMethods`/`allowHeaders` echoes what the preflight asked for, and
//! `maxAge` defaults to 5 seconds.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Method;

use crate::config::route_spec::CorsSpec;
use crate::routing::error::RuleError;

const REQUEST_METHOD: HeaderName = HeaderName::from_static("access-control-request-method");
const REQUEST_HEADERS: HeaderName = HeaderName::from_static("access-control-request-headers");
const ALLOW_ORIGIN: HeaderName = HeaderName::from_static("access-control-allow-origin");
const ALLOW_CREDENTIALS: HeaderName = HeaderName::from_static("access-control-allow-credentials");
const ALLOW_METHODS: HeaderName = HeaderName::from_static("access-control-allow-methods");
const ALLOW_HEADERS: HeaderName = HeaderName::from_static("access-control-allow-headers");
const EXPOSE_HEADERS: HeaderName = HeaderName::from_static("access-control-expose-headers");
const MAX_AGE: HeaderName = HeaderName::from_static("access-control-max-age");

/// The spec's default for `maxAge`.
const DEFAULT_MAX_AGE: i64 = 5;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Origin {
    Any,
    /// `scheme://host[:port]`, compared exactly (ASCII case-insensitively).
    Exact(Box<str>),
    /// `scheme://*.suffix[:port]`: `scheme` and `.suffix[:port]`; one or more labels in front.
    Wildcard {
        scheme: Box<str>,
        suffix: Box<str>,
    },
}

/// A compiled `CORS` filter.
#[derive(Debug, Clone)]
pub struct Cors {
    origins: Vec<Origin>,
    credentials: bool,
    /// `None`: `*` (echo the requested one). Empty: no header.
    methods: Option<String>,
    headers: Option<String>,
    expose: Option<String>,
    max_age: HeaderValue,
}

/// What the filter does with a request before it is forwarded.
#[derive(Debug)]
pub enum CorsVerdict {
    /// Not a preflight: forward, then call [`Cors::decorate`] on the response.
    Forward,
    /// A preflight: answer 204 with these headers (none when the origin is not allowed).
    Preflight(HeaderMap),
}

/// Joins a list, or `None` for the lone wildcard `*`.
fn joined(list: &[String]) -> Option<String> {
    match list {
        [only] if only == "*" => None,
        list => Some(list.join(", ")),
    }
}

impl Cors {
    pub fn compile(spec: &CorsSpec) -> Result<Cors, RuleError> {
        let mut origins = Vec::new();
        for o in &spec.allow_origins {
            origins.push(parse_origin(o)?);
        }
        for (field, list) in [
            ("allowMethods", &spec.allow_methods),
            ("allowHeaders", &spec.allow_headers),
            ("exposeHeaders", &spec.expose_headers),
        ] {
            if list.len() > 1 && list.iter().any(|v| v == "*") {
                return Err(format!("{field}: \"*\" must be the only entry").into());
            }
            if let Some(bad) = list
                .iter()
                .find(|v| HeaderValue::from_str(v).is_err() || v.contains(','))
            {
                return Err(format!("{field}: {bad:?} is not a single token").into());
            }
        }
        if let Some(bad) = spec
            .allow_methods
            .iter()
            .find(|m| *m != "*" && Method::from_bytes(m.as_bytes()).is_err())
        {
            return Err(format!("allowMethods: {bad:?} is not an HTTP method").into());
        }
        let max_age = match spec.max_age {
            n if n < 0 => return Err(format!("maxAge {n} is negative").into()),
            0 => DEFAULT_MAX_AGE,
            n => n,
        };
        Ok(Cors {
            origins,
            credentials: spec.allow_credentials,
            methods: joined(&spec.allow_methods),
            headers: joined(&spec.allow_headers),
            expose: joined(&spec.expose_headers),
            max_age: HeaderValue::from(max_age),
        })
    }

    fn allows(&self, origin: &str) -> bool {
        // A literal `*` is no origin a browser sends; echoing it would turn a strict policy
        // into a wildcard answer.
        if origin.is_empty() || origin == "*" {
            return false;
        }
        // `null` is the opaque origin (Fetch §3.2.5 "serialization of an origin"): sandboxed
        // iframes, `data:` and `file:` documents, cross-origin redirects. Anyone can make a
        // browser send it, so under `*` echoing it (with credentials allowed) would open the
        // policy to every page; Gateway API's conformance needs only real origins echoed.
        let opaque = origin.eq_ignore_ascii_case("null");
        self.origins.iter().any(|o| match o {
            Origin::Any => !opaque,
            Origin::Exact(e) => origin.eq_ignore_ascii_case(e),
            Origin::Wildcard { scheme, suffix } => origin.split_once("://").is_some_and(|(s, host)| {
                s.eq_ignore_ascii_case(scheme)
                    && host.len() > suffix.len()
                    && host.to_ascii_lowercase().ends_with(&**suffix)
            }),
        })
    }

    /// Decides on a request; a preflight is answered without reaching a backend.
    pub fn on_request(&self, method: &Method, headers: &HeaderMap) -> CorsVerdict {
        let requested = headers.get(REQUEST_METHOD);
        let Some(requested) = requested.filter(|_| method == Method::OPTIONS) else {
            return CorsVerdict::Forward;
        };
        let mut out = HeaderMap::new();
        let origin = headers.get(header::ORIGIN);
        let Some(origin) = origin.filter(|o| o.to_str().is_ok_and(|o| self.allows(o))) else {
            return CorsVerdict::Preflight(out);
        };
        out.insert(ALLOW_ORIGIN, origin.clone());
        if self.credentials {
            out.insert(ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
        }
        let echo_or_star = |configured: &Option<String>, asked: Option<&HeaderValue>| -> Option<HeaderValue> {
            match configured {
                Some(list) if list.is_empty() => None,
                Some(list) => HeaderValue::from_str(list).ok(),
                None => match asked {
                    Some(a) if !a.is_empty() => Some(a.clone()),
                    // `*` means "any" only for requests without credentials (Fetch §3.2.3).
                    _ if self.credentials => None,
                    _ => Some(HeaderValue::from_static("*")),
                },
            }
        };
        if let Some(v) = echo_or_star(&self.methods, Some(requested)) {
            out.insert(ALLOW_METHODS, v);
        }
        if let Some(v) = echo_or_star(&self.headers, headers.get(REQUEST_HEADERS)) {
            out.insert(ALLOW_HEADERS, v);
        }
        if let Some(v) = self.expose_value() {
            out.insert(EXPOSE_HEADERS, v);
        }
        out.insert(MAX_AGE, self.max_age.clone());
        vary(
            &mut out,
            &[
                "origin",
                "access-control-request-method",
                "access-control-request-headers",
            ],
        );
        CorsVerdict::Preflight(out)
    }

    fn expose_value(&self) -> Option<HeaderValue> {
        match &self.expose {
            Some(list) if list.is_empty() => None,
            Some(list) => HeaderValue::from_str(list).ok(),
            None if self.credentials => None,
            None => Some(HeaderValue::from_static("*")),
        }
    }

    /// Adds the CORS headers to the response of a forwarded request from an allowed origin.
    /// `origin` is the request's `Origin`.
    pub fn decorate(&self, origin: Option<&HeaderValue>, response: &mut HeaderMap) {
        let Some(origin) = origin.filter(|o| o.to_str().is_ok_and(|o| self.allows(o))) else {
            return;
        };
        response.insert(ALLOW_ORIGIN, origin.clone());
        if self.credentials {
            response.insert(ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
        }
        if let Some(v) = self.expose_value() {
            response.insert(EXPOSE_HEADERS, v);
        }
        vary(response, &["origin"]);
    }
}

/// Appends `Vary` entries, so a cache in front (Cloudflare's edge) never serves one origin's
/// answer to another.
fn vary(headers: &mut HeaderMap, names: &[&'static str]) {
    for n in names {
        headers.append(header::VARY, HeaderValue::from_static(n));
    }
}

fn parse_origin(o: &str) -> Result<Origin, RuleError> {
    if o == "*" {
        return Ok(Origin::Any);
    }
    let Some((scheme, host)) = o.split_once("://") else {
        return Err(format!("allowOrigins: {o:?} is not \"*\" or scheme://host[:port]").into());
    };
    let scheme_ok = !scheme.is_empty() && scheme.bytes().all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b));
    if !scheme_ok || host.is_empty() || host.contains(['/', '?', '#', ' ']) {
        return Err(format!("allowOrigins: {o:?} is not \"*\" or scheme://host[:port]").into());
    }
    match host.strip_prefix('*') {
        Some(suffix) if suffix.starts_with('.') && suffix.len() > 1 && !suffix.contains('*') => Ok(Origin::Wildcard {
            scheme: scheme.to_ascii_lowercase().into(),
            suffix: suffix.to_ascii_lowercase().into(),
        }),
        Some(_) => Err(format!("allowOrigins: {o:?}: a wildcard must be a leading \"*.\"").into()),
        None if host.contains('*') => Err(format!("allowOrigins: {o:?}: a wildcard must be a leading \"*.\"").into()),
        None => Ok(Origin::Exact(o.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cors(json: &str) -> Cors {
        Cors::compile(&serde_json::from_str(json).unwrap()).unwrap()
    }

    fn preflight(c: &Cors, origin: &str, method: &str, hdrs: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ORIGIN, HeaderValue::from_str(origin).unwrap());
        h.insert(REQUEST_METHOD, HeaderValue::from_str(method).unwrap());
        if let Some(v) = hdrs {
            h.insert(REQUEST_HEADERS, HeaderValue::from_str(v).unwrap());
        }
        match c.on_request(&Method::OPTIONS, &h) {
            CorsVerdict::Preflight(out) => out,
            CorsVerdict::Forward => panic!("a preflight must be answered"),
        }
    }

    #[test]
    fn preflight_from_allowed_origins_lists_the_policy() {
        // The conformance suite's `cors-multiple-origins-methods-headers` route.
        let c = cors(
            r#"{"allowOrigins": ["https://www.foo.com", "https://*.bar.com"], "allowMethods": ["GET", "OPTIONS"],
                "allowHeaders": ["x-header-1", "x-header-2"], "exposeHeaders": ["x-header-3", "x-header-4"],
                "allowCredentials": true, "maxAge": 3600}"#,
        );
        for origin in ["https://www.foo.com", "https://www.bar.com", "https://a.b.bar.com"] {
            let h = preflight(&c, origin, "GET", Some("x-header-1, x-header-2"));
            assert_eq!(h[ALLOW_ORIGIN], origin);
            assert_eq!(h[ALLOW_METHODS], "GET, OPTIONS");
            assert_eq!(h[ALLOW_HEADERS], "x-header-1, x-header-2");
            assert_eq!(h[EXPOSE_HEADERS], "x-header-3, x-header-4");
            assert_eq!(h[MAX_AGE], "3600");
            assert_eq!(h[ALLOW_CREDENTIALS], "true");
        }
        for origin in ["https://foobar.com", "https://bar.com", "http://www.foo.com", "*"] {
            assert!(preflight(&c, origin, "GET", None).is_empty(), "{origin}");
        }
    }

    #[test]
    fn wildcards_echo_what_was_asked_and_never_star_with_credentials() {
        let open =
            cors(r#"{"allowOrigins": ["*"], "allowMethods": ["*"], "allowHeaders": ["*"], "exposeHeaders": ["*"]}"#);
        let h = preflight(&open, "https://x.example", "PUT", None);
        assert_eq!(h[ALLOW_ORIGIN], "https://x.example");
        assert_eq!(h[ALLOW_METHODS], "PUT");
        assert_eq!(h[ALLOW_HEADERS], "*");
        assert_eq!(h[EXPOSE_HEADERS], "*");
        assert_eq!(h[MAX_AGE], "5", "the spec's default max age");
        let cred =
            cors(r#"{"allowOrigins": ["*"], "allowHeaders": ["*"], "exposeHeaders": ["*"], "allowCredentials": true}"#);
        let h = preflight(&cred, "https://x.example", "PUT", None);
        assert!(
            !h.contains_key(ALLOW_HEADERS) && !h.contains_key(EXPOSE_HEADERS),
            "{h:?}"
        );
        assert!(!h.contains_key(ALLOW_METHODS), "no allowMethods: no header");
    }

    #[test]
    fn simple_requests_are_forwarded_and_decorated_only_for_allowed_origins() {
        let c = cors(r#"{"allowOrigins": ["https://www.foo.com"], "exposeHeaders": ["x-a"]}"#);
        let mut h = HeaderMap::new();
        h.insert(REQUEST_METHOD, HeaderValue::from_static("GET"));
        assert!(matches!(c.on_request(&Method::GET, &h), CorsVerdict::Forward));
        assert!(matches!(
            c.on_request(&Method::OPTIONS, &HeaderMap::new()),
            CorsVerdict::Forward
        ));
        let mut resp = HeaderMap::new();
        c.decorate(Some(&HeaderValue::from_static("https://www.foo.com")), &mut resp);
        assert_eq!(resp[ALLOW_ORIGIN], "https://www.foo.com");
        assert_eq!(resp[EXPOSE_HEADERS], "x-a");
        assert_eq!(resp[header::VARY], "origin");
        let mut resp = HeaderMap::new();
        c.decorate(Some(&HeaderValue::from_static("https://foobar.com")), &mut resp);
        c.decorate(None, &mut resp);
        assert!(resp.is_empty());
    }

    #[test]
    fn bad_policies_are_refused_with_the_field() {
        for (json, want) in [
            (r#"{"allowOrigins": ["www.foo.com"]}"#, "allowOrigins"),
            (r#"{"allowOrigins": ["https://a.*.com"]}"#, "leading"),
            (r#"{"allowMethods": ["GET", "*"]}"#, "only entry"),
            (r#"{"allowMethods": ["GE T"]}"#, "allowMethods"),
            (r#"{"maxAge": -1}"#, "negative"),
        ] {
            let err = Cors::compile(&serde_json::from_str(json).unwrap()).unwrap_err();
            assert!(err.reason().contains(want), "{json}: {err}");
        }
    }
}
