//! `[role_election]` and `[role_follow]`: the role sources that decide by themselves (a leader
//! election on etcd, a local health check to follow). docs/config.md describes every key.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{duration, Problem};

/// Why the node has its role. Not a setting: it lives beside [`super::Role`] in the leaf so that
/// `health` (below the role module) can render it and `<state_dir>/role.json` can carry it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RoleSource {
    /// `role` in the config file (at boot, or changed by a reload).
    Config,
    /// `promote`/`demote` in this run.
    Cli,
    /// `promote`/`demote` in an earlier run, read back from the state dir.
    Persisted,
    WatchedAttribute,
    /// The leader election on etcd (`[role_election]`).
    Election,
    /// The local health check (`[role_follow]`) without an election.
    Follow,
}

impl RoleSource {
    pub fn as_str(self) -> &'static str {
        match self {
            RoleSource::Config => "config",
            RoleSource::Cli => "cli",
            RoleSource::Persisted => "persisted",
            RoleSource::WatchedAttribute => "watched-attribute",
            RoleSource::Election => "election",
            RoleSource::Follow => "follow",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ElectionBackend {
    #[default]
    Etcd,
    /// A `coordination.k8s.io/v1` Lease.
    Kubernetes,
}

/// Where a pod finds its service account's token and the cluster CA (the kubelet mounts them).
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// What a leader does when it cannot renew its lease (etcd lost quorum, or this host lost
/// etcd: the two look the same from here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OnStoreLoss {
    /// Fence: leave `active` before the lease can expire on the server (Patroni's choice).
    #[default]
    Demote,
    /// Keep the role while no member answers at all. Risk: when it is this host that is cut
    /// off and the rest still has quorum, the lease expires there and another node becomes
    /// active while this one still is.
    Keep,
}

/// `[role_election]`: the node holding `key` under a live lease (etcd), or holding the Lease
/// (Kubernetes), is active.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RoleElectionSection {
    pub backend: ElectionBackend,
    /// etcd: client URLs of the members (`http://…:2379` or `https://…`); tried in order, the
    /// last one that answered first.
    pub endpoints: Vec<String>,
    /// etcd: one key per pair or fleet; its value is the leader's `host_name`.
    pub key: String,
    /// Kubernetes: the Lease's namespace and name (one Lease per pair or fleet).
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// Kubernetes: the API server's URL. Unset: `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`.
    pub api_url: Option<String>,
    /// Kubernetes: the service account token, read for each request (the kubelet rotates it).
    /// Unset: the pod's mounted token.
    pub token_file: Option<PathBuf>,
    /// Kubernetes, outside the cluster: a kubeconfig file naming the API server, its CA and
    /// the credentials (instead of `api_url`, `token_file` and `ca_file`). Only this key names
    /// one: `KUBECONFIG` in the agent's environment is not read, so the cluster the election
    /// runs on is in the config file, where `check` sees it.
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig's context to use. Unset: its `current-context`.
    pub context: Option<String>,
    /// Lease TTL, whole seconds. Failover after a crash takes up to this long.
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::HOUR }>")]
    pub ttl: Duration,
    /// Budget from "the renewals failed" to cloudflared's SIGTERM delivered: the leader fences
    /// this long before its lease could expire on the server.
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::HOUR }>")]
    pub fence_margin: Duration,
    /// How often a standby reads the key to notice it is gone.
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::HOUR }>")]
    pub poll_interval: Duration,
    /// This host's name in the key. Unset: the kernel hostname.
    pub host_name: Option<String>,
    /// PEM CA bundle for `https://` endpoints or the API server (else the system roots; on
    /// Kubernetes the pod's mounted `ca.crt` when it exists).
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for etcd's `--client-cert-auth`.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// etcd user (with `password_secret`): etcd's `auth enable`.
    pub username: Option<String>,
    /// The name of a `[secrets.NAME]` holding the password; never the password itself.
    pub password_secret: Option<String>,
    pub on_store_loss: OnStoreLoss,
}

