//! Unit tests of `routing::table`.

use super::*;
use crate::config::Problem;
use crate::telemetry::Metrics;

fn table(toml: &str) -> Result<RouteTable, RoutesError> {
    let config =
        crate::routing::parse_config(Path::new("t.toml"), toml).map_err(|e| RoutesError { problems: e.problems })?;
    crate::routing::compile::build(&config, &config.routes.hosts)
}

#[test]
fn host_map_is_one_rule_per_host_case_insensitive() {
    let t = table("[routes.hosts]\n\"API.example.com\" = \"https://svc-1.a.run.app/\"\n").unwrap();
    let rule = t.find("api.EXAMPLE.com").expect("route found");
    assert_eq!(rule.backends[0].upstream.url, "https://svc-1.a.run.app");
    assert!(t.find("other.example.com").is_none());
    assert!(t.find("api.example.com.").is_some(), "trailing dot is the same name");
}

#[test]
fn wildcard_matches_subdomains_not_apex_and_exact_wins() {
    let t = table(
        r#"
        [routes.hosts]
        "*.example.com" = "http://wild"
        "a.example.com" = "http://exact"
        "*.b.example.com" = "http://deeper"
        "#,
    )
    .unwrap();
    assert_eq!(
        t.find("a.example.com").unwrap().backends[0].upstream.url,
        "http://exact"
    );
    assert_eq!(
        t.find("x.y.example.com").unwrap().backends[0].upstream.url,
        "http://wild"
    );
    assert_eq!(
        t.find("x.b.example.com").unwrap().backends[0].upstream.url,
        "http://deeper"
    );
    assert!(t.find("example.com").is_none());
}

#[test]
fn bad_urls_and_duplicates_are_all_reported() {
    let err = table(
        r#"
        [routes.hosts]
        "a.example.com" = "ftp://x"
        "b.example.com" = "no-scheme"
        "c.example.com:80" = "http://x"
        [[route]]
        hostnames = ["A.example.com"]
        upstream = "http://user:pw@x"
        "#,
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("scheme \"ftp\""), "{text}");
    assert!(text.contains("missing scheme"), "{text}");
    assert!(text.contains("not a valid hostname"), "{text}");
    assert!(text.contains("already routed"), "{text}");
    assert!(text.contains("credentials"), "{text}");
    assert!(!text.contains("pw@"), "URL credentials must not be echoed: {text}");
}

#[test]
fn upstream_uri_keeps_path_and_query_and_prefixes_base_path() {
    let u = Upstream::parse("https://svc.run.app").unwrap();
    let pq = PathAndQuery::from_static("/a/b?x=1");
    assert_eq!(u.uri_for(Some(&pq)).unwrap().to_string(), "https://svc.run.app/a/b?x=1");
    let u = Upstream::parse("http://127.0.0.1:9/base/").unwrap();
    assert_eq!(
        u.uri_for(Some(&pq)).unwrap().to_string(),
        "http://127.0.0.1:9/base/a/b?x=1"
    );
}

#[test]
fn weights_pick_only_positive_backends() {
    let t = table(
        r#"
        [[route]]
        hostnames = ["w.example.com"]
        backends = [{ url = "http://a", weight = 0 }, { url = "http://b", weight = 3 }]
        [[route]]
        hostnames = ["z.example.com"]
        backends = [{ url = "http://a", weight = 0 }]
        "#,
    )
    .unwrap();
    let rule = t.find("w.example.com").unwrap();
    for _ in 0..200 {
        assert_eq!(rule.pick_backend().unwrap().upstream.url, "http://b");
    }
    assert!(t.find("z.example.com").unwrap().pick_backend().is_none());
}

#[test]
fn host_port_stripping() {
    assert_eq!(host_without_port("a.example.com:8080"), "a.example.com");
    assert_eq!(host_without_port("a.example.com"), "a.example.com");
    assert_eq!(host_without_port("[::1]:80"), "::1");
}

