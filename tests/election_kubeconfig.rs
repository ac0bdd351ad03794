//! The Lease election over HTTPS and from a kubeconfig (`role_election.kubeconfig`): the fake
//! API server (`common::kube_api`) serves TLS with a CA made for the run (`common::pki`), and
//! the agent trusts it through `ca_file` or a kubeconfig's `certificate-authority[-data]`; a
//! server whose certificate does not chain to that CA is never trusted, so never elects. A
//! kubeconfig's `tokenFile` is read again when it rotates; its client certificate authenticates
//! alone. `check` reads the kubeconfig as start-up does.

mod common;

use base64::Engine as _;
use common::kube_api::{FakeKubeApi, Tls};
use common::pki::{self, Pki};
use common::sampler::Sampler;
use common::{eventually, Agent, AgentBuilder, ConfigText, FakeCloudflared, FakeUpstream, Wire, DEADLINE};

const TUNNEL_TOKEN: &str = "eyJhIjoiZmFrZS1hY2NvdW50IiwidCI6ImZha2UtdHVubmVsIn0";
/// The bearer token the fake API server accepts. It must never reach a log line.
const SA_TOKEN: &str = "kc-token-3b9d0c2e71";
const NAMESPACE: &str = "tunnel";
const LEASE: &str = "pair-1";

struct Node {
    agent: Agent,
    /// Kept for the agent's lifetime: its script is the agent's cloudflared.
    _cf: FakeCloudflared,
}

/// A node named `name` whose `[role_election]` ends with `lines` (`{dir}` stands for the
/// agent's directory), with `files` written there first.
async fn node(name: &str, up: &FakeUpstream, files: &[(&str, String)], lines: &str) -> Node {
    let builder = AgentBuilder::new();
    let cf = FakeCloudflared::new(builder.dir());
    cf.set("drain_ms", "100");
    for (file, text) in files {
        builder.file(file, text);
    }
    let lines = lines.replace("{dir}", &builder.dir().display().to_string());
    let config = ConfigText::new()
        .top("role = \"active\"")
        .env_secret("tunnel_token", "TA_TUNNEL_TOKEN")
        .host("app.test", &up.url())
        .raw(&cf.section(&["grace_period = \"10s\"", "stop_margin = \"2s\""]))
        .raw(&format!(
            "[role_election]\nbackend = \"kubernetes\"\nnamespace = \"{NAMESPACE}\"\nname = \"{LEASE}\"\nttl = \"3s\"\nfence_margin = \"500ms\"\npoll_interval = \"100ms\"\nhost_name = \"{name}\"\n{lines}\n"
        ));
    let agent = builder.env("TA_TUNNEL_TOKEN", TUNNEL_TOKEN).start(&config).await;
    Node { agent, _cf: cf }
}

impl Node {
    async fn status(&self) -> serde_json::Value {
        common::client::get(self.agent.health_addr(), "localhost", "/status", &[])
            .await
            .json()
    }
}

/// A kubeconfig whose current context uses cluster `cluster` (YAML lines under `cluster:`) and
/// user `user` (lines under `user:`).
fn kubeconfig(cluster: &str, user: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: agent\nclusters:\n- name: test\n  cluster:\n{cluster}\ncontexts:\n- name: agent\n  context:\n    cluster: test\n    user: agent\nusers:\n- name: agent\n  user:\n{user}\n"
    )
}

fn base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn server_tls(pki: &Pki, client_ca: bool) -> Tls {
    Tls {
        cert_pem: pki.read("server.pem"),
        key_pem: pki.read("server.key"),
        client_ca_pem: client_ca.then(|| pki.read("ca.pem")),
    }
}

/// Waits until node `i` alone reports itself the elected leader.
async fn leader_is(nodes: &[Node], i: usize) {
    eventually(DEADLINE, &format!("node {i} elected"), || async {
        let mut leaders = Vec::new();
        for n in nodes {
            let s = n.status().await;
            leaders.push(s["role"] == "active" && s["election"]["is_leader"] == true);
        }
        leaders.iter().enumerate().all(|(j, l)| *l == (j == i)).then_some(())
    })
    .await
}

fn no_secret_in_logs(nodes: &[Node], secrets: &[&str]) {
    for n in nodes {
        let logs = n.agent.logs().join("\n");
        for s in secrets {
            assert!(!logs.contains(s), "a secret in the logs:\n{logs}");
        }
    }
}

