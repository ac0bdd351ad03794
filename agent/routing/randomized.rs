//! Randomized test of the table builder and matcher: random configurations (valid and not)
//! must never panic; for those that compile, every random request must land where a brute
//! force reference (all matches, hostname tier, then precedence) says.
//!
//! Hand-rolled rather than `proptest`: a seeded xorshift generator over a small vocabulary of
//! interesting values (spec edge cases, invalid input) finds the same classes of bugs without
//! ~15 extra crates. The seed is printed; `L7_FUZZ_SEED=N cargo test randomized` replays it.

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use serde_json::{json, Value};

use super::matching::{RequestHead, RouteMatch};
use crate::config::Config;
use crate::routing::config_api::PushedConfig;
use crate::routing::table::normalise_hostname;
use crate::telemetry::Metrics;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
    /// Mostly a valid value, sometimes (3%) an invalid one, so that most configs compile but
    /// every rejection path still runs.
    fn mostly<'a, T>(&mut self, valid: &'a [T], invalid: &'a [T]) -> &'a T {
        if self.chance(3) {
            self.pick(invalid)
        } else {
            self.pick(valid)
        }
    }
}

const HOSTNAMES: &[&str] = &[
    "a.example.com",
    "b.example.com",
    "*.example.com",
    "*.a.example.com",
    "A.EXAMPLE.COM",
    "x.y",
    "ex_ample.com",
];
const BAD_HOSTNAMES: &[&str] = &["bad host", "", "*.", "*", "a.example.com:80"];
const PATH_TYPES: &[&str] = &["Exact", "PathPrefix", "RegularExpression"];
const BAD_PATH_TYPES: &[&str] = &["Bogus", "exact"];
const PATHS: &[&str] = &[
    "/",
    "/a",
    "/a/",
    "/a/b",
    "/ab",
    "/a/[0-9]+",
    "/a|/a/b",
    "/é",
    "/%2F",
    "/.*",
];
const BAD_PATHS: &[&str] = &["a", "", "/(", "/a?b", "(?u)/\\d"];
const NAMES: &[&str] = &["x", "X", "y", "q", "Q"];
const BAD_NAMES: &[&str] = &["bad name", ""];
const VALUES: &[&str] = &["1", "2", "[0-9]", "", "1,2", "a b"];
const BAD_VALUES: &[&str] = &["(", "\\p{L}"];
const METHODS: &[&str] = &["GET", "POST", ""];
const BAD_METHODS: &[&str] = &["get", "FETCH"];
const URLS: &[&str] = &["http://127.0.0.1:1", "https://x.example", "http://h/base"];
const BAD_URLS: &[&str] = &["ftp://x", "", "http://u:p@h"];
const DURATIONS: &[&str] = &["10s", "0s", "1m30s", "1.5s"];
const BAD_DURATIONS: &[&str] = &["bogus", "-1s"];

fn random_match(rng: &mut Rng) -> Value {
    let mut m = serde_json::Map::new();
    if rng.chance(80) {
        m.insert(
            "path".into(),
            json!({ "type": rng.mostly(PATH_TYPES, BAD_PATH_TYPES), "value": rng.mostly(PATHS, BAD_PATHS) }),
        );
    }
    let conditions = |rng: &mut Rng| -> Value {
        (0..rng.below(3))
            .map(|_| {
                let kind = if rng.chance(70) { "Exact" } else { "RegularExpression" };
                json!({ "type": kind, "name": rng.mostly(NAMES, BAD_NAMES), "value": rng.mostly(VALUES, BAD_VALUES) })
            })
            .collect()
    };
    if rng.chance(40) {
        m.insert("headers".into(), conditions(rng));
    }
    if rng.chance(30) {
        m.insert("queryParams".into(), conditions(rng));
    }
    if rng.chance(30) {
        m.insert("method".into(), json!(rng.mostly(METHODS, BAD_METHODS)));
    }
    Value::Object(m)
}

