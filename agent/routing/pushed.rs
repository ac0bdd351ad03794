//! The pushed table: the gateway controller's wire format (its `Config`, `RouteRule` and
//! `BackendRef`, `internal/proxy/config.go`), parsed with every problem named by its key path and
//! compiled into a [`RouteTable`] like every other table. Unknown fields are refused (the peer's
//! Go decoder ignores them): a field we do not know is a rule we would serve differently.

use serde::Deserialize;

use crate::config::route_spec::null_as_empty;
use crate::config::{BackendSpec, Config, HostHeader, ListenerSpec, Problem};
use crate::config::{FilterSpec, MatchSpec, TimeoutsSpec};
use crate::routing::compile;
use crate::routing::table::{RouteTable, RoutesError, RuleSource};
use crate::telemetry::Metrics;

/// A pushed configuration (the controller's `Config`, `internal/proxy/config.go`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushedConfig {
    pub version: u64,
    /// `null` when the controller has no rules (Go's nil slice).
    #[serde(default, deserialize_with = "null_as_empty")]
    pub rules: Vec<PushedRule>,
    /// Set by the controller when a GRPCRoute contributed rules. gRPC needs trailers end to
    /// end, which cloudflared loses over QUIC: the agent warns when its tunnel is not on
    /// HTTP/2 and shows the flag in `/status`.
    #[serde(default, alias = "hasGrpcRoute")]
    pub has_grpc_route: bool,
    /// Optional listener scopes (our extension, docs/routing.md): `[{name, hostname}]`.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub listeners: Vec<ListenerSpec>,
}

/// The controller's `RouteRule`: one HTTPRoute rule with its route's hostnames.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushedRule {
    /// For metrics and logs; defaults to the first hostname.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub hostnames: Vec<String>,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub matches: Vec<MatchSpec>,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub filters: Vec<FilterSpec>,
    /// The controller's `BackendRef`s (`url`, `weight`, `protocol`, `tls`, `filters`,
    /// `websocket`, `unavailableStatus`), plus our `upstreamAuth` and `authHeader`.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub backends: Vec<BackendSpec>,
    #[serde(default)]
    pub timeouts: Option<TimeoutsSpec>,
    /// Every request this rule matches is answered with this status, before filters and
    /// backends: the controller's way to fail a rule closed that it cannot serve as written.
    #[serde(default, alias = "unavailableStatus")]
    pub unavailable_status: Option<u16>,
    /// Names of the `listeners` this rule is attached to; absent, null or empty: all.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub listeners: Vec<String>,
}