impl Default for RoleElectionSection {
    fn default() -> Self {
        RoleElectionSection {
            backend: ElectionBackend::Etcd,
            endpoints: Vec::new(),
            key: String::new(),
            namespace: None,
            name: None,
            api_url: None,
            token_file: None,
            kubeconfig: None,
            context: None,
            ttl: Duration::from_secs(10),
            fence_margin: Duration::from_secs(1),
            poll_interval: Duration::from_millis(250),
            host_name: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            username: None,
            password_secret: None,
            on_store_loss: OnStoreLoss::Demote,
        }
    }
}

impl RoleElectionSection {
    /// A lease is renewed every ttl/3 (etcd's own clients do the same).
    pub fn renew_interval(&self) -> Duration {
        self.ttl / 3
    }

    /// How long one renewal may take before it counts as failed.
    pub fn request_timeout(&self) -> Duration {
        self.renew_interval()
    }

    pub fn validate(&self, secrets: &[&str], bad: &mut dyn FnMut(String, String)) {
        let key = |k: &str| format!("role_election.{k}");
        match self.backend {
            ElectionBackend::Etcd => self.validate_etcd(secrets, bad),
            ElectionBackend::Kubernetes => self.validate_kubernetes(bad),
        }
        if self.ttl.subsec_nanos() != 0 || self.ttl < Duration::from_secs(2) {
            bad(
                key("ttl"),
                format!(
                    "{} is not a whole number of seconds >= 2 (leases are whole seconds; etcd raises shorter ones)",
                    humantime_serde::re::humantime::format_duration(self.ttl)
                ),
            );
        } else if self.renew_interval() + self.request_timeout() + self.fence_margin >= self.ttl {
            bad(
                key("ttl"),
                format!(
                    "{} is too short to fence safely: a renewal every ttl/3 ({}), its timeout ({}) and fence_margin ({}) must fit within it; raise ttl to at least {}s or lower fence_margin",
                    humantime_serde::re::humantime::format_duration(self.ttl),
                    humantime_serde::re::humantime::format_duration(self.renew_interval()),
                    humantime_serde::re::humantime::format_duration(self.request_timeout()),
                    humantime_serde::re::humantime::format_duration(self.fence_margin),
                    (self.fence_margin.as_secs_f64() * 3.0).floor() as u64 + 1
                ),
            );
        }
        if self.fence_margin.is_zero() {
            bad(key("fence_margin"), "must be greater than 0".into());
        }
        if self.poll_interval.is_zero() {
            bad(key("poll_interval"), "must be greater than 0".into());
        }
        if self.host_name.as_deref().is_some_and(|h| h.trim().is_empty()) {
            bad(key("host_name"), "must not be empty".into());
        }
    }
}

impl RoleElectionSection {
    fn validate_etcd(&self, secrets: &[&str], bad: &mut dyn FnMut(String, String)) {
        let key = |k: &str| format!("role_election.{k}");
        if self.endpoints.is_empty() {
            bad(key("endpoints"), "at least one etcd client URL is required".into());
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            if !(e.starts_with("http://") || e.starts_with("https://")) || e.len() < "http://x".len() {
                bad(format!("{}[{i}]", key("endpoints")), not_a_url(e));
            }
        }
        if self.key.trim().is_empty() {
            bad(
                key("key"),
                "required: one key per pair or fleet, e.g. \"/tunnel-agent/pair-1/leader\"".into(),
            );
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            bad(key("cert_file"), "cert_file and key_file go together".into());
        }
        match (&self.username, &self.password_secret) {
            (Some(_), None) => bad(key("password_secret"), "required with username".into()),
            (None, Some(_)) => bad(key("username"), "required with password_secret".into()),
            (_, Some(name)) if !secrets.contains(&name.as_str()) => bad(
                key("password_secret"),
                format!("no [secrets.{name}] is defined (name a secret, never the password itself)"),
            ),
            _ => {}
        }
        let kube_only = [
            ("namespace", self.namespace.is_some()),
            ("name", self.name.is_some()),
            ("api_url", self.api_url.is_some()),
            ("token_file", self.token_file.is_some()),
            ("kubeconfig", self.kubeconfig.is_some()),
            ("context", self.context.is_some()),
        ];
        for (k, set) in kube_only {
            if set {
                bad(key(k), "only for backend = \"kubernetes\"".into());
            }
        }
    }

