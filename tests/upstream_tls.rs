//! Upstream TLS against a real local TLS server with a throwaway CA made by the openssl CLI
//! for each run: CA bundles (global and per backend), SNI, DNS and URI SAN lists, ALPN h2, and
//! client certificates for mTLS.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use bytes::Bytes;
use common::agent::toml_str;
use common::client::get;
use common::pki::{self, Pki};
use common::{AgentBuilder, ConfigText};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;

/// The URI SAN (a SPIFFE ID) of the `workload` certificate.
const WORKLOAD_ID: &str = "spiffe://cluster.local/ns/shop/sa/api";

/// A CA, a server certificate for `secure.internal` and 127.0.0.1, a `workload` server
/// certificate for [`WORKLOAD_ID`] and `api.shop.internal`, and a client certificate.
fn test_pki(dir: &Path) -> Pki {
    let workload =
        format!("subjectAltName=URI:{WORKLOAD_ID},DNS:api.shop.internal\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE");
    Pki::with_leaves(
        dir,
        "pki",
        &[
            (
                "server",
                "subjectAltName=DNS:secure.internal,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE",
            ),
            ("workload", &workload),
            ("client", pki::CLIENT),
        ],
    )
}

/// A TLS upstream with the `server` certificate answering `sni=…;alpn=…;client_cert=…;host=…`.
async fn tls_upstream(pki: &Pki, require_client_cert: bool) -> SocketAddr {
    tls_upstream_with(pki, "server", require_client_cert).await
}

/// The same with the certificate `cert` (`server` or `workload`).
async fn tls_upstream_with(pki: &Pki, cert: &str, require_client_cert: bool) -> SocketAddr {
    tls_upstream_seen(pki, cert, require_client_cert).await.0
}

/// What a TLS upstream answered, one `…;host=…;path=…` line per request.
type Seen = Arc<std::sync::Mutex<Vec<String>>>;

