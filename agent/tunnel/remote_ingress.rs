//! What cloudflared's ingress actually is, and which of its rules reach around the proxy.
//!
//! A remotely-managed tunnel's ingress lives at Cloudflare: a dashboard, Terraform or a
//! controller writes it, and cloudflared applies whatever the edge pushes (there is no flag to
//! refuse it). The gateway controller, for one, points each hostname at its backend Service.
//! `cloudflared.remote_ingress = "via-proxy"` (the default) sends the `http://` ones through the
//! proxy ([`super::egress_proxy_env`]); what no proxy variable can catch (a service on loopback
//! other than the proxy, a UNIX socket, `tcp://`, `ssh://`, `rdp://`, a bastion, the hello-world
//! server) is found here, by reading the configuration cloudflared serves on its metrics
//! address, and reported: the log (once per configuration version), `/status`
//! `tunnel.remote_ingress` and `tunnel_agent_cloudflared_ingress_bypass_rules`.
//!
//! Facts this relies on (cloudflared's `metrics/metrics.go` and
//! `orchestration/orchestrator.go` at d1df7985; tests/cloudflared_contract.rs asserts the shape
//! on the fake and, with `CLOUDFLARED_BIN`, a real one): `GET /config` on `--metrics`
//! answers `{"version":N,"config":{"ingress":[{"hostname":…,"path":…,"service":"…",
//! "originRequest":{…}},…],…}}`, `version` -1 until the edge pushed a configuration (a
//! locally-managed tunnel stays at -1), each rule's `service` its string form
//! (`http://host:port`, `http_status:404`, `unix:/path`, `tcp://host:port`, `hello_world`, …).

use std::net::SocketAddr;

use serde::Deserialize;

/// The most of cloudflared's `/config` answer read: a remote ingress of thousands of rules fits.
const MAX_CONFIG_BYTES: usize = 4 << 20;

/// The most rules that go around the proxy kept for `/status` and the log; the rest are counted.
pub const MAX_REPORTED: usize = 16;

#[derive(Debug, Deserialize)]
struct Versioned {
    version: i64,
    config: Config,
}

#[derive(Debug, Deserialize)]
struct Config {
    #[serde(default)]
    ingress: Vec<Rule>,
}

#[derive(Debug, Deserialize)]
struct Rule {
    #[serde(default)]
    hostname: String,
    #[serde(default)]
    service: String,
}

pub use crate::health::{IngressAudit as Audit, IngressBypass as Bypass};

/// Where a rule's requests end up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// The proxy, directly or through the proxy variables.
    Proxy,
    /// Answered by cloudflared itself (`http_status:N`).
    Answered,
    /// Refused by the proxy (`https` through the proxy variables: `CONNECT`).
    Refused,
    /// Somewhere the proxy never sees.
    Around,
}

/// How many of the supervisor's polls pass between two reads of a process's `/config` (10 s
/// at the default `poll_interval`): the body may be megabytes, parsed on the control runtime,
/// and a remote ingress changes when someone edits it, not every second.
const READ_EVERY: u32 = 10;

/// When the ingress is read: at the first answered poll of each cloudflared process, then
/// every [`READ_EVERY`]th.
#[derive(Debug, Default)]
pub(super) struct Schedule {
    pid: Option<u32>,
    polls: u32,
}

impl Schedule {
    /// Whether this poll of process `pid` reads the ingress.
    pub(super) fn due(&mut self, pid: u32) -> bool {
        if self.pid != Some(pid) {
            *self = Schedule {
                pid: Some(pid),
                polls: 0,
            };
            return true;
        }
        self.polls += 1;
        if self.polls < READ_EVERY {
            return false;
        }
        self.polls = 0;
        true
    }
}

/// Reads cloudflared's `/config` and audits it against `origin` (the proxy's address) and
/// `via_proxy` (whether cloudflared has the proxy variables). `None` when cloudflared did not
/// answer, or answered something that is not its configuration (an older cloudflared without
/// the endpoint answers 404).
pub async fn read(http: &reqwest::Client, metrics: SocketAddr, origin: SocketAddr, via_proxy: bool) -> Option<Audit> {
    let resp = http.get(format!("http://{metrics}/config")).send().await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let body = crate::peer_body::read(resp, MAX_CONFIG_BYTES).await.ok()?;
    audit(&body, origin, via_proxy)
}

