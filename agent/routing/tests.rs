//! Table-driven tests built from the Gateway API v1 spec text (`HTTPRoute`, `HTTPRouteMatch`,
//! `HTTPPathModifier`, `HTTPRequestRedirectFilter`). HTTP-level cases are in tests/l7.rs.

use std::path::Path;

use http::{HeaderMap, HeaderName, HeaderValue, Method};

use super::filters::PathModifier;
use super::matching::{compile_anchored, first_query_value, PathMatcher};
use super::RequestHead;
use crate::config::Config;
use crate::routing::table::{RouteTable, RoutesError};

fn table(toml: &str) -> Result<RouteTable, RoutesError> {
    let config =
        crate::routing::parse_config(Path::new("t.toml"), toml).map_err(|e| RoutesError { problems: e.problems })?;
    crate::routing::compile::build(&config, &config.routes.hosts)
}

/// A request for matching: `target` is `path[?query]`.
struct Req {
    host: &'static str,
    method: Method,
    target: &'static str,
    headers: HeaderMap,
}

fn req(host: &'static str, target: &'static str) -> Req {
    Req {
        host,
        method: Method::GET,
        target,
        headers: HeaderMap::new(),
    }
}

impl Req {
    fn method(mut self, m: &str) -> Req {
        self.method = Method::from_bytes(m.as_bytes()).unwrap();
        self
    }
    fn header(mut self, name: &'static str, value: &'static str) -> Req {
        self.headers
            .append(HeaderName::from_static(name), HeaderValue::from_static(value));
        self
    }
}

/// The name of the route `r` lands on, or "404".
fn route_of(t: &RouteTable, r: &Req) -> String {
    let (path, query) = match r.target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (r.target, None),
    };
    let head = RequestHead {
        method: &r.method,
        path,
        query,
        headers: &r.headers,
    };
    t.route(r.host, &head)
        .map_or_else(|| "404".to_owned(), |m| m.rule.route.to_string())
}

#[test]
fn path_prefix_matches_whole_segments_and_ignores_a_trailing_slash() {
    // "the paths `/abc`, `/abc/`, and `/abc/def` would all match the prefix `/abc`, but the
    // path `/abcd` would not." (PathMatchType, PathPrefix)
    let cases = [
        ("/abc", "/abc", true),
        ("/abc", "/abc/", true),
        ("/abc", "/abc/def", true),
        ("/abc", "/abcd", false),
        ("/abc/", "/abc", true),
        ("/abc/", "/abc/def", true),
        ("/abc/", "/abcd", false),
        ("/", "/anything", true),
        ("/", "/", true),
        ("/foo/bar", "/foo", false),
        ("/foo/bar", "/foo/bar/baz", true),
        ("/foo/bar", "/foo/barbaz", false),
    ];
    for (prefix, path, want) in cases {
        let m = PathMatcher::Prefix(prefix.trim_end_matches('/').into());
        assert_eq!(m.matches(path), want, "PathPrefix {prefix} vs {path}");
    }
}

#[test]
fn exact_and_regex_paths_match_the_whole_path() {
    assert!(PathMatcher::Exact("/foo".into()).matches("/foo"));
    assert!(!PathMatcher::Exact("/foo".into()).matches("/foo/"));
    let re = PathMatcher::Regex(compile_anchored(r"/v\d+/items").unwrap());
    assert!(re.matches("/v2/items"));
    assert!(!re.matches("/v2/items/1"), "anchored at the end");
    assert!(!re.matches("/api/v2/items"), "anchored at the start");
    // `a|ab` on "ab": a leftmost-first search stops at "a"; a whole-path match must still succeed.
    assert!(PathMatcher::Regex(compile_anchored("/a|/ab").unwrap()).matches("/ab"));
    // A pattern cannot break out of the anchoring group.
    assert!(compile_anchored("/a)|(/b").is_err());
}

#[test]
fn regex_perl_classes_are_ascii_like_re2() {
    let re = compile_anchored(r"/v\d").unwrap();
    assert!(re.is_match(b"/v3"));
    assert!(!re.is_match("/v٣".as_bytes()), "Arabic-Indic digit is not \\d in RE2");
    let re = compile_anchored(r"(?u)/v\d").unwrap_err();
    assert!(
        re.reason().contains("Unicode"),
        "opting in needs the unicode tables, which are not compiled in: {re}"
    );
}