/// The same, also recording every request it answered.
async fn tls_upstream_seen(pki: &Pki, cert: &str, require_client_cert: bool) -> (SocketAddr, Seen) {
    let seen = Seen::default();
    let seen_by_server = seen.clone();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pki.read(&format!("{cert}.pem")))
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(&pki.read(&format!("{cert}.key"))).unwrap();
    let builder = rustls::ServerConfig::builder();
    let builder = if require_client_cert {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&pki.read("ca.pem")) {
            roots.add(c.unwrap()).unwrap();
        }
        builder.with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                .build()
                .unwrap(),
        )
    } else {
        builder.with_no_client_auth()
    };
    let mut config = builder.with_single_cert(certs, key).unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let seen = seen_by_server.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let (_, conn) = tls.get_ref();
                let described = format!(
                    "sni={};alpn={};client_cert={}",
                    conn.server_name().unwrap_or("-"),
                    conn.alpn_protocol()
                        .map_or("-".into(), |p| String::from_utf8_lossy(p).into_owned()),
                    conn.peer_certificates().is_some_and(|c| !c.is_empty()),
                );
                let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let seen = seen.clone();
                    // HTTP/1.1 names the host in `Host`, HTTP/2 in `:authority`; a `host`
                    // header that differs from `:authority` is forbidden (RFC 9113 §8.3.1)
                    // and shown as such.
                    let header = req.headers().get("host").and_then(|h| h.to_str().ok());
                    let authority = req.uri().authority().map(|a| a.as_str());
                    let host = match (header, authority) {
                        (Some(h), Some(a)) if h != a => format!("{h} (but :authority {a})"),
                        (Some(h), _) => h.to_owned(),
                        (None, Some(a)) => a.to_owned(),
                        (None, None) => "-".to_owned(),
                    };
                    let body = format!("{described};host={host}");
                    seen.lock().unwrap().push(format!("{body};path={}", req.uri().path()));
                    async move { Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body)))) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_tls_settings_anchor_name_and_authenticate_the_upstream() {
    let scratch = tempfile::tempdir().unwrap();
    let pki = test_pki(scratch.path());
    let one_way = tls_upstream(&pki, false).await;
    let mutual = tls_upstream(&pki, true).await;
    let ca = toml_str(&pki.path_str("ca.pem"));
    let cert = toml_str(&String::from_utf8(pki.read("client.pem")).unwrap());
    let key = toml_str(&String::from_utf8(pki.read("client.key")).unwrap());
    let config = ConfigText::new().raw(&format!(
        r#"
[[route]]
hostnames = ["trusted.test"]
backends = [{{ url = "https://{one_way}", tls = {{ ca_file = {ca}, server_name = "secure.internal" }} }}]

[[route]]
hostnames = ["default-trust.test"]
upstream = "https://{one_way}"

[[route]]
hostnames = ["san-ok.test"]
backends = [{{ url = "https://{one_way}", tls = {{ ca_file = {ca}, server_name = "wrong.internal", subject_alt_names = ["other.internal", "secure.internal"] }} }}]

[[route]]
hostnames = ["san-bad.test"]
backends = [{{ url = "https://{one_way}", tls = {{ ca_file = {ca}, server_name = "secure.internal", subject_alt_names = ["other.internal"] }} }}]

[[route]]
hostnames = ["mtls.test"]
backends = [{{ url = "https://{mutual}", tls = {{ ca_file = {ca}, server_name = "secure.internal", client_cert_pem = {cert}, client_key_pem = {key} }} }}]

[[route]]
hostnames = ["no-client-cert.test"]
backends = [{{ url = "https://{mutual}", tls = {{ ca_file = {ca}, server_name = "secure.internal" }} }}]
"#
    ));
    let agent = AgentBuilder::new().start(&config).await;
    let addr = agent.proxy_addr();

    let r = get(addr, "trusted.test", "/", &[]).await;
    assert_eq!(r.status.as_u16(), 200, "{}", r.text());
    assert_eq!(
        r.text(),
        "sni=secure.internal;alpn=h2;client_cert=false;host=trusted.test"
    );
    let r = get(addr, "default-trust.test", "/", &[]).await;
    assert_eq!(
        r.status.as_u16(),
        502,
        "a private CA is not in the default trust: {}",
        r.text()
    );
    let r = get(addr, "san-ok.test", "/", &[]).await;
    assert_eq!(
        (r.status.as_u16(), r.text().starts_with("sni=wrong.internal;")),
        (200, true),
        "{}",
        r.text()
    );
    assert_eq!(get(addr, "san-bad.test", "/", &[]).await.status.as_u16(), 502);
    let r = get(addr, "mtls.test", "/", &[]).await;
    assert_eq!(
        (r.status.as_u16(), r.text().contains("client_cert=true")),
        (200, true),
        "{}",
        r.text()
    );
    assert_eq!(get(addr, "no-client-cert.test", "/", &[]).await.status.as_u16(), 502);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_ca_bundle_anchors_every_https_upstream() {
    let scratch = tempfile::tempdir().unwrap();
    let pki = test_pki(scratch.path());
    let up = tls_upstream(&pki, false).await;
    let config = ConfigText::new()
        .proxy(&format!("ca_file = {}", toml_str(&pki.path_str("ca.pem"))))
        .host("map.test", &format!("https://{up}"));
    let agent = AgentBuilder::new().start(&config).await;
    let r = get(agent.proxy_addr(), "map.test", "/", &[]).await;
    assert_eq!(r.status.as_u16(), 200, "{}", r.text());
    // A host map keeps the upstream's own Host; the IP SAN is what was verified.
    assert_eq!(r.text(), format!("sni=-;alpn=h2;client_cert=false;host={up}"));
}

/// A CA certificate that signed nothing the tests serve.
fn unrelated_ca(dir: &Path) -> Vec<u8> {
    let other = dir.join("other");
    pki::make_ca(&other, "other CA");
    std::fs::read(other.join("ca.pem")).unwrap()
}

/// A CA taken out of `proxy.ca_file` is no longer trusted once a reload reports success: the
/// shared pool (and its pooled connections) is rebuilt with the new anchors, not kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_removed_from_the_global_bundle_is_distrusted_after_a_reload() {
    let scratch = tempfile::tempdir().unwrap();
    let pki = test_pki(scratch.path());
    let other_ca = unrelated_ca(scratch.path());
    let bundle = scratch.path().join("bundle.pem");
    std::fs::write(&bundle, [pki.read("ca.pem"), other_ca.clone()].concat()).unwrap();
    let up = tls_upstream(&pki, false).await;
    let config = ConfigText::new()
        .proxy(&format!("ca_file = {}", toml_str(&bundle.display().to_string())))
        .host("map.test", &format!("https://{up}"));
    let agent = AgentBuilder::new().start(&config).await;
    let r = get(agent.proxy_addr(), "map.test", "/", &[]).await;
    assert_eq!(r.status.as_u16(), 200, "{}", r.text());

    std::fs::write(&bundle, other_ca).unwrap();
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    agent.wait_for_log(&["configuration reloaded"], common::DEADLINE).await;
    let r = get(agent.proxy_addr(), "map.test", "/", &[]).await;
    assert_eq!(r.status.as_u16(), 502, "the removed CA is still trusted: {}", r.text());
}