/// Reads the ingress of the running cloudflared `pid` (started from `spec`) and publishes it in
/// `state`; the first time a process shows a configuration version with rules that go around
/// the proxy, says so in the log.
pub(super) async fn check(http: &reqwest::Client, spec: &super::TunnelSpec, pid: u32, state: &super::TunnelState) {
    let Some(audit) = read(http, spec.metrics, spec.origin, spec.egress_proxy.is_some()).await else {
        return;
    };
    let seen = state
        .detail()
        .remote_ingress
        .is_some_and(|(p, a)| p == pid && a.version == audit.version);
    if !seen && audit.bypassing > 0 {
        report(&audit, spec.egress_proxy.is_some());
    }
    state.with_detail(|d| d.remote_ingress = Some((pid, audit)));
}

/// The log line about rules that go around the proxy.
fn report(audit: &Audit, via_proxy: bool) {
    let (version, n) = (audit.version, audit.bypassing);
    let rules: Vec<String> = audit
        .bypass
        .iter()
        .map(|b| format!("{} -> {}", b.hostname, b.service))
        .collect();
    let rules = rules.join(", ");
    let more = n.saturating_sub(audit.bypass.len());
    let more = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    let why = if via_proxy {
        "a service on loopback other than the proxy, an https service (its CONNECT is refused), or one \
         cloudflared dials itself (unix, tcp, ssh, rdp, bastion, hello_world)"
    } else {
        "cloudflared.remote_ingress = \"direct\": cloudflared dials the services itself"
    };
    tracing::error!(
        version,
        bypassing = n,
        "cloudflared's ingress (version {version}) has {n} rule(s) whose requests do not reach the proxy \
         and so skip the route table's filters, authentication and weights: {rules}{more} ({why}; \
         docs/operations.md, \"cloudflared's remote ingress\")"
    );
}

/// Audits the body of a `/config` answer. Public for the fuzz target and the tests.
pub fn audit(body: &[u8], origin: SocketAddr, via_proxy: bool) -> Option<Audit> {
    let versioned: Versioned = serde_json::from_slice(body).ok()?;
    let rules = &versioned.config.ingress;
    let mut audit = Audit {
        version: versioned.version,
        rules: rules.len(),
        ..Audit::default()
    };
    for rule in rules {
        match reach(&rule.service, origin, via_proxy) {
            Reach::Proxy => audit.via_proxy += 1,
            Reach::Answered => {}
            Reach::Refused | Reach::Around => {
                audit.bypassing += 1;
                if audit.bypass.len() < MAX_REPORTED {
                    let hostname = if rule.hostname.is_empty() { "*" } else { &rule.hostname };
                    audit.bypass.push(Bypass {
                        hostname: bounded(hostname),
                        service: bounded(&crate::secret::redact_url(&rule.service)),
                    });
                }
            }
        }
    }
    Some(audit)
}

/// At most 256 characters of `s`, for the log and `/status`.
fn bounded(s: &str) -> String {
    s.chars().take(256).collect()
}

/// Where a request for `service` goes.
fn reach(service: &str, origin: SocketAddr, via_proxy: bool) -> Reach {
    if service.starts_with("http_status:") {
        return Reach::Answered;
    }
    let Some((scheme, rest)) = service.split_once("://") else {
        // `unix:/path`, `unix+tls:/path`, `hello_world`, `bastion`, `socks5`, a bare address.
        return Reach::Around;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let tls = match scheme {
        "http" | "ws" => false,
        "https" | "wss" => true,
        // tcp, ssh, rdp, smb: dialled directly, never through a proxy variable.
        _ => return Reach::Around,
    };
    let Some((host, port)) = host_and_port(authority, tls) else {
        return Reach::Around;
    };
    let loopback =
        host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if loopback {
        // Go dials loopback directly, whatever the proxy variables say.
        return if !tls && port == origin.port() && reaches(host, origin.ip()) {
            Reach::Proxy
        } else {
            Reach::Around
        };
    }
    if via_proxy {
        return if tls { Reach::Refused } else { Reach::Proxy };
    }
    let named = host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip == origin.ip()) && port == origin.port();
    if named && !tls {
        Reach::Proxy
    } else {
        Reach::Around
    }
}

/// Whether a loopback `host` reaches a proxy listening on `listen`.
fn reaches(host: &str, listen: std::net::IpAddr) -> bool {
    match host.parse::<std::net::IpAddr>() {
        // `[::]` takes IPv4 too (unless the socket is v6-only); `0.0.0.0` only IPv4.
        Ok(ip) => ip == listen || (listen.is_unspecified() && (ip.is_ipv4() == listen.is_ipv4() || listen.is_ipv6())),
        // `localhost`.
        Err(_) => listen.is_loopback() || listen.is_unspecified(),
    }
}

