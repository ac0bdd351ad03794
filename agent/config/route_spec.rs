//! Route rule pieces as written by people (TOML `[[route]]`) and by the controller (`PUT /config`
//! JSON): one set of types for both, so both sources are validated and compiled by the same code.
//!
//! Field names are snake_case (the TOML file's convention) and also accept the camelCase
//! spelling that Gateway API and the peer's wire format use (`queryParams`,
//! `requestHeaderModifier`, `replacePrefixMatch`, …). Enum values keep Gateway API's spelling
//! (`PathPrefix`, `RequestRedirect`, `ReplaceFullPath`).
//!
//! Every list also accepts `null`: the controller is written in Go, whose `encoding/json`
//! encodes an empty (nil) slice as `null`, so a redirect-only rule arrives as `"backends": null`.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::{duration, AuthHeaderKind, UpstreamAuthKind, UpstreamProtocol};

/// Deserializes a list that may be `null` (Go's encoding of a nil slice) as an empty list.
/// Use with `#[serde(default, deserialize_with = "null_as_empty")]`.
pub fn null_as_empty<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

/// One `HTTPRouteMatch`: every condition given must hold.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchSpec {
    /// Absent: `PathPrefix /`.
    #[serde(default)]
    pub path: Option<PathMatchSpec>,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub headers: Vec<ValueMatchSpec>,
    #[serde(default, alias = "queryParams", deserialize_with = "null_as_empty")]
    pub query_params: Vec<ValueMatchSpec>,
    /// An HTTP method; empty means any (the peer sends `""` for none).
    #[serde(default)]
    pub method: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathMatchSpec {
    #[serde(rename = "type", default)]
    pub kind: PathMatchKind,
    #[serde(default = "slash")]
    pub value: String,
}

fn slash() -> String {
    "/".to_owned()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum PathMatchKind {
    Exact,
    #[default]
    PathPrefix,
    RegularExpression,
}

/// A header or query parameter condition (`HTTPHeaderMatch`, `HTTPQueryParamMatch`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueMatchSpec {
    #[serde(rename = "type", default)]
    pub kind: ValueMatchKind,
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum ValueMatchKind {
    #[default]
    Exact,
    RegularExpression,
}

/// One `HTTPRouteFilter`: `type` names which of the other fields carries the settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterSpec {
    #[serde(rename = "type")]
    pub kind: FilterKind,
    #[serde(default, alias = "requestHeaderModifier")]
    pub request_header_modifier: Option<HeaderModifierSpec>,
    #[serde(default, alias = "responseHeaderModifier")]
    pub response_header_modifier: Option<HeaderModifierSpec>,
    #[serde(default, alias = "requestRedirect")]
    pub request_redirect: Option<RedirectSpec>,
    #[serde(default, alias = "urlRewrite")]
    pub url_rewrite: Option<UrlRewriteSpec>,
    #[serde(default, alias = "requestMirror")]
    pub request_mirror: Option<MirrorSpec>,
    #[serde(default)]
    pub cors: Option<CorsSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum FilterKind {
    RequestHeaderModifier,
    ResponseHeaderModifier,
    RequestRedirect,
    #[serde(rename = "URLRewrite")]
    UrlRewrite,
    RequestMirror,
    #[serde(rename = "CORS")]
    Cors,
}

impl FilterKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FilterKind::RequestHeaderModifier => "RequestHeaderModifier",
            FilterKind::ResponseHeaderModifier => "ResponseHeaderModifier",
            FilterKind::RequestRedirect => "RequestRedirect",
            FilterKind::UrlRewrite => "URLRewrite",
            FilterKind::RequestMirror => "RequestMirror",
            FilterKind::Cors => "CORS",
        }
    }
}

/// `HTTPHeaderFilter`: applied as set, then add, then remove.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderModifierSpec {
    #[serde(default, deserialize_with = "null_as_empty")]
    pub set: Vec<HeaderSpec>,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub add: Vec<HeaderSpec>,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderSpec {
    pub name: String,
    pub value: String,
}

/// `HTTPRequestRedirectFilter`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedirectSpec {
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub path: Option<PathModifierSpec>,
    #[serde(default, alias = "statusCode")]
    pub status_code: Option<u16>,
}

/// `HTTPPathModifier`. Gateway API carries the value in `replaceFullPath` or
/// `replacePrefixMatch`; the peer's redirect filter carries it in `value`. Both are accepted.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathModifierSpec {
    #[serde(rename = "type")]
    pub kind: PathModifierKind,
    #[serde(default)]
    pub value: Option<String>,
    #[serde(default, alias = "replaceFullPath")]
    pub replace_full_path: Option<String>,
    #[serde(default, alias = "replacePrefixMatch")]
    pub replace_prefix_match: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum PathModifierKind {
    ReplaceFullPath,
    ReplacePrefixMatch,
}

/// `HTTPURLRewriteFilter`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UrlRewriteSpec {
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<PathModifierSpec>,
}

