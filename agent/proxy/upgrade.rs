//! Protocol upgrades (WebSocket and the like): which one a request asks for, and the 101 that
//! hands both connections over to a splice (`limits::splice_upgraded`, with its idle timeout).

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use hyper::upgrade::OnUpgrade;

use super::headers::connection_tokens;
use super::limits;

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

/// The upgrade phase: when the upstream switched protocols (101) for a client that asked to,
/// both upgraded connections are spliced in a task of their own and `true` says the response
/// goes back as it is (its `Connection` and `Upgrade` are the 101's point, and no response
/// filter applies). Otherwise `false`, and the response goes through the response phase.
pub(super) fn splice<B>(
    resp: &mut Response<B>,
    downstream: Option<OnUpgrade>,
    route: &Arc<str>,
    idle_timeout: Duration,
) -> bool {
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return false;
    }
    let Some(downstream) = downstream else {
        return false;
    };
    let upstream = hyper::upgrade::on(resp);
    tokio::spawn(limits::splice_upgraded(
        downstream,
        upstream,
        route.clone(),
        idle_timeout,
    ));
    true
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

    #[tokio::test]
    async fn only_a_101_for_a_client_that_asked_is_spliced() {
        let route: Arc<str> = "r".into();
        let idle = Duration::from_secs(1);
        // What a request that carried no upgrade handle gives: a splice that ends at once.
        let asked = || Some(hyper::upgrade::on(http::Request::new(())));
        let mut ok = Response::new(());
        assert!(!splice(&mut ok, asked(), &route, idle), "a 200 is no switch");
        let mut switched = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .body(())
            .unwrap();
        assert!(!splice(&mut switched, None, &route, idle), "the client did not ask");
        assert!(splice(&mut switched, asked(), &route, idle));
    }
}
