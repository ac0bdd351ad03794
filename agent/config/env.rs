//! The environment mode (`tunnel-agent run --from-env`): the gateway controller's proxy pods are
//! configured by environment variables, not a file, and the agent reads the same ones into the
//! same [`Config`] a file produces, validated by the same code.
//!
//! Facts about the peer are from lexfrei/cloudflare-tunnel-gateway-controller (`cmd/proxy/
//! main.go`, `internal/proxy/api.go`, `internal/proxy/startup_protocol.go`,
//! `internal/tunnel/bootstrap.go` at 97349fc, August 2026): `TUNNEL_TOKEN` set selects its tunnel
//! mode, `PROXY_ADDR` and `PROXY_CONFIG_ADDR` default to `:8080` and `:8081`, an unset
//! `PROXY_AUTH_TOKEN` runs the config API without a token and a set but empty one refuses to
//! start, `PROXY_GRACE_PERIOD` defaults to 30 s and is clamped to cloudflared's 3 min,
//! `PROXY_TUNNEL_PROTOCOL` is `auto|http2|quic`, `PROXY_METRICS_ENABLED` is on unless `0` or
//! `false`. Where the peer keeps a default after a value it cannot read, the agent refuses to
//! start naming the variable (docs/config.md lists every difference).
//!
//! A file given with `-c` is the base (directories, the health listener, cloudflared's path);
//! the variables own what they cover: an unset one gives the peer's default, never the file's
//! value, so a pod means the same whatever file its image carries, and a file's own config API
//! token is refused rather than silently replaced. Only the access-log variables, optional in
//! the peer's chart, leave the file's settings when unset. The variables are read once, when the
//! mode is enabled, so a reload applies the same ones to the re-read file. Secret values are not kept
//! here: only whether `TUNNEL_TOKEN` and `PROXY_AUTH_TOKEN` are set; the secrets themselves are
//! `source = "env"` secrets, read where every secret is read.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::OnceLock;
use std::time::Duration;

use super::secrets::{SecretSourceKind, SecretSpecAsWritten};
use super::{Config, ConfigApiSection, Problem, RouteSourceKind, TokenDelivery, TunnelProtocol};

/// The secret the connector token is read into (`source = "env"`, `var = "TUNNEL_TOKEN"`).
pub const TUNNEL_TOKEN_SECRET: &str = "tunnel_token";
/// The secret the config API's bearer token is read into (`var = "PROXY_AUTH_TOKEN"`).
pub const AUTH_TOKEN_SECRET: &str = "config_api_token";

/// cloudflared's `connection.MaxGracePeriod`, which the peer clamps `PROXY_GRACE_PERIOD` to.
pub const MAX_GRACE: Duration = Duration::from_secs(180);
/// The peer's `defaultGracePeriod`.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(30);

/// The peer's variables the agent reads.
const READ: &[&str] = &[
    "PROXY_ADDR",
    "PROXY_CONFIG_ADDR",
    "PROXY_GRACE_PERIOD",
    "PROXY_TUNNEL_PROTOCOL",
    "PROXY_METRICS_ENABLED",
    "PROXY_ACCESS_LOG_ENABLED",
    "PROXY_ACCESS_LOG_SAMPLING_RATE",
];

/// The peer's variables the agent knows but does not act on, with why.
const IGNORED: &[(&str, &str)] = &[
    (
        "PROXY_TUNNEL_PROTOCOL_WAIT",
        "cloudflared starts at once and is restarted on http2 when a table with gRPC routes arrives",
    ),
    ("PROXY_WS_DIAL_TIMEOUT", "WebSocket upstreams use proxy.connect_timeout"),
    (
        "PROXY_WS_HANDSHAKE_TIMEOUT",
        "WebSocket handshakes use proxy.upstream_timeout",
    ),
    (
        "PROXY_ACCESS_LOG_STRIP_QUERY",
        "the access log leaves query strings out unless proxy.access_log.query is set",
    ),
    ("PROXY_TRACING_ENABLED", "tracing is not supported"),
    ("PROXY_TRACING_ENDPOINT", "tracing is not supported"),
    ("PROXY_TRACING_SAMPLE_RATE", "tracing is not supported"),
];

/// Whether a secret's variable is there: its value stays in the process environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    Unset,
    Empty,
    Set,
}