/// The same for a pushed table's backend whose `tls` names no CA (BackendTLSPolicy's
/// `wellKnownCACertificates`): it is anchored by `proxy.ca_file`, and a reload compiles the
/// pushed table in use again under the new anchors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_backend_follows_the_reloaded_global_bundle() {
    let scratch = tempfile::tempdir().unwrap();
    let pki = test_pki(scratch.path());
    let other_ca = unrelated_ca(scratch.path());
    let bundle = scratch.path().join("bundle.pem");
    std::fs::write(&bundle, [pki.read("ca.pem"), other_ca.clone()].concat()).unwrap();
    let up = tls_upstream(&pki, false).await;
    let config = ConfigText::new()
        .proxy(&format!("ca_file = {}", toml_str(&bundle.display().to_string())))
        .env_secret("config_token", "UPSTREAM_TLS_API_TOKEN")
        .routes("source = \"config-api\"")
        .raw("[config_api]\nlisten = \"127.0.0.1:0\"\nauth_secret = \"config_token\"\n");
    let agent = AgentBuilder::new()
        .env("UPSTREAM_TLS_API_TOKEN", "api-token")
        .start(&config)
        .await;
    let table = serde_json::json!({ "version": 1, "rules": [{ "hostnames": ["push.test"],
        "backends": [{ "url": format!("https://{up}"), "tls": { "serverName": "secure.internal" } }] }] });
    let pushed = reqwest::Client::new()
        .put(format!("http://{}/config", agent.config_api_addr()))
        .bearer_auth("api-token")
        .json(&table)
        .send()
        .await
        .unwrap();
    assert_eq!(pushed.status().as_u16(), 200, "{}", pushed.text().await.unwrap());
    let r = get(agent.proxy_addr(), "push.test", "/", &[]).await;
    assert_eq!(r.status.as_u16(), 200, "{}", r.text());

    std::fs::write(&bundle, other_ca).unwrap();
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    agent.wait_for_log(&["configuration reloaded"], common::DEADLINE).await;
    let r = get(agent.proxy_addr(), "push.test", "/", &[]).await;
    assert_eq!(r.status.as_u16(), 502, "the removed CA is still trusted: {}", r.text());
}

