//! A [`TunnelSpec`] in the form an upgrade carries it: comparable with a spec the new image
//! computes, without the token. Apart from `carry.rs` so that the supervisor, which compares its
//! first applied spec with it, does not depend on the hand-over.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{sandbox, TunnelSpec};

/// A [`TunnelSpec`] as far as it can be compared without its token: a newly computed spec
/// that has this form (and, computed from the same secret values, the same token) runs the
/// same cloudflared, so applying it restarts nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CarriedSpec {
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Whether a token was set; never its value.
    pub has_token: bool,
    pub token_file: Option<PathBuf>,
    /// The ingress file's path and content (no secret: it names the credentials file).
    pub ingress: Option<(PathBuf, String)>,
    pub metrics: SocketAddr,
    pub grace_ms: u64,
    pub stop_margin_ms: u64,
    pub origin: SocketAddr,
    /// Absent from the state an image before `remote_ingress` wrote: its cloudflared has no
    /// proxy variables, and a spec with them differs (one restart, at that upgrade).
    #[serde(default)]
    pub egress_proxy: Option<SocketAddr>,
    pub home: Option<PathBuf>,
    pub sandbox: Option<CarriedSandbox>,
}

/// A [`sandbox::Policy`], by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CarriedSandbox {
    pub mode: String,
    pub allow: Vec<(PathBuf, String)>,
    pub files: Vec<(PathBuf, String)>,
    pub protected: Vec<PathBuf>,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl CarriedSpec {
    pub fn of(spec: &TunnelSpec) -> CarriedSpec {
        CarriedSpec {
            program: spec.program.clone(),
            args: spec.args.clone(),
            has_token: spec.token.is_some(),
            token_file: spec.token_file.clone(),
            ingress: spec.ingress.clone(),
            metrics: spec.metrics,
            grace_ms: millis(spec.grace),
            stop_margin_ms: millis(spec.stop_margin),
            origin: spec.origin,
            egress_proxy: spec.egress_proxy,
            home: spec.home.clone(),
            sandbox: spec.sandbox.as_ref().map(CarriedSandbox::of),
        }
    }

    /// Whether `spec` (`None`: none wanted) is what `carried` describes.
    pub fn same(carried: Option<&CarriedSpec>, spec: Option<&TunnelSpec>) -> bool {
        carried.cloned() == spec.map(CarriedSpec::of)
    }
}

impl CarriedSandbox {
    fn of(policy: &sandbox::Policy) -> CarriedSandbox {
        use crate::config::Sandbox;
        use sandbox::Access;
        let access = |list: &[(PathBuf, Access)]| {
            let name = |a: &Access| match a {
                Access::Read => "read",
                Access::ReadExec => "read-exec",
                Access::All => "all",
            };
            list.iter().map(|(p, a)| (p.clone(), name(a).to_owned())).collect()
        };
        let mode = match policy.mode {
            Sandbox::Auto => "auto",
            Sandbox::Landlock => "landlock",
            Sandbox::Off => "off",
        };
        CarriedSandbox {
            mode: mode.to_owned(),
            allow: access(&policy.allow),
            files: access(&policy.files),
            protected: policy.protected.clone(),
        }
    }
}