    fn validate_kubernetes(&self, bad: &mut dyn FnMut(String, String)) {
        let key = |k: &str| format!("role_election.{k}");
        // Object names: DNS-1123 (a namespace is a label, 63; a Lease a subdomain, 253).
        for (k, value, limit) in [("namespace", &self.namespace, 63), ("name", &self.name, 253)] {
            match value {
                None => bad(key(k), "required with backend = \"kubernetes\"".into()),
                Some(v) if !is_dns1123(v, limit, k == "name") => bad(
                    key(k),
                    format!("{v:?} is not a Kubernetes object name (lower-case letters, digits, '-', at most {limit} characters)"),
                ),
                Some(_) => {}
            }
        }
        if let Some(url) = &self.api_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() < "http://x".len() {
                bad(key("api_url"), not_a_url(url));
            }
        }
        if self.kubeconfig.is_some() {
            let in_kubeconfig = [
                ("api_url", self.api_url.is_some()),
                ("token_file", self.token_file.is_some()),
                ("ca_file", self.ca_file.is_some()),
            ];
            for (k, _) in in_kubeconfig.iter().filter(|(_, set)| *set) {
                bad(
                    key(k),
                    "not with kubeconfig: the kubeconfig names the server, its CA and the credentials".into(),
                );
            }
        } else if self.context.is_some() {
            bad(key("context"), "only with kubeconfig".into());
        }
        if self.context.as_deref().is_some_and(|c| c.is_empty() || c.len() > 253) {
            bad(key("context"), "must be a context's name (1 to 253 characters)".into());
        }
        let etcd_only = [
            ("endpoints", !self.endpoints.is_empty()),
            ("key", !self.key.is_empty()),
            ("cert_file", self.cert_file.is_some()),
            ("key_file", self.key_file.is_some()),
            ("username", self.username.is_some()),
            ("password_secret", self.password_secret.is_some()),
        ];
        for (k, set) in etcd_only {
            if set {
                bad(
                    key(k),
                    "only for backend = \"etcd\" (the Lease is namespace/name)".into(),
                );
            }
        }
    }

    /// What `/status` and the logs call the election's key: etcd's key, or `namespace/name`.
    pub fn key_name(&self) -> String {
        match self.backend {
            ElectionBackend::Etcd => self.key.clone(),
            ElectionBackend::Kubernetes => format!(
                "{}/{}",
                self.namespace.as_deref().unwrap_or(""),
                self.name.as_deref().unwrap_or("")
            ),
        }
    }
}

/// A DNS-1123 label (`dots` false) or subdomain (`dots` true) of at most `limit` characters.
fn is_dns1123(v: &str, limit: usize, dots: bool) -> bool {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    !v.is_empty() && v.len() <= limit && if dots { v.split('.').all(label_ok) } else { label_ok(v) }
}

/// `[role_follow]`: active iff `url` answers 2xx (e.g. Patroni's `GET /primary`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RoleFollowSection {
    pub url: String,
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::HOUR }>")]
    pub interval: Duration,
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::HOUR }>")]
    pub timeout: Duration,
    /// Consecutive 2xx answers before the check counts as passing.
    pub rise: u32,
    /// Consecutive failures (non-2xx, no answer) before it counts as failing.
    pub fall: u32,
}

impl Default for RoleFollowSection {
    fn default() -> Self {
        RoleFollowSection {
            url: String::new(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(800),
            rise: 2,
            fall: 2,
        }
    }
}

impl RoleFollowSection {
    pub fn validate(&self, bad: &mut dyn FnMut(String, String)) {
        let key = |k: &str| format!("role_follow.{k}");
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            bad(key("url"), not_a_url(&self.url));
        }
        if self.interval.is_zero() {
            bad(key("interval"), "must be greater than 0".into());
        }
        if self.timeout.is_zero() || self.timeout > self.interval {
            bad(key("timeout"), "must be greater than 0 and at most interval".into());
        }
        if self.rise == 0 {
            bad(key("rise"), "must be at least 1".into());
        }
        if self.fall == 0 {
            bad(key("fall"), "must be at least 1".into());
        }
    }
}

