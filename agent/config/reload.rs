//! Reload: which settings a running agent cannot change (they need a restart).
//!
//! [`RESTART_ONLY`] lists them once. A reload reports each one that changed
//! ([`Config::restart_only_differences`]) and keeps the running value of every one
//! ([`Config::keep_restart_only`]), so the reloaded configuration describes what is really in
//! effect and nothing half-applies a value that needs a restart.

use super::Config;

/// One setting (or group) read once, at start.
pub struct RestartOnly {
    /// As reported in `/status` `pending_restart` and the reload warning.
    pub name: &'static str,
    differs: fn(&Config, &Config) -> bool,
    /// Copies the running value into the reloaded config.
    keep: fn(&mut Config, &Config),
}

/// A setting that is a plain group of fields: differs when any does, kept whole.
macro_rules! fields {
    ($name:literal: $($($field:ident).+),+) => {
        RestartOnly {
            name: $name,
            differs: |a, b| false $(|| a.$($field).+ != b.$($field).+)+,
            keep: |new, running| {
                $(new.$($field).+ = running.$($field).+.clone();)+
            },
        }
    };
}

/// Every restart-only setting, in the order a reload reports them.
#[allow(clippy::clone_on_copy)]
pub const RESTART_ONLY: &[RestartOnly] = &[
    fields!("proxy.listen": proxy.listen),
    fields!("health.listen": health.listen),
    fields!("health.details_from": health.details_from),
    // Kept with the whole `config_api` section below.
    RestartOnly {
        name: "config_api.listen",
        differs: |a, b| a.config_api.as_ref().map(|c| c.listen) != b.config_api.as_ref().map(|c| c.listen),
        keep: |_, _| {},
    },
    fields!("agent.runtime_dir": agent.runtime_dir),
    fields!("agent.state_dir": agent.state_dir),
    fields!("agent.log_format": agent.log_format),
    // The subscriber's writer is chosen once, at start.
    fields!("agent.log_stream": agent.log_stream),
    // The global subscriber is installed once, with the level read at start.
    fields!("agent.log_level": agent.log_level),
    fields!("proxy.max_header_bytes": proxy.max_header_bytes),
    fields!("proxy.header_read_timeout": proxy.header_read_timeout),
    fields!("proxy.idle_timeout": proxy.idle_timeout),
    // The proxy reads them from its settings, taken once at start.
    fields!("proxy.body_read_timeout/upgrade_idle_timeout": proxy.body_read_timeout, proxy.upgrade_idle_timeout),
    // The listeners' connection settings and cap are built once, at start.
    fields!("proxy.http2_keep_alive_interval/max_connections": proxy.http2_keep_alive_interval, proxy.max_connections),
    fields!("proxy.connect_timeout/pool_*": proxy.connect_timeout, proxy.pool_idle_timeout, proxy.pool_max_idle_per_host),
    fields!("proxy.workers": proxy.workers),
    RestartOnly {
        name: "routes.source/attribute",
        differs: |a, b| {
            a.routes.source != b.routes.source
                || a.routes.attribute != b.routes.attribute
                || a.routes.attribute_scope != b.routes.attribute_scope
        },
        keep: |new, running| {
            if new.routes.source != running.routes.source {
                // The source's own keys go with it; within one source, `file` and `hosts` are
                // live.
                new.routes.source = running.routes.source;
                new.routes.file = running.routes.file.clone();
                new.routes.hosts = running.routes.hosts.clone();
            }
            new.routes.attribute = running.routes.attribute.clone();
            new.routes.attribute_scope = running.routes.attribute_scope;
        },
    },
    fields!("role_watch": role_watch.attribute, role_watch.attribute_scope, role_watch.host_name),
    // The election's client and task, and the check's, are built once at start.
    fields!("role_election": role_election),
    fields!("role_follow": role_follow),
    // The config API's listener, secret name and persistence are read once, at start; the
    // secret's value rotates (`Node::apply_settings`).
    RestartOnly {
        name: "config_api",
        differs: |a, b| {
            let api = |c: &Config| {
                c.config_api.as_ref().map(|a| {
                    (
                        a.listen,
                        a.auth_secret.clone(),
                        a.allow_unauthenticated,
                        a.metrics,
                        a.persist,
                    )
                })
            };
            api(a) != api(b)
        },
        keep: |new, running| new.config_api = running.config_api.clone(),
    },
    fields!("gcp.metadata_url/metadata_timeout": gcp.metadata_url, gcp.metadata_timeout),
    // The identity-token cache is built once at start and keeps its margin.
    fields!("gcp.id_token_refresh_margin": gcp.id_token_refresh_margin),
    // The Secret Manager client is built once at start, with its endpoint.
    fields!("gcp.secret_manager_endpoint": gcp.secret_manager_endpoint),
    // The supervisor takes its restart policy at start; a reload only changes the command.
    fields!(
        "cloudflared.restart_backoff/restart_backoff_max/stable_after/crash_loop_*/give_up_after_exits/poll_interval/disconnected_restart_after":
        cloudflared.restart_backoff,
        cloudflared.restart_backoff_max,
        cloudflared.stable_after,
        cloudflared.crash_loop_exits,
        cloudflared.crash_loop_window,
        cloudflared.give_up_after_exits,
        cloudflared.poll_interval,
        cloudflared.disconnected_restart_after
    ),
];

impl Config {
    /// The restart-only settings that differ in `new`. Reload reports them instead of
    /// half-applying them.
    pub fn restart_only_differences(&self, new: &Config) -> Vec<&'static str> {
        RESTART_ONLY
            .iter()
            .filter(|s| (s.differs)(self, new))
            .map(|s| s.name)
            .collect()
    }

    /// Overwrites every restart-only setting with `running`'s, so a reloaded configuration
    /// describes what is really in effect: the next reload diffs against it, and nothing
    /// half-applies a value that needs a restart (cloudflared's token file in a new
    /// `runtime_dir`, one read of a new route source).
    pub fn keep_restart_only(&mut self, running: &Config) {
        for s in RESTART_ONLY {
            (s.keep)(self, running);
        }
    }
}