/// `HTTPRequestMirrorFilter`, with the backend given as a URL.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorSpec {
    #[serde(alias = "backendUrl", alias = "url")]
    pub backend_url: String,
    /// Share of requests mirrored, 0–100. Absent (and no `fraction`): every request.
    #[serde(default)]
    pub percent: Option<u32>,
    #[serde(default)]
    pub fraction: Option<FractionSpec>,
    #[serde(default, deserialize_with = "crate::config::protocol_or_empty")]
    pub protocol: Option<UpstreamProtocol>,
    #[serde(default, alias = "upstreamAuth")]
    pub upstream_auth: Option<UpstreamAuthKind>,
    #[serde(default, alias = "authHeader")]
    pub auth_header: Option<AuthHeaderKind>,
    /// TLS towards the mirror backend (a BackendTLSPolicy on the mirrored Service).
    #[serde(default)]
    pub tls: Option<BackendTlsSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FractionSpec {
    pub numerator: u32,
    #[serde(default = "hundred")]
    pub denominator: u32,
}

fn hundred() -> u32 {
    100
}

/// `HTTPRouteTimeouts`. Durations as `"10s"`, `"1m30s"`, `"1.5s"`, `"500ms"`; `"0s"` disables
/// that timeout (GEP-1742).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsSpec {
    /// From receiving the request to sending the response head.
    #[serde(default, deserialize_with = "duration::at_most::<_, _, { duration::DAY }>")]
    pub request: Option<Duration>,
    /// From sending the request upstream to receiving the response head.
    #[serde(
        default,
        deserialize_with = "duration::at_most::<_, _, { duration::DAY }>",
        alias = "backend",
        alias = "backendRequest"
    )]
    pub backend_request: Option<Duration>,
}

/// `HTTPCORSFilter` (Gateway API v1.2+), as the controller sends it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsSpec {
    /// `*`, `scheme://host[:port]`, or `scheme://*.suffix[:port]`.
    #[serde(default, alias = "allowOrigins", deserialize_with = "null_as_empty")]
    pub allow_origins: Vec<String>,
    #[serde(default, alias = "allowCredentials")]
    pub allow_credentials: bool,
    #[serde(default, alias = "allowMethods", deserialize_with = "null_as_empty")]
    pub allow_methods: Vec<String>,
    #[serde(default, alias = "allowHeaders", deserialize_with = "null_as_empty")]
    pub allow_headers: Vec<String>,
    #[serde(default, alias = "exposeHeaders", deserialize_with = "null_as_empty")]
    pub expose_headers: Vec<String>,
    /// Seconds a preflight answer may be cached; 0 or absent: 5 (the spec's default).
    #[serde(default, alias = "maxAge")]
    pub max_age: i64,
}

/// TLS towards one backend: the controller's rendering of a `BackendTLSPolicy` (plus the
/// Gateway's backend client certificate), or the same keys written by hand in TOML.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendTlsSpec {
    /// PEM CA certificates that anchor the backend's chain, inline (the controller's
    /// `caBundle`). Absent, with no `ca_file`: the agent's trust store.
    #[serde(default, alias = "caBundle")]
    pub ca_bundle: Option<String>,
    /// The same as a file path: TOML only. A pushed table that names one (either spelling) is
    /// refused before anything is read (`routing::config_api`): the controller is trusted with
    /// routes, not with the host's files.
    #[serde(default, alias = "caFile")]
    pub ca_file: Option<std::path::PathBuf>,
    /// SNI, and the name the certificate must carry when no SANs are listed.
    #[serde(default, alias = "serverName")]
    pub server_name: Option<String>,
    /// DNS names of which the certificate must carry at least one (then `server_name` is only
    /// the SNI, as Gateway API says).
    #[serde(default, alias = "subjectAltNames", deserialize_with = "null_as_empty")]
    pub subject_alt_names: Vec<String>,
    /// URI SANs (e.g. SPIFFE IDs), compared exactly; any one listed DNS or URI SAN suffices.
    #[serde(default, alias = "subjectAltNameUris", deserialize_with = "null_as_empty")]
    pub subject_alt_name_uris: Vec<String>,
    /// PEM client certificate chain for mTLS. On the wire Go encodes `[]byte` as base64, so a
    /// pushed value is base64 of the PEM; a value that already starts with `-----BEGIN` is
    /// taken as PEM.
    #[serde(default, alias = "clientCertPem")]
    pub client_cert_pem: Option<String>,
    /// PEM private key for `client_cert_pem` (base64 on the wire, like it).
    #[serde(default, alias = "clientKeyPem")]
    pub client_key_pem: Option<String>,
}

impl std::fmt::Debug for BackendTlsSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendTlsSpec")
            .field("ca_bundle", &self.ca_bundle.as_ref().map(|_| "[pem]"))
            .field("ca_file", &self.ca_file)
            .field("server_name", &self.server_name)
            .field("subject_alt_names", &self.subject_alt_names)
            .field("subject_alt_name_uris", &self.subject_alt_name_uris)
            .field("client_cert_pem", &self.client_cert_pem.as_ref().map(|_| "[pem]"))
            .field("client_key_pem", &self.client_key_pem.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}