fn random_filter(rng: &mut Rng) -> Value {
    let path_modifier = |rng: &mut Rng| {
        if rng.chance(50) {
            json!({ "type": "ReplaceFullPath", "replaceFullPath": rng.mostly(PATHS, BAD_PATHS) })
        } else {
            json!({ "type": "ReplacePrefixMatch", "replacePrefixMatch": rng.mostly(PATHS, BAD_PATHS) })
        }
    };
    match rng.below(6) {
        0 => json!({ "type": "RequestHeaderModifier", "requestHeaderModifier": {
            "set": [{ "name": rng.mostly(NAMES, BAD_NAMES), "value": rng.pick(VALUES) }],
            "add": [{ "name": rng.mostly(&["x-a", "x-b"], &["Connection", "Host"]), "value": "v" }],
            "remove": [rng.mostly(NAMES, BAD_NAMES)],
        }}),
        1 => {
            json!({ "type": "ResponseHeaderModifier", "responseHeaderModifier": { "add": [{ "name": "x-r", "value": rng.pick(VALUES) }] } })
        }
        2 => json!({ "type": "RequestRedirect", "requestRedirect": {
            "scheme": rng.mostly(&["http", "https"], &["ftp"]),
            "hostname": rng.mostly(&["a.example.com", "b.example.com"], &["*.example.com", "bad host"]),
            "port": rng.mostly(&[80, 443, 8080], &[0]),
            "statusCode": rng.mostly(&[301, 302], &[200]),
            "path": path_modifier(rng),
        }}),
        3 => {
            json!({ "type": "URLRewrite", "urlRewrite": { "hostname": rng.mostly(&["a.example.com"], BAD_HOSTNAMES), "path": path_modifier(rng) } })
        }
        4 => {
            json!({ "type": "RequestMirror", "requestMirror": { "backendUrl": rng.mostly(URLS, BAD_URLS), "percent": rng.mostly(&[0, 50, 100], &[150]) } })
        }
        _ if rng.chance(10) => json!({ "type": "RequestMirror" }),
        _ => json!({ "type": "ResponseHeaderModifier", "responseHeaderModifier": {} }),
    }
}

/// Listener scopes a random table may declare: (name, hostname).
const LISTENERS: &[(&str, Option<&str>)] = &[
    ("wild", Some("*.example.com")),
    ("exact", Some("a.example.com")),
    ("deeper", Some("*.a.example.com")),
    ("any", None),
];

fn random_config(rng: &mut Rng) -> Value {
    // A third of the tables declare some listeners; their rules name some or none of them.
    let listeners: Vec<(&str, Option<&str>)> = if rng.chance(33) {
        LISTENERS.iter().copied().filter(|_| rng.chance(60)).collect()
    } else {
        Vec::new()
    };
    let rules: Vec<Value> = (0..1 + rng.below(6))
        .map(|i| {
            let mut r = serde_json::Map::new();
            r.insert("name".into(), json!(format!("r{i}")));
            let hostnames: Vec<&str> = (0..rng.below(3)).map(|_| *rng.mostly(HOSTNAMES, BAD_HOSTNAMES)).collect();
            r.insert("hostnames".into(), json!(hostnames));
            let matches: Vec<Value> = (0..rng.below(4)).map(|_| random_match(rng)).collect();
            r.insert("matches".into(), json!(matches));
            if rng.chance(40) {
                let filters: Vec<Value> = (0..1 + rng.below(2)).map(|_| random_filter(rng)).collect();
                r.insert("filters".into(), json!(filters));
            }
            let backends: Vec<Value> = (0..rng.below(3))
                .map(|_| json!({ "url": rng.mostly(URLS, BAD_URLS), "weight": rng.below(3) }))
                .collect();
            r.insert("backends".into(), json!(backends));
            if !listeners.is_empty() && rng.chance(50) {
                let names: Vec<&str> = listeners.iter().map(|l| l.0).filter(|_| rng.chance(50)).collect();
                r.insert("listeners".into(), json!(names));
            }
            if rng.chance(20) {
                r.insert(
                    "timeouts".into(),
                    json!({ "request": rng.mostly(DURATIONS, BAD_DURATIONS), "backend": rng.mostly(DURATIONS, BAD_DURATIONS) }),
                );
            }
            Value::Object(r)
        })
        .collect();
    let listeners: Vec<Value> = listeners
        .iter()
        .map(|(name, hostname)| json!({ "name": name, "hostname": hostname }))
        .collect();
    json!({ "version": rng.below(10), "rules": rules, "listeners": listeners })
}