#[test]
fn query_values_are_decoded_first_value_wins_and_names_are_case_sensitive() {
    assert_eq!(first_query_value("a=1&a=2", "a").as_deref(), Some(&b"1"[..]));
    assert_eq!(first_query_value("A=1", "a"), None);
    assert_eq!(
        first_query_value("q=hello+w%6Frld", "q").as_deref(),
        Some(&b"hello world"[..])
    );
    assert_eq!(first_query_value("x%20y=1", "x y").as_deref(), Some(&b"1"[..]));
    assert_eq!(first_query_value("flag", "flag").as_deref(), Some(&b""[..]));
    assert_eq!(first_query_value("bad=%zz", "bad").as_deref(), Some(&b"%zz"[..]));
}

/// The case the peer gets wrong: it scores each rule by its best match, so rule A's `Exact
/// /foo` lifts A's `PathPrefix /` above rule B's `PathPrefix /bar`, and `/bar/x` goes to A.
/// Gateway API ranks matches, not rules: `PathPrefix /bar` outranks `PathPrefix /`.
#[test]
fn precedence_is_per_match_not_per_rule() {
    let t = table(
        r#"
        [[route]]
        name = "a"
        hostnames = ["app.example.com"]
        upstream = "http://a"
        matches = [{ path = { type = "Exact", value = "/foo" } }, { path = { type = "PathPrefix", value = "/" } }]

        [[route]]
        name = "b"
        hostnames = ["app.example.com"]
        upstream = "http://b"
        matches = [{ path = { type = "PathPrefix", value = "/bar" } }]
        "#,
    )
    .unwrap();
    assert_eq!(route_of(&t, &req("app.example.com", "/bar/x")), "b");
    assert_eq!(route_of(&t, &req("app.example.com", "/bar")), "b");
    assert_eq!(route_of(&t, &req("app.example.com", "/foo")), "a");
    assert_eq!(route_of(&t, &req("app.example.com", "/barn")), "a", "segment boundary");
    assert_eq!(route_of(&t, &req("app.example.com", "/other")), "a");
}

/// Two routes on one hostname, each with one match; a request both accept goes to `winner`.
/// Route "first" is listed first, so it wins only on a full tie.
#[test]
fn precedence_order_follows_the_spec() {
    let cases: [(&str, &str, Req, &str); 10] = [
        // "Exact" path match.
        (
            r#"{ path = { type = "PathPrefix", value = "/foo" }, method = "GET", headers = [{ name = "x", value = "1" }] }"#,
            r#"{ path = { type = "Exact", value = "/foo" } }"#,
            req("h.example.com", "/foo").header("x", "1"),
            "second",
        ),
        // "Prefix" path match with largest number of characters.
        (
            r#"{ path = { type = "PathPrefix", value = "/a" }, method = "GET" }"#,
            r#"{ path = { type = "PathPrefix", value = "/a/b" } }"#,
            req("h.example.com", "/a/b/c"),
            "second",
        ),
        // A trailing slash does not make a prefix longer.
        (
            r#"{ path = { type = "PathPrefix", value = "/a" } }"#,
            r#"{ path = { type = "PathPrefix", value = "/a/" } }"#,
            req("h.example.com", "/a/b"),
            "first",
        ),
        // Method match.
        (
            r#"{ headers = [{ name = "x", value = "1" }, { name = "y", value = "2" }] }"#,
            r#"{ method = "POST" }"#,
            req("h.example.com", "/")
                .method("POST")
                .header("x", "1")
                .header("y", "2"),
            "second",
        ),
        // Largest number of header matches.
        (
            r#"{ headers = [{ name = "x", value = "1" }], query_params = [{ name = "a", value = "1" }, { name = "b", value = "2" }] }"#,
            r#"{ headers = [{ name = "x", value = "1" }, { name = "y", value = "2" }] }"#,
            req("h.example.com", "/?a=1&b=2").header("x", "1").header("y", "2"),
            "second",
        ),
        // Equivalent header names count once ("only the first entry … MUST be considered").
        (
            r#"{ headers = [{ name = "x", value = "1" }, { name = "X", value = "other" }] }"#,
            r#"{ headers = [{ name = "x", value = "1" }], query_params = [{ name = "a", value = "1" }] }"#,
            req("h.example.com", "/?a=1").header("x", "1"),
            "second",
        ),
        // Largest number of query param matches.
        (
            r#"{ query_params = [{ name = "a", value = "1" }] }"#,
            r#"{ query_params = [{ name = "a", value = "1" }, { name = "b", value = "2" }] }"#,
            req("h.example.com", "/?a=1&b=2"),
            "second",
        ),
        // Full tie: the earlier rule.
        (
            r#"{ path = { type = "PathPrefix", value = "/x" } }"#,
            r#"{ path = { type = "PathPrefix", value = "/x" } }"#,
            req("h.example.com", "/x"),
            "first",
        ),
        // RegularExpression ranks between Exact and PathPrefix (implementation-specific).
        (
            r#"{ path = { type = "PathPrefix", value = "/api/v1" } }"#,
            r#"{ path = { type = "RegularExpression", value = "/api/v[0-9]+/.*" } }"#,
            req("h.example.com", "/api/v1/x"),
            "second",
        ),
        (
            r#"{ path = { type = "RegularExpression", value = "/api/.*" } }"#,
            r#"{ path = { type = "Exact", value = "/api/x" } }"#,
            req("h.example.com", "/api/x"),
            "second",
        ),
    ];
    for (first, second, r, winner) in cases {
        let toml = format!(
            r#"
            [[route]]
            name = "first"
            hostnames = ["h.example.com"]
            upstream = "http://first"
            matches = [{first}]
            [[route]]
            name = "second"
            hostnames = ["h.example.com"]
            upstream = "http://second"
            matches = [{second}]
            "#
        );
        let t = table(&toml).unwrap_or_else(|e| panic!("{e}\n{toml}"));
        assert_eq!(
            route_of(&t, &r),
            winner,
            "first={first} second={second} target={}",
            r.target
        );
        // Order in the file must not matter unless it is a full tie.
        let swapped = format!(
            r#"
            [[route]]
            name = "second"
            hostnames = ["h.example.com"]
            upstream = "http://second"
            matches = [{second}]
            [[route]]
            name = "first"
            hostnames = ["h.example.com"]
            upstream = "http://first"
            matches = [{first}]
            "#
        );
        let t = table(&swapped).unwrap();
        // In this table "first" only ever wins a full tie, which goes to whichever is listed first.
        let want_swapped = if winner == "first" { "second" } else { winner };
        assert_eq!(
            route_of(&t, &r),
            want_swapped,
            "names swapped: first={first} second={second}"
        );
    }
}

