//! A table pushed to the config API takes the path every other route table takes: it reaches a
//! locally-managed tunnel's ingress (cloudflared's `config.yml`) and the runtime `routes.json`,
//! not only the proxy. Before issue 9 the config API swapped the proxy's table itself and both
//! were skipped.

mod common;

use common::{eventually, Agent, AgentBuilder, ConfigText, FakeCloudflared, DEADLINE};
use serde_json::json;

const API_TOKEN: &str = "config-api-token-for-test";
const TUNNEL_ID: &str = "6ff42ae2-765d-4adf-8112-31c55c1551ef";

/// A config-API agent running a locally-managed tunnel on the fake cloudflared.
async fn start() -> (Agent, FakeCloudflared) {
    let builder = AgentBuilder::new();
    let cf = FakeCloudflared::new(builder.dir());
    let creds = builder.file("creds.json", r#"{"AccountTag":"a","TunnelSecret":"s","TunnelID":"t"}"#);
    let section = cf.section(&[
        "token_secret = \"\"",
        &format!("credentials_file = {:?}", creds.display().to_string()),
        &format!("tunnel = \"{TUNNEL_ID}\""),
    ]);
    // A locally-managed tunnel has no token: drop the line the helper added.
    let section = section.replace("token_secret = \"\"\n", "");
    let cfg = ConfigText::new()
        .env_secret("config_token", "CONFIG_API_TOKEN_FOR_TEST")
        .routes("source = \"config-api\"")
        .raw("[config_api]\nlisten = \"127.0.0.1:0\"\nauth_secret = \"config_token\"\n")
        .raw(&section);
    let agent = builder.env("CONFIG_API_TOKEN_FOR_TEST", API_TOKEN).start(&cfg).await;
    (agent, cf)
}

async fn push(agent: &Agent, version: u64, hostname: &str) -> u16 {
    let body = json!({
        "version": version,
        "rules": [{ "hostnames": [hostname], "backends": [{ "url": "http://127.0.0.1:9" }] }],
    });
    reqwest::Client::new()
        .put(format!("http://{}/config", agent.config_api_addr()))
        .bearer_auth(API_TOKEN)
        .json(&body)
        .send()
        .await
        .expect("config api answers")
        .status()
        .as_u16()
}

fn read(agent: &Agent, path: &str) -> String {
    std::fs::read_to_string(agent.dir().join(path)).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pushed_table_reaches_a_locally_managed_tunnels_ingress() {
    let (agent, cf) = start().await;
    // Before any push cloudflared runs with the catch-all only.
    cf.wait_starts(1, DEADLINE).await;
    assert!(!read(&agent, "run/cloudflared.yml").contains("push.example.com"));

    assert_eq!(push(&agent, 3, "push.example.com").await, 200);
    let yaml = eventually(DEADLINE, "the pushed hostname in cloudflared.yml", || async {
        let yaml = read(&agent, "run/cloudflared.yml");
        yaml.contains("- hostname: \"push.example.com\"").then_some(yaml)
    })
    .await;
    let origin = format!("service: http://{}", agent.proxy_addr());
    assert_eq!(yaml.matches(&origin).count(), 1, "{yaml}");
    assert!(yaml.trim_end().ends_with("- service: http_status:404"), "{yaml}");
    // cloudflared reads its ingress at start: the new table restarts it.
    let pids = cf.wait_starts(2, DEADLINE).await;
    assert_eq!(cf.sigterms(pids[0]), 1, "{:?}", cf.events());

    // A second push with other hostnames replaces the first.
    assert_eq!(push(&agent, 4, "other.example.com").await, 200);
    eventually(DEADLINE, "the second push in cloudflared.yml", || async {
        let yaml = read(&agent, "run/cloudflared.yml");
        (yaml.contains("other.example.com") && !yaml.contains("push.example.com")).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pushed_table_is_written_to_the_runtime_routes_json_and_status() {
    let (agent, _cf) = start().await;
    assert_eq!(push(&agent, 7, "push.example.com").await, 200);
    let routes: serde_json::Value =
        serde_json::from_str(&read(&agent, "run/routes.json")).expect("routes.json is JSON");
    assert_eq!(routes, json!({ "push.example.com": "http://127.0.0.1:9" }));

    let status: serde_json::Value = reqwest::get(agent.health_url("/status"))
        .await
        .expect("health listener answers")
        .json()
        .await
        .expect("status is JSON");
    assert_eq!(status["routes"]["version"], 7, "{status}");
    assert_eq!(status["routes"]["source"], "config-api", "{status}");

    // A stale push changes nothing.
    assert_eq!(push(&agent, 6, "stale.example.com").await, 409);
    assert!(!read(&agent, "run/routes.json").contains("stale.example.com"));
}