/// One node trusts the API server through `ca_file`, the other through its kubeconfig's
/// `certificate-authority-data` (with the kubeconfig's `token`): both reach it over HTTPS, one
/// is elected, and after `demote` the other is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_is_trusted_through_ca_file_and_kubeconfig_ca_data() {
    if !pki::available("https_is_trusted_through_ca_file_and_kubeconfig_ca_data") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "cluster-ca");
    let api = FakeKubeApi::start_tls(SA_TOKEN, &server_tls(&pki, false)).await;
    assert!(api.url().starts_with("https://127.0.0.1:"));
    let up = FakeUpstream::start(Wire::Http1).await;
    let ca = pki.path_str("ca.pem");
    let a = node(
        "node-a",
        &up,
        &[("sa-token", SA_TOKEN.to_owned())],
        &format!(
            "api_url = \"{}\"\ntoken_file = \"{{dir}}/sa-token\"\nca_file = {ca:?}",
            api.url()
        ),
    )
    .await;
    let cluster = format!(
        "    server: {}\n    certificate-authority-data: {}",
        api.url(),
        base64(&pki.read("ca.pem"))
    );
    let config = kubeconfig(&cluster, &format!("    token: {SA_TOKEN}"));
    let b = node(
        "node-b",
        &up,
        &[("kubeconfig", config)],
        "kubeconfig = \"{dir}/kubeconfig\"",
    )
    .await;
    let nodes = [a, b];
    let sampler = Sampler::start(nodes.iter().map(|n| n.agent.health_addr()).collect());
    let first = eventually(DEADLINE, "one node elected", || async {
        for (i, n) in nodes.iter().enumerate() {
            if n.status().await["election"]["is_leader"] == true {
                return Some(i);
            }
        }
        None
    })
    .await;
    let run = nodes[first].agent.control("demote").await;
    assert!(run.ok(), "{run:?}");
    leader_is(&nodes, 1 - first).await;
    let (_, overlaps) = sampler.finish().await;
    assert!(overlaps.is_empty(), "two actives at once: {overlaps:?}");
    assert_eq!(api.answered(401), 0);
    no_secret_in_logs(&nodes, &[SA_TOKEN]);
}

/// The API server's certificate chains to another CA than the one the node was given (through
/// `ca_file`, or a kubeconfig's `certificate-authority`): no request gets through, the node
/// says why (an unknown issuer), stays standby and never answers `/active` 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_from_another_ca_is_refused() {
    if !pki::available("a_server_certificate_from_another_ca_is_refused") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "cluster-ca");
    let wrong = Pki::new(dir.path(), "other-ca");
    let api = FakeKubeApi::start_tls(SA_TOKEN, &server_tls(&pki, false)).await;
    let up = FakeUpstream::start(Wire::Http1).await;
    let wrong_ca = String::from_utf8(wrong.read("ca.pem")).expect("PEM");
    let a = node(
        "node-a",
        &up,
        &[("sa-token", SA_TOKEN.to_owned()), ("ca.pem", wrong_ca.clone())],
        &format!(
            "api_url = \"{}\"\ntoken_file = \"{{dir}}/sa-token\"\nca_file = \"{{dir}}/ca.pem\"",
            api.url()
        ),
    )
    .await;
    let cluster = format!("    server: {}\n    certificate-authority: ca.pem", api.url());
    let files = [
        ("kubeconfig", kubeconfig(&cluster, &format!("    token: {SA_TOKEN}"))),
        ("ca.pem", wrong_ca),
    ];
    let b = node("node-b", &up, &files, "kubeconfig = \"{dir}/kubeconfig\"").await;
    let nodes = [a, b];
    let sampler = Sampler::start(nodes.iter().map(|n| n.agent.health_addr()).collect());
    for n in &nodes {
        let s = eventually(DEADLINE, "the election to report the server untrusted", || async {
            let s = n.status().await;
            (s["election"]["state"] == "unreachable").then_some(s)
        })
        .await;
        assert_eq!(s["role"], "standby", "{s}");
        let error = s["election"]["last_error"].as_str().unwrap_or("");
        assert!(
            error.contains("certificate is not trusted") && error.contains("UnknownIssuer"),
            "{s}"
        );
    }
    // Several campaigns later (each a handshake the client breaks off), still nothing got
    // through.
    let tries = api.failed_handshakes() + 10;
    eventually(DEADLINE, "ten more refused handshakes", || async {
        (api.failed_handshakes() >= tries).then_some(())
    })
    .await;
    assert_eq!(api.answered(200) + api.answered(201) + api.answered(404), 0);
    let timeline = sampler.timeline.clone();
    sampler.finish().await;
    let ever_active = timeline.lock().unwrap().iter().any(|(_, v)| v.iter().any(|a| *a));
    assert!(!ever_active, "a node trusting another CA went active");
    assert!(api.lease(NAMESPACE, LEASE).is_none());
    no_secret_in_logs(&nodes, &[SA_TOKEN]);
}

/// A kubeconfig's `tokenFile` (relative to the kubeconfig) holding a token the server refuses:
/// 401, said once, standby. Once the file holds a good one (rotated), the next request reads it
/// and the node is elected, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubeconfig_token_file_is_read_again_when_rotated() {
    let api = FakeKubeApi::start(SA_TOKEN).await;
    let up = FakeUpstream::start(Wire::Http1).await;
    let config = kubeconfig(&format!("    server: {}", api.url()), "    tokenFile: token");
    let files = [("kubeconfig", config), ("token", "kc-token-old-0000\n".to_owned())];
    let nodes = [node("node-a", &up, &files, "kubeconfig = \"{dir}/kubeconfig\"").await];
    let line = nodes[0]
        .agent
        .wait_for_log(&["refused the credentials", "HTTP 401", "tokenFile"], DEADLINE)
        .await;
    assert!(!line.contains("kc-token-old"), "{line}");
    assert_eq!(nodes[0].status().await["role"], "standby");
    nodes[0].agent.write_file("token", &format!("{SA_TOKEN}\n"));
    leader_is(&nodes, 0).await;
    no_secret_in_logs(&nodes, &[SA_TOKEN, "kc-token-old"]);
}

