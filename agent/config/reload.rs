//! Reload: which settings a running agent cannot change (they need a restart).

use std::time::Duration;

use super::{CloudflaredSection, Config};

impl Config {
    /// Settings that only take effect on restart (listeners, directories). Reload reports a
    /// change to any of these instead of half-applying it.
    pub fn restart_only_differences(&self, new: &Config) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.proxy.listen != new.proxy.listen {
            out.push("proxy.listen");
        }
        if self.health.listen != new.health.listen {
            out.push("health.listen");
        }
        if self.config_api.as_ref().map(|a| a.listen) != new.config_api.as_ref().map(|a| a.listen) {
            out.push("config_api.listen");
        }
        if self.agent.runtime_dir != new.agent.runtime_dir {
            out.push("agent.runtime_dir");
        }
        if self.agent.state_dir != new.agent.state_dir {
            out.push("agent.state_dir");
        }
        if self.agent.log_format != new.agent.log_format {
            out.push("agent.log_format");
        }
        // The global subscriber is installed once, with the level read at start.
        if self.agent.log_level != new.agent.log_level {
            out.push("agent.log_level");
        }
        if self.proxy.max_header_bytes != new.proxy.max_header_bytes {
            out.push("proxy.max_header_bytes");
        }
        if self.proxy.header_read_timeout != new.proxy.header_read_timeout {
            out.push("proxy.header_read_timeout");
        }
        if self.proxy.idle_timeout != new.proxy.idle_timeout {
            out.push("proxy.idle_timeout");
        }
        if self.proxy.connect_timeout != new.proxy.connect_timeout
            || self.proxy.pool_idle_timeout != new.proxy.pool_idle_timeout
            || self.proxy.pool_max_idle_per_host != new.proxy.pool_max_idle_per_host
        {
            out.push("proxy.connect_timeout/pool_*");
        }
        if self.routes.source != new.routes.source
            || self.routes.attribute != new.routes.attribute
            || self.routes.attribute_scope != new.routes.attribute_scope
        {
            out.push("routes.source/attribute");
        }
        if self.role_watch.attribute != new.role_watch.attribute
            || self.role_watch.attribute_scope != new.role_watch.attribute_scope
            || self.role_watch.host_name != new.role_watch.host_name
        {
            out.push("role_watch");
        }
        let api = |c: &Config| {
            c.config_api
                .as_ref()
                .map(|a| (a.listen, a.auth_secret.clone(), a.persist))
        };
        if api(self) != api(new) {
            out.push("config_api");
        }
        if self.gcp.metadata_url != new.gcp.metadata_url || self.gcp.metadata_timeout != new.gcp.metadata_timeout {
            out.push("gcp.metadata_url/metadata_timeout");
        }
        // The identity-token cache is built once at start and keeps its margin.
        if self.gcp.id_token_refresh_margin != new.gcp.id_token_refresh_margin {
            out.push("gcp.id_token_refresh_margin");
        }
        // The Secret Manager client is built once at start, with its endpoint.
        if self.gcp.secret_manager_endpoint != new.gcp.secret_manager_endpoint {
            out.push("gcp.secret_manager_endpoint");
        }
        // The supervisor takes its restart policy at start; a reload only changes the command.
        if restart_policy(&self.cloudflared) != restart_policy(&new.cloudflared) {
            out.push(
                "cloudflared.restart_backoff/restart_backoff_max/stable_after/crash_loop_*/give_up_after_exits/poll_interval/disconnected_restart_after",
            );
        }
        out
    }

    /// Overwrites the settings [`Config::restart_only_differences`] covers with `running`'s, so
    /// a reloaded configuration describes what is really in effect: the next reload diffs
    /// against it, and nothing half-applies a value that needs a restart (cloudflared's token
    /// file in a new `runtime_dir`, one read of a new route source).
    pub fn keep_restart_only(&mut self, running: &Config) {
        self.proxy.listen = running.proxy.listen;
        self.health.listen = running.health.listen;
        self.agent.runtime_dir = running.agent.runtime_dir.clone();
        self.agent.state_dir = running.agent.state_dir.clone();
        self.agent.log_format = running.agent.log_format;
        self.agent.log_level = running.agent.log_level.clone();
        self.proxy.max_header_bytes = running.proxy.max_header_bytes;
        self.proxy.header_read_timeout = running.proxy.header_read_timeout;
        self.proxy.idle_timeout = running.proxy.idle_timeout;
        self.proxy.connect_timeout = running.proxy.connect_timeout;
        self.proxy.pool_idle_timeout = running.proxy.pool_idle_timeout;
        self.proxy.pool_max_idle_per_host = running.proxy.pool_max_idle_per_host;
        if self.routes.source != running.routes.source {
            // The source's own keys go with it; within one source, `file` and `hosts` are live.
            self.routes.source = running.routes.source;
            self.routes.file = running.routes.file.clone();
            self.routes.hosts = running.routes.hosts.clone();
        }
        self.routes.attribute = running.routes.attribute.clone();
        self.routes.attribute_scope = running.routes.attribute_scope;
        self.role_watch = running.role_watch.clone();
        // The config API's listener and token are read once, at start.
        self.config_api = running.config_api.clone();
        self.gcp.metadata_url = running.gcp.metadata_url.clone();
        self.gcp.metadata_timeout = running.gcp.metadata_timeout;
        self.gcp.id_token_refresh_margin = running.gcp.id_token_refresh_margin;
        self.gcp.secret_manager_endpoint = running.gcp.secret_manager_endpoint.clone();
        let cf = &running.cloudflared;
        self.cloudflared.restart_backoff = cf.restart_backoff;
        self.cloudflared.restart_backoff_max = cf.restart_backoff_max;
        self.cloudflared.stable_after = cf.stable_after;
        self.cloudflared.crash_loop_exits = cf.crash_loop_exits;
        self.cloudflared.crash_loop_window = cf.crash_loop_window;
        self.cloudflared.give_up_after_exits = cf.give_up_after_exits;
        self.cloudflared.poll_interval = cf.poll_interval;
        self.cloudflared.disconnected_restart_after = cf.disconnected_restart_after;
    }
}

/// The `[cloudflared]` keys the supervisor reads once, at start.
fn restart_policy(cf: &CloudflaredSection) -> (Duration, Duration, Duration, u32, Duration, u32, Duration, Duration) {
    (
        cf.restart_backoff,
        cf.restart_backoff_max,
        cf.stable_after,
        cf.crash_loop_exits,
        cf.crash_loop_window,
        cf.give_up_after_exits,
        cf.poll_interval,
        cf.disconnected_restart_after,
    )
}
