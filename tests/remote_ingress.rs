//! cloudflared's *remote* ingress (written at Cloudflare, e.g. by the gateway controller, which
//! points each hostname at its backend Service): with `cloudflared.remote_ingress = "via-proxy"`
//! (the default) its `http://` services are reached through the proxy and its table; what goes
//! around the proxy anyway is reported in the log, `/status` and `/metrics`. Against
//! `tests/fakes/cloudflared`, which applies a pushed configuration and sends visitors' requests
//! the way cloudflared's Go HTTP client does (`HTTP_PROXY`/`HTTPS_PROXY`, loopback exempt).

mod common;

use std::time::Duration;

use common::upstream::{Echo, FakeUpstream, Wire};
use common::{eventually, Agent, AgentBuilder, ConfigText, FakeCloudflared, DEADLINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "eyJhIjoiZmFrZS10dW5uZWwtdG9rZW4tZG8tbm90LWxlYWsifQ";

/// The controller's shape: every hostname to its Service's in-cluster name (which does not
/// resolve here: a request only arrives if the proxy routed it), an `https` Service, a rule
/// straight to a loopback service, and the catch-all.
fn remote_config(direct: &FakeUpstream) -> String {
    serde_json::json!({
        "version": 7,
        "ingress": [
            {"hostname": "app.example.com", "service": "http://app.default.svc.cluster.invalid:80"},
            {"hostname": "tls.example.com", "service": "https://tls.default.svc.cluster.invalid:443"},
            {"hostname": "direct.example.com", "service": direct.url()},
            {"service": "http_status:404"}
        ]
    })
    .to_string()
}

async fn start(extra: &[&str], upstream: &FakeUpstream, direct: &FakeUpstream) -> (Agent, FakeCloudflared) {
    let builder = AgentBuilder::new();
    let cf = FakeCloudflared::new(builder.dir());
    cf.set("remote_config", &remote_config(direct));
    let config = ConfigText::new()
        .env_secret("tunnel_token", "TUNNEL_TOKEN_FOR_TEST")
        .host("app.example.com", &upstream.url())
        .host("direct.example.com", &upstream.url())
        .raw(&cf.section(extra));
    let agent = builder.env("TUNNEL_TOKEN_FOR_TEST", TOKEN).start(&config).await;
    (agent, cf)
}

/// `/status`'s `cloudflared.remote_ingress`, once it shows the pushed version 7.
async fn audit_of(agent: &Agent) -> serde_json::Value {
    eventually(DEADLINE, "/status shows cloudflared's pushed ingress", || async {
        let status: serde_json::Value = reqwest::get(agent.health_url("/status"))
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let audit = status["cloudflared"]["remote_ingress"].clone();
        (audit["version"] == 7).then_some(audit)
    })
    .await
}

/// A visitor's request for `host`, as the edge hands it to the fake cloudflared.
async fn visit(cf: &FakeCloudflared, host: &str, path: &str) -> reqwest::Response {
    let port = eventually(DEADLINE, "the fake's visitor port", || async {
        std::fs::read_to_string(cf.dir().join("visitor_port"))
            .ok()?
            .trim()
            .parse::<u16>()
            .ok()
    })
    .await;
    reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}{path}"))
        .header("host", host)
        .timeout(DEADLINE)
        .send()
        .await
        .expect("the fake answers its visitors")
}

