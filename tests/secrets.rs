//! Secrets from Secret Manager (through the fake metadata server's access token and the fake
//! Secret Manager REST API), boot retries and refusals, rotation with overlap, and local secrets
//! from `$CREDENTIALS_DIRECTORY`.

mod common;

use std::time::Duration;

use common::secret_manager::Checksum;
use common::{
    client, eventually, Agent, AgentBuilder, ConfigText, FakeMetadata, FakeSecretManager, FakeUpstream, NotifySocket,
    Wire, DEADLINE,
};

const RESOURCE: &str = "projects/test-project/secrets/internal-token/versions/latest";
const TOKEN_V1: &str = "internal-token-v1-do-not-log";
const TOKEN_V2: &str = "internal-token-v2-do-not-log";

struct Cloud {
    metadata: FakeMetadata,
    sm: FakeSecretManager,
    upstream: FakeUpstream,
}

async fn cloud() -> Cloud {
    let metadata = FakeMetadata::start().await;
    let sm = FakeSecretManager::start(&metadata.access_token()).await;
    sm.set(RESOURCE, format!("{TOKEN_V1}\n").as_bytes());
    let upstream = FakeUpstream::start(Wire::Http1).await;
    Cloud { metadata, sm, upstream }
}

fn config(c: &Cloud, secret: &str) -> ConfigText {
    ConfigText::new()
        .agent("boot_timeout = \"20s\"")
        .gcp(&format!("metadata_url = {:?}", c.metadata.url()))
        .gcp(&format!("secret_manager_endpoint = {:?}", c.sm.url()))
        .proxy("auth_secret = \"internal_token\"")
        .host("app.example.com", &c.upstream.url())
        .raw(&format!(
            "[secrets.internal_token]\nsource = \"gcp-secret-manager\"\nname = \"{RESOURCE}\"\n{secret}"
        ))
}

async fn status_with(agent: &Agent, token: &str) -> u16 {
    client::get(
        agent.proxy_addr(),
        "app.example.com",
        "/",
        &[("x-internal-auth-token", token)],
    )
    .await
    .status
    .as_u16()
}