#[test]
fn seed_routes_json_round_trips() {
    let map = parse_host_map(br#"{"api.example.com": "https://svc-x-ew.a.run.app"}"#).unwrap();
    assert_eq!(map["api.example.com"], "https://svc-x-ew.a.run.app");
    assert!(parse_host_map(b"[1,2]").is_err());
    assert!(parse_host_map(br#"{"a": 1}"#).is_err());
}

#[test]
fn routes_file_errors_do_not_quote_the_content() {
    for (content, want) in [
        (&br#""s3cr3t""#[..], "line 1, column 8"),
        (b"8817263548\n", "line 1, column 10"),
        (br#"{"a": "s3cr3t", "b": 8817263548}"#, "line 1, column 31"),
        (b"s3cr3t", "not valid JSON"),
    ] {
        let err = parse_host_map(content).unwrap_err().to_string();
        assert!(err.contains(want), "{err}");
        assert!(!err.contains("s3cr3t") && !err.contains("8817263548"), "{err}");
    }
}

fn compile(body: &str) -> Result<RouteTable, Vec<Problem>> {
    let config = crate::routing::parse_config(Path::new("t.toml"), "").expect("empty config is valid");
    let pushed = crate::routing::config_api::PushedConfig::parse(body.as_bytes()).map_err(|p| vec![p])?;
    pushed.compile(&config, &Metrics::default()).map_err(|e| e.problems)
}

/// The rule a `GET path` to `host` lands on, or "404".
fn route(t: &RouteTable, host: &str, path: &str) -> String {
    let headers = http::HeaderMap::new();
    let head = RequestHead {
        method: &http::Method::GET,
        path,
        query: None,
        headers: &headers,
    };
    t.route(host, &head)
        .map_or("404".to_owned(), |r| r.rule.route.to_string())
}

/// `rules` rules on the same `hostnames` hostnames, each with `regexes` regex path matches.
fn regex_push(rules: usize, hostnames: usize, regexes: usize) -> String {
    let hosts: Vec<String> = (0..hostnames).map(|h| format!("h{h}.example.com")).collect();
    let rules: Vec<serde_json::Value> = (0..rules)
        .map(|r| {
            let matches: Vec<serde_json::Value> = (0..regexes)
                .map(|j| serde_json::json!({ "path": { "type": "RegularExpression", "value": format!("/r{r}/{j}/[0-9]+") } }))
                .collect();
            serde_json::json!({ "name": format!("r{r}"), "hostnames": hosts, "matches": matches })
        })
        .collect();
    serde_json::json!({ "version": 1, "rules": rules }).to_string()
}

#[test]
fn hostnames_with_the_same_rules_share_one_regex_set() {
    // 64 hostnames × 80 patterns would be 5,120 set entries, over the budget of 4,096, if every
    // hostname built its own set; shared, they are 80.
    let t = compile(&regex_push(2, 64, 40)).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(route(&t, "h63.example.com", "/r1/39/7"), "r1");
    assert_eq!(route(&t, "h0.example.com", "/r0/0/12"), "r0");
    assert_eq!(route(&t, "h0.example.com", "/r0/0/x"), "404");
}

#[test]
fn a_table_over_a_limit_names_the_rule_and_the_limit() {
    let problems = compile(&regex_push(1, 65, 65)).unwrap_err();
    let said: Vec<String> = problems.iter().map(|p| format!("{}: {}", p.key, p.reason)).collect();
    assert!(
        said.contains(&"rules[0].hostnames: 65 hostnames; at most 64 per rule".to_owned()),
        "{said:?}"
    );
    assert!(
        said.contains(&"rules[0].matches: 65 matches; at most 64 per rule".to_owned()),
        "{said:?}"
    );

    // The TOML side: `check` and a reload say the same, with the TOML key.
    let many: Vec<String> = (0..17)
        .map(|i| format!("{{ name = \"x{i}\", value = \"1\" }}"))
        .collect();
    let err = table(&format!(
        "[[route]]\nhostnames = [\"a.example.com\"]\nupstream = \"http://a\"\nmatches = [{{ headers = [{}] }}]\n",
        many.join(", ")
    ))
    .unwrap_err();
    assert_eq!(err.problems.len(), 1, "{err}");
    assert_eq!(err.problems[0].key, "route[0].matches[0].headers");
    assert!(err.problems[0].reason.contains("at most 16 per match"), "{err}");
}

/// Gateway API: routes whose hostnames match a request are ordered by hostname specificity,
/// not filtered by it, so an exact host with no matching rule is served by its wildcard's
/// rules (docs/routing.md, "Hostname fall-through"); a catch-all on the exact host that
/// answers an error fences it off.
#[test]
fn an_exact_host_falls_through_to_its_wildcard_unless_it_has_a_catch_all() {
    let admin = r#"{ "name": "admin", "hostnames": ["admin.example.com"], "matches": [{ "path": { "type": "PathPrefix", "value": "/admin" } }] }"#;
    let app = r#"{ "name": "app", "hostnames": ["*.example.com"] }"#;
    let fence = r#"{ "name": "fence", "hostnames": ["admin.example.com"], "unavailableStatus": 404 }"#;
    let t = compile(&format!(r#"{{ "version": 1, "rules": [{admin}, {app}] }}"#)).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(route(&t, "admin.example.com", "/admin/x"), "admin");
    assert_eq!(route(&t, "admin.example.com", "/other"), "app");

    let t = compile(&format!(r#"{{ "version": 1, "rules": [{admin}, {app}, {fence}] }}"#))
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(route(&t, "admin.example.com", "/admin/x"), "admin");
    assert_eq!(route(&t, "admin.example.com", "/other"), "fence");
    let rule = t.find("admin.example.com").expect("the fence");
    assert_eq!(rule.unavailable, Some(StatusCode::NOT_FOUND));
    assert_eq!(route(&t, "www.example.com", "/other"), "app");

    // The TOML spelling: a rule without backends, which answers 500.
    let t = table(
        r#"
        [[route]]
        hostnames = ["*.example.com"]
        upstream = "http://app"
        [[route]]
        name = "fence"
        hostnames = ["admin.example.com"]
        backends = []
        "#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let rule = t.find("admin.example.com").expect("the fence");
    assert_eq!(&*rule.route, "fence");
    assert!(rule.pick_backend().is_none(), "no backend: 500");
}