impl PushedConfig {
    /// Compiles the push into a table carrying its version. Collects every problem; a push that
    /// names a local file is refused before compiling, which would read it.
    pub fn compile(&self, config: &Config, metrics: &Metrics) -> Result<RouteTable, RoutesError> {
        let named = self.local_files();
        if !named.is_empty() {
            return Err(RoutesError { problems: named });
        }
        let sources = self
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| RuleSource {
                name: r
                    .name
                    .clone()
                    .or_else(|| r.hostnames.first().map(|h| h.to_ascii_lowercase()))
                    .unwrap_or_else(|| "(any host)".to_owned()),
                key: format!("rules[{i}]"),
                hostnames: r.hostnames.clone(),
                backends: r.backends.clone(),
                unavailable_status: r.unavailable_status,
                host_header: HostHeader::Client,
                listeners: r.listeners.clone(),
                shorthand: false,
                upstream_key: None,
                matches: r.matches.clone(),
                filters: r.filters.clone(),
                timeouts: r.timeouts.clone().unwrap_or_default(),
                default_backend_timeout: config.proxy.upstream_timeout,
            })
            .collect();
        // Rules without backends are allowed, as in Gateway API: their requests get 500.
        let mut table = compile::rules(sources, &self.listeners, config, metrics, false, Vec::new())?;
        table.version = Some(self.version);
        table.grpc = self.has_grpc_route;
        Ok(table)
    }

    /// Every `tls.caFile` the push names, each as a problem. The answer is the same whatever
    /// the path is: it must not tell the controller which of the host's files exist or can be
    /// read.
    fn local_files(&self) -> Vec<Problem> {
        let named = |key: String| Problem {
            key: format!("{key}.tls.caFile"),
            reason: "a pushed table cannot name a local file; send the PEM CA certificates in caBundle".to_owned(),
        };
        let mirrors = |filters: &[FilterSpec], key: &str, out: &mut Vec<Problem>| {
            for (fi, f) in filters.iter().enumerate() {
                let tls = f.request_mirror.as_ref().and_then(|m| m.tls.as_ref());
                if tls.is_some_and(|t| t.ca_file.is_some()) {
                    out.push(named(format!("{key}.filters[{fi}].requestMirror")));
                }
            }
        };
        let mut out = Vec::new();
        for (i, r) in self.rules.iter().enumerate() {
            for (bi, b) in r.backends.iter().enumerate() {
                let key = format!("rules[{i}].backends[{bi}]");
                if b.tls.as_ref().is_some_and(|t| t.ca_file.is_some()) {
                    out.push(named(key.clone()));
                }
                mirrors(&b.filters, &key, &mut out);
            }
            mirrors(&r.filters, &format!("rules[{i}]"), &mut out);
        }
        out
    }

    /// Parses a push. A type error or unknown field names its key path (`rules[0].backends[1].
    /// weight`), as `check` does for TOML; only a syntax error is located by line and column.
    pub fn parse(body: &[u8]) -> Result<PushedConfig, Problem> {
        let problem = |key: String, reason: String| Problem {
            key: if key.is_empty() || key == "." {
                "(body)".to_owned()
            } else {
                key
            },
            reason,
        };
        // serde's derived struct also accepts a JSON array (`[version, rules]`), which would
        // apply `[99999, []]` as version 99999: the wire format is an object, so only that is.
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(problem(
                String::new(),
                "expected a JSON object {\"version\": N, \"rules\": [...]}".to_owned(),
            ));
        }
        let mut de = serde_json::Deserializer::from_slice(body);
        let pushed: PushedConfig = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            // Broken JSON has no key to name (the path would be `?`); its line and column are in
            // the reason.
            let key = match e.inner().classify() {
                serde_json::error::Category::Data => e.path().to_string(),
                _ => String::new(),
            };
            problem(key, e.into_inner().to_string())
        })?;
        // Trailing bytes after the object (what `from_slice` checks).
        de.end().map_err(|e| problem(String::new(), e.to_string()))?;
        Ok(pushed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        crate::routing::parse_config(std::path::Path::new("t.toml"), "").expect("empty config is valid")
    }

    fn compile(body: &str) -> Result<RouteTable, Vec<Problem>> {
        let pushed = PushedConfig::parse(body.as_bytes()).map_err(|p| vec![p])?;
        pushed.compile(&config(), &Metrics::default()).map_err(|e| e.problems)
    }

    /// What the controller's Go `encoding/json` writes for a table using every field it knows
    /// (internal/proxy/config.go): nil slices as `null`, `[]byte` as base64, Go durations.
    const CONTROLLER_PUSH: &str = r#"{"version": 7, "hasGrpcRoute": true, "rules": [
      {"hostnames": ["old.example.com"], "backends": null, "filters": [
         {"type": "RequestRedirect", "requestRedirect": {"scheme": "https", "statusCode": 301,
          "path": {"type": "ReplaceFullPath", "value": "/new"}}}]},
      {"hostnames": ["app.example.com"], "matches": [
         {"path": {"type": "PathPrefix", "value": "/api"}, "headers": null, "queryParams": null}],
       "filters": [
         {"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": null, "add": [{"name": "x-a", "value": "1"}], "remove": null}},
         {"type": "CORS", "cors": {"allowOrigins": ["https://*.example.com"], "allowCredentials": true,
          "allowMethods": ["GET"], "allowHeaders": null, "exposeHeaders": ["x-b"], "maxAge": 60}},
         {"type": "RequestMirror", "requestMirror": {"backendUrl": "http://mirror:8080", "percent": 25, "protocol": ""}}],
       "backends": [
         {"url": "http://api:8080", "weight": 3, "protocol": "h2c", "websocket": true, "filters": null},
         {"url": "http://gone:8080", "weight": 1, "unavailableStatus": 503},
         {"url": "https://secure:8443", "weight": 1, "tls": {"caBundle": "-----BEGIN CERTIFICATE-----\n",
          "serverName": "secure.internal", "subjectAltNames": ["secure.internal"], "subjectAltNameUris": null}},
         {"url": "http://redirecting:8080", "weight": 1, "filters": [
           {"type": "RequestRedirect", "requestRedirect": {"hostname": "elsewhere.example.com"}}]}],
       "timeouts": {"request": "10s", "backend": "1.5s"}},
      {"hostnames": ["broken.example.com"], "backends": [], "unavailableStatus": 500}
    ]}"#;

    #[test]
    fn the_controllers_push_parses_with_every_field_it_sends() {
        let pushed = PushedConfig::parse(CONTROLLER_PUSH.as_bytes()).expect("parses");
        assert!(pushed.has_grpc_route);
        assert_eq!(pushed.rules.len(), 3);
        assert!(pushed.rules[0].backends.is_empty(), "null backends are an empty list");
        assert_eq!(pushed.rules[1].backends[1].unavailable_status, Some(503));
        assert!(pushed.rules[1].backends[0].websocket);
        assert_eq!(
            pushed.rules[1].backends[0].protocol,
            Some(crate::config::UpstreamProtocol::H2c)
        );
        let tls = pushed.rules[1].backends[2].tls.as_ref().expect("tls kept");
        assert_eq!(tls.server_name.as_deref(), Some("secure.internal"));
        assert_eq!(pushed.rules[2].unavailable_status, Some(500));
    }

    #[test]
    fn rules_without_anything_and_null_rules_are_accepted() {
        let t = compile(r#"{"version": 1, "rules": null}"#).expect("null rules");
        assert!(t.is_empty());
        let t = compile(
            r#"{"version": 1, "rules": [{"hostnames": null, "matches": null, "filters": null, "backends": null}]}"#,
        )
        .expect("all null");
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn unknown_fields_fail_closed_naming_the_rule_and_field() {
        let err = compile(
            r#"{"version": 1, "rules": [{"backends": []}, {"backends": [{"url": "http://a", "retries": 3}]}]}"#,
        )
        .unwrap_err();
        assert_eq!(err[0].key, "rules[1].backends[0].retries", "{err:?}");
        assert!(err[0].reason.contains("unknown field `retries`"), "{err:?}");
        let err = compile(r#"{"version": 1, "rules": [{"filters": [{"type": "CORS", "cors": {"allowOrigin": []}}]}]}"#)
            .unwrap_err();
        assert_eq!(err[0].key, "rules[0].filters[0].cors.allowOrigin", "{err:?}");
        let err =
            compile(r#"{"version": 1, "rules": [{"backends": [{"url": "http://a", "protocol": "h3"}]}]}"#).unwrap_err();
        assert_eq!(err[0].key, "rules[0].backends[0].protocol", "{err:?}");
        let err =
            compile(r#"{"version": 1, "rules": [{"backends": [{"url": "http://a", "unavailableStatus": 200}]}]}"#)
                .unwrap_err();
        assert_eq!(err[0].key, "rules[0].backends[0].unavailableStatus", "{err:?}");
        let err = compile(r#"{"version": 1, "rules": [{"unavailableStatus": 302}]}"#).unwrap_err();
        assert_eq!(err[0].key, "rules[0].unavailableStatus", "{err:?}");
    }
}

#[cfg(test)]
mod listener_tests {
    use super::tests_support::*;

    /// Gateway API listener isolation: the most specific listener matching the host owns the
    /// request, and only its rules serve it.
    #[test]
    fn the_most_specific_listener_owns_the_request() {
        let t = compile(
            r#"{"version": 1,
             "listeners": [{"name": "empty"}, {"name": "wild", "hostname": "*.example.com"},
                           {"name": "foo", "hostname": "foo.example.com"}],
             "rules": [
               {"name": "any", "listeners": ["empty"], "backends": [{"url": "http://any"}]},
               {"name": "wild", "listeners": ["wild"], "hostnames": ["*.example.com"], "matches": [{"path": {"type": "PathPrefix", "value": "/wild"}}],
                "backends": [{"url": "http://wild"}]},
               {"name": "foo", "listeners": ["foo"], "backends": [{"url": "http://foo"}]},
               {"name": "everywhere", "hostnames": ["shared.example.com"], "matches": [{"path": {"type": "Exact", "value": "/shared"}}],
                "backends": [{"url": "http://shared"}]}
             ]}"#,
        )
        .expect("compiles");
        let at = |host: &str, path: &str| route(&t, host, path);
        assert_eq!(at("foo.example.com", "/"), "foo");
        assert_eq!(at("bar.example.com", "/wild/x"), "wild");
        assert_eq!(at("bar.example.com", "/"), "404", "the *.example.com listener owns bar");
        assert_eq!(at("example.org", "/"), "any");
        assert_eq!(
            at("shared.example.com", "/shared"),
            "everywhere",
            "a rule without listeners is on all"
        );
        let err = compile(r#"{"version": 1, "listeners": [{"name": "a"}, {"name": "a", "hostname": "x:1"}], "rules": [{"listeners": ["b"]}]}"#)
            .unwrap_err();
        let keys: Vec<&str> = err.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            ["listeners[1].hostname", "listeners[1].name", "rules[0].listeners[0]"],
            "{err:?}"
        );
    }

    /// The controller's mirror `tls` (a BackendTLSPolicy on the mirrored Service) compiles into
    /// the mirror; on an `http://` mirror it is refused with the filter's key.
    #[test]
    fn a_pushed_mirror_takes_its_own_tls_settings() {
        let mirror = |url: &str| {
            format!(
                r#"{{"version": 1, "rules": [{{"hostnames": ["m.example.com"], "backends": [{{"url": "http://app"}}],
                  "filters": [{{"type": "RequestMirror", "requestMirror": {{"backendUrl": "{url}", "percent": 100,
                    "tls": {{"serverName": "mirror.internal", "subjectAltNames": null, "subjectAltNameUris": ["spiffe://c/ns/a/sa/m"]}}}}}}]}}]}}"#
            )
        };
        let t = compile(&mirror("https://mirror:8443")).expect("compiles");
        assert_eq!(t.len(), 1);
        let err = compile(&mirror("http://mirror:8080")).unwrap_err();
        assert_eq!(err.len(), 1, "{err:?}");
        assert_eq!(err[0].key, "rules[0].filters[0]", "{err:?}");
        assert!(err[0].reason.contains("https:// mirror backend"), "{err:?}");
    }

    #[test]
    fn toml_listeners_scope_routes_too() {
        let config = crate::routing::parse_config(
            std::path::Path::new("t.toml"),
            r#"
            [[listener]]
            name = "wild"
            hostname = "*.example.com"
            [[listener]]
            name = "empty"
            [[route]]
            name = "fallback"
            listeners = ["empty"]
            upstream = "http://fallback"
            "#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let t = crate::routing::compile::build(&config, &config.routes.hosts).expect("builds");
        assert_eq!(route(&t, "bar.example.com", "/"), "404");
        assert_eq!(route(&t, "example.org", "/"), "fallback");
    }
}

#[cfg(test)]
mod tests_support {
    pub use super::*;

    pub fn compile(body: &str) -> Result<RouteTable, Vec<Problem>> {
        let config = crate::routing::parse_config(std::path::Path::new("t.toml"), "").expect("empty config is valid");
        let pushed = PushedConfig::parse(body.as_bytes()).map_err(|p| vec![p])?;
        pushed.compile(&config, &Metrics::default()).map_err(|e| e.problems)
    }

    /// The name of the rule a `GET path` to `host` lands on, or "404".
    pub fn route(t: &RouteTable, host: &str, path: &str) -> String {
        let headers = http::HeaderMap::new();
        let head = crate::routing::RequestHead {
            method: &http::Method::GET,
            path,
            query: None,
            headers: &headers,
        };
        t.route(host, &head)
            .map_or("404".to_owned(), |r| r.rule.route.to_string())
    }
}
