//! What the agent's HTTP peers answer, through the agent's own clients and parsers: the etcd
//! JSON gateway (agent/election/etcd.rs: lease grant, keepalive, revoke, range, txn, auth), the
//! metadata server (agent/gcp/: an attribute, the access token, an identity token through the
//! cache that reads its `exp`), cloudflared's `/ready`, its `/config` and its log lines (agent/tunnel/).
//! A peer may be broken or hostile; no answer may panic the agent, allocate without bound or
//! hang it.
//!
//! Input: one byte choosing the call, then the whole HTTP/1.1 response (status line, headers,
//! body) the loopback peer sends back; for the log-line call, the line.

#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tunnel_agent::election::etcd::{EtcdClient, EtcdOptions};
use tunnel_agent::gcp::{IdTokenCache, MetadataClient};
use tunnel_agent::secrets::Secret;
use tunnel_agent::telemetry::Metrics;
use tunnel_agent_fuzz::{block_on, runtime, RawPeer};

struct Peers {
    peer: RawPeer,
    etcd: EtcdClient,
    etcd_auth: EtcdClient,
    metadata: MetadataClient,
    ready: reqwest::Client,
}

fn peers() -> &'static Peers {
    static PEERS: OnceLock<Peers> = OnceLock::new();
    PEERS.get_or_init(|| {
        let peer = RawPeer::start();
        let options = EtcdOptions {
            endpoints: vec![format!("http://{}", peer.addr)],
            ca_pem: None,
            identity_pem: None,
            username: None,
            password: None,
        };
        let with_auth = EtcdOptions {
            username: Some("agent".into()),
            password: Some(Secret::new("pw")),
            ..options.clone()
        };
        let _rt = runtime().enter();
        Peers {
            etcd: EtcdClient::new(&options).expect("an etcd client"),
            etcd_auth: EtcdClient::new(&with_auth).expect("an etcd client"),
            metadata: MetadataClient::new(format!("http://{}", peer.addr), Duration::from_secs(2))
                .expect("a metadata client"),
            ready: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .expect("an HTTP client"),
            peer,
        }
    })
}

const T: Duration = Duration::from_secs(2);

fuzz_target!(|data: &[u8]| {
    let [which, answer @ ..] = data else {
        return;
    };
    if which % 12 == 10 {
        let _ = tunnel_agent::tunnel::parse_log_line(&String::from_utf8_lossy(answer));
        return;
    }
    let p = peers();
    p.peer.answer(answer);
    let _ = block_on(async {
        match which % 12 {
            0 => drop(p.etcd.grant(Duration::from_secs(10), T).await),
            1 => drop(p.etcd.keepalive(7, T).await),
            2 => drop(p.etcd.revoke(7, T).await),
            3 => drop(p.etcd.get("/tunnel-agent/leader", T).await),
            4 => drop(p.etcd.campaign("/tunnel-agent/leader", "host-a", 7, T).await),
            5 => drop(p.etcd_auth.get("/tunnel-agent/leader", T).await),
            6 => drop(p.metadata.get("instance/attributes/tunnel-role", &[]).await),
            7 => drop(p.metadata.access_token().await),
            8 => {
                // A fresh cache each time: a cached token would hide the next answer.
                let cache = IdTokenCache::new(
                    p.metadata.clone(),
                    Duration::from_secs(300),
                    Arc::new(Metrics::default()),
                    runtime().handle().clone(),
                );
                drop(cache.header("https://app.example.run.app").await)
            }
            9 => drop(tunnel_agent::tunnel::poll_ready(&p.ready, p.peer.addr).await),
            _ => {
                let origin = "127.0.0.1:8080".parse().expect("an address");
                drop(tunnel_agent::tunnel::remote_ingress::read(&p.ready, p.peer.addr, origin, true).await)
            }
        }
    });
});
