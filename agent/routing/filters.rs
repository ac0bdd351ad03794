//! Compiled `HTTPRouteFilter`s: header modifiers, redirect, URL rewrite, mirror.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;

use super::cors::Cors;
use crate::config::route_spec::{
    FilterKind, FilterSpec, HeaderModifierSpec, HeaderSpec, MirrorSpec, PathModifierKind, PathModifierSpec,
};
use crate::config::{AuthHeaderKind, Problem, RoutesSection, UpstreamAuthKind, UpstreamProtocol};
use crate::routing::error::RuleError;
use crate::routing::table::Upstream;
use crate::routing::tls::{DefaultRoots, TlsError, UpstreamTls};

/// Headers a modifier may not touch: they belong to the connection, not the message
/// (RFC 9110 §7.6.1), or the proxy owns them.
const UNMODIFIABLE: [&str; 11] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
    "host",
    "content-length",
];

#[derive(Debug, Default)]
pub struct Filters {
    pub request_headers: Option<HeaderModifier>,
    pub response_headers: Option<HeaderModifier>,
    pub redirect: Option<Redirect>,
    pub rewrite: Option<UrlRewrite>,
    pub mirrors: Vec<Mirror>,
    pub cors: Option<Cors>,
}

impl Filters {
    pub fn is_empty(&self) -> bool {
        self.request_headers.is_none()
            && self.response_headers.is_none()
            && self.redirect.is_none()
            && self.rewrite.is_none()
            && self.mirrors.is_empty()
            && self.cors.is_none()
    }

    /// Whether any filter rewrites or redirects with `ReplacePrefixMatch`, which is only defined
    /// for rules whose matches are all `PathPrefix`.
    pub fn replaces_prefix(&self) -> bool {
        let prefix = |p: &Option<PathModifier>| matches!(p, Some(PathModifier::Prefix(_)));
        self.redirect.as_ref().is_some_and(|r| prefix(&r.path))
            || self.rewrite.as_ref().is_some_and(|r| prefix(&r.path))
    }

    /// Compiles `specs` (found under `key`), collecting every problem. `default_roots` anchor
    /// mirrors whose own `tls` names no CA.
    pub fn compile(
        specs: &[FilterSpec],
        key: &str,
        defaults: &RoutesSection,
        default_roots: &DefaultRoots<'_>,
        problems: &mut Vec<Problem>,
    ) -> Filters {
        let mut out = Filters::default();
        let mut seen: Vec<FilterKind> = Vec::new();
        for (i, f) in specs.iter().enumerate() {
            let k = format!("{key}[{i}]");
            misplaced_settings(f, &k, problems);
            // Gateway API: each filter type at most once per rule, except RequestMirror.
            if f.kind != FilterKind::RequestMirror && seen.contains(&f.kind) {
                problems.push(Problem {
                    key: k,
                    reason: format!("{} given more than once", f.kind.as_str()),
                });
                continue;
            }
            seen.push(f.kind);
            let compiled = FilterContext {
                key: &k,
                defaults,
                default_roots,
            }
            .add(f, &mut out, problems);
            if let Err(e) = compiled {
                problems.push(e.at(k));
            }
        }
        // "RequestRedirect and URLRewrite cannot both be set on the same rule."
        if out.redirect.is_some() && out.rewrite.is_some() {
            problems.push(Problem {
                key: key.to_owned(),
                reason: "RequestRedirect and URLRewrite cannot be combined".into(),
            });
        }
        out
    }
}

/// A settings object given for another type than the filter's (`cors` on a `RequestMirror`).
fn misplaced_settings(f: &FilterSpec, key: &str, problems: &mut Vec<Problem>) {
    let given = [
        (FilterKind::RequestHeaderModifier, f.request_header_modifier.is_some()),
        (FilterKind::ResponseHeaderModifier, f.response_header_modifier.is_some()),
        (FilterKind::RequestRedirect, f.request_redirect.is_some()),
        (FilterKind::UrlRewrite, f.url_rewrite.is_some()),
        (FilterKind::RequestMirror, f.request_mirror.is_some()),
        (FilterKind::Cors, f.cors.is_some()),
    ];
    for (kind, present) in given {
        if kind != f.kind && present {
            problems.push(Problem {
                key: key.to_owned(),
                reason: format!(
                    "settings for {} given on a filter of type {}",
                    kind.as_str(),
                    f.kind.as_str()
                ),
            });
        }
    }
}