/// Problems of both sections and of their combination with `[role_watch]`.
pub fn validate(config: &super::Config) -> Vec<Problem> {
    let mut out = Vec::new();
    let mut bad = |key: String, reason: String| out.push(Problem { key, reason });
    let secrets: Vec<&str> = config.secrets.keys().map(String::as_str).collect();
    if let Some(e) = &config.role_election {
        e.validate(&secrets, &mut bad);
        if config.role_watch.attribute.is_some() {
            bad(
                "role_election".into(),
                "cannot be combined with role_watch.attribute: one source must decide the role".into(),
            );
        }
    }
    if let Some(f) = &config.role_follow {
        f.validate(&mut bad);
        if config.role_watch.attribute.is_some() {
            bad(
                "role_follow".into(),
                "cannot be combined with role_watch.attribute: one source must decide the role".into(),
            );
        }
    }
    out
}

/// Why `url` is refused, echoing only its scheme: the URL may carry credentials (`user:pass@`,
/// a token in the query), and `check` and the journal print this.
fn not_a_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, _)) if scheme.len() <= 16 => {
            format!("must be an http:// or https:// URL (this one's scheme is {scheme:?})")
        }
        _ => "must be an http:// or https:// URL, with its host".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `check` prints these problems: a refused URL is named by its key, never echoed whole.
    #[test]
    fn a_refused_url_is_named_by_its_key_not_echoed() {
        let secret_url = "ftp://admin:hunter2@db.internal/?token=s3cr3t";
        let follow = RoleFollowSection {
            url: secret_url.into(),
            ..RoleFollowSection::default()
        };
        let mut seen = Vec::new();
        follow.validate(&mut |k, r| seen.push(format!("{k}: {r}")));
        let election = RoleElectionSection {
            endpoints: vec!["http://127.0.0.1:2379".into(), secret_url.into()],
            ..RoleElectionSection::default()
        };
        election.validate(&[], &mut |k, r| seen.push(format!("{k}: {r}")));
        let text = seen.join("\n");
        assert!(
            text.contains("role_follow.url: must be an http:// or https:// URL"),
            "{text}"
        );
        assert!(text.contains("role_election.endpoints[1]: must be"), "{text}");
        assert!(text.contains("\"ftp\""), "{text}");
        assert!(!text.contains("hunter2") && !text.contains("s3cr3t"), "{text}");
    }

    /// A kubeconfig replaces api_url, token_file and ca_file; context goes with it; neither is
    /// etcd's.
    #[test]
    fn a_kubeconfig_is_kubernetes_only_and_replaces_the_explicit_keys() {
        let problems = |section: RoleElectionSection| {
            let mut seen = Vec::new();
            section.validate(&[], &mut |k, r| seen.push(format!("{k}: {r}")));
            seen
        };
        let kube = RoleElectionSection {
            backend: ElectionBackend::Kubernetes,
            namespace: Some("tunnel".into()),
            name: Some("pair-1".into()),
            ttl: Duration::from_secs(4),
            kubeconfig: Some("/etc/tunnel-agent/kubeconfig".into()),
            context: Some("prod".into()),
            ..RoleElectionSection::default()
        };
        assert_eq!(problems(kube.clone()), Vec::<String>::new());
        let both = RoleElectionSection {
            api_url: Some("https://10.0.0.1".into()),
            ca_file: Some("/ca.pem".into()),
            ..kube.clone()
        };
        let seen = problems(both).join("\n");
        assert!(seen.contains("role_election.api_url: not with kubeconfig"), "{seen}");
        assert!(seen.contains("role_election.ca_file: not with kubeconfig"), "{seen}");
        let lone_context = RoleElectionSection {
            kubeconfig: None,
            ..kube.clone()
        };
        assert_eq!(problems(lone_context), ["role_election.context: only with kubeconfig"]);
        let etcd = RoleElectionSection {
            backend: ElectionBackend::Etcd,
            endpoints: vec!["http://127.0.0.1:2379".into()],
            key: "/k".into(),
            namespace: None,
            name: None,
            ..kube
        };
        let seen = problems(etcd).join("\n");
        assert!(
            seen.contains("role_election.kubeconfig: only for backend = \"kubernetes\""),
            "{seen}"
        );
        assert!(seen.contains("role_election.context: only for backend"), "{seen}");
    }
}