/// The variables of the peer's contract as found at start.
#[derive(Debug, Clone)]
pub struct Environment {
    tunnel_token: Presence,
    auth_token: Presence,
    /// Every `PROXY_*` variable but `PROXY_AUTH_TOKEN`, with its value (`None`: not UTF-8).
    proxy: BTreeMap<String, Option<String>>,
}

static ACTIVE: OnceLock<Environment> = OnceLock::new();

/// Where the environment mode without a file keeps its files when a default directory cannot be
/// written. The gateway controller's chart runs its proxy pods as uid 65534 on a read-only root
/// with no volume; `/dev/shm` is the tmpfs every container runtime mounts writable (mode 1777),
/// shared by the pod's containers and kept for the pod's life, across container restarts.
pub const SHM_DIR: &str = "/dev/shm/tunnel-agent";

/// What [`writable_dirs`] moved, for the start-up warnings.
static MOVED: OnceLock<Vec<String>> = OnceLock::new();

/// Without a file: each default directory the agent cannot write (`runtime_dir`,
/// `state_dir`) replaced by one beneath [`SHM_DIR`], when that can be written. Only probes
/// (access(2)); the agent creates the directories at start, as for any other path.
/// Also says when the default config file exists: `--from-env` without `-c` does not read it
/// (the image's default command is `run --from-env`; a pod with a file passes `args: ["run"]`).
pub fn writable_dirs(agent: &mut super::AgentSection) {
    let mut notes = writable_dirs_under(agent, std::path::Path::new(SHM_DIR));
    if std::path::Path::new(super::DEFAULT_PATH).exists() {
        notes.push(format!(
            "{} exists but is not read: --from-env without -c takes the variables alone (run without --from-env to read the file, or with -c {0} to apply the variables over it)",
            super::DEFAULT_PATH
        ));
    }
    let _ = MOVED.set(notes);
}

/// [`writable_dirs`] with `shm` for [`SHM_DIR`]; what it moved, said as a warning.
fn writable_dirs_under(agent: &mut super::AgentSection, shm: &std::path::Path) -> Vec<String> {
    if !can_write(shm) {
        return Vec::new();
    }
    let mut moved = Vec::new();
    for (key, dir, sub) in [
        ("agent.runtime_dir", &mut agent.runtime_dir, "run"),
        ("agent.state_dir", &mut agent.state_dir, "state"),
    ] {
        if !can_write(dir) {
            let new = shm.join(sub);
            moved.push(format!(
                "{key} {} cannot be written (a read-only root without a volume?): using {}",
                dir.display(),
                new.display()
            ));
            *dir = new;
        }
    }
    moved
}

/// Whether `dir` can be written, or created: its nearest existing ancestor can be written.
fn can_write(dir: &std::path::Path) -> bool {
    use nix::unistd::{access, AccessFlags};
    dir.ancestors()
        .find(|a| !a.as_os_str().is_empty() && a.exists())
        .is_some_and(|a| access(a, AccessFlags::W_OK | AccessFlags::X_OK).is_ok())
}

/// Turns the environment mode on for this process: reads the variables once; every later
/// [`Config::load`] applies them.
pub fn enable() -> &'static Environment {
    ACTIVE.get_or_init(|| Environment::from_vars(std::env::vars_os()))
}

/// The environment mode's variables, when it is on.
pub fn active() -> Option<&'static Environment> {
    ACTIVE.get()
}

impl Environment {
    /// The contract's variables among `vars`.
    pub fn from_vars<K, V>(vars: impl IntoIterator<Item = (K, V)>) -> Environment
    where
        K: Into<std::ffi::OsString>,
        V: Into<std::ffi::OsString>,
    {
        let mut env = Environment {
            tunnel_token: Presence::Unset,
            auth_token: Presence::Unset,
            proxy: BTreeMap::new(),
        };
        for (k, v) in vars {
            let (k, v): (std::ffi::OsString, std::ffi::OsString) = (k.into(), v.into());
            let Some(k) = k.to_str() else { continue };
            let presence = if v.is_empty() { Presence::Empty } else { Presence::Set };
            match k {
                "TUNNEL_TOKEN" => env.tunnel_token = presence,
                "PROXY_AUTH_TOKEN" => env.auth_token = presence,
                _ if k.starts_with("PROXY_") => {
                    env.proxy.insert(k.to_owned(), v.into_string().ok());
                }
                _ => {}
            }
        }
        env
    }