/// What compiling one filter needs besides its spec.
struct FilterContext<'a, 'r> {
    /// The filter's key (`route[0].filters[1]`).
    key: &'a str,
    defaults: &'a RoutesSection,
    default_roots: &'a DefaultRoots<'r>,
}

impl FilterContext<'_, '_> {
    /// Compiles `f` into `out`. A header modifier files its problems per entry in `problems`;
    /// the other types fail as a whole, with the error returned.
    fn add(&self, f: &FilterSpec, out: &mut Filters, problems: &mut Vec<Problem>) -> Result<(), RuleError> {
        let missing = || RuleError::new(format!("type {} needs its settings object", f.kind.as_str()));
        match f.kind {
            FilterKind::RequestHeaderModifier => {
                let spec = f.request_header_modifier.as_ref().ok_or_else(missing)?;
                out.request_headers = HeaderModifier::compile(spec, self.key, problems);
            }
            FilterKind::ResponseHeaderModifier => {
                let spec = f.response_header_modifier.as_ref().ok_or_else(missing)?;
                out.response_headers = HeaderModifier::compile(spec, self.key, problems);
            }
            // On a backend (valid Gateway API) it answers for the share of requests that
            // picked that backend, after the rule's filters.
            FilterKind::RequestRedirect => {
                out.redirect = Some(Redirect::compile(f.request_redirect.as_ref().ok_or_else(missing)?)?);
            }
            FilterKind::Cors => out.cors = Some(Cors::compile(f.cors.as_ref().ok_or_else(missing)?)?),
            FilterKind::UrlRewrite => {
                let spec = f.url_rewrite.as_ref().ok_or_else(missing)?;
                let hostname = match spec.hostname.as_deref().map(rewrite_hostname).transpose() {
                    Ok(h) => h,
                    Err(e) => {
                        problems.push(e.at(self.key));
                        None
                    }
                };
                let path = spec.path.as_ref().map(PathModifier::compile).transpose()?;
                out.rewrite = Some(UrlRewrite { hostname, path });
            }
            FilterKind::RequestMirror => {
                let spec = f.request_mirror.as_ref().ok_or_else(missing)?;
                out.mirrors
                    .push(Mirror::compile(spec, self.defaults, self.default_roots)?);
            }
        }
        Ok(())
    }
}

/// `HTTPHeaderFilter`, compiled: names parsed (lower-case, so they compare
/// case-insensitively) and values validated once.
#[derive(Debug, Default)]
pub struct HeaderModifier {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

impl HeaderModifier {
    fn compile(spec: &HeaderModifierSpec, key: &str, problems: &mut Vec<Problem>) -> Option<HeaderModifier> {
        let before = problems.len();
        let pairs = |op: &str, list: &[HeaderSpec], problems: &mut Vec<Problem>| {
            let mut out: Vec<(HeaderName, HeaderValue)> = Vec::new();
            for (i, h) in list.iter().enumerate() {
                let k = format!("{key}.{op}[{i}]");
                let Some(n) = modifiable_name(&h.name, &k, problems) else {
                    continue;
                };
                match HeaderValue::from_str(&h.value) {
                    Err(_) => problems.push(Problem {
                        key: k,
                        reason: format!("value of {:?} is not a valid header value", h.name),
                    }),
                    Ok(_) if out.iter().any(|(seen, _)| *seen == n) => problems.push(Problem {
                        key: k,
                        reason: format!("{:?} is listed twice", h.name),
                    }),
                    Ok(v) => out.push((n, v)),
                }
            }
            out
        };
        let set = pairs("set", &spec.set, problems);
        let add = pairs("add", &spec.add, problems);
        let mut remove = Vec::new();
        for (i, n) in spec.remove.iter().enumerate() {
            if let Some(h) = modifiable_name(n, &format!("{key}.remove[{i}]"), problems) {
                remove.push(h);
            }
        }
        (problems.len() == before).then_some(HeaderModifier { set, add, remove })
    }