/// BackendTLSPolicy's URI SANs (SPIFFE IDs): the leaf must carry one listed URI exactly, or one
/// listed DNS name; `serverName` is then SNI only; the chain is still checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uri_subject_alt_names_authenticate_a_workload_identity() {
    let scratch = tempfile::tempdir().unwrap();
    let pki = test_pki(scratch.path());
    let up = tls_upstream_with(&pki, "workload", false).await;
    let ca = toml_str(&pki.path_str("ca.pem"));
    let tls = |rest: &str| format!("{{ ca_file = {ca}, server_name = \"sni-only.invalid\", {rest} }}");
    let route = |host: &str, tls: &str| {
        format!("[[route]]\nhostnames = [\"{host}\"]\nbackends = [{{ url = \"https://{up}\", tls = {tls} }}]\n\n")
    };
    let other_id = "spiffe://cluster.local/ns/shop/sa/other";
    let config = ConfigText::new().raw(
        &[
            route(
                "uri-ok.test",
                &tls(&format!("subject_alt_name_uris = [\"{other_id}\", \"{WORKLOAD_ID}\"]")),
            ),
            route(
                "uri-bad.test",
                &tls(&format!("subject_alt_name_uris = [\"{other_id}\"]")),
            ),
            // Exact comparison: a prefix of the identity is another identity.
            route(
                "uri-prefix.test",
                &tls("subject_alt_name_uris = [\"spiffe://cluster.local/ns/shop\"]"),
            ),
            route(
                "mix-by-uri.test",
                &tls(&format!(
                    "subject_alt_names = [\"nope.internal\"], subject_alt_name_uris = [\"{WORKLOAD_ID}\"]"
                )),
            ),
            route(
                "mix-by-dns.test",
                &tls(&format!(
                    "subject_alt_names = [\"api.shop.internal\"], subject_alt_name_uris = [\"{other_id}\"]"
                )),
            ),
            // The right identity from a CA nobody configured: the default (webpki) roots refuse it.
            route(
                "uri-untrusted.test",
                &format!("{{ server_name = \"sni-only.invalid\", subject_alt_name_uris = [\"{WORKLOAD_ID}\"] }}"),
            ),
        ]
        .concat(),
    );
    let agent = AgentBuilder::new().start(&config).await;
    let addr = agent.proxy_addr();
    for host in ["uri-ok.test", "mix-by-uri.test", "mix-by-dns.test"] {
        let r = get(addr, host, "/", &[]).await;
        assert_eq!(
            (r.status.as_u16(), r.text().starts_with("sni=sni-only.invalid;")),
            (200, true),
            "{host}: {}",
            r.text()
        );
    }
    for host in ["uri-bad.test", "uri-prefix.test", "uri-untrusted.test"] {
        assert_eq!(get(addr, host, "/", &[]).await.status.as_u16(), 502, "{host}");
    }
    // The 502 says why: what was asked for and what the certificate presents.
    agent
        .wait_for_log(
            &[
                "uri-bad.test",
                &format!("certificate carries none of the subjectAltNames URI:{other_id}"),
                &format!("it presents DNS:api.shop.internal, URI:{WORKLOAD_ID}"),
            ],
            common::DEADLINE,
        )
        .await;
    let untrusted = agent
        .wait_for_log(&["uri-untrusted.test", "answering 502"], common::DEADLINE)
        .await;
    assert!(untrusted.contains("UnknownIssuer"), "{untrusted}");
}

/// The same policy in the controller's JSON (`subjectAltNameUris`, `caBundle` as PEM text),
/// pushed to the config API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_uri_san_policy_is_enforced() {
    const TOKEN: &str = "uri-san-push-token";
    let scratch = tempfile::tempdir().unwrap();
    let pki = test_pki(scratch.path());
    let up = tls_upstream_with(&pki, "workload", false).await;
    let config = ConfigText::new()
        .env_secret("config_token", "URI_SAN_PUSH_TOKEN")
        .routes("source = \"config-api\"")
        .raw("[config_api]\nlisten = \"127.0.0.1:0\"\nauth_secret = \"config_token\"\npersist = false\n");
    let agent = AgentBuilder::new()
        .env("URI_SAN_PUSH_TOKEN", TOKEN)
        .start(&config)
        .await;
    let ca = String::from_utf8(pki.read("ca.pem")).unwrap();
    let rule = |host: &str, uri: &str| {
        serde_json::json!({
            "hostnames": [host],
            "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
            "backends": [{"url": format!("https://{up}"), "weight": 1, "tls": {
                "caBundle": ca, "serverName": "sni-only.invalid",
                "subjectAltNames": null, "subjectAltNameUris": [uri]}}],
        })
    };
    let body = serde_json::json!({"version": 1, "rules": [
        rule("pushed-ok.test", WORKLOAD_ID),
        rule("pushed-bad.test", "spiffe://cluster.local/ns/shop/sa/other"),
    ]});
    let status = reqwest::Client::new()
        .put(format!("http://{}/config", agent.config_api_addr()))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .expect("config api answers")
        .status();
    assert_eq!(status.as_u16(), 200);
    let addr = agent.proxy_addr();
    let r = get(addr, "pushed-ok.test", "/", &[]).await;
    assert_eq!(r.status.as_u16(), 200, "{}", r.text());
    assert_eq!(get(addr, "pushed-bad.test", "/", &[]).await.status.as_u16(), 502);
}

