//! `[routes]`, `[[route]]`, `[[listener]]` and `[config_api]`: where the route table comes from
//! and the rules written in this file (the rule pieces shared with pushed tables are in
//! [`super::route_spec`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{duration, route_spec, FilterSpec, MatchSpec, TimeoutsSpec};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RouteSourceKind {
    /// `[routes.hosts]` in this file.
    #[default]
    Inline,
    /// A JSON host map file (`routes.json`: `{"hostname": "https://upstream"}`).
    File,
    /// A GCE metadata attribute holding that JSON, watched for changes.
    GcpMetadata,
    /// Pushed by a controller to the config API (`PUT /config`, the L7 peer's wire format).
    ConfigApi,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum AttributeScope {
    #[default]
    Instance,
    Project,
}

impl AttributeScope {
    /// The metadata path prefix for attributes of this scope.
    pub fn path(self) -> &'static str {
        match self {
            AttributeScope::Instance => "instance/attributes",
            AttributeScope::Project => "project/attributes",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamAuthKind {
    #[default]
    None,
    /// Identity token from the metadata server, audience = the upstream URL.
    GcpIdToken,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum AuthHeaderKind {
    /// `Authorization: Bearer …`
    #[default]
    Authorization,
    /// Cloud Run's `X-Serverless-Authorization`, which leaves `Authorization` to the app.
    XServerlessAuthorization,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamProtocol {
    /// HTTP/1.1, or HTTP/2 when an `https` upstream offers it through ALPN.
    #[default]
    Auto,
    /// HTTP/2 with prior knowledge over cleartext (gRPC servers).
    H2c,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutesSection {
    pub source: RouteSourceKind,
    /// `source = "file"`: the JSON host map.
    pub file: Option<PathBuf>,
    /// `source = "inline"`: hostname → upstream URL.
    pub hosts: BTreeMap<String, String>,
    /// `source = "gcp-metadata"`: the attribute name, e.g. `tunnel-routes`.
    pub attribute: Option<String>,
    pub attribute_scope: AttributeScope,
    /// Applied to every host-map entry.
    pub upstream_auth: UpstreamAuthKind,
    pub auth_header: AuthHeaderKind,
    pub protocol: UpstreamProtocol,
}

impl Default for RoutesSection {
    fn default() -> Self {
        RoutesSection {
            source: RouteSourceKind::Inline,
            file: None,
            hosts: BTreeMap::new(),
            attribute: None,
            attribute_scope: AttributeScope::Instance,
            upstream_auth: UpstreamAuthKind::None,
            auth_header: AuthHeaderKind::Authorization,
            protocol: UpstreamProtocol::Auto,
        }
    }
}

/// One `[[route]]`: hostnames and the backends that serve them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// Shown in metrics and logs; defaults to the first hostname.
    pub name: Option<String>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// Shorthand for a single backend.
    pub upstream: Option<String>,
    /// Weighted backends. An explicit empty list is a rule whose requests get 500 (Gateway
    /// API's answer for a rule without backendRefs); leaving both this and `upstream` out is
    /// an error, since that is almost always a mistake.
    #[serde(default)]
    pub backends: Option<Vec<BackendSpec>>,
    pub upstream_auth: Option<UpstreamAuthKind>,
    pub auth_header: Option<AuthHeaderKind>,
    pub protocol: Option<UpstreamProtocol>,
    /// The `Host` this route's backends see: `client` (default, Gateway API) or `upstream`.
    pub host_header: Option<HostHeader>,
    /// Names of the `[[listener]]`s this route is attached to; none: all of them.
    #[serde(default)]
    pub listeners: Vec<String>,
    /// Overrides `proxy.upstream_timeout` for this route.
    #[serde(default, deserialize_with = "duration::at_most::<_, _, { duration::DAY }>")]
    pub timeout: Option<Duration>,
    /// Gateway API `HTTPRouteMatch`es, ORed; none means `PathPrefix /` (docs/routing.md).
    #[serde(default)]
    pub matches: Vec<MatchSpec>,
    /// Gateway API `HTTPRouteFilter`s for every request of this route.
    #[serde(default)]
    pub filters: Vec<FilterSpec>,
    /// Gateway API `HTTPRouteTimeouts` (`request`, `backend_request`).
    #[serde(default)]
    pub timeouts: Option<TimeoutsSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    pub url: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default, alias = "upstreamAuth")]
    pub upstream_auth: Option<UpstreamAuthKind>,
    #[serde(default, alias = "authHeader")]
    pub auth_header: Option<AuthHeaderKind>,
    #[serde(default, deserialize_with = "protocol_or_empty")]
    pub protocol: Option<UpstreamProtocol>,
    /// Filters applied only when this backend is chosen.
    #[serde(default, deserialize_with = "route_spec::null_as_empty")]
    pub filters: Vec<FilterSpec>,
    /// TLS towards this backend (CA, SNI, SANs, client certificate); docs/routing.md.
    #[serde(default)]
    pub tls: Option<route_spec::BackendTlsSpec>,
    /// Upgrade (WebSocket) handshakes to this backend are exempt from the rule's timeouts.
    #[serde(default)]
    pub websocket: bool,
    /// Answer this status instead of forwarding, whenever this backend is picked (the
    /// controller marks an unresolvable backendRef so its share of traffic fails closed).
    #[serde(default, alias = "unavailableStatus")]
    pub unavailable_status: Option<u16>,
    /// `client` or `upstream`; unset: the route's, else `client`.
    #[serde(default, alias = "hostHeader")]
    pub host_header: Option<HostHeader>,
}

fn default_weight() -> u32 {
    1
}

impl BackendSpec {
    /// One backend with weight 1 and every other setting left to the defaults.
    pub fn new(url: &str) -> BackendSpec {
        BackendSpec {
            url: url.to_owned(),
            weight: 1,
            upstream_auth: None,
            auth_header: None,
            protocol: None,
            filters: Vec::new(),
            tls: None,
            websocket: false,
            unavailable_status: None,
            host_header: None,
        }
    }
}

/// A Gateway listener, as a scope of rules: its name and hostname (exact, `*.suffix`, or none
/// for a listener that accepts any host).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSpec {
    pub name: String,
    #[serde(default)]
    pub hostname: Option<String>,
}

/// Which `Host` the upstream sees (docs/routing.md, "The Host rule").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostHeader {
    /// The client's `Host` (Gateway API): the default for `[[route]]` and pushed tables.
    Client,
    /// The upstream URL's own host: the default for host-map entries (Cloud Run routes on it).
    Upstream,
}

