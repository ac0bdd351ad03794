//! Where a backend or a mirror may point (SPEC §9): not at the cloud's metadata server, nor
//! anywhere link-local, and an identity token never over plain http.
//!
//! The metadata server answers `http://169.254.169.254/` with the VM's service-account token to
//! any request carrying `Metadata-Flavor: Google`, which a header filter can set; a table that
//! routes there serves the token to the internet. The rule is checked twice: here, when a table
//! is compiled (literal addresses and well-known names, with the field named), and by the
//! proxy's resolver when it connects (`proxy::destination`), since a name's addresses can change
//! after the table was accepted. `proxy.allow_link_local_upstreams` and
//! `proxy.allow_id_tokens_over_http` lift them; they exist only in the local TOML, never in a
//! push.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::config::{Config, FilterSpec, Problem, UpstreamAuthKind};
use crate::routing::rule_source::RuleSource;

/// The key that allows link-local and metadata destinations.
pub const ALLOW_LINK_LOCAL: &str = "proxy.allow_link_local_upstreams";
/// The key that allows identity tokens to `http://` (and h2c) upstreams.
pub const ALLOW_ID_TOKENS_OVER_HTTP: &str = "proxy.allow_id_tokens_over_http";

/// AWS's IPv6 metadata address (IMDS on Nitro), outside fe80::/10.
const AWS_METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);

/// Names of the metadata server: GCE's (and its short form, which GCE's resolver answers), as a
/// host name in any case, with or without the root's trailing dot.
const METADATA_NAMES: [&str; 2] = ["metadata.google.internal", "metadata"];

/// Whether `ip` is link-local (169.254.0.0/16, fe80::/10, which hold every cloud's metadata
/// server) or another metadata address, including IPv4 written inside IPv6.
pub fn refused_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => refused_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped().or_else(|| compatible_v4(v6)) {
                return refused_v4(v4);
            }
            (v6.segments()[0] & 0xffc0) == 0xfe80 || v6 == AWS_METADATA_V6
        }
    }
}

fn refused_v4(v4: Ipv4Addr) -> bool {
    v4.is_link_local()
}

/// The IPv4 address of a deprecated IPv4-compatible IPv6 address (`::a.b.c.d`), which some
/// stacks still route as IPv4.
fn compatible_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    (s[..6] == [0; 6] && (s[6] != 0 || s[7] > 1))
        .then(|| Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8))
}

/// Whether `host` (a URL's host, IPv6 in brackets or not) names a refused destination by
/// itself: a refused address literal or a metadata server's name.
pub fn refused_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return refused_ip(ip);
    }
    let name = bare.strip_suffix('.').unwrap_or(bare);
    METADATA_NAMES.iter().any(|m| name.eq_ignore_ascii_case(m))
}

/// Why `url` may not be a backend or mirror, if it may not (unparsable URLs are the table's
/// business and pass here).
fn refused_url(url: &str) -> Option<String> {
    let uri: http::Uri = url.parse().ok()?;
    let host = uri.host()?;
    refused_host(host).then(|| {
        format!(
            "{host} is a link-local or metadata-server destination; set {ALLOW_LINK_LOCAL} = true in the \
             local config to allow it"
        )
    })
}

fn plain_http(url: &str) -> bool {
    url.get(..7).is_some_and(|s| s.eq_ignore_ascii_case("http://"))
}

fn token_over_http() -> String {
    format!(
        "an identity token would travel in clear text to an http:// upstream; use https://, or set \
         {ALLOW_ID_TOKENS_OVER_HTTP} = true in the local config"
    )
}

/// Checks every backend and mirror of `sources` against the destination rules, pushing one
/// problem per refused field.
pub(crate) fn check(sources: &[RuleSource], config: &Config, problems: &mut Vec<Problem>) {
    let allow_link_local = config.proxy.allow_link_local_upstreams;
    let allow_http_tokens = config.proxy.allow_id_tokens_over_http;
    let default_auth = config.routes.upstream_auth;
    let mut refuse = |key: String, reason: Option<String>| {
        if let Some(reason) = reason {
            problems.push(Problem { key, reason });
        }
    };
    for p in sources {
        for (bi, b) in p.backends.iter().enumerate() {
            let url_key = if p.shorthand {
                p.upstream_key.clone().unwrap_or_else(|| p.key.clone())
            } else {
                format!("{}.backends[{bi}].url", p.key)
            };
            if !allow_link_local {
                refuse(url_key.clone(), refused_url(&b.url));
            }
            let token = b.upstream_auth.unwrap_or(default_auth) == UpstreamAuthKind::GcpIdToken;
            if token && plain_http(&b.url) && !allow_http_tokens {
                let key = match (p.shorthand, b.upstream_auth) {
                    (true, _) | (false, None) => url_key,
                    (false, Some(_)) => format!("{}.backends[{bi}].upstreamAuth", p.key),
                };
                refuse(key, Some(token_over_http()));
            }
            let key = format!("{}.backends[{bi}].filters", p.key);
            check_mirrors(&b.filters, &key, config, &mut refuse);
        }
        check_mirrors(&p.filters, &format!("{}.filters", p.key), config, &mut refuse);
    }
}

/// The same for the `RequestMirror` filters in `filters` (keyed `{key}[i]`, as the filter's
/// other problems are).
fn check_mirrors(filters: &[FilterSpec], key: &str, config: &Config, refuse: &mut impl FnMut(String, Option<String>)) {
    for (fi, f) in filters.iter().enumerate() {
        let Some(m) = &f.request_mirror else { continue };
        if !config.proxy.allow_link_local_upstreams {
            refuse(
                format!("{key}[{fi}]"),
                refused_url(&m.backend_url).map(|r| format!("requestMirror: {r}")),
            );
        }
        let token = m.upstream_auth.unwrap_or(config.routes.upstream_auth) == UpstreamAuthKind::GcpIdToken;
        if token && plain_http(&m.backend_url) && !config.proxy.allow_id_tokens_over_http {
            refuse(
                format!("{key}[{fi}]"),
                Some(format!("requestMirror: {}", token_over_http())),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_local_and_metadata_destinations_are_refused_and_others_are_not() {
        for host in [
            "169.254.169.254",
            "169.254.0.1",
            "[fe80::1]",
            "febf::1",
            "[fd00:ec2::254]",
            "[::ffff:169.254.169.254]",
            "[::169.254.169.254]",
            "metadata.google.internal",
            "Metadata.Google.Internal.",
            "metadata",
        ] {
            assert!(refused_host(host), "{host}");
        }
        for host in [
            "127.0.0.1",
            "10.0.0.1",
            "169.253.255.255",
            "[::1]",
            "[fec0::1]",
            "[fd00:ec2::253]",
            "metadata.example.com",
            "app.internal",
            "[::ffff:10.0.0.1]",
        ] {
            assert!(!refused_host(host), "{host}");
        }
    }
}