    /// Set, then add (appending to existing values), then remove.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (n, v) in &self.set {
            headers.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            headers.append(n.clone(), v.clone());
        }
        for n in &self.remove {
            headers.remove(n);
        }
    }
}

fn modifiable_name(name: &str, key: &str, problems: &mut Vec<Problem>) -> Option<HeaderName> {
    let reason = match HeaderName::from_bytes(name.as_bytes()) {
        Ok(h) if !UNMODIFIABLE.contains(&h.as_str()) => return Some(h),
        Ok(_) => format!("{name:?} belongs to the connection or the proxy and cannot be modified"),
        Err(_) => format!("{name:?} is not a valid header name"),
    };
    problems.push(Problem {
        key: key.to_owned(),
        reason,
    });
    None
}

/// `HTTPPathModifier`, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathModifier {
    /// `ReplaceFullPath`.
    Full(Box<str>),
    /// `ReplacePrefixMatch`: the replacement for the matched `PathPrefix`.
    Prefix(Box<str>),
}

impl PathModifier {
    fn compile(spec: &PathModifierSpec) -> Result<PathModifier, RuleError> {
        let (wanted, other) = match spec.kind {
            PathModifierKind::ReplaceFullPath => (&spec.replace_full_path, &spec.replace_prefix_match),
            PathModifierKind::ReplacePrefixMatch => (&spec.replace_prefix_match, &spec.replace_full_path),
        };
        let kind = match spec.kind {
            PathModifierKind::ReplaceFullPath => "ReplaceFullPath",
            PathModifierKind::ReplacePrefixMatch => "ReplacePrefixMatch",
        };
        if other.is_some() {
            return Err(format!("path type {kind} takes only its own value").into());
        }
        let value = match (wanted, &spec.value) {
            (Some(v), None) | (None, Some(v)) => v.as_str(),
            (Some(_), Some(_)) => return Err("give the path value once (value or the type's own field)".into()),
            (None, None) => return Err(format!("path type {kind} needs a value").into()),
        };
        // `ReplacePrefixMatch` may be empty (the spec's table strips the prefix to "/").
        let empty_ok = spec.kind == PathModifierKind::ReplacePrefixMatch && value.is_empty();
        if !empty_ok && !value.starts_with('/') {
            return Err(format!("path {value:?} must start with \"/\"").into());
        }
        if value
            .chars()
            .any(|c| matches!(c, '?' | '#') || c.is_whitespace() || c.is_control())
        {
            return Err(format!("path {value:?} contains a character that cannot appear in a path").into());
        }
        // In normal form, so a rewrite of a normalised path stays normalised and inside its
        // prefix: no dot-segment or `//` can be spliced in.
        if !value.is_empty() {
            super::matching::normal_form(value)?;
        }
        Ok(match spec.kind {
            PathModifierKind::ReplaceFullPath => PathModifier::Full(value.into()),
            PathModifierKind::ReplacePrefixMatch => PathModifier::Prefix(value.into()),
        })
    }

    /// The new path for `path`, which matched `PathPrefix matched_prefix` (without its trailing
    /// slash). Follows the Gateway API `HTTPPathModifier` table: the replacement's trailing
    /// slash is dropped, what followed the prefix is kept, and an empty result is `/`.
    pub fn apply(&self, path: &str, matched_prefix: Option<&str>) -> String {
        match self {
            PathModifier::Full(p) => p.to_string(),
            PathModifier::Prefix(replacement) => {
                let prefix = matched_prefix.unwrap_or("");
                let rest = path.get(prefix.len()..).unwrap_or("");
                let mut out = replacement.trim_end_matches('/').to_owned();
                out.push_str(rest);
                if out.is_empty() {
                    out.push('/');
                }
                out
            }
        }
    }
}

/// `HTTPRequestRedirectFilter`, compiled.
#[derive(Debug)]
pub struct Redirect {
    scheme: Option<&'static str>,
    hostname: Option<Box<str>>,
    port: Option<u16>,
    pub path: Option<PathModifier>,
    pub status: StatusCode,
}