#[test]
fn header_query_and_method_conditions() {
    let t = table(
        r#"
        [[route]]
        name = "hdr"
        hostnames = ["h.example.com"]
        upstream = "http://x"
        matches = [{ headers = [{ name = "X-API-Version", value = "2" }, { type = "RegularExpression", name = "x-tenant", value = "t-[0-9]+" }] }]
        [[route]]
        name = "query"
        hostnames = ["h.example.com"]
        upstream = "http://x"
        matches = [{ query_params = [{ name = "Debug", value = "on" }, { type = "RegularExpression", name = "n", value = "[0-9]{2}" }] }]
        [[route]]
        name = "method"
        hostnames = ["h.example.com"]
        upstream = "http://x"
        matches = [{ method = "DELETE" }]
        "#,
    )
    .unwrap();
    let h = "h.example.com";
    assert_eq!(
        route_of(&t, &req(h, "/").header("x-api-version", "2").header("x-tenant", "t-42")),
        "hdr"
    );
    assert_eq!(
        route_of(&t, &req(h, "/").header("x-api-version", "2").header("x-tenant", "t-4x")),
        "404"
    );
    assert_eq!(
        route_of(&t, &req(h, "/").header("x-api-version", "2")),
        "404",
        "both headers needed"
    );
    assert_eq!(
        route_of(
            &t,
            &req(h, "/")
                .header("x-api-version", "2")
                .header("x-api-version", "3")
                .header("x-tenant", "t-1")
        ),
        "404",
        "a repeated header is matched as \"2,3\""
    );
    assert_eq!(route_of(&t, &req(h, "/?Debug=on&n=12")), "query");
    assert_eq!(
        route_of(&t, &req(h, "/?debug=on&n=12")),
        "404",
        "query names are case-sensitive"
    );
    assert_eq!(route_of(&t, &req(h, "/?Debug=on&n=123")), "404", "regex is anchored");
    assert_eq!(
        route_of(&t, &req(h, "/?n=12&Debug=off&Debug=on")),
        "404",
        "first value counts"
    );
    assert_eq!(route_of(&t, &req(h, "/x").method("DELETE")), "method");
    assert_eq!(route_of(&t, &req(h, "/x").method("GET")), "404");
}

