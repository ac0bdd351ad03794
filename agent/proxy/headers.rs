//! The header policy of one hop: hop-by-hop headers (RFC 9110 §7.6.1), the forwarding headers
//! the proxy writes (`X-Forwarded-For`, `X-Forwarded-Proto`), and what it reads from a request
//! head (`Host`, `Content-Length`, `TE: trailers`).

use std::net::SocketAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Request;

const HOP_BY_HOP_COUNT: usize = 10;

/// Hop-by-hop headers that are removed whether or not `Connection` names them
/// (RFC 9110 §7.6.1; `Keep-Alive` and `Proxy-Connection` are the legacy ones it mentions).
/// `Connection` comes first: [`strip_hop_by_hop`] reads its tokens only when `present[0]`.
const HOP_BY_HOP: [HeaderName; HOP_BY_HOP_COUNT] = [
    header::CONNECTION,
    // The h2c upgrade's settings; only meaningful with `Upgrade: h2c`, which is never forwarded.
    HeaderName::from_static("http2-settings"),
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
];

pub(super) const X_SERVERLESS_AUTHORIZATION: HeaderName = HeaderName::from_static("x-serverless-authorization");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// The client's Host as a header value: HTTP/1.1's own `Host` (shared, not copied), or HTTP/2's
/// `:authority`. The same text as
/// [`request_host`](crate::routing::filters::request_host), which routing matched.
pub(super) fn client_host<B>(req: &Request<B>) -> Option<HeaderValue> {
    if let Some(authority) = req.uri().authority() {
        return HeaderValue::from_str(authority.as_str()).ok();
    }
    match req.headers().get(header::HOST) {
        Some(host) if host.to_str().is_ok() => Some(host.clone()),
        _ => Some(HeaderValue::from_static("")),
    }
}

pub(super) fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

pub(super) fn te_has_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            t.trim()
                .split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
}

/// Every token of every `Connection` line (a sender may split them over several lines).
pub(super) fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Removes hop-by-hop headers: the fixed set and every header named by any `Connection` line.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names (standard names compare as enum tags) notes which of the fixed
    // set are present; only those are removed. Most messages carry none, and most others only
    // `Connection`, so this is one hashed removal instead of ten.
    let mut present = [false; HOP_BY_HOP_COUNT];
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present[i] = true;
        }
    }
    if !present.contains(&true) {
        return;
    }
    // `Connection: keep-alive` and the like name headers of the fixed set, removed below.
    if present[0] {
        let named: Vec<HeaderName> = connection_tokens(headers)
            .filter(|t| !HOP_BY_HOP.iter().any(|h| h.as_str().eq_ignore_ascii_case(t)))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (name, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, here)| *here) {
        headers.remove(name);
    }
}

/// `X-Forwarded-Proto` as the proxy knows it. The scheme the visitor used is known to the
/// Cloudflare edge, which sets the header on every request it relays, and so to the local
/// cloudflared, a loopback peer: its single `http` or `https` is kept. From any other peer the
/// header is the client's own claim (it would make redirects and upstreams believe a plain
/// request was encrypted), replaced by what the proxy saw: its listener is plain `http`.
pub(super) fn set_forwarded_proto(headers: &mut HeaderMap, peer: SocketAddr) {
    let mut lines = headers.get_all(X_FORWARDED_PROTO).iter();
    let relayed = match (lines.next(), lines.next()) {
        (Some(v), None) => peer.ip().to_canonical().is_loopback() && (v == "https" || v == "http"),
        _ => false,
    };
    if !relayed {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    }
}

pub(super) fn append_forwarded_for(headers: &mut HeaderMap, peer: SocketAddr) {
    // A chain may arrive split over several lines, which mean the same as one comma-joined
    // line (RFC 9110 §5.3); `get` would keep only the first and `insert` drop the rest.
    // Built in one string: this runs on every request.
    let mut value = String::with_capacity(48);
    let chain = headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty());
    for hop in chain {
        value.push_str(hop);
        value.push_str(", ");
    }
    push_ip(&mut value, peer.ip());
    if let Ok(v) = HeaderValue::try_from(value) {
        headers.insert(X_FORWARDED_FOR, v);
    }
}

/// Appends `ip` as `Display` writes it. IPv4 (every request from a local cloudflared) without
/// the formatting machinery, which cost about 900 instructions a request (callgrind).
fn push_ip(out: &mut String, ip: std::net::IpAddr) {
    use std::fmt::Write as _;
    let std::net::IpAddr::V4(v4) = ip else {
        let _ = write!(out, "{ip}");
        return;
    };
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        if octet >= 100 {
            out.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            out.push(char::from(b'0' + octet / 10 % 10));
        }
        out.push(char::from(b'0' + octet % 10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_headers_named_on_every_connection_line() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("keep-alive, x-first"));
        h.append(header::CONNECTION, HeaderValue::from_static("X-Second"));
        h.insert("x-first", HeaderValue::from_static("1"));
        h.insert("x-second", HeaderValue::from_static("2"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert("x-kept", HeaderValue::from_static("3"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn strips_each_hop_by_hop_header_alone_and_keeps_the_rest() {
        for name in &HOP_BY_HOP {
            let mut h = HeaderMap::new();
            h.insert("x-kept", HeaderValue::from_static("1"));
            h.insert(name.clone(), HeaderValue::from_static("x"));
            strip_hop_by_hop(&mut h);
            assert_eq!(h.keys().collect::<Vec<_>>(), ["x-kept"], "after stripping {name}");
        }
        let mut none = HeaderMap::new();
        none.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut none);
        assert_eq!(none.len(), 1);
    }

    #[test]
    fn ip_text_is_what_display_writes() {
        let mut ips: Vec<std::net::IpAddr> = vec!["::1".parse().unwrap(), "2001:db8::8:800:200c:417a".parse().unwrap()];
        for a in [0u8, 1, 9, 10, 11, 99, 100, 101, 199, 200, 249, 250, 255] {
            ips.push(std::net::Ipv4Addr::new(a, 255 - a, a / 2, 7).into());
        }
        for ip in ips {
            let mut out = String::from("x, ");
            push_ip(&mut out, ip);
            assert_eq!(out, format!("x, {ip}"));
        }
    }

    #[test]
    fn forwarded_for_appends() {
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, "10.0.0.1:5".parse().unwrap());
        append_forwarded_for(&mut h, "[::1]:5".parse().unwrap());
        assert_eq!(h[X_FORWARDED_FOR], "10.0.0.1, ::1");
    }

    #[test]
    fn forwarded_for_keeps_every_line() {
        let mut h = HeaderMap::new();
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("198.51.100.1"));
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("203.0.113.7, 192.0.2.9"));
        append_forwarded_for(&mut h, "10.0.0.1:5".parse().unwrap());
        assert_eq!(h.get_all(X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(h[X_FORWARDED_FOR], "198.51.100.1, 203.0.113.7, 192.0.2.9, 10.0.0.1");
    }

    #[test]
    fn te_trailers_detected_with_params() {
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("gzip, trailers;q=1"));
        assert!(te_has_trailers(&h));
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        assert!(!te_has_trailers(&h));
    }
}