    /// Whether `TUNNEL_TOKEN` selects the tunnel (the peer's tunnel mode).
    pub fn tunnel(&self) -> bool {
        self.tunnel_token == Presence::Set
    }

    /// `name`'s value: `Ok(None)` when unset or empty (the peer's `envOrDefault` treats both
    /// as unset), a problem when it is not UTF-8.
    fn value(&self, name: &str) -> Result<Option<&str>, Problem> {
        match self.proxy.get(name) {
            None => Ok(None),
            Some(None) => Err(problem(name, "not valid UTF-8".to_owned())),
            Some(Some(v)) if v.trim().is_empty() => Ok(None),
            Some(Some(v)) => Ok(Some(v.trim())),
        }
    }

    /// Sets what the variables cover in `config` (the file's, or the defaults). Returns every
    /// variable that cannot be read, each naming the variable.
    pub fn overlay(&self, config: &mut Config) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut keep = |r: Result<(), Problem>| {
            if let Err(p) = r {
                out.push(p);
            }
        };
        keep(self.overlay_tunnel(config));
        keep(self.overlay_config_api(config));
        keep(self.overlay_listen(config));
        keep(self.overlay_grace(config));
        keep(self.overlay_access_log(config));
        out
    }

    /// `TUNNEL_TOKEN` (cloudflared, token through `--token-file`) and `PROXY_TUNNEL_PROTOCOL`.
    fn overlay_tunnel(&self, config: &mut Config) -> Result<(), Problem> {
        if self.tunnel_token == Presence::Empty {
            // The peer runs without a tunnel then; an empty Secret key is a broken deployment.
            return Err(problem(
                "TUNNEL_TOKEN",
                "set but empty; unset it to run without a tunnel".to_owned(),
            ));
        }
        if self.tunnel() {
            add_env_secret(config, TUNNEL_TOKEN_SECRET, "TUNNEL_TOKEN")?;
            let cf = &mut config.cloudflared;
            cf.enabled = true;
            cf.token_secret = Some(TUNNEL_TOKEN_SECRET.to_owned());
            cf.token_delivery = TokenDelivery::File;
        }
        config.cloudflared.protocol = match self.value("PROXY_TUNNEL_PROTOCOL")? {
            None => TunnelProtocol::Auto,
            Some(v) => match v.to_ascii_lowercase().as_str() {
                "auto" => TunnelProtocol::Auto,
                "http2" => TunnelProtocol::Http2,
                "quic" => TunnelProtocol::Quic,
                _ => {
                    return Err(problem(
                        "PROXY_TUNNEL_PROTOCOL",
                        format!("{v:?} is not one of auto, http2, quic"),
                    ))
                }
            },
        };
        Ok(())
    }

    /// The route table comes from the config API: `PROXY_CONFIG_ADDR`, `PROXY_AUTH_TOKEN`,
    /// `PROXY_METRICS_ENABLED`.
    fn overlay_config_api(&self, config: &mut Config) -> Result<(), Problem> {
        config.routes.source = RouteSourceKind::ConfigApi;
        // The peer keeps nothing across a restart (and its pods have a read-only root): the
        // controller pushes to every new pod. A file's `[config_api] persist` is kept.
        let mut api = config.config_api.clone().unwrap_or(ConfigApiSection {
            persist: false,
            ..ConfigApiSection::default()
        });
        if api.auth_secret.is_some() || api.allow_unauthenticated {
            // Replacing it (or opening the API because PROXY_AUTH_TOKEN is unset) would change
            // who may push behind the file's back.
            return Err(Problem {
                key: "config_api.auth_secret".to_owned(),
                reason: "the environment mode takes the config API's token from PROXY_AUTH_TOKEN; remove auth_secret and allow_unauthenticated from the file".to_owned(),
            });
        }
        api.listen = listen_addr("PROXY_CONFIG_ADDR", self.value("PROXY_CONFIG_ADDR")?.unwrap_or(":8081"))?;
        api.metrics = match self.value("PROXY_METRICS_ENABLED")? {
            // Default on; only an explicit 0 or false turns it off (the peer's rule).
            None => true,
            Some(v) => flag("PROXY_METRICS_ENABLED", v)?,
        };
        match self.auth_token {
            Presence::Unset => {
                api.auth_secret = None;
                api.allow_unauthenticated = true;
            }
            Presence::Empty => {
                return Err(problem(
                    "PROXY_AUTH_TOKEN",
                    "set but empty; refusing to run the config API without the token it was meant to have (unset it to run without authentication)".to_owned(),
                ))
            }
            Presence::Set => {
                add_env_secret(config, AUTH_TOKEN_SECRET, "PROXY_AUTH_TOKEN")?;
                api.auth_secret = Some(AUTH_TOKEN_SECRET.to_owned());
                api.allow_unauthenticated = false;
            }
        }
        config.config_api = Some(api);
        Ok(())
    }

    /// `PROXY_ADDR`. With a tunnel only cloudflared (a child, on this host) talks to the proxy,
    /// and the peer's proxy has no listener at all then: the port is kept, the address is
    /// loopback, so the cluster cannot reach the proxy around the tunnel.
    fn overlay_listen(&self, config: &mut Config) -> Result<(), Problem> {
        let addr = listen_addr("PROXY_ADDR", self.value("PROXY_ADDR")?.unwrap_or(":8080"))?;
        config.proxy.listen = if self.tunnel() {
            SocketAddr::from((Ipv4Addr::LOCALHOST, addr.port()))
        } else {
            addr
        };
        Ok(())
    }

    /// `PROXY_GRACE_PERIOD`: cloudflared's drain, and the proxy's after it.
    fn overlay_grace(&self, config: &mut Config) -> Result<(), Problem> {
        let grace = match self.value("PROXY_GRACE_PERIOD")? {
            None => DEFAULT_GRACE,
            Some(v) => Self::grace(v)?,
        };
        config.cloudflared.grace_period = grace;
        config.agent.shutdown_grace = grace;
        Ok(())
    }

    /// A `PROXY_GRACE_PERIOD` value, clamped to [`MAX_GRACE`].
    fn grace(v: &str) -> Result<Duration, Problem> {
        let grace = humantime::parse_duration(v).map_err(|e| {
            problem(
                "PROXY_GRACE_PERIOD",
                format!("{v:?} is not a duration (\"30s\", \"1m30s\"): {e}"),
            )
        })?;
        if grace.is_zero() {
            return Err(problem("PROXY_GRACE_PERIOD", "must be greater than 0".to_owned()));
        }
        Ok(grace.min(MAX_GRACE))
    }

    /// `PROXY_ACCESS_LOG_ENABLED`, `PROXY_ACCESS_LOG_SAMPLING_RATE`.
    fn overlay_access_log(&self, config: &mut Config) -> Result<(), Problem> {
        if let Some(v) = self.value("PROXY_ACCESS_LOG_ENABLED")? {
            config.proxy.access_log.enabled = flag("PROXY_ACCESS_LOG_ENABLED", v)?;
        }
        if let Some(v) = self.value("PROXY_ACCESS_LOG_SAMPLING_RATE")? {
            let rate: f64 = v
                .parse()
                .ok()
                .filter(|r: &f64| r.is_finite())
                .ok_or_else(|| problem("PROXY_ACCESS_LOG_SAMPLING_RATE", format!("{v:?} is not a number")))?;
            // The peer clamps: above 1 logs everything, below 0 only the failures.
            config.proxy.access_log.sample = rate.clamp(0.0, 1.0);
        }
        Ok(())
    }

    /// What start-up says once, as warnings: no config API token, a clamped grace, variables of
    /// the peer that are not acted on, and `PROXY_*` variables the peer does not have either.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = MOVED.get().cloned().unwrap_or_default();
        if self.auth_token == Presence::Unset {
            out.push("the config API runs WITHOUT authentication: anyone who reaches PROXY_CONFIG_ADDR can replace the route table; set PROXY_AUTH_TOKEN".to_owned());
        }
        let grace = self.value("PROXY_GRACE_PERIOD").ok().flatten();
        if let Some(g) = grace.and_then(|v| humantime::parse_duration(v).ok()) {
            if g > MAX_GRACE {
                out.push(format!(
                    "PROXY_GRACE_PERIOD {} is clamped to cloudflared's maximum of 3m",
                    humantime::format_duration(g)
                ));
            }
        }
        for name in self.proxy.keys() {
            if let Some((_, why)) = IGNORED.iter().find(|(n, _)| n == name) {
                out.push(format!("{name} is ignored: {why}"));
            } else if !READ.contains(&name.as_str()) {
                out.push(format!(
                    "{name} is not a variable of the gateway controller's proxy; ignored"
                ));
            }
        }
        out
    }

    /// Appends the variable behind a validation problem's key (`config_api.listen` →
    /// `PROXY_CONFIG_ADDR`), so an error names what the operator wrote.
    pub fn name_variables(&self, problems: &mut [Problem]) {
        const KEYS: &[(&str, &str)] = &[
            ("proxy.listen", "PROXY_ADDR"),
            ("proxy.access_log", "PROXY_ACCESS_LOG_*"),
            ("config_api.listen", "PROXY_CONFIG_ADDR"),
            ("config_api.auth_secret", "PROXY_AUTH_TOKEN"),
            ("config_api", "PROXY_CONFIG_ADDR"),
            ("cloudflared.grace_period", "PROXY_GRACE_PERIOD"),
            ("agent.shutdown_grace", "PROXY_GRACE_PERIOD"),
            ("cloudflared.protocol", "PROXY_TUNNEL_PROTOCOL"),
            ("cloudflared.token_secret", "TUNNEL_TOKEN"),
        ];
        for p in problems {
            if let Some((_, var)) = KEYS
                .iter()
                .find(|(k, _)| p.key == *k || p.key.starts_with(&format!("{k}.")))
            {
                p.key = format!("{} ({var})", p.key);
            }
        }
    }
}