#[test]
fn hostnames_exact_wildcard_and_fallback() {
    let t = table(
        r#"
        [[route]]
        name = "exact"
        hostnames = ["a.example.com"]
        upstream = "http://x"
        matches = [{ path = { type = "PathPrefix", value = "/only" } }]
        [[route]]
        name = "wild"
        hostnames = ["*.example.com"]
        upstream = "http://x"
        [[route]]
        name = "deeper"
        hostnames = ["*.b.example.com"]
        upstream = "http://x"
        matches = [{ path = { type = "PathPrefix", value = "/deep" } }]
        [[route]]
        name = "any"
        upstream = "http://x"
        "#,
    )
    .unwrap();
    assert_eq!(route_of(&t, &req("a.example.com", "/only/x")), "exact");
    assert_eq!(
        route_of(&t, &req("A.Example.COM", "/only")),
        "exact",
        "case-insensitive"
    );
    assert_eq!(route_of(&t, &req("a.example.com.", "/only")), "exact", "trailing dot");
    // The exact hostname's rules do not match: fall through to the wildcard.
    assert_eq!(route_of(&t, &req("a.example.com", "/other")), "wild");
    // "*.example.com would match both test.example.com, and foo.test.example.com, but not
    // example.com"
    assert_eq!(route_of(&t, &req("test.example.com", "/")), "wild");
    assert_eq!(route_of(&t, &req("foo.test.example.com", "/")), "wild");
    assert_eq!(route_of(&t, &req("example.com", "/")), "any");
    // Longest wildcard first, then the shorter one.
    assert_eq!(route_of(&t, &req("x.b.example.com", "/deep")), "deeper");
    assert_eq!(route_of(&t, &req("x.b.example.com", "/shallow")), "wild");
    assert_eq!(route_of(&t, &req("other.org", "/")), "any");
}

#[test]
fn replace_prefix_match_follows_the_spec_table() {
    // HTTPPathModifier, ReplacePrefixMatch: request path, prefix match, modified prefix, result.
    let table = [
        ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
        ("/foo", "/foo", "/xyz", "/xyz"),
        ("/foo/", "/foo", "/xyz", "/xyz/"),
        ("/foo/bar", "/foo", "", "/bar"),
        ("/foo/", "/foo", "", "/"),
        ("/foo", "/foo", "", "/"),
        ("/foo/", "/foo", "/", "/"),
        ("/foo", "/foo", "/", "/"),
    ];
    for (path, prefix, replacement, want) in table {
        let m = PathModifier::Prefix(replacement.into());
        assert_eq!(
            m.apply(path, Some(prefix.trim_end_matches('/'))),
            want,
            "{path} prefix {prefix} → {replacement}"
        );
    }
    assert_eq!(PathModifier::Full("/new".into()).apply("/old/x", Some("/old")), "/new");
}

/// The compiled redirect of a route whose only filter is `RequestRedirect` with `spec`.
fn redirect(spec: &str) -> super::filters::Redirect {
    let toml = format!(
        r#"
        [[route]]
        name = "r"
        hostnames = ["h.example.com"]
        filters = [{{ type = "RequestRedirect", request_redirect = {spec} }}]
        matches = [{{ path = {{ type = "PathPrefix", value = "/old" }} }}]
        "#
    );
    let config = crate::routing::parse_config(Path::new("t.toml"), &toml).unwrap_or_else(|e| panic!("{e}"));
    let mut problems = Vec::new();
    let f = super::Filters::compile(
        &config.route[0].filters,
        "route[0].filters",
        &config.routes,
        &super::tls::DefaultRoots::new(&config.proxy),
        &mut problems,
    );
    assert!(problems.is_empty(), "{problems:?}");
    f.redirect.expect("a redirect")
}