/// A kubeconfig user with a client certificate and key (one a path, one inline) and no token:
/// the API server authenticates the certificate and the node is elected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubeconfig_client_certificate_authenticates_alone() {
    if !pki::available("a_kubeconfig_client_certificate_authenticates_alone") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "cluster-ca");
    let api = FakeKubeApi::start_tls("a-token-nobody-has", &server_tls(&pki, true)).await;
    let up = FakeUpstream::start(Wire::Http1).await;
    let cluster = format!(
        "    server: {}\n    certificate-authority: {}",
        api.url(),
        pki.path("ca.pem").display()
    );
    let user = format!(
        "    client-certificate: client.pem\n    client-key-data: {}",
        base64(&pki.read("client.key"))
    );
    let files = [
        ("kubeconfig", kubeconfig(&cluster, &user)),
        ("client.pem", String::from_utf8(pki.read("client.pem")).expect("PEM")),
    ];
    let nodes = [node("node-a", &up, &files, "kubeconfig = \"{dir}/kubeconfig\"").await];
    leader_is(&nodes, 0).await;
    assert_eq!(api.answered(401), 0);
    let key = String::from_utf8(pki.read("client.key")).expect("PEM");
    let key_body = key.lines().nth(1).expect("a key line");
    no_secret_in_logs(&nodes, &[key_body]);
}

/// `check` reads the kubeconfig and what it names, as start-up does: a usable one passes; a
/// plugin, a missing file, a CA or key that is not PEM or a conflicting key fails, naming the config
/// file, the key, the kubeconfig and its field, and never printing the token.
#[test]
fn check_reads_the_kubeconfig_as_start_up_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.toml");
    let kube = dir.path().join("kubeconfig");
    let check = |extra: &str, kubeconfig: &str| {
        std::fs::write(&kube, kubeconfig).expect("write kubeconfig");
        let text = format!("[role_election]\nbackend = \"kubernetes\"\nnamespace = \"tunnel\"\nname = \"pair-1\"\nttl = \"4s\"\nfence_margin = \"1s\"\n{extra}\n");
        std::fs::write(&path, text).expect("write config");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tunnel-agent"))
            .args(["check", "-c"])
            .arg(&path)
            .output()
            .expect("run check");
        let text = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
        assert!(!text.contains(SA_TOKEN), "{text}");
        (out.status.code(), text)
    };
    let uses = format!("kubeconfig = {:?}", kube.display().to_string());
    let server = "    server: https://127.0.0.1:6443";
    let token = format!("    token: {SA_TOKEN}");
    let (code, out) = check(&uses, &kubeconfig(server, &token));
    assert_eq!(code, Some(0), "{out}");
    let exec = format!("{token}\n    exec:\n      command: aws");
    let (code, out) = check(&uses, &kubeconfig(server, &exec));
    assert_eq!(code, Some(78), "{out}");
    let at = format!(
        "{}: role_election.kubeconfig: {}: users[0].user.exec: refused",
        path.display(),
        kube.display()
    );
    assert!(out.contains(&at), "{out}");
    let bad_key = format!(
        "    client-certificate-data: {}\n    client-key-data: {}",
        base64(b"x"),
        base64(b"y")
    );
    let (code, out) = check(&uses, &kubeconfig(server, &bad_key));
    assert_eq!(code, Some(78), "{out}");
    assert!(
        out.contains("role_election.kubeconfig") && out.contains("client certificate/key"),
        "{out}"
    );
    let not_pem = format!("{server}\n    certificate-authority-data: {}", base64(b"not a PEM"));
    let (code, out) = check(&uses, &kubeconfig(&not_pem, &token));
    assert_eq!(code, Some(78), "{out}");
    assert!(out.contains("CA bundle: holds no PEM certificate"), "{out}");
    let (code, out) = check(&format!("{uses}\ncontext = \"elsewhere\""), &kubeconfig(server, &token));
    assert_eq!(code, Some(78), "{out}");
    assert!(out.contains("contexts: no context named \"elsewhere\""), "{out}");
    let (code, out) = check(
        &format!("{uses}\napi_url = \"https://10.0.0.1\""),
        &kubeconfig(server, &token),
    );
    assert_eq!(code, Some(78), "{out}");
    assert!(out.contains("role_election.api_url: not with kubeconfig"), "{out}");
    std::fs::remove_file(&kube).expect("remove");
    let missing = format!("kubeconfig = \"{}/absent\"", dir.path().display());
    let (code, out) = check(&missing, "");
    assert_eq!(code, Some(78), "{out}");
    assert!(out.contains("absent: (file): cannot read"), "{out}");
    let (code, out) = check("context = \"agent\"", "");
    assert_eq!(code, Some(78), "{out}");
    assert!(out.contains("role_election.context: only with kubeconfig"), "{out}");
}
