//! Protocol upgrades (WebSocket and the like): which one a request asks for.

use http::header::{self, HeaderMap, HeaderValue};

use super::headers::connection_tokens;

/// The `Upgrade` value to forward when the request asks for one (`Connection: upgrade` on any
/// line), without `h2c`: RFC 9113 §3.1 removed the HTTP/1.1 upgrade to HTTP/2 ("h2c" ... is
/// "deprecated"), and a lenient upstream that still switches would give the client a raw
/// HTTP/2 connection past the proxy's routing and auth (h2c smuggling). A request offering only
/// h2c is forwarded as the plain HTTP/1.1 request it also is.
pub(super) fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"));
    if !asks {
        return None;
    }
    let offered = headers.get(header::UPGRADE)?.to_str().ok()?;
    let kept: Vec<&str> = offered
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .filter(|p| !p.split('/').next().unwrap_or(p).trim().eq_ignore_ascii_case("h2c"))
        .collect();
    if kept.is_empty() {
        return None;
    }
    HeaderValue::from_str(&kept.join(", ")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h2c_is_never_an_upgrade_to_forward() {
        let ask = |upgrade: &str, connection: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::UPGRADE, HeaderValue::from_str(upgrade).unwrap());
            h.insert(header::CONNECTION, HeaderValue::from_str(connection).unwrap());
            upgrade_protocol(&h)
        };
        assert_eq!(ask("h2c", "Upgrade, HTTP2-Settings"), None);
        assert_eq!(ask("H2C", "upgrade"), None);
        assert_eq!(
            ask("h2c, websocket", "upgrade"),
            Some(HeaderValue::from_static("websocket"))
        );
        assert_eq!(ask("websocket", "Upgrade"), Some(HeaderValue::from_static("websocket")));
        assert_eq!(
            ask("websocket", "keep-alive"),
            None,
            "no Connection: upgrade, no upgrade"
        );
    }
}