async fn metric(agent: &Agent, name: &str) -> Option<String> {
    let text = reqwest::get(agent.health_url("/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|v| v.strip_prefix(' '))
            .map(str::to_owned)
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_remote_ingress_to_cluster_services_is_served_by_the_proxys_table() {
    let upstream = FakeUpstream::start(Wire::Http1).await;
    let direct = FakeUpstream::start(Wire::Http1).await;
    let (agent, cf) = start(&[], &upstream, &direct).await;
    let pid = cf.wait_starts(1, DEADLINE).await[0];
    let env = cf.env_of(Some(pid));
    let proxy = format!("http://{}", agent.proxy_addr());
    assert_eq!(env.get("HTTP_PROXY"), Some(&proxy), "{env:?}");
    assert_eq!(env.get("HTTPS_PROXY"), Some(&proxy), "{env:?}");
    assert!(
        !env.contains_key("NO_PROXY") && !env.contains_key("no_proxy"),
        "{env:?}"
    );
    let audit = audit_of(&agent).await;

    // The Service's name never resolves: the answer comes from the table's upstream.
    let resp = visit(&cf, "app.example.com", "/orders?id=1").await;
    assert_eq!(resp.status().as_u16(), 200, "{:?}", resp.headers());
    let echo: Echo = resp.json().await.expect("the upstream's echo");
    assert_eq!(echo.uri, "/orders?id=1", "{echo:?}");
    assert!(echo.has("x-forwarded-for"), "went through the proxy: {echo:?}");
    assert_eq!(upstream.requests(), 1);

    // An https Service arrives as CONNECT: refused, never tunnelled anywhere.
    let resp = visit(&cf, "tls.example.com", "/").await;
    assert_eq!(resp.status().as_u16(), 502, "{:?}", resp.headers());
    let why = resp
        .headers()
        .get("x-fake-cloudflared-error")
        .map(|v| v.to_str().unwrap_or("").to_owned());
    assert!(why.as_deref().is_some_and(|w| w.contains("405")), "{why:?}");

    // A loopback service is dialled directly whatever the variables say: it goes around the
    // proxy (the direct upstream sees the request), and is reported.
    let resp = visit(&cf, "direct.example.com", "/").await;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!((direct.requests(), upstream.requests()), (1, 1));
    assert_eq!(audit["rules"], 4, "{audit}");
    assert_eq!(audit["via_proxy"], 1, "{audit}");
    assert_eq!(audit["bypassing"], 2, "{audit}");
    let reported: Vec<_> = audit["bypass"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["hostname"].as_str().unwrap().to_owned(),
                b["service"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        reported,
        [
            (
                "tls.example.com".to_owned(),
                "https://tls.default.svc.cluster.invalid:443".to_owned()
            ),
            ("direct.example.com".to_owned(), direct.url()),
        ]
    );
    assert_eq!(
        metric(&agent, "tunnel_agent_cloudflared_ingress_bypass_rules")
            .await
            .as_deref(),
        Some("2")
    );
    let line = agent
        .wait_for_log(
            &[
                "version 7",
                "2 rule(s) whose requests do not reach the proxy",
                "direct.example.com",
            ],
            DEADLINE,
        )
        .await;
    assert!(line.contains("tls.example.com -> https://"), "{line}");
    // Said once per configuration version, not at every poll (100 ms here).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let said = agent
        .logs()
        .iter()
        .filter(|l| l.contains("do not reach the proxy"))
        .count();
    assert_eq!(said, 1, "{:?}", agent.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn remote_ingress_direct_leaves_cloudflared_to_dial_and_reports_every_rule() {
    let upstream = FakeUpstream::start(Wire::Http1).await;
    let direct = FakeUpstream::start(Wire::Http1).await;
    let (agent, cf) = start(&["remote_ingress = \"direct\""], &upstream, &direct).await;
    let pid = cf.wait_starts(1, DEADLINE).await[0];
    let env = cf.env_of(Some(pid));
    assert!(
        !env.contains_key("HTTP_PROXY") && !env.contains_key("HTTPS_PROXY"),
        "{env:?}"
    );
    let audit = audit_of(&agent).await;
    assert_eq!(
        (audit["via_proxy"].as_u64(), audit["bypassing"].as_u64()),
        (Some(0), Some(3)),
        "{audit}"
    );
    // cloudflared tries the Service's name itself, and the proxy never sees the request.
    let resp = visit(&cf, "app.example.com", "/").await;
    assert_eq!(resp.status().as_u16(), 502);
    assert_eq!(upstream.requests(), 0);
    agent
        .wait_for_log(
            &["3 rule(s) whose requests do not reach the proxy", "\"direct\""],
            DEADLINE,
        )
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_is_refused_even_with_a_catch_all_route() {
    let upstream = FakeUpstream::start(Wire::Http1).await;
    let builder = AgentBuilder::new();
    let catch_all = format!("[[route]]\nname = \"all\"\nupstream = \"{}\"\n", upstream.url());
    let agent = builder.start(&ConfigText::new().raw(&catch_all)).await;
    let mut conn = tokio::net::TcpStream::connect(agent.proxy_addr()).await.unwrap();
    conn.write_all(b"CONNECT internal.example:443 HTTP/1.1\r\nHost: internal.example:443\r\n\r\n")
        .await
        .unwrap();
    let mut head = vec![0u8; 1024];
    let n = tokio::time::timeout(DEADLINE, conn.read(&mut head))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&head[..n]);
    assert!(head.starts_with("HTTP/1.1 405 "), "{head}");
    assert!(head.contains("connect_refused"), "{head}");
    assert_eq!(
        upstream.requests() + upstream.connections(),
        0,
        "nothing reached the upstream"
    );
}
