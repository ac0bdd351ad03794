//! The role's side of the sources that decide by themselves: the etcd election (its outcomes,
//! `promote`/`demote` as handover requests, resigning on shutdown) and the `[role_follow]` check
//! (alone it decides; with an election it gates the campaign).

use std::sync::Arc;

use tokio::sync::mpsc;

use super::{Change, Role, RoleSource, Roles};
use crate::config::roles::{ElectionBackend, RoleElectionSection, SERVICE_ACCOUNT_DIR};
use crate::config::Config;
use crate::election::{self, etcd, kubeconfig, kubernetes, store::Store};
use crate::follow;
use crate::secrets::SecretValues;

/// A handover request's first part, before the role path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handover {
    /// Answered without a role change.
    Answered(super::Answer),
    /// Won or resigned: apply `change` through the role path, then answer `prefix; outcome`.
    Apply { change: Change, prefix: String },
}

/// What an election outcome asks of the role path.
pub fn outcome_change(outcome: election::Outcome) -> Change {
    match outcome {
        election::Outcome::Elected { term } => {
            tracing::info!(term, "elected: becoming active (term {term})");
            Change {
                to: Role::Active,
                source: RoleSource::Election,
            }
        }
        election::Outcome::Deposed { reason } => {
            tracing::warn!(%reason, "no longer the elected leader: becoming standby ({reason})");
            Change {
                to: Role::Standby,
                source: RoleSource::Election,
            }
        }
    }
}

/// `role_election.{key}`'s file, read now.
fn read(key: &str, path: &Option<std::path::PathBuf>) -> anyhow::Result<Option<Vec<u8>>> {
    path.as_ref()
        .map(|p| {
            crate::files::read_regular(p, FILE_LIMIT)
                .map_err(|e| anyhow::anyhow!("role_election.{key}: {}: {e}", p.display()))
        })
        .transpose()
}

/// The largest CA, certificate or key file read for the store's client: far more than any
/// real one, so a device or a huge file cannot grow memory without bound.
const FILE_LIMIT: u64 = 1024 * 1024;

/// The backend's client for `[role_election]`, its files and password read now.
fn store(section: &RoleElectionSection, secrets: &SecretValues, me: &str) -> anyhow::Result<Store> {
    Ok(match section.backend {
        ElectionBackend::Etcd => Store::Etcd(client(section, secrets)?),
        ElectionBackend::Kubernetes => Store::Kubernetes(Box::new(lease_client(section, me)?)),
    })
}

/// The Lease client for `[role_election]`'s Lease, reaching the API server as [`lease_access`]
/// says.
fn lease_client(section: &RoleElectionSection, me: &str) -> anyhow::Result<kubernetes::LeaseClient> {
    let options = kubernetes::LeaseOptions {
        access: lease_access(section)?,
        namespace: section.namespace.clone().unwrap_or_default(),
        name: section.name.clone().unwrap_or_default(),
        me: me.to_owned(),
        ttl: section.ttl,
    };
    kubernetes::LeaseClient::new(&options).map_err(|e| match &section.kubeconfig {
        Some(path) => anyhow::anyhow!("role_election.kubeconfig: {}: {e}", path.display()),
        None => anyhow::anyhow!("role_election: {e}"),
    })
}

/// How the Lease client reaches the API server: a kubeconfig's cluster and user, or the API
/// server from the config or the pod's environment, the CA from the config or the pod's mount,
/// and the token file from the config or the pod's mount. Files are read now, except a token
/// file, which is read for each request.
fn lease_access(section: &RoleElectionSection) -> anyhow::Result<kubernetes::Access> {
    if let Some(path) = &section.kubeconfig {
        return kubeconfig::load(path, section.context.as_deref())
            .map_err(|e| anyhow::anyhow!("role_election.kubeconfig: {e}"));
    }
    let api_url = match &section.api_url {
        Some(url) => url.clone(),
        None => {
            let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
            let (Some(host), Some(port)) = (var("KUBERNETES_SERVICE_HOST"), var("KUBERNETES_SERVICE_PORT")) else {
                anyhow::bail!(
                    "role_election.api_url: unset, and KUBERNETES_SERVICE_HOST/KUBERNETES_SERVICE_PORT are not in the environment (not in a pod? outside the cluster, set role_election.kubeconfig)"
                );
            };
            // An IPv6 service address goes in brackets.
            let host = if host.contains(':') { format!("[{host}]") } else { host };
            format!("https://{host}:{port}")
        }
    };
    let default_ca = std::path::Path::new(SERVICE_ACCOUNT_DIR).join("ca.crt");
    let ca_pem = match &section.ca_file {
        Some(_) => read("ca_file", &section.ca_file)?,
        None if default_ca.exists() => read("ca_file", &Some(default_ca))?,
        None => None,
    };
    let token_file = section
        .token_file
        .clone()
        .unwrap_or_else(|| std::path::Path::new(SERVICE_ACCOUNT_DIR).join("token"));
    Ok(kubernetes::Access {
        api_url,
        ca_pem,
        token: kubernetes::Token::File(token_file),
        identity_pem: None,
    })
}