/// The rules (by index) that may serve `host`: all of them without listeners; with listeners,
/// those of the most specific listener matching `host` (its own and those naming none), none
/// when no listener matches. Brute force, as the spec words it.
fn eligible(doc: &Value, host: &str) -> Vec<bool> {
    let host = host.to_ascii_lowercase();
    let host = host.strip_suffix('.').unwrap_or(&host);
    let rules = doc["rules"].as_array().map_or(0, Vec::len);
    let listeners = doc["listeners"].as_array().cloned().unwrap_or_default();
    if listeners.is_empty() {
        return vec![true; rules];
    }
    let rank = |l: &Value| match l["hostname"].as_str() {
        None => Some((0, 0)),
        Some(h) => match h.strip_prefix('*') {
            Some(suffix) => (host.len() > suffix.len() && host.ends_with(suffix)).then_some((1, suffix.len())),
            None => (h == host).then_some((2, h.len())),
        },
    };
    let owner = listeners
        .iter()
        .filter_map(|l| rank(l).map(|r| (r, l)))
        .max_by_key(|(r, _)| *r);
    let Some((_, owner)) = owner else {
        return vec![false; rules];
    };
    (0..rules)
        .map(|i| {
            let named = doc["rules"][i]["listeners"].as_array().cloned().unwrap_or_default();
            named.is_empty() || named.contains(&owner["name"])
        })
        .collect()
}

/// Brute force: the rule (by name) and matched prefix a request should get.
fn reference(
    rules: &[(String, Vec<String>, Vec<RouteMatch>)],
    host: &str,
    head: &RequestHead<'_>,
) -> Option<(String, Option<String>)> {
    let host = host.to_ascii_lowercase();
    let host = host.strip_suffix('.').unwrap_or(&host);
    // Hostname tier: exact 0, wildcards by suffix length (longer first), host-less last.
    let tier = |hostnames: &[String]| -> Option<usize> {
        if hostnames.is_empty() {
            return Some(usize::MAX);
        }
        hostnames
            .iter()
            .filter_map(|h| match h.strip_prefix('*') {
                None => (h == host).then_some(0),
                Some(suffix) => (host.len() > suffix.len() && host.ends_with(suffix)).then(|| 10_000 - suffix.len()),
            })
            .min()
    };
    let mut best: Option<(usize, &RouteMatch, &str)> = None;
    for (name, hostnames, matches) in rules {
        let Some(t) = tier(hostnames) else { continue };
        for m in matches.iter().filter(|m| m.matches(head)) {
            let better = match best {
                None => true,
                Some((bt, bm, _)) => t < bt || (t == bt && m.outranks(bm)),
            };
            if better {
                best = Some((t, m, name));
            }
        }
        // A rule listed under several hostnames competes in its best tier only for this host.
    }
    best.map(|(_, m, name)| (name.to_owned(), m.prefix().map(str::to_owned)))
}