fn assert_never_logged(logs: &[String]) {
    for l in logs {
        assert!(!l.contains(TOKEN_V1) && !l.contains(TOKEN_V2), "secret in log: {l}");
        assert!(!l.contains("ya29.fake-access-token"), "access token in log: {l}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn internal_token_comes_from_secret_manager() {
    let c = cloud().await;
    let agent = AgentBuilder::new().start(&config(&c, "")).await;
    assert_eq!(
        status_with(&agent, TOKEN_V1).await,
        200,
        "trailing newline trimmed, value accepted"
    );
    assert_eq!(status_with(&agent, "wrong").await, 401);
    assert_eq!(c.sm.requests(RESOURCE), 1);
    assert_eq!(
        c.sm.unauthenticated(),
        0,
        "the metadata server's access token is sent as Bearer"
    );
    assert_eq!(c.metadata.token_requests(), 1);
    let status = reqwest::get(agent.health_url("/status"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        status.contains("internal_token") && !status.contains(TOKEN_V1),
        "{status}"
    );
    assert_never_logged(&agent.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn regional_secret_names_are_accessed_under_their_location() {
    let c = cloud().await;
    let regional = "projects/test-project/locations/europe-west1/secrets/internal-token/versions/3";
    c.sm.set(regional, b"regional-value");
    let cfg = config(&c, "").raw("").to_owned();
    let text = cfg.render(std::path::Path::new("/unused")).replace(RESOURCE, regional);
    assert!(text.contains(regional));
    let agent = {
        let builder = AgentBuilder::new();
        let text = cfg.render(builder.dir()).replace(RESOURCE, regional);
        let mut a = builder.spawn(&text);
        a.wait_ready().await;
        a
    };
    assert_eq!(status_with(&agent, "regional-value").await, 200);
    assert_eq!(c.sm.requests(regional), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn transient_errors_are_retried_until_the_secret_arrives() {
    let c = cloud().await;
    c.sm.queue_faults(&[503, 503, 429, 500]);
    let builder = AgentBuilder::new();
    let notify = NotifySocket::bind(builder.dir());
    let agent = builder
        .env("NOTIFY_SOCKET", &notify.path.display().to_string())
        .start(&config(&c, ""))
        .await;
    // While waiting, systemd hears which secret and why, and gets more time.
    let lines = notify.lines();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("STATUS=waiting for secret \"internal_token\"") && l.contains("503")),
        "{lines:#?}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("EXTEND_TIMEOUT_USEC=")),
        "{lines:#?}"
    );
    assert_eq!(status_with(&agent, TOKEN_V1).await, 200);
    assert_eq!(c.sm.requests(RESOURCE), 5, "four failures, then success");
    assert!(
        agent
            .logs()
            .iter()
            .any(|l| l.contains("secret not available yet") && l.contains("503")),
        "{:#?}",
        agent.logs()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn permission_denied_is_reported_at_once_with_googles_message() {
    let c = cloud().await;
    c.sm.forbid(RESOURCE);
    let builder = AgentBuilder::new();
    let text = config(&c, "").render(builder.dir());
    let t = tokio::time::Instant::now();
    let mut agent = builder.spawn(&text);
    let status = agent.wait_exit(DEADLINE).await;
    assert!(!status.success());
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "a 403 must not wait out boot_timeout: {:?}",
        t.elapsed()
    );
    assert_eq!(c.sm.requests(RESOURCE), 1, "no retries for 403");
    let logs = agent.logs().join("\n");
    assert!(logs.contains("secret \"internal_token\""), "{logs}");
    assert!(
        logs.contains("Permission 'secretmanager.versions.access' denied"),
        "{logs}"
    );
    assert!(logs.contains("PERMISSION_DENIED"), "{logs}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_checksum_mismatch_is_refused() {
    let c = cloud().await;
    c.sm.set_checksum(Checksum::Wrong);
    let builder = AgentBuilder::new();
    let text = config(&c, "").render(builder.dir());
    let mut agent = builder.spawn(&text);
    assert!(!agent.wait_exit(DEADLINE).await.success());
    let logs = agent.logs();
    assert!(
        logs.iter()
            .any(|l| l.contains("checksum mismatch") && l.contains("internal_token")),
        "{logs:#?}"
    );
    assert_never_logged(&logs);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_absent_checksum_is_accepted() {
    let c = cloud().await;
    c.sm.set_checksum(Checksum::Absent);
    let agent = AgentBuilder::new().start(&config(&c, "")).await;
    assert_eq!(status_with(&agent, TOKEN_V1).await, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn boot_gives_up_after_boot_timeout_naming_the_secret() {
    let c = cloud().await;
    c.sm.queue_faults(&[503; 200]);
    let builder = AgentBuilder::new();
    let text = config(&c, "").agent("boot_timeout = \"2s\"").render(builder.dir());
    let mut agent = builder.spawn(&text);
    assert!(!agent.wait_exit(DEADLINE).await.success());
    let logs = agent.logs().join("\n");
    assert!(
        logs.contains("secret \"internal_token\"") && logs.contains("503"),
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rotation_accepts_the_new_token_at_once_and_the_old_one_during_the_overlap() {
    let c = cloud().await;
    let cfg = config(&c, "refresh = \"1s\"\n").proxy("auth_overlap = \"3s\"");
    let agent = AgentBuilder::new().start(&cfg).await;
    assert_eq!(status_with(&agent, TOKEN_V1).await, 200);

    // A client that keeps sending v1 until v2 works, then sends v2: never a 401.
    c.sm.set(RESOURCE, TOKEN_V2.as_bytes());
    let mut sent = 0;
    let rotated_at = loop {
        assert_eq!(
            status_with(&agent, TOKEN_V1).await,
            200,
            "v1 refused before v2 was accepted"
        );
        sent += 1;
        if status_with(&agent, TOKEN_V2).await == 200 {
            break tokio::time::Instant::now();
        }
        assert!(sent < 10_000, "v2 never accepted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // During the overlap both work; after it only v2.
    assert_eq!(
        status_with(&agent, TOKEN_V1).await,
        200,
        "v1 still accepted during the overlap"
    );
    eventually(DEADLINE, "v1 refused after the overlap", || async {
        (status_with(&agent, TOKEN_V1).await == 401).then_some(())
    })
    .await;
    assert!(
        rotated_at.elapsed() >= Duration::from_millis(2500),
        "overlap ended early: {:?}",
        rotated_at.elapsed()
    );
    assert_eq!(status_with(&agent, TOKEN_V2).await, 200);
    assert!(agent.logs().iter().any(|l| l.contains("secret changed")));
    assert_never_logged(&agent.logs());
    // Periodic refreshes are counted like the boot fetch.
    let metrics = reqwest::get(agent.health_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let fetches: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tunnel_agent_secret_fetches_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("secret fetch counter exported");
    assert!(
        fetches >= 3,
        "boot fetch + at least two refreshes counted, got {fetches}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn file_secrets_are_read_from_the_credentials_directory() {
    let upstream = FakeUpstream::start(Wire::Http1).await;
    let builder = AgentBuilder::new();
    let creds = builder.dir().join("creds");
    std::fs::create_dir_all(&creds).unwrap();
    std::fs::write(creds.join("internal-token"), "from-load-credential\n").unwrap();
    let cfg = ConfigText::new()
        .proxy("auth_secret = \"internal_token\"")
        .host("app.example.com", &upstream.url())
        .raw("[secrets.internal_token]\nsource = \"file\"\npath = \"internal-token\"\n");
    let agent = builder
        .env("CREDENTIALS_DIRECTORY", &creds.display().to_string())
        .start(&cfg)
        .await;
    assert_eq!(status_with(&agent, "from-load-credential").await, 200);
}
