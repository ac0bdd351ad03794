//! The role path's decisions, without a network: a real `Health`, `TunnelState` and `Metrics`,
//! no cloudflared (the node's half, bringing cloudflared in line, is not here).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::health::Health;
use crate::telemetry::Metrics;
use crate::tunnel::TunnelState;

struct Fixture {
    roles: Roles,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    config: Config,
    dir: std::path::PathBuf,
}

fn fixture(name: &str, role: Role, source: RoleSource) -> Fixture {
    let metrics = Arc::new(Metrics::default());
    let tunnel = Arc::new(TunnelState::default());
    let health = Health::new(metrics.clone(), tunnel.clone());
    let boot = Boot {
        role,
        source,
        etag: None,
    };
    let roles = Roles::new(&boot, Fence::new(health.clone(), tunnel), metrics.clone());
    let dir = std::env::temp_dir().join(format!("ta-role-{name}-{}", std::process::id()));
    let mut config = Config::default();
    config.agent.state_dir = dir.clone();
    config.role = Role::Standby;
    Fixture {
        roles,
        health,
        metrics,
        config,
        dir,
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn change(to: Role, source: RoleSource) -> Change {
    Change { to, source }
}

#[test]
fn leaving_active_fences_and_publishes_before_cloudflared_follows() {
    let mut f = fixture("demote", Role::Active, RoleSource::Config);
    f.roles.publish();
    assert_eq!(
        f.roles.change(change(Role::Standby, RoleSource::Cli), &f.config),
        Ok(())
    );
    // The decision is visible before the node has touched cloudflared.
    assert!(f.health.leaving_active.load(Ordering::Acquire));
    let status = f.health.status.load();
    assert_eq!(
        (status.role, status.role_source),
        (Some(Role::Standby), Some(RoleSource::Cli))
    );
    assert_eq!(f.metrics.demotions.get(), 1);
    assert_eq!(f.roles.describe(), "standby (cli)");
    let outcome = f.roles.changed(Duration::from_millis(12), &f.config);
    assert!(outcome.changed());
    assert_eq!(
        outcome.to_string(),
        "demoted to standby; cloudflared stopped in 12.0 ms, the proxy keeps serving"
    );
    // Entering active again lifts the fence.
    assert_eq!(f.roles.change(change(Role::Active, RoleSource::Cli), &f.config), Ok(()));
    assert!(!f.health.leaving_active.load(Ordering::Acquire));
    assert_eq!(f.metrics.promotions.get(), 1);
    let outcome = f.roles.changed(Duration::from_millis(3), &f.config);
    assert_eq!(
        outcome.to_string(),
        "promoted to active (cloudflared is disabled in the config)"
    );
}

#[test]
fn the_same_role_again_changes_nothing_but_an_authoritative_source() {
    let mut f = fixture("same", Role::Active, RoleSource::Cli);
    let unchanged = f.roles.change(change(Role::Active, RoleSource::Cli), &f.config);
    assert_eq!(unchanged, Err(Outcome::Unchanged(Role::Active)));
    assert_eq!(unchanged.unwrap_err().to_string(), "already active; nothing to do");
    assert_eq!(f.roles.source(), RoleSource::Cli);
    // The attribute (or the file) that agrees takes the role over, without counting a change.
    let _ = f
        .roles
        .change(change(Role::Active, RoleSource::WatchedAttribute), &f.config);
    assert_eq!(f.roles.source(), RoleSource::WatchedAttribute);
    assert_eq!(f.health.status.load().role_source, Some(RoleSource::WatchedAttribute));
    assert_eq!(f.metrics.promotions.get() + f.metrics.demotions.get(), 0);
    assert!(!f.health.leaving_active.load(Ordering::Acquire));
}

#[test]
fn only_a_manual_role_is_kept_and_the_file_takes_it_back() {
    let mut f = fixture("kept", Role::Standby, RoleSource::Config);
    let kept = || std::fs::read(start::state_path(&f.dir)).ok();
    assert_eq!(f.roles.change(change(Role::Active, RoleSource::Cli), &f.config), Ok(()));
    let written: PersistedRole = serde_json::from_slice(&kept().expect("role.json written")).unwrap();
    assert_eq!(
        written,
        PersistedRole {
            role: Role::Active,
            source: RoleSource::Cli,
            config_role: Role::Standby
        }
    );
    // The file's role changed by a reload drops what a promote kept, even when it agrees.
    let mut edited = f.config.clone();
    edited.role = Role::Active;
    let c = f.roles.reloaded(&f.config, &edited).expect("the file's role changed");
    assert_eq!(c, change(Role::Active, RoleSource::Config));
    assert_eq!(f.roles.change(c, &edited), Err(Outcome::Unchanged(Role::Active)));
    assert_eq!(f.roles.source(), RoleSource::Config);
    assert_eq!(kept(), None);
    // A role from another source is never kept.
    assert_eq!(
        f.roles.change(change(Role::Standby, RoleSource::Follow), &edited),
        Ok(())
    );
    assert_eq!(kept(), None);
}

#[test]
fn manual_commands_follow_the_configured_sources() {
    let f = fixture("manual", Role::Standby, RoleSource::Config);
    assert_eq!(
        f.roles.manual(&f.config, true),
        Manual::Direct(change(Role::Active, RoleSource::Cli))
    );
    assert_eq!(
        f.roles.manual(&f.config, false),
        Manual::Direct(change(Role::Standby, RoleSource::Cli))
    );
    let mut watched = f.config.clone();
    watched.role_watch.attribute = Some("tunnel-active".to_owned());
    assert_eq!(
        f.roles.manual(&watched, true),
        Manual::Refused("the role is decided by the metadata attribute \"tunnel-active\"; change it there".to_owned())
    );
    // Nor does the file decide while the attribute does.
    let mut edited = watched.clone();
    edited.role = Role::Active;
    assert_eq!(f.roles.reloaded(&watched, &edited), None);
    assert_eq!(f.roles.reloaded(&f.config, &f.config), None);
}

#[test]
fn outcomes_answer_the_control_socket() {
    let not_leader = Answer::after(Some("won the election for k".to_owned()), &Outcome::NotLeader);
    assert_eq!(
        not_leader,
        Answer {
            ok: true,
            changed: false,
            message: "won the election for k; not promoted: this node no longer holds the election key".to_owned()
        }
    );
    let promoted = Outcome::Changed {
        role: Role::Active,
        took: Duration::from_micros(1500),
        cloudflared: true,
    };
    let answer = Answer::after(None, &promoted);
    assert!(answer.ok && answer.changed);
    assert_eq!(answer.message, "promoted to active; cloudflared started in 1.5 ms");
    assert_eq!(
        election::outcome_change(crate::election::Outcome::Deposed {
            reason: "lease expired".to_owned()
        }),
        change(Role::Standby, RoleSource::Election)
    );
    assert_eq!(
        election::outcome_change(crate::election::Outcome::Elected { term: 2 }),
        change(Role::Active, RoleSource::Election)
    );
}

#[test]
fn health_renders_the_published_role_and_reads_it_back_typed() {
    let mut f = fixture("health", Role::Standby, RoleSource::Config);
    let (_, before) = f.health.readiness();
    assert_eq!(
        before["role"],
        serde_json::Value::Null,
        "no role before the boot decided one"
    );
    f.roles.publish();
    let (ready, body) = f.health.readiness();
    assert!(!ready, "nothing else is loaded: {body}");
    assert_eq!(body["role"], "standby");
    assert_eq!(body["components"]["cloudflared"], "standby (not running)");
    assert!(!f.health.active());
    let status = f.health.status_json();
    assert_eq!(status["role"], "standby");
    assert_eq!(status["role_source"], "config");
    // The one type the control socket sends and the CLI reads holds every key of the JSON.
    let typed: crate::health::Status = serde_json::from_value(status.clone()).expect("typed status");
    assert_eq!(typed.role, Some(Role::Standby));
    assert_eq!(serde_json::to_value(&typed).unwrap(), status);
}

/// An upgrade in place under an election: a carried leader within its lease leads as soon as
/// the election is resumed (no `Elected`, no fence); past its fence point, or with
/// `[role_election]` gone from the config, the node is fenced. The store is unreachable here:
/// leading on the carried lease needs no answer until its fence point.
#[tokio::test]
async fn a_carried_election_leads_only_while_its_lease_is_safe() {
    use crate::config::roles::RoleElectionSection;
    let mut f = fixture("carried", Role::Active, RoleSource::Election);
    let (outcomes, _rx) = tokio::sync::mpsc::channel(8);
    let secrets = crate::secrets::SecretValues::new();
    assert!(f.roles.detach_election().await.expect("no election").is_none());
    let mut config = f.config.clone();
    config.role_election = Some(RoleElectionSection {
        endpoints: vec!["http://127.0.0.1:1".to_owned()],
        key: "/k".to_owned(),
        host_name: Some("node-a".to_owned()),
        ..RoleElectionSection::default()
    });
    let margin = config
        .role_election
        .as_ref()
        .map(|s| s.fence_margin)
        .unwrap_or_default();
    let carried = |left: Duration| -> crate::election::Carried {
        let deadline = crate::deadline::to_monotonic_ns(tokio::time::Instant::now() + left);
        serde_json::from_value(serde_json::json!({
            "backend": "etcd", "key": "/k", "me": "node-a",
            "lease": {"id": 42, "granted_ms": 10_000, "deadline_ns": deadline, "next_renew_ns": deadline},
            "stale": null, "gate_open": true, "stepped_aside": false,
            "term": 3, "won": 3, "lost": 2, "renew_failures": 0,
            "leader": "node-a", "last_error": null, "observed": null
        }))
        .expect("carried")
    };
    let fenced = |f: &Fixture| f.health.leaving_active.load(Ordering::Acquire);

    f.roles
        .resume_election(&config, &secrets, outcomes.clone(), carried(margin * 4))
        .expect("resumed");
    assert!(f.roles.election_leads() && !fenced(&f));
    let again = f.roles.detach_election().await.expect("detached").expect("carried");
    assert_eq!(again.lease.map(|l| l.id), Some(42));
    assert_eq!(again.won, 3);
    assert!(!f.roles.election_leads(), "detached: no longer this image's election");

    f.roles
        .resume_election(&config, &secrets, outcomes.clone(), carried(margin / 2))
        .expect("resumed");
    assert!(!f.roles.election_leads() && fenced(&f), "past the fence point");

    f.roles.fence.decide(Role::Active);
    f.roles
        .resume_election(&f.config, &secrets, outcomes, carried(margin * 4))
        .expect("no election configured");
    assert!(!f.roles.election_leads() && fenced(&f), "[role_election] gone");
    f.roles.stop().await;
}
