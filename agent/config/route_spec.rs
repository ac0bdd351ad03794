//! Route rule pieces as written by people (TOML `[[route]]`) and by the controller (`PUT /config`
//! JSON): one set of types for both, so both sources are validated and compiled by the same code.
//!
//! Field names are snake_case (the TOML file's convention) and also accept the camelCase
//! spelling that Gateway API and the peer's wire format use (`queryParams`,
//! `requestHeaderModifier`, `replacePrefixMatch`, …). Enum values keep Gateway API's spelling
//! (`PathPrefix`, `RequestRedirect`, `ReplaceFullPath`).

use std::time::Duration;

use serde::Deserialize;

use super::{AuthHeaderKind, UpstreamAuthKind, UpstreamProtocol};

/// One `HTTPRouteMatch`: every condition given must hold.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchSpec {
    /// Absent: `PathPrefix /`.
    #[serde(default)]
    pub path: Option<PathMatchSpec>,
    #[serde(default)]
    pub headers: Vec<ValueMatchSpec>,
    #[serde(default, alias = "queryParams")]
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum FilterKind {
    RequestHeaderModifier,
    ResponseHeaderModifier,
    RequestRedirect,
    #[serde(rename = "URLRewrite")]
    UrlRewrite,
    RequestMirror,
}

impl FilterKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FilterKind::RequestHeaderModifier => "RequestHeaderModifier",
            FilterKind::ResponseHeaderModifier => "ResponseHeaderModifier",
            FilterKind::RequestRedirect => "RequestRedirect",
            FilterKind::UrlRewrite => "URLRewrite",
            FilterKind::RequestMirror => "RequestMirror",
        }
    }
}

/// `HTTPHeaderFilter`: applied as set, then add, then remove.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderModifierSpec {
    #[serde(default)]
    pub set: Vec<HeaderSpec>,
    #[serde(default)]
    pub add: Vec<HeaderSpec>,
    #[serde(default)]
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
    #[serde(default)]
    pub protocol: Option<UpstreamProtocol>,
    #[serde(default, alias = "upstreamAuth")]
    pub upstream_auth: Option<UpstreamAuthKind>,
    #[serde(default, alias = "authHeader")]
    pub auth_header: Option<AuthHeaderKind>,
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
    #[serde(default, with = "humantime_serde")]
    pub request: Option<Duration>,
    /// From sending the request upstream to receiving the response head.
    #[serde(default, with = "humantime_serde", alias = "backend", alias = "backendRequest")]
    pub backend_request: Option<Duration>,
}