/// What `tunnel-agent check` verifies of a Lease election that names a kubeconfig, as start-up
/// does: the file and the files it names read, and the client built from them (a CA or a client
/// key that is not PEM fails here). Without a kubeconfig nothing is read: the in-cluster
/// defaults exist only in the pod, and `check` may run elsewhere.
pub fn check_kubeconfig(section: &RoleElectionSection) -> anyhow::Result<()> {
    if section.backend != ElectionBackend::Kubernetes || section.kubeconfig.is_none() {
        return Ok(());
    }
    lease_client(section, "check").map(drop)
}

/// The etcd client for `[role_election]`, its files and password read now.
fn client(section: &RoleElectionSection, secrets: &SecretValues) -> anyhow::Result<etcd::EtcdClient> {
    let identity = match (
        read("cert_file", &section.cert_file)?,
        read("key_file", &section.key_file)?,
    ) {
        (Some(mut cert), Some(key)) => {
            cert.push(b'\n');
            cert.extend_from_slice(&key);
            Some(cert)
        }
        _ => None,
    };
    let password = match &section.password_secret {
        Some(name) => Some(
            secrets
                .get(name)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("role_election.password_secret: secret {name:?} has no value"))?,
        ),
        None => None,
    };
    etcd::EtcdClient::new(&etcd::EtcdOptions {
        endpoints: section.endpoints.clone(),
        ca_pem: read("ca_file", &section.ca_file)?,
        identity_pem: identity,
        username: section.username.clone(),
        password,
    })
    .map_err(|e| anyhow::anyhow!("role_election: {e}"))
}

impl Roles {
    /// Starts polling the `[role_follow]` check, if configured; its verdicts arrive on `changes`.
    pub fn start_follow(&mut self, config: &Config, changes: mpsc::Sender<bool>) -> anyhow::Result<()> {
        let Some(section) = &config.role_follow else {
            return Ok(());
        };
        let (follow, task) = follow::start(section, changes)?;
        self.fence.health.publish_follow(Box::new(follow.clone()));
        self.follow = Some(follow);
        self.tasks.push(task);
        Ok(())
    }

    /// Builds the etcd client and starts the election, if `[role_election]` is configured (after
    /// [`Roles::start_follow`]: a check gates it). The node is standby until the election says
    /// otherwise (also when etcd cannot be reached).
    pub fn start_election(
        &mut self,
        config: &Config,
        secrets: &SecretValues,
        outcomes: mpsc::Sender<election::Outcome>,
    ) -> anyhow::Result<()> {
        self.run_election(config, secrets, outcomes, None)
    }

    /// [`Roles::start_election`] after an upgrade in place: the election goes on from what the
    /// previous image carried ([`election::resume`]). A carried leader is still the leader when
    /// this returns unless the exec took it past its fence point (then it is fenced, and a
    /// `Deposed` follows on `outcomes`): start active only if [`Roles::election_leads`] says so.
    /// Without `[role_election]` any more, a carried lease is left to expire, fenced.
    pub fn resume_election(
        &mut self,
        config: &Config,
        secrets: &SecretValues,
        outcomes: mpsc::Sender<election::Outcome>,
        carried: election::Carried,
    ) -> anyhow::Result<()> {
        self.run_election(config, secrets, outcomes, Some(carried))
    }

    /// An upgrade in place: the election's task stops *without resigning* and its state is
    /// returned for [`Roles::resume_election`] in the next image (`None`: no election). From
    /// here nobody renews the lease until the resume: call it last before the exec. The
    /// election is no longer this node's: [`Roles::stop`] neither fences nor resigns for it.
    pub async fn detach_election(&mut self) -> Result<Option<election::Carried>, election::ElectionError> {
        let Some(election) = self.election.clone() else {
            return Ok(None);
        };
        let carried = election.detach().await?;
        self.election = None;
        Ok(Some(carried))
    }

    /// Whether the election says this node holds the key now (`false` without an election).
    pub fn election_leads(&self) -> bool {
        self.election.as_ref().is_some_and(|e| e.state().is_leader)
    }