/// The host (brackets removed) and port of an authority, the scheme's default port when it has
/// none; `None` when it is not one.
fn host_and_port(authority: &str, tls: bool) -> Option<(&str, u16)> {
    let authority = authority.rsplit('@').next()?;
    let default = if tls { 443 } else { 80 };
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default,
            None => return None,
        };
        return Some((host, port));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => Some((host, port.parse().ok()?)),
        None => Some((authority, default)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ingress_is_read_at_a_new_process_then_every_tenth_poll() {
        let mut schedule = Schedule::default();
        let reads: Vec<bool> = (0..21).map(|_| schedule.due(41)).collect();
        let at: Vec<usize> = reads.iter().enumerate().filter(|(_, r)| **r).map(|(i, _)| i).collect();
        assert_eq!(at, [0, 10, 20]);
        assert!(schedule.due(42), "a new process is read at once");
        assert!(!schedule.due(42));
    }

    fn config(rules: &[(&str, &str)]) -> Vec<u8> {
        let ingress: Vec<_> = rules
            .iter()
            .map(|(h, s)| serde_json::json!({"hostname": h, "path": null, "service": s, "originRequest": {}}))
            .collect();
        serde_json::json!({"version": 3, "config": {"ingress": ingress, "warp-routing": {}, "originRequest": {}}})
            .to_string()
            .into_bytes()
    }

    const ORIGIN: &str = "127.0.0.1:8080";

    fn audit_of(rules: &[(&str, &str)], via_proxy: bool) -> Audit {
        audit(&config(rules), ORIGIN.parse().unwrap(), via_proxy).unwrap()
    }

    #[test]
    fn the_proxy_and_status_answers_do_not_go_around() {
        let a = audit_of(
            &[
                ("a.example.com", "http://127.0.0.1:8080"),
                ("b.example.com", "http://localhost:8080"),
                ("", "http_status:404"),
            ],
            false,
        );
        assert_eq!((a.version, a.rules, a.via_proxy, a.bypassing), (3, 3, 2, 0), "{a:?}");
    }

    #[test]
    fn services_off_loopback_go_through_the_proxy_variables_only_when_given() {
        let rules = [
            ("app.example.com", "http://app.default.svc.cluster.local:80"),
            ("ws.example.com", "ws://10.0.0.7:9000"),
            ("tls.example.com", "https://app.default.svc:443"),
        ];
        let a = audit_of(&rules, true);
        assert_eq!(
            (a.via_proxy, a.bypassing),
            (2, 1),
            "https arrives as CONNECT, refused: {a:?}"
        );
        assert_eq!(a.bypass[0].hostname, "tls.example.com");
        let a = audit_of(&rules, false);
        assert_eq!((a.via_proxy, a.bypassing), (0, 3), "{a:?}");
    }

    #[test]
    fn loopback_services_other_than_the_proxy_and_raw_services_go_around() {
        let a = audit_of(
            &[
                ("a.example.com", "http://127.0.0.1:3000"),
                ("b.example.com", "https://localhost:8080"),
                ("c.example.com", "ssh://localhost:22"),
                ("d.example.com", "tcp://db:5432"),
                ("e.example.com", "unix:/run/app.sock"),
                ("f.example.com", "hello_world"),
                ("g.example.com", "http://[::1]:8080"),
            ],
            true,
        );
        assert_eq!(a.bypassing, 7, "{a:?}");
        assert_eq!(
            a.bypass[2],
            Bypass {
                hostname: "c.example.com".into(),
                service: "ssh://localhost:22".into()
            }
        );
    }

    #[test]
    fn credentials_in_a_service_are_redacted_and_reports_are_bounded() {
        let many: Vec<(String, String)> = (0..40)
            .map(|i| {
                (
                    format!("h{i}.example.com"),
                    format!("http://user:hunter2@127.0.0.1:{}", 3000 + i),
                )
            })
            .collect();
        let rules: Vec<(&str, &str)> = many.iter().map(|(h, s)| (h.as_str(), s.as_str())).collect();
        let a = audit_of(&rules, true);
        assert_eq!((a.bypassing, a.bypass.len()), (40, MAX_REPORTED));
        assert!(!format!("{a:?}").contains("hunter2"), "{a:?}");
    }

    #[test]
    fn a_proxy_on_every_address_is_reached_on_loopback() {
        let a = audit(
            &config(&[("a.example.com", "http://localhost:8080")]),
            "0.0.0.0:8080".parse().unwrap(),
            true,
        )
        .unwrap();
        assert_eq!((a.via_proxy, a.bypassing), (1, 0), "{a:?}");
    }

    #[test]
    fn what_is_not_a_configuration_is_none() {
        let origin = ORIGIN.parse().unwrap();
        for body in [
            &b"404 page not found\n"[..],
            b"{}",
            b"{\"version\":\"x\",\"config\":{}}",
            b"\xff",
        ] {
            assert_eq!(audit(body, origin, true), None, "{body:?}");
        }
    }
}
