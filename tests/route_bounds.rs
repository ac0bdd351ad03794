//! A pushed table is a bounded amount of work (issue 18): tables over the limits are refused
//! before they are compiled, naming the rule and the limit; the largest table the limits allow
//! compiles off the control runtime, so `/ready` keeps answering meanwhile; and the per-route
//! state of a route that went away (its metric series, its identity-token refresher) goes too.

mod common;

use std::time::Duration;

use tokio::time::Instant;

use common::client::get;
use common::{eventually, Agent, AgentBuilder, ConfigText, FakeMetadata, FakeUpstream, Wire, DEADLINE};
use serde_json::{json, Value};

const API_TOKEN: &str = "route-bounds-test-token";

async fn start(extra: ConfigText) -> Agent {
    let cfg = extra
        .env_secret("config_token", "ROUTE_BOUNDS_TOKEN")
        .routes("source = \"config-api\"")
        .raw("[config_api]\nlisten = \"127.0.0.1:0\"\nauth_secret = \"config_token\"\npersist = false\n");
    AgentBuilder::new()
        .env("ROUTE_BOUNDS_TOKEN", API_TOKEN)
        .start(&cfg)
        .await
}

/// `PUT /config` with `body`: the status and the JSON answer.
async fn push(agent: &Agent, body: &Value) -> (u16, Value) {
    agent.put_config(API_TOKEN, body, Duration::from_secs(120)).await
}

/// `rules` rules sharing `hostnames` hostnames, each with `regexes` regex path matches.
fn regex_table(version: u64, rules: usize, hostnames: usize, regexes: usize) -> Value {
    let hosts: Vec<String> = (0..hostnames).map(|h| format!("host{h}.tenant.example.com")).collect();
    let rules: Vec<Value> = (0..rules)
        .map(|r| {
            let matches: Vec<Value> = (0..regexes)
                .map(|j| json!({ "path": { "type": "RegularExpression", "value": format!("/svc{r}/api{j}/[a-z0-9-]+/(item|list)") } }))
                .collect();
            json!({ "name": format!("r{r}"), "hostnames": hosts, "matches": matches, "backends": [{ "url": "http://127.0.0.1:9" }] })
        })
        .collect();
    json!({ "version": version, "rules": rules })
}

