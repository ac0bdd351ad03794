//! A pushed route table (agent/routing/config_api.rs) from parse to a routed request:
//! `PushedConfig::parse`, `compile` under an empty agent config (what the config API does with
//! a push), then a request through the compiled table (`RouteTable::route`, the backend pick,
//! the redirect's `Location`, a rewrite's path, CORS). No input may panic, allocate without
//! bound or take long: a push is 1 MiB at most and comes over the network.
//!
//! Input: the push's JSON body, a NUL byte, then the request: `METHOD HOST PATH[?QUERY]` on
//! the first line and `name: value` header lines after it.

#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use libfuzzer_sys::fuzz_target;
use tunnel_agent::config::Config;
use tunnel_agent::routing::config_api::PushedConfig;
use tunnel_agent::routing::RequestHead;
use tunnel_agent::telemetry::Metrics;

fn config() -> &'static Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG.get_or_init(|| {
        tunnel_agent::routing::parse_config(Path::new("fuzz.toml"), "").expect("the empty config is valid")
    })
}

fuzz_target!(|data: &[u8]| {
    let (body, request) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b"GET example.com /"[..]),
    };
    let Ok(pushed) = PushedConfig::parse(body) else {
        return;
    };
    let Ok(table) = pushed.compile(config(), &Metrics::default()) else {
        return;
    };
    let text = String::from_utf8_lossy(request);
    let mut lines = text.lines();
    let mut first = lines.next().unwrap_or("").splitn(3, ' ');
    let (Ok(method), host, target) = (
        Method::from_bytes(first.next().unwrap_or("GET").as_bytes()),
        first.next().unwrap_or(""),
        first.next().unwrap_or("/"),
    ) else {
        return;
    };
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value.trim()),
        ) {
            headers.append(n, v);
        }
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let head = RequestHead {
        method: &method,
        path,
        query,
        headers: &headers,
    };
    let Some(routed) = table.route(host, &head) else {
        return;
    };
    let prefix = routed.matched.prefix();
    let filters = [
        Some(&routed.rule.filters),
        routed.rule.pick_backend().map(|b| &b.filters),
    ];
    for f in filters.into_iter().flatten() {
        if let Some(r) = &f.redirect {
            let _ = r.location("https", host, path, query, prefix);
        }
        if let Some(p) = f.rewrite.as_ref().and_then(|r| r.path.as_ref()) {
            let _ = p.apply(path, prefix);
        }
        if let Some(c) = &f.cors {
            let _ = c.on_request(&method, &headers);
        }
        if let Some(h) = &f.request_headers {
            h.apply(&mut headers.clone());
        }
    }
    if let Some(b) = routed.rule.pick_backend() {
        let pq = target.parse::<http::uri::PathAndQuery>().ok();
        let _ = b.upstream.uri_for(pq.as_ref());
    }
});