fn problem(var: &str, reason: String) -> Problem {
    Problem {
        key: var.to_owned(),
        reason,
    }
}

/// `[secrets.NAME]` with `source = "env"`, `var = VAR`; a file's secret of that name is a
/// problem (the file and the environment would mean two different things by it).
fn add_env_secret(config: &mut Config, name: &str, var: &str) -> Result<(), Problem> {
    if config.secrets_as_written.contains_key(name) {
        return Err(problem(
            var,
            format!(
                "the environment mode reads it into the secret {name:?}, which the file defines too; rename the file's"
            ),
        ));
    }
    let spec = SecretSpecAsWritten {
        source: SecretSourceKind::Env,
        path: None,
        var: Some(var.to_owned()),
        name: None,
        refresh: None,
    };
    config.secrets_as_written.insert(name.to_owned(), spec);
    Ok(())
}

/// The peer's toggles: `1`/`true` and `0`/`false` (trimmed, any case). Anything else is
/// refused rather than read as false.
fn flag(var: &str, v: &str) -> Result<bool, Problem> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" => Ok(true),
        "0" | "false" => Ok(false),
        _ => Err(problem(var, format!("{v:?} is not one of 1, true, 0, false"))),
    }
}

/// A Go listen address: `:PORT` (every IPv4 address), `IP:PORT`, `[IPv6]:PORT` or
/// `localhost:PORT`. Host names are refused: a listener binds an address.
fn listen_addr(var: &str, v: &str) -> Result<SocketAddr, Problem> {
    let bad = |why: &str| {
        problem(
            var,
            format!("{v:?}: {why} (expected \":PORT\", \"IP:PORT\" or \"[IPv6]:PORT\")"),
        )
    };
    let (host, port) = v.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| bad("the port is not a number from 0 to 65535"))?;
    let ip = match host {
        "" => Ipv4Addr::UNSPECIFIED.into(),
        "localhost" => Ipv4Addr::LOCALHOST.into(),
        h => h
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(h)
            .parse()
            .map_err(|_| bad("the host is not an IP address"))?,
    };
    Ok(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {

    #[test]
    fn default_dirs_that_cannot_be_written_move_beneath_shm() {
        let tmp = tempfile::tempdir().unwrap();
        // Nothing can be created beneath a regular file, not even by root.
        let file = tmp.path().join("not-a-directory");
        std::fs::write(&file, "").unwrap();
        let fresh = || super::super::AgentSection {
            runtime_dir: file.join("run"),
            state_dir: tmp.path().join("state"),
            ..Default::default()
        };
        let shm = tmp.path().join("shm");
        let mut agent = fresh();
        let said = writable_dirs_under(&mut agent, &shm);
        assert_eq!(agent.runtime_dir, shm.join("run"));
        assert_eq!(said.len(), 1, "{said:?}");
        assert!(
            said[0].starts_with("agent.runtime_dir ") && said[0].contains("cannot be written"),
            "{said:?}"
        );
        assert_eq!(
            agent.state_dir,
            tmp.path().join("state"),
            "a directory that can be created stays"
        );
        let mut agent = fresh();
        writable_dirs_under(&mut agent, &file.join("shm"));
        assert_eq!(
            agent.runtime_dir,
            file.join("run"),
            "no writable /dev/shm: nothing moves"
        );
    }

    use super::*;

    fn env(vars: &[(&str, &str)]) -> Environment {
        Environment::from_vars(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    fn overlaid(vars: &[(&str, &str)]) -> (Config, Vec<Problem>) {
        let mut c = Config::default();
        let problems = env(vars).overlay(&mut c);
        (c, problems)
    }

    fn keys(problems: &[Problem]) -> Vec<&str> {
        problems.iter().map(|p| p.key.as_str()).collect()
    }

    #[test]
    fn nothing_set_is_the_peers_standalone_mode_with_its_defaults() {
        let (c, problems) = overlaid(&[]);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(c.routes.source, RouteSourceKind::ConfigApi);
        let api = c.config_api.expect("config api");
        assert_eq!(api.listen, "0.0.0.0:8081".parse().unwrap());
        assert!(api.allow_unauthenticated && api.auth_secret.is_none() && api.metrics && !api.persist);
        assert_eq!(c.proxy.listen, "0.0.0.0:8080".parse().unwrap());
        assert!(!c.cloudflared.enabled);
        assert_eq!(c.cloudflared.grace_period, Duration::from_secs(30));
    }

    #[test]
    fn a_tunnel_token_runs_cloudflared_with_the_token_in_a_file_and_the_proxy_on_loopback() {
        let (c, problems) = overlaid(&[
            ("TUNNEL_TOKEN", "eyJ-not-kept"),
            ("PROXY_ADDR", ":9090"),
            ("PROXY_AUTH_TOKEN", "s3cret"),
        ]);
        assert!(problems.is_empty(), "{problems:?}");
        assert!(c.cloudflared.enabled);
        assert_eq!(c.cloudflared.token_secret.as_deref(), Some(TUNNEL_TOKEN_SECRET));
        assert_eq!(c.cloudflared.token_delivery, TokenDelivery::File);
        assert_eq!(c.proxy.listen, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(c.config_api.unwrap().auth_secret.as_deref(), Some(AUTH_TOKEN_SECRET));
        let debug = format!("{:?}", env(&[("TUNNEL_TOKEN", "eyJ-not-kept")]));
        assert!(!debug.contains("eyJ"), "values of secrets are not kept: {debug}");
    }

    #[test]
    fn an_empty_token_refuses_to_start_naming_the_variable() {
        let (_, problems) = overlaid(&[("PROXY_AUTH_TOKEN", ""), ("TUNNEL_TOKEN", "")]);
        assert_eq!(keys(&problems), ["TUNNEL_TOKEN", "PROXY_AUTH_TOKEN"]);
        assert!(problems[1].reason.contains("set but empty"), "{problems:?}");
    }

    #[test]
    fn every_unreadable_variable_is_named_at_once() {
        let (_, problems) = overlaid(&[
            ("PROXY_ADDR", "localhost"),
            ("PROXY_CONFIG_ADDR", "example.com:80"),
            ("PROXY_GRACE_PERIOD", "soon"),
            ("PROXY_TUNNEL_PROTOCOL", "h3"),
            ("PROXY_METRICS_ENABLED", "yes"),
            ("PROXY_ACCESS_LOG_SAMPLING_RATE", "NaN"),
        ]);
        let mut got = keys(&problems);
        got.sort_unstable();
        assert_eq!(
            got,
            [
                "PROXY_ACCESS_LOG_SAMPLING_RATE",
                "PROXY_ADDR",
                "PROXY_CONFIG_ADDR",
                "PROXY_GRACE_PERIOD",
                "PROXY_TUNNEL_PROTOCOL"
            ],
            "{problems:?}"
        );
        // PROXY_METRICS_ENABLED is refused too, but after PROXY_CONFIG_ADDR in the same step.
        let (_, problems) = overlaid(&[("PROXY_METRICS_ENABLED", "yes")]);
        assert_eq!(keys(&problems), ["PROXY_METRICS_ENABLED"]);
        let (_, problems) = overlaid(&[("PROXY_GRACE_PERIOD", "0s")]);
        assert_eq!(keys(&problems), ["PROXY_GRACE_PERIOD"]);
    }

    #[test]
    fn the_grace_is_clamped_to_three_minutes_with_a_warning() {
        let vars = [("PROXY_GRACE_PERIOD", "10m"), ("PROXY_AUTH_TOKEN", "t")];
        let (c, problems) = overlaid(&vars);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(c.cloudflared.grace_period, MAX_GRACE);
        assert_eq!(c.agent.shutdown_grace, MAX_GRACE);
        assert_eq!(
            env(&vars).warnings(),
            ["PROXY_GRACE_PERIOD 10m is clamped to cloudflared's maximum of 3m"]
        );
        let (c, _) = overlaid(&[("PROXY_GRACE_PERIOD", "1m30s")]);
        assert_eq!(c.cloudflared.grace_period, Duration::from_secs(90));
    }

    #[test]
    fn the_variables_own_their_keys_over_a_file() {
        let mut c = Config::default();
        c.cloudflared.grace_period = Duration::from_secs(5);
        c.cloudflared.protocol = TunnelProtocol::Quic;
        c.proxy.listen = "127.0.0.1:1".parse().unwrap();
        assert!(env(&[]).overlay(&mut c).is_empty());
        assert_eq!(c.cloudflared.grace_period, DEFAULT_GRACE);
        assert_eq!(c.cloudflared.protocol, TunnelProtocol::Auto);
        assert_eq!(c.proxy.listen, "0.0.0.0:8080".parse().unwrap());
        // A file's own token would be replaced, or dropped with PROXY_AUTH_TOKEN unset.
        let mut c = Config {
            config_api: Some(ConfigApiSection {
                auth_secret: Some("mine".into()),
                ..ConfigApiSection::default()
            }),
            ..Config::default()
        };
        assert_eq!(keys(&env(&[]).overlay(&mut c)), ["config_api.auth_secret"]);
    }

    #[test]
    fn the_peers_toggles_and_addresses() {
        let (c, problems) = overlaid(&[
            ("PROXY_METRICS_ENABLED", " FALSE "),
            ("PROXY_TUNNEL_PROTOCOL", "HTTP2"),
            ("PROXY_CONFIG_ADDR", "[::1]:7000"),
            ("PROXY_ACCESS_LOG_ENABLED", "1"),
            ("PROXY_ACCESS_LOG_SAMPLING_RATE", "7"),
        ]);
        assert!(problems.is_empty(), "{problems:?}");
        let api = c.config_api.unwrap();
        assert!(!api.metrics);
        assert_eq!(api.listen, "[::1]:7000".parse().unwrap());
        assert_eq!(c.cloudflared.protocol, TunnelProtocol::Http2);
        assert!(c.proxy.access_log.enabled);
        assert_eq!(c.proxy.access_log.sample, 1.0);
    }

    #[test]
    fn unknown_and_ignored_variables_are_reported_once_each() {
        let e = env(&[
            ("PROXY_AUTH_TOKEN", "t"),
            ("PROXY_TRACING_ENABLED", "true"),
            ("PROXY_LISTEN", ":1"),
            ("PROXY_ADDR", ":8080"),
            ("HOME", "/root"),
        ]);
        assert_eq!(
            e.warnings(),
            [
                "PROXY_LISTEN is not a variable of the gateway controller's proxy; ignored",
                "PROXY_TRACING_ENABLED is ignored: tracing is not supported",
            ]
        );
        assert!(env(&[]).warnings().iter().any(|w| w.contains("WITHOUT authentication")));
    }

    #[test]
    fn a_validation_problem_names_the_variable_behind_its_key() {
        let mut problems = vec![
            problem("config_api.listen", "in use".into()),
            problem("health.listen", "x".into()),
        ];
        env(&[]).name_variables(&mut problems);
        assert_eq!(
            keys(&problems),
            ["config_api.listen (PROXY_CONFIG_ADDR)", "health.listen"]
        );
    }
}