/// `proxy.trust = "system"` anchors upstreams in the operating system's store. The store is
/// read by rustls-native-certs, which takes it from `SSL_CERT_FILE` when that is set: a
/// throwaway CA stands in for /etc/ssl/certs. Without `trust`, the same environment changes
/// nothing (webpki's roots, compiled in).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_system_trust_store_anchors_upstreams_when_chosen() {
    let scratch = tempfile::tempdir().unwrap();
    let pki = test_pki(scratch.path());
    let up = tls_upstream(&pki, false).await;
    let routes = format!(
        r#"
[[route]]
hostnames = ["policy.test"]
backends = [{{ url = "https://{up}", tls = {{ server_name = "secure.internal" }} }}]
"#
    );
    let system = ConfigText::new()
        .proxy("trust = \"system\"")
        .host("map.test", &format!("https://{up}"))
        .raw(&routes);
    let agent = AgentBuilder::new()
        .env("SSL_CERT_FILE", &pki.path_str("ca.pem"))
        .start(&system)
        .await;
    for host in ["map.test", "policy.test"] {
        let r = get(agent.proxy_addr(), host, "/", &[]).await;
        assert_eq!(r.status.as_u16(), 200, "{host}: {}", r.text());
    }
    drop(agent);

    let default = ConfigText::new()
        .host("map.test", &format!("https://{up}"))
        .raw(&routes);
    let agent = AgentBuilder::new()
        .env("SSL_CERT_FILE", &pki.path_str("ca.pem"))
        .start(&default)
        .await;
    for host in ["map.test", "policy.test"] {
        let r = get(agent.proxy_addr(), host, "/", &[]).await;
        assert_eq!(r.status.as_u16(), 502, "{host}: webpki roots do not hold the test CA");
    }
}

