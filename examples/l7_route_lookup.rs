//! Cost of one route lookup (`RouteTable::route`) with a one-rule table and with a 200-rule
//! table (50 Exact, 50 RegularExpression, 50 PathPrefix, 49 PathPrefix + header, one
//! catch-all), the same table bench/l7_routes.sh proxies through.
//!
//!   cargo run --release --example l7_route_lookup

use std::hint::black_box;
use std::path::Path;

use http::{HeaderMap, HeaderValue, Method};
use tokio::time::Instant;
use tunnel_agent::routing::table::RouteTable;
use tunnel_agent::routing::RequestHead;

fn table(toml: &str) -> RouteTable {
    let config = tunnel_agent::routing::parse_config(Path::new("bench.toml"), toml).expect("valid");
    tunnel_agent::routing::compile::build(&config, &config.routes.hosts).expect("builds")
}

fn two_hundred_rules() -> String {
    let mut out = String::new();
    let mut route = |m: String| {
        out.push_str(&format!(
            "[[route]]\nhostnames = [\"bench.example.com\"]\nupstream = \"http://127.0.0.1:1\"\nmatches = [{m}]\n"
        ))
    };
    for i in 0..50 {
        route(format!("{{ path = {{ type = \"Exact\", value = \"/exact/{i}\" }} }}"));
        route(format!(
            "{{ path = {{ type = \"RegularExpression\", value = \"/re/{i}/[0-9]+/item\" }} }}"
        ));
        route(format!(
            "{{ path = {{ type = \"PathPrefix\", value = \"/prefix/{i}\" }} }}"
        ));
    }
    for i in 0..49 {
        route(format!(
            "{{ path = {{ type = \"PathPrefix\", value = \"/h\" }}, headers = [{{ name = \"x-tenant\", value = \"t{i}\" }}] }}"
        ));
    }
    route("{ path = { type = \"PathPrefix\", value = \"/\" } }".to_owned());
    out
}

/// Best of 20 runs of 200k lookups, in ns per lookup (the machine is shared; the best run is
/// the one least disturbed).
fn ns_per_lookup(t: &RouteTable, path: &str, headers: &HeaderMap) -> f64 {
    let n = 200_000;
    let head = RequestHead {
        method: &Method::GET,
        path,
        query: None,
        headers,
    };
    assert!(t.route("bench.example.com", &head).is_some(), "{path} is routed");
    (0..20)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..n {
                black_box(t.route(black_box("bench.example.com"), black_box(&head)));
            }
            start.elapsed().as_nanos() as f64 / f64::from(n)
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let one = table("[routes.hosts]\n\"bench.example.com\" = \"http://127.0.0.1:1\"\n");
    let many = table(&two_hundred_rules());
    let none = HeaderMap::new();
    let mut tenant = HeaderMap::new();
    tenant.insert("x-tenant", HeaderValue::from_static("t48"));
    println!(
        "one rule, any path:                  {:6.0} ns",
        ns_per_lookup(&one, "/some/other/path", &none)
    );
    println!(
        "200 rules, exact hit:                {:6.0} ns",
        ns_per_lookup(&many, "/exact/25", &none)
    );
    println!(
        "200 rules, regex hit:                {:6.0} ns",
        ns_per_lookup(&many, "/re/25/123/item", &none)
    );
    println!(
        "200 rules, prefix hit:               {:6.0} ns",
        ns_per_lookup(&many, "/prefix/25/x", &none)
    );
    println!(
        "200 rules, last header rule:         {:6.0} ns",
        ns_per_lookup(&many, "/h/x", &tenant)
    );
    println!(
        "200 rules, catch-all (worst case):   {:6.0} ns",
        ns_per_lookup(&many, "/some/other/path", &none)
    );
}