fn problem_with<'a>(answer: &'a Value, key: &str) -> &'a Value {
    let problems = answer["problems"].as_array().expect("a problem list");
    problems
        .iter()
        .find(|p| p["key"] == key)
        .unwrap_or_else(|| panic!("no problem for {key}: {answer:#}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_table_over_the_limits_is_refused_naming_the_rule_and_the_limit() {
    let agent = start(ConfigText::new()).await;

    // The 1 MiB push: 40 rules × 40 hostnames × 265 regexes.
    let (status, answer) = push(&agent, &regex_table(1, 40, 40, 265)).await;
    assert_eq!(status, 400, "{answer}");
    let matches = problem_with(&answer, "rules[0].matches");
    assert!(
        matches["reason"].as_str().unwrap().contains("at most 64 per rule"),
        "{answer:#}"
    );
    let regexes = answer["problems"].as_array().unwrap().iter().find(|p| {
        p["reason"]
            .as_str()
            .is_some_and(|r| r.contains("more than 1024 regular expressions"))
    });
    assert!(regexes.is_some(), "{answer:#}");

    // Listeners: at most 64; every rule without listeners is on each of them.
    let listeners: Vec<Value> = (0..65).map(|i| json!({ "name": format!("l{i}") })).collect();
    let body =
        json!({ "version": 1, "listeners": listeners, "rules": [{ "backends": [{ "url": "http://127.0.0.1:9" }] }] });
    let (status, answer) = push(&agent, &body).await;
    assert_eq!(status, 400, "{answer}");
    assert!(problem_with(&answer, "listeners")["reason"]
        .as_str()
        .unwrap()
        .contains("at most 64"));

    // Rules sharing hostnames in a sliding window: each hostname has its own list of regexes,
    // so the sets would hold far more patterns than the table has. Refused after the rules
    // compiled, before any set is.
    let rules: Vec<Value> = (0..16)
        .map(|r| {
            let hosts: Vec<String> = (r.max(8) - 8..=r).map(|h| format!("h{h}.example.com")).collect();
            let matches: Vec<Value> = (0..64)
                .map(|j| json!({ "path": { "type": "RegularExpression", "value": format!("/r{r}/{j}/[0-9]+") } }))
                .collect();
            json!({ "hostnames": hosts, "matches": matches })
        })
        .collect();
    let (status, answer) = push(&agent, &json!({ "version": 1, "rules": rules })).await;
    assert_eq!(status, 400, "{answer}");
    let reason = answer["problems"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("exceed 4096"), "{answer:#}");
    assert!(
        answer["problems"][0]["key"].as_str().unwrap().starts_with("rules["),
        "{answer:#}"
    );

    // Nothing of it was applied.
    let config: Value = reqwest::Client::new()
        .get(format!("http://{}/config", agent.config_api_addr()))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(config["ready"], false, "{config}");
}

#[tokio::test(flavor = "multi_thread")]
async fn ready_answers_while_the_largest_allowed_table_compiles() {
    let agent = start(ConfigText::new()).await;
    assert_eq!(push(&agent, &regex_table(1, 1, 1, 1)).await.0, 200);

    // 16 rules × 64 hostnames × 64 regexes: 1,024 regexes (the limit), 65,536 index entries.
    let big = regex_table(2, 16, 64, 64);
    let pushed = tokio::spawn({
        let url = format!("http://{}/config", agent.config_api_addr());
        async move {
            let started = Instant::now();
            let resp = reqwest::Client::new()
                .put(url)
                .bearer_auth(API_TOKEN)
                .json(&big)
                .send()
                .await
                .expect("config api answers");
            (resp.status().as_u16(), started.elapsed())
        }
    });
    let ready = agent.health_url("/ready");
    let client = reqwest::Client::new();
    let (mut samples, mut slowest) = (0, Duration::ZERO);
    while !pushed.is_finished() {
        let asked = Instant::now();
        let status = client.get(&ready).send().await.expect("/ready answers").status();
        slowest = slowest.max(asked.elapsed());
        assert_eq!(status, 200, "/ready while a table compiles");
        samples += 1;
    }
    let (status, took) = pushed.await.unwrap();
    assert_eq!(status, 200, "the largest allowed table is accepted");
    eprintln!("push took {took:?}; /ready sampled {samples} times, slowest {slowest:?}");
    assert!(
        samples >= 3,
        "the push took {took:?}: too quick to sample /ready ({samples})"
    );
    assert!(
        slowest < Duration::from_millis(500),
        "/ready took {slowest:?} while the push compiled ({took:?})"
    );
}

/// The lines of `/metrics` that name `route`.
async fn series(agent: &Agent, route: &str) -> usize {
    let text = reqwest::get(agent.health_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let label = format!("route=\"{route}\"");
    text.lines().filter(|l| l.contains(&label)).count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_removed_route_takes_its_series_and_token_refresher_with_it() {
    let meta = FakeMetadata::start().await;
    // The background refresh falls due about 2 s after each fetch.
    meta.set_token_lifetime(Duration::from_secs(60));
    let gone = FakeUpstream::start(Wire::Http1).await;
    let stays = FakeUpstream::start(Wire::Http1).await;
    let config = ConfigText::new()
        .gcp(&format!("metadata_url = {:?}", meta.url()))
        .gcp("id_token_refresh_margin = \"58s\"")
        // The fakes speak plain http; identity tokens over http need the local key (issue 18).
        .proxy("allow_id_tokens_over_http = true");
    let agent = start(config).await;
    let rule = |name: &str, host: &str, url: &str| json!({ "name": name, "hostnames": [host], "backends": [{ "url": url, "upstreamAuth": "gcp-id-token" }] });
    let both = json!({ "version": 1, "rules": [rule("gone", "gone.test", &gone.url()), rule("stays", "stays.test", &stays.url())] });
    assert_eq!(push(&agent, &both).await.0, 200);
    for host in ["gone.test", "stays.test"] {
        assert_eq!(get(agent.proxy_addr(), host, "/", &[]).await.status.as_u16(), 200);
    }
    assert!(series(&agent, "gone").await > 0, "the route has series while it exists");
    eventually(DEADLINE, "a background refresh of each audience", || async {
        (meta.fetches(&gone.url()) >= 2 && meta.fetches(&stays.url()) >= 2).then_some(())
    })
    .await;

    let one = json!({ "version": 2, "rules": [rule("stays", "stays.test", &stays.url())] });
    assert_eq!(push(&agent, &one).await.0, 200);
    assert_eq!(series(&agent, "gone").await, 0, "the removed route's series are gone");
    assert!(series(&agent, "stays").await > 0, "the kept route keeps its series");

    // The kept audience's refreshes are the clock: two more of them, and none for the other.
    let (gone_fetches, stays_fetches) = (meta.fetches(&gone.url()), meta.fetches(&stays.url()));
    eventually(DEADLINE, "two more refreshes of the kept audience", || async {
        (meta.fetches(&stays.url()) >= stays_fetches + 2).then_some(())
    })
    .await;
    assert_eq!(
        meta.fetches(&gone.url()),
        gone_fetches,
        "the removed route's audience is no longer refreshed"
    );
}