/// An empty or unreadable system store, or two choices of trust, is a config error naming
/// `proxy.trust` (here through `check`, which compiles the table as boot and reload do).
#[test]
fn an_unusable_system_store_or_two_trust_choices_are_config_errors() {
    let scratch = tempfile::tempdir().unwrap();
    let empty = scratch.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let check = |toml: &str, cert_file: &Path| {
        let path = scratch.path().join("agent.toml");
        std::fs::write(&path, toml).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_tunnel-agent"))
            .args(["check", "-c"])
            .arg(&path)
            .env_clear()
            .env("SSL_CERT_FILE", cert_file)
            .output()
            .expect("run tunnel-agent check");
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    for cert_file in [empty.clone(), scratch.path().join("absent.pem")] {
        let (code, err) = check("[proxy]\ntrust = \"system\"\n", &cert_file);
        assert_eq!(code, Some(78), "{err}");
        assert!(
            err.contains("proxy.trust: the system trust store holds no usable certificate"),
            "{cert_file:?}: {err}"
        );
    }
    let (code, err) = check("[proxy]\ntrust = \"system\"\nca_file = \"/etc/hostname\"\n", &empty);
    assert_eq!(code, Some(78), "{err}");
    assert!(
        err.contains("proxy.trust: trust = \"system\" and ca_file both choose the trust anchors"),
        "{err}"
    );
    let (code, err) = check("[proxy]\ntrust = \"os\"\n", &empty);
    assert_eq!(code, Some(78), "{err}");
    assert!(
        err.contains("proxy.trust") && err.contains("webpki") && err.contains("system"),
        "{err}"
    );
}

/// A `RequestMirror` with its own `tls` (the controller's BackendTLSPolicy on the mirrored
/// Service): the copy goes out under that CA, SNI and client certificate, through a pool of
/// its own; a mirror whose settings the server refuses gets nothing, and the real request is
/// unaffected either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_with_its_own_tls_settings_reaches_an_mtls_only_backend() {
    let scratch = tempfile::tempdir().unwrap();
    let pki = test_pki(scratch.path());
    let primary = tls_upstream(&pki, false).await;
    let (mirror, mirrored) = tls_upstream_seen(&pki, "server", true).await;
    let ca = toml_str(&pki.path_str("ca.pem"));
    let cert = toml_str(&String::from_utf8(pki.read("client.pem")).unwrap());
    let key = toml_str(&String::from_utf8(pki.read("client.key")).unwrap());
    let primary_tls = format!("{{ ca_file = {ca}, server_name = \"secure.internal\" }}");
    let config = ConfigText::new().raw(&format!(
        r#"
[[route]]
hostnames = ["mirrored.test"]
backends = [{{ url = "https://{primary}", tls = {primary_tls} }}]
filters = [
  {{ type = "RequestMirror", request_mirror = {{ backend_url = "https://{mirror}", tls = {{ ca_file = {ca}, server_name = "secure.internal", client_cert_pem = {cert}, client_key_pem = {key} }} }} }},
]

[[route]]
hostnames = ["mirror-refused.test"]
backends = [{{ url = "https://{primary}", tls = {primary_tls} }}]
filters = [
  {{ type = "RequestMirror", request_mirror = {{ backend_url = "https://{mirror}", tls = {{ ca_file = {ca}, server_name = "secure.internal" }} }} }},
]
"#
    ));
    let agent = AgentBuilder::new().start(&config.agent("log_level = \"debug\"")).await;
    let addr = agent.proxy_addr();

    let r = get(addr, "mirror-refused.test", "/refused", &[]).await;
    assert_eq!(r.status.as_u16(), 200, "{}", r.text());
    agent
        .wait_for_log(
            &["route mirror-refused.test: mirror to https://", "failed"],
            common::DEADLINE,
        )
        .await;

    let r = get(addr, "mirrored.test", "/copied", &[]).await;
    assert_eq!(r.status.as_u16(), 200, "{}", r.text());
    let line = common::eventually(common::DEADLINE, "the mirrored copy", || async {
        mirrored.lock().unwrap().first().cloned()
    })
    .await;
    // A mirrored copy carries the mirror URL's authority (docs/routing.md, RequestMirror).
    assert_eq!(
        line,
        format!("sni=secure.internal;alpn=h2;client_cert=true;host={mirror};path=/copied")
    );
    assert_eq!(mirrored.lock().unwrap().len(), 1, "only the mTLS mirror got through");
}

/// Mirror `tls` on an `http://` mirror is refused with the filter's key, as on a backend.
#[test]
fn mirror_tls_needs_an_https_mirror() {
    let scratch = tempfile::tempdir().unwrap();
    let path = scratch.path().join("agent.toml");
    std::fs::write(
        &path,
        r#"
[[route]]
hostnames = ["m.test"]
upstream = "http://127.0.0.1:9"
filters = [{ type = "RequestMirror", request_mirror = { backend_url = "http://127.0.0.1:9", tls = { server_name = "x.internal" } } }]
"#,
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tunnel-agent"))
        .args(["check", "-c"])
        .arg(&path)
        .env_clear()
        .output()
        .expect("run tunnel-agent check");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains("route[0].filters[0]") && err.contains("TLS settings need an https:// mirror backend"),
        "{err}"
    );
}