impl HostHeader {
    pub fn as_str(self) -> &'static str {
        match self {
            HostHeader::Client => "client",
            HostHeader::Upstream => "upstream",
        }
    }
}

/// A backend `protocol`: the controller's `""` (plain HTTP, its `BackendProtocolHTTP`) is `auto`.
pub(crate) fn protocol_or_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<UpstreamProtocol>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Given {
        Known(UpstreamProtocol),
        Empty(String),
    }
    match Option::<Given>::deserialize(d)? {
        None => Ok(None),
        Some(Given::Known(p)) => Ok(Some(p)),
        Some(Given::Empty(s)) if s.is_empty() => Ok(Some(UpstreamProtocol::Auto)),
        Some(Given::Empty(s)) => Err(serde::de::Error::custom(format!(
            "unknown protocol {s:?}, expected \"auto\", \"h2c\" or \"\""
        ))),
    }
}

/// The config API listener (`PUT /config`, `GET /config`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConfigApiSection {
    /// Loopback by default: only a local controller or an SSH tunnel can reach it.
    pub listen: SocketAddr,
    /// Secret holding the bearer token `PUT /config` and `GET /config` must present. Required
    /// unless `allow_unauthenticated` says, explicitly, that anyone reaching `listen` may push.
    pub auth_secret: Option<String>,
    /// No bearer token at all (the gateway controller's proxy without `PROXY_AUTH_TOKEN`):
    /// every client that reaches `listen` may replace the route table. Refused together with
    /// `auth_secret`; a warning at every start says it is on.
    pub allow_unauthenticated: bool,
    /// `GET /metrics` on this listener, without a token (the peer serves it there, and its
    /// chart's ServiceMonitor scrapes it): the same text as the health listener's `/metrics`.
    pub metrics: bool,
    /// Write each applied table to `agent.state_dir` and serve it again after a restart, until
    /// the controller pushes a newer one.
    pub persist: bool,
}

impl Default for ConfigApiSection {
    fn default() -> Self {
        ConfigApiSection {
            listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            auth_secret: None,
            allow_unauthenticated: false,
            metrics: true,
            persist: true,
        }
    }
}