#[test]
fn redirect_location_follows_the_spec_port_and_scheme_rules() {
    // (redirect settings, client scheme, Host, path, query, expected Location)
    let cases = [
        // Scheme set, no port: the scheme's well-known port, which is left out.
        (
            r#"{ scheme = "https" }"#,
            "http",
            "h.example.com",
            "/old/a",
            None,
            "https://h.example.com/old/a",
        ),
        (
            r#"{ scheme = "https" }"#,
            "http",
            "h.example.com:8080",
            "/old",
            None,
            "https://h.example.com/old",
        ),
        // No scheme, no port: the port the client used (the listener's), unless default.
        (
            r#"{ hostname = "new.example.com" }"#,
            "http",
            "h.example.com:8080",
            "/old",
            None,
            "http://new.example.com:8080/old",
        ),
        (
            r#"{ hostname = "new.example.com" }"#,
            "https",
            "h.example.com",
            "/old",
            Some("a=1&b"),
            "https://new.example.com/old?a=1&b",
        ),
        // Explicit port; the default port for the scheme is never written.
        (
            r#"{ scheme = "http", port = 8080 }"#,
            "https",
            "h.example.com",
            "/old",
            None,
            "http://h.example.com:8080/old",
        ),
        (
            r#"{ scheme = "https", port = 443 }"#,
            "http",
            "h.example.com",
            "/old",
            None,
            "https://h.example.com/old",
        ),
        (
            r#"{ port = 80 }"#,
            "http",
            "h.example.com:9",
            "/old",
            None,
            "http://h.example.com/old",
        ),
        // Paths.
        (
            r#"{ path = { type = "ReplaceFullPath", replace_full_path = "/new" } }"#,
            "http",
            "h.example.com",
            "/old/x",
            Some("q=1"),
            "http://h.example.com/new?q=1",
        ),
        (
            r#"{ path = { type = "ReplacePrefixMatch", replace_prefix_match = "/new/" } }"#,
            "http",
            "h.example.com",
            "/old/x/",
            None,
            "http://h.example.com/new/x/",
        ),
        (
            r#"{ path = { type = "ReplacePrefixMatch", value = "" } }"#,
            "http",
            "h.example.com",
            "/old",
            None,
            "http://h.example.com/",
        ),
        // IPv6 literal hosts keep their brackets.
        (r#"{ }"#, "http", "[::1]:8080", "/old", None, "http://[::1]:8080/old"),
    ];
    for (spec, scheme, host, path, query, want) in cases {
        let r = redirect(spec);
        assert_eq!(
            r.location(scheme, host, path, query, Some("/old")),
            want,
            "{spec} {host}{path}"
        );
    }
    assert_eq!(redirect("{ }").status, 302, "default status");
    assert_eq!(redirect("{ status_code = 301 }").status, 301);
}

#[test]
fn invalid_rules_report_every_problem_with_its_key() {
    let err = table(
        r#"
        [[route]]
        hostnames = ["h.example.com"]
        upstream = "http://x"
        matches = [
          { path = { type = "RegularExpression", value = "/(unclosed" } },
          { path = { type = "Exact", value = "no-slash" }, method = "FETCH" },
          { headers = [{ name = "bad header", value = "1" }] },
        ]
        filters = [
          { type = "URLRewrite", url_rewrite = { path = { type = "ReplacePrefixMatch", replace_prefix_match = "/x" } } },
          { type = "RequestRedirect", request_redirect = { status_code = 200 } },
          { type = "RequestHeaderModifier", request_header_modifier = { set = [{ name = "Connection", value = "x" }] } },
          { type = "ResponseHeaderModifier" },
        ]
        timeouts = { request = "1s", backend_request = "2s" }
        "#,
    )
    .unwrap_err();
    let text = err.to_string();
    for want in [
        "route[0].matches[0].path: invalid regular expression",
        "route[0].matches[1].path: \"no-slash\" must start with \"/\"",
        "route[0].matches[1].method: \"FETCH\" is not one of",
        "route[0].matches[2].headers[0]: \"bad header\" is not a valid header name",
        "route[0].filters[1]: status code 200 is not a redirect",
        "route[0].filters[2].set[0]: \"Connection\" belongs to the connection",
        "route[0].filters[3]: type ResponseHeaderModifier needs its settings object",
        "route[0].timeouts.backend_request",
    ] {
        assert!(text.contains(want), "missing {want:?} in {text}");
    }
    let err = table(
        r#"
        [[route]]
        hostnames = ["h.example.com"]
        upstream = "http://x"
        matches = [{ path = { type = "Exact", value = "/a" } }]
        filters = [{ type = "URLRewrite", url_rewrite = { path = { type = "ReplacePrefixMatch", replace_prefix_match = "/x" } } }]
        "#,
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("ReplacePrefixMatch needs every match"),
        "{err}"
    );
    let err = table(
        r#"
        [[route]]
        hostnames = ["h.example.com"]
        upstream = "http://x"
        filters = [
          { type = "URLRewrite", url_rewrite = { hostname = "x.example.com" } },
          { type = "RequestRedirect", request_redirect = { scheme = "https" } },
        ]
        "#,
    )
    .unwrap_err();
    assert!(err.to_string().contains("cannot be combined"), "{err}");
}

/// Requests are matched normalised (routing/path.rs), so a value in any other form could never
/// match as written: it is refused with the form to write instead.
#[test]
fn path_values_must_be_in_normal_form() {
    let err = table(
        r#"
        [[route]]
        hostnames = ["h.example.com"]
        upstream = "http://x"
        matches = [
          { path = { type = "PathPrefix", value = "//admin" } },
          { path = { type = "Exact", value = "/%61dmin/./x" } },
          { path = { type = "PathPrefix", value = "/a%2Fb" } },
          { path = { type = "PathPrefix", value = "/ok/%c3%a9" } },
        ]
        filters = [{ type = "URLRewrite", url_rewrite = { path = { type = "ReplacePrefixMatch", replace_prefix_match = "/x/../.." } } }]

        [[route]]
        hostnames = ["r.example.com"]
        filters = [{ type = "RequestRedirect", request_redirect = { path = { type = "ReplaceFullPath", replace_full_path = "/a//b" } } }]
        "#,
    )
    .unwrap_err();
    let text = err.to_string();
    for want in [
        r#"route[0].matches[0].path: "//admin" is not a normalised path (requests are matched and forwarded normalised): write "/admin""#,
        r#"route[0].matches[1].path: "/%61dmin/./x" is not a normalised path"#,
        r#"write "/admin/x""#,
        r#"route[0].matches[2].path: "/a%2Fb" cannot be a request path: the path contains an encoded"#,
        r#"write "/ok/%C3%A9""#,
        r#"route[0].filters[0]: "/x/../.." cannot be a request path: the path climbs above the root"#,
        r#"route[1].filters[0]: "/a//b" is not a normalised path"#,
    ] {
        assert!(text.contains(want), "missing {want:?} in {text}");
    }
}

#[test]
fn same_hostname_is_fine_unless_two_catch_alls_claim_it() {
    assert!(table(
        r#"
        [routes.hosts]
        "h.example.com" = "http://default"
        [[route]]
        hostnames = ["h.example.com"]
        upstream = "http://api"
        matches = [{ path = { type = "PathPrefix", value = "/api" } }]
        "#
    )
    .is_ok());
    let err = table(
        r#"
        [routes.hosts]
        "h.example.com" = "http://default"
        [[route]]
        hostnames = ["h.example.com"]
        upstream = "http://api"
        "#,
    )
    .unwrap_err();
    assert!(err.to_string().contains("already routed"), "{err}");
}

/// The worked example in docs/routing.md (the gateway controller's `advanced-routing`
/// HTTPRoute), in both forms, must
/// parse and route as the document says.
#[test]
fn docs_worked_example_builds_and_routes() {
    let doc = include_str!("../../docs/routing.md");
    let block = |fence: &str, starts: &str| -> String {
        doc.split(fence)
            .skip(1)
            .map(|b| b.split("```").next().unwrap_or(""))
            .find(|b| b.trim_start().starts_with(starts))
            .unwrap_or_else(|| panic!("no {fence} block starting with {starts}"))
            .to_owned()
    };
    let toml_table = table(&block("```toml\n", "[[route]]\nname = \"advanced-routing\"")).unwrap();
    let pushed =
        crate::routing::config_api::PushedConfig::parse(block("```json\n", "{\"version\": 1").as_bytes()).unwrap();
    let json_table = pushed
        .compile(&Config::default(), &crate::telemetry::Metrics::default())
        .unwrap();
    for t in [&toml_table, &json_table] {
        let hit = req("app.example.com", "/api/v2/health").header("x-api-version", "2");
        let head = RequestHead {
            method: &hit.method,
            path: "/api/v2/health",
            query: None,
            headers: &hit.headers,
        };
        let rule = t.route("app.example.com", &head).expect("routed").rule;
        let weights: Vec<u32> = rule.backends.iter().map(|b| b.weight).collect();
        assert_eq!(weights, [80, 20]);
        let mut headers = HeaderMap::new();
        rule.filters
            .response_headers
            .as_ref()
            .expect("response modifier")
            .apply(&mut headers);
        assert_eq!(headers["x-proxy"], "cloudflare-tunnel-gateway");
        assert_eq!(
            route_of(t, &req("app.example.com", "/api/v2/health")),
            "404",
            "header required"
        );
        assert_eq!(route_of(t, &req("app.example.com", "/other")), "404", "no catch-all");
    }
}