impl Redirect {
    fn compile(spec: &crate::config::route_spec::RedirectSpec) -> Result<Redirect, RuleError> {
        let scheme = match spec.scheme.as_deref() {
            None => None,
            Some("http") => Some("http"),
            Some("https") => Some("https"),
            Some(other) => return Err(format!("scheme {other:?} is not http or https").into()),
        };
        let hostname = spec
            .hostname
            .as_deref()
            .map(|h| crate::routing::table::normalise_hostname(h).map(String::into_boxed_str))
            .transpose()?;
        if hostname.as_deref().is_some_and(|h| h.starts_with('*')) {
            return Err("a redirect hostname cannot be a wildcard".into());
        }
        if spec.port == Some(0) {
            return Err("port 0 is not a port".into());
        }
        // 301 and 302 are Gateway API v1's; 303, 307 and 308 were added later and are accepted
        // so a newer controller's push is not rejected.
        let status = match spec.status_code.unwrap_or(302) {
            code @ (301 | 302 | 303 | 307 | 308) => StatusCode::from_u16(code).map_err(|e| e.to_string())?,
            code => return Err(format!("status code {code} is not a redirect (301, 302, 303, 307, 308)").into()),
        };
        Ok(Redirect {
            scheme,
            hostname,
            port: spec.port,
            path: spec.path.as_ref().map(PathModifier::compile).transpose()?,
            status,
        })
    }

    /// Whether the `Location` takes its host from the request (no `hostname` configured:
    /// Gateway API, "When empty, the hostname in the Host header of the request is used").
    pub fn uses_request_host(&self) -> bool {
        self.hostname.is_none()
    }

    /// The `Location` for a request. `scheme` is how the client reached us (from
    /// `X-Forwarded-Proto`), `host` its `Host` (possibly with a port).
    ///
    /// Port, per Gateway API: the configured one; else, when the redirect sets a scheme, that
    /// scheme's well-known port; else the port the client used. It is left out when it is the
    /// scheme's default (80 for http, 443 for https).
    pub fn location(
        &self,
        scheme: &str,
        host: &str,
        path: &str,
        query: Option<&str>,
        matched_prefix: Option<&str>,
    ) -> String {
        let scheme = self.scheme.unwrap_or(scheme);
        let (request_host, request_port) = split_host_port(host);
        let host = self.hostname.as_deref().unwrap_or(request_host);
        let port = match (self.port, self.scheme) {
            (Some(p), _) => Some(p),
            (None, Some(_)) => None,
            (None, None) => request_port,
        };
        let port = port.filter(|&p| !matches!((scheme, p), ("http", 80) | ("https", 443)));
        let path = match &self.path {
            Some(m) => m.apply(path, matched_prefix),
            None => path.to_owned(),
        };
        let mut out = String::with_capacity(scheme.len() + host.len() + path.len() + 16);
        out.push_str(scheme);
        out.push_str("://");
        if host.contains(':') {
            out.push('[');
            out.push_str(host);
            out.push(']');
        } else {
            out.push_str(host);
        }
        if let Some(p) = port {
            out.push(':');
            out.push_str(&p.to_string());
        }
        out.push_str(&path);
        if let Some(q) = query {
            out.push('?');
            out.push_str(q);
        }
        out
    }
}

/// `example.com:8080` → (`example.com`, 8080); `[::1]:80` → (`::1`, 80).
fn split_host_port(host: &str) -> (&str, Option<u16>) {
    if let Some(rest) = host.strip_prefix('[') {
        let (h, after) = rest.split_once(']').unwrap_or((rest, ""));
        return (h, after.strip_prefix(':').and_then(|p| p.parse().ok()));
    }
    match host.rsplit_once(':') {
        Some((h, p)) => match p.parse() {
            Ok(port) => (h, Some(port)),
            Err(_) => (host, None),
        },
        None => (host, None),
    }
}

fn rewrite_hostname(h: &str) -> Result<HeaderValue, RuleError> {
    let h = crate::routing::table::normalise_hostname(h)?;
    if h.starts_with('*') {
        return Err("a rewrite hostname cannot be a wildcard".into());
    }
    HeaderValue::try_from(h).map_err(|e| RuleError::new(e.to_string()))
}