#[test]
fn random_configs_never_panic_and_route_like_the_reference() {
    let seed = std::env::var("L7_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| crate::random::random_u64() | 1);
    eprintln!("L7_FUZZ_SEED={seed}");
    let mut rng = Rng(seed);
    let config = Config::default();
    let metrics = Metrics::default();
    let (mut compiled, mut routed) = (0, 0);
    for _ in 0..600 {
        let doc = random_config(&mut rng);
        let Ok(pushed) = PushedConfig::parse(doc.to_string().as_bytes()) else {
            continue;
        };
        let Ok(table) = pushed.compile(&config, &metrics) else {
            continue;
        };
        compiled += 1;
        // The reference needs each rule's hostnames and compiled matches.
        let rules: Vec<(String, Vec<String>, Vec<RouteMatch>)> = pushed
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let mut hostnames: Vec<String> = r.hostnames.iter().map(|h| normalise_hostname(h).unwrap()).collect();
                hostnames.dedup();
                let matches = if r.matches.is_empty() {
                    vec![RouteMatch::catch_all(i, i)]
                } else {
                    r.matches
                        .iter()
                        .enumerate()
                        .map(|(mi, m)| RouteMatch::compile(m, "k", i, (i, mi)).unwrap())
                        .collect()
                };
                (r.name.clone().unwrap(), hostnames, matches)
            })
            .collect();
        for _ in 0..40 {
            let host = *rng.pick(&[
                "a.example.com",
                "c.a.example.com",
                "B.example.com.",
                "example.com",
                "other.org",
                "x.y",
            ]);
            let path = *rng.pick(&["/", "/a", "/a/", "/a/b", "/ab", "/a/12", "/b", "/é", "*"]);
            let query = *rng.pick(&[None, Some("q=1"), Some("Q=2&q=1"), Some("q=%31&x"), Some("=&&=")]);
            let method = rng.pick(&[Method::GET, Method::POST]).clone();
            let mut headers = HeaderMap::new();
            for _ in 0..rng.below(3) {
                const HEADER_NAMES: [&str; 3] = ["x", "y", "z"];
                const HEADER_VALUES: [&str; 3] = ["1", "2", "3"];
                let name = HEADER_NAMES[rng.below(3)];
                let value = HEADER_VALUES[rng.below(3)];
                headers.append(HeaderName::from_static(name), HeaderValue::from_static(value));
            }
            let head = RequestHead {
                method: &method,
                path,
                query,
                headers: &headers,
            };
            let got = table.route(host, &head);
            let eligible = eligible(&doc, host);
            let in_scope: Vec<_> = (rules.iter().zip(&eligible))
                .filter(|(_, e)| **e)
                .map(|(r, _)| r.clone())
                .collect();
            let want = reference(&in_scope, host, &head);
            let got_named = got.map(|r| (r.rule.route.to_string(), r.matched.prefix().map(str::to_owned)));
            assert_eq!(
                got_named, want,
                "seed {seed}: {host}{path}?{query:?} {method} {headers:?}\n{doc:#}"
            );
            if let Some(r) = got {
                routed += 1;
                // Exercise the filters on what matched: none of this may panic.
                let mut h = headers.clone();
                for f in [&r.rule.filters]
                    .into_iter()
                    .chain(r.rule.backends.iter().map(|b| &b.filters))
                {
                    if let Some(m) = &f.request_headers {
                        m.apply(&mut h);
                    }
                    if let Some(m) = &f.response_headers {
                        m.apply(&mut h);
                    }
                    if let Some(redirect) = &f.redirect {
                        let _ = redirect.location("http", host, path, query, r.matched.prefix());
                    }
                    if let Some(p) = f.rewrite.as_ref().and_then(|w| w.path.as_ref()) {
                        let _ = p.apply(path, r.matched.prefix());
                    }
                }
                let _ = r.rule.pick_backend();
            }
        }
    }
    eprintln!("{compiled} of 600 configs compiled, {routed} requests routed");
    assert!(
        compiled > 100,
        "seed {seed}: only {compiled} of 600 random configs compiled"
    );
    assert!(routed > 100, "seed {seed}: only {routed} requests routed");
}