    fn run_election(
        &mut self,
        config: &Config,
        secrets: &SecretValues,
        outcomes: mpsc::Sender<election::Outcome>,
        carried: Option<election::Carried>,
    ) -> anyhow::Result<()> {
        let Some(section) = &config.role_election else {
            if carried.as_ref().is_some_and(election::Carried::is_leader) {
                tracing::warn!("the carried election lease is not resumed: [role_election] is gone from the config; fenced, it expires by itself");
                self.fence.decide(Role::Standby);
            }
            return Ok(());
        };
        let me = section.host_name.clone().unwrap_or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_default()
        });
        anyhow::ensure!(
            !me.is_empty(),
            "role_election.host_name: unset and the kernel hostname is empty"
        );
        let client = store(section, secrets, &me)?;
        let fence: election::Fence = {
            let fence = self.fence.clone();
            Arc::new(move || fence.decide(Role::Standby))
        };
        let settings = election::Settings::from_section(section, me);
        let gated = self.follow.is_some();
        let (election, task) = match carried {
            Some(carried) => election::resume(settings, client, fence, outcomes, gated, carried),
            None => election::start(settings, client, fence, outcomes, gated),
        };
        self.fence.health.publish_election(Box::new(election.clone()));
        self.election = Some(election);
        self.tasks.push(task);
        Ok(())
    }

    /// `promote`/`demote` under an election: handover requests.
    pub async fn handover(&mut self, promote: bool) -> Handover {
        let Some(election) = self.election.clone() else {
            return Handover::Answered(super::Answer::refused("no election is configured".to_owned()));
        };
        let state = election.state();
        let refused = |holder: &str| {
            super::Answer::refused(format!(
                "refused: {holder} holds the election key {}; run `tunnel-agent demote` there to hand over",
                state.key
            ))
        };
        if promote {
            if state.is_leader {
                let message = format!("already active: this node holds {}", state.key);
                return Handover::Answered(super::Answer::unchanged(message));
            }
            if let Some(other) = state.leader.as_deref().filter(|l| *l != state.me) {
                return Handover::Answered(refused(other));
            }
            return match election.campaign().await {
                Ok(true) => Handover::Apply {
                    change: Change {
                        to: Role::Active,
                        source: RoleSource::Election,
                    },
                    prefix: format!("won the election for {}", state.key),
                },
                Ok(false) => {
                    let holder = election.state().leader;
                    Handover::Answered(refused(holder.as_deref().unwrap_or("another node")))
                }
                Err(e) => Handover::Answered(super::Answer::refused(format!("refused: cannot campaign: {e}"))),
            };
        }
        if !state.is_leader {
            let message = match &state.leader {
                Some(leader) => format!("already standby; {leader} holds {}", state.key),
                None => format!("already standby; nobody holds {}", state.key),
            };
            return Handover::Answered(super::Answer::unchanged(message));
        }
        // Resign: cloudflared's SIGTERM first (no new requests from here on), then the lease is
        // revoked at once so a standby takes over now; the drain goes on meanwhile.
        self.fence.decide(Role::Standby);
        let prefix = match election.resign(true).await {
            Ok(()) => {
                "resigned the election (lease revoked, this node steps aside until another takes the key or `promote`)"
                    .to_owned()
            }
            Err(e) => format!("resigned; {e}"),
        };
        Handover::Apply {
            change: Change {
                to: Role::Standby,
                source: RoleSource::Election,
            },
            prefix,
        }
    }

    /// The `[role_follow]` check changed verdict. Alone it decides the role; with an election it
    /// gates the campaign, and a failing check makes the leader resign (fenced first).
    pub async fn follow_changed(&mut self, passing: bool) -> Option<Change> {
        let Some(election) = self.election.clone() else {
            let to = if passing { Role::Active } else { Role::Standby };
            return Some(Change {
                to,
                source: RoleSource::Follow,
            });
        };
        election.gate(passing).await;
        if passing || !election.state().is_leader {
            return None;
        }
        tracing::warn!("the role_follow check fails: resigning the election");
        self.fence.decide(Role::Standby);
        if let Err(e) = election.resign(false).await {
            tracing::warn!(error = %e, "resigning the election failed: {e}");
        }
        Some(Change {
            to: Role::Standby,
            source: RoleSource::Election,
        })
    }

    /// Shutdown: the elected leader resigns (cloudflared's SIGTERM, then the lease revoked at
    /// once), then the election's and the check's tasks stop.
    pub async fn stop(&mut self) {
        if let Some(election) = self.election.as_ref().filter(|e| e.state().is_leader) {
            self.fence.decide(Role::Standby);
            match election.resign(true).await {
                Err(e) => tracing::warn!(error = %e, "could not resign the election on shutdown: {e}"),
                Ok(()) => tracing::info!("resigned the election on shutdown (lease revoked)"),
            }
        }
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}