/// `HTTPURLRewriteFilter`, compiled.
#[derive(Debug)]
pub struct UrlRewrite {
    /// Sent as `Host` to the backend.
    pub hostname: Option<HeaderValue>,
    pub path: Option<PathModifier>,
}

/// `HTTPRequestMirrorFilter`, compiled.
#[derive(Debug)]
pub struct Mirror {
    pub upstream: Upstream,
    pub protocol: UpstreamProtocol,
    pub auth: UpstreamAuthKind,
    pub auth_header: AuthHeaderKind,
    /// Mirror `numerator` of every `denominator` requests.
    pub numerator: u32,
    pub denominator: u32,
    /// Own TLS settings (the controller's BackendTLSPolicy on the mirrored Service), with a
    /// pool of their own in the proxy; `None`: the proxy's trust.
    pub tls: Option<std::sync::Arc<UpstreamTls>>,
}

impl Mirror {
    fn compile(
        spec: &MirrorSpec,
        defaults: &RoutesSection,
        default_roots: &DefaultRoots<'_>,
    ) -> Result<Mirror, RuleError> {
        let upstream = Upstream::parse(&spec.backend_url)?;
        let tls = match &spec.tls {
            None => None,
            Some(_) if upstream.scheme != http::uri::Scheme::HTTPS => {
                return Err("tls: TLS settings need an https:// mirror backend".into())
            }
            Some(t) => Some(std::sync::Arc::new(UpstreamTls::compile(t, default_roots).map_err(
                |e| match e {
                    TlsError::Field(field, reason) => format!("tls.{field}: {reason}"),
                    TlsError::Default(key, reason) => format!("{key}: {reason}"),
                },
            )?)),
        };
        let protocol = spec.protocol.unwrap_or(defaults.protocol);
        if protocol == UpstreamProtocol::H2c && upstream.scheme == http::uri::Scheme::HTTPS {
            return Err("protocol = \"h2c\" needs an http:// mirror backend".into());
        }
        let (numerator, denominator) = match (spec.percent, &spec.fraction) {
            (Some(_), Some(_)) => return Err("give percent or fraction, not both".into()),
            (Some(p), None) if p <= 100 => (p, 100),
            (Some(p), None) => return Err(format!("percent {p} is not within 0–100").into()),
            (None, Some(f)) if f.denominator > 0 && f.numerator <= f.denominator => (f.numerator, f.denominator),
            (None, Some(f)) => {
                return Err(format!(
                    "fraction {}/{} must have 0 < denominator and numerator <= denominator",
                    f.numerator, f.denominator
                )
                .into())
            }
            (None, None) => (1, 1),
        };
        Ok(Mirror {
            upstream,
            protocol,
            auth: spec.upstream_auth.unwrap_or(defaults.upstream_auth),
            auth_header: spec.auth_header.unwrap_or(defaults.auth_header),
            numerator,
            denominator,
            tls,
        })
    }

    /// Whether this request is one of the sampled ones.
    pub fn sampled(&self) -> bool {
        crate::random::chance(self.numerator, self.denominator)
    }
}

/// The scheme the client used, as cloudflared reports it; `http` when nobody says otherwise
/// (the proxy listener itself is plain HTTP).
pub fn client_scheme(headers: &HeaderMap) -> &'static str {
    match headers.get("x-forwarded-proto").map(HeaderValue::as_bytes) {
        Some(v) if v.eq_ignore_ascii_case(b"https") => "https",
        _ => "http",
    }
}

/// The `Host` the client sent (`:authority` for HTTP/2), port included.
pub fn request_host<B>(req: &http::Request<B>) -> &str {
    req.uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers().get(header::HOST).and_then(|h| h.to_str().ok()))
        .unwrap_or("")
}

/// Whether `host` is what RFC 9110 §7.2 allows in `Host` (`uri-host [":" port]`), and so safe to
/// write into a `Location`: not empty, no userinfo (`a@evil.example`), nothing past the
/// authority (`evil.example/x`).
pub fn is_host_and_port(host: &str) -> bool {
    !host.is_empty()
        && !host.contains('@')
        && http::uri::Authority::try_from(host).is_ok_and(|a| a.as_str().len() == host.len())
}
