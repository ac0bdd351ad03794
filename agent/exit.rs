//! How the process ends: the exit statuses the agent promises (packaging/tunnel-agent.1's EXIT
//! STATUS, the unit's `RestartPreventExitStatus=`) and the top-level error that chooses one.
//!
//! Usage errors (exit 2) are clap's own and never reach this module.

use std::process::ExitCode;

use crate::config::ConfigError;
use crate::tunnel::version::Unsupported;

/// An exit status of `tunnel-agent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// Success, a clean shutdown; for `check`, a valid configuration.
    Success = 0,
    /// Any other failure: an address in use, cloudflared crash-looping past its restart limit,
    /// no agent on the control socket or a refused command.
    Failure = 1,
    /// The configuration is invalid (`EX_CONFIG` from sysexits.h). The unit lists it in
    /// `RestartPreventExitStatus=`, so a bad file does not become a restart loop.
    Config = 78,
}

impl Exit {
    /// Every status the agent itself returns (the man page documents each).
    pub const ALL: [Exit; 3] = [Exit::Success, Exit::Failure, Exit::Config];

    pub const fn code(self) -> u8 {
        self as u8
    }
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> ExitCode {
        ExitCode::from(exit.code())
    }
}

/// Why the agent stopped with an error. Each variant is a kind of failure with its exit status,
/// so the binary asks [`AgentError::exit`] instead of guessing from a message.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The configuration file does not load or validate.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// The configured cloudflared cannot run this configuration: restarting cannot fix it.
    #[error("{0}")]
    Unsupported(#[from] Unsupported),
    /// Anything else that ends a run.
    #[error("{0:#}")]
    Failed(anyhow::Error),
}

impl AgentError {
    pub fn exit(&self) -> Exit {
        match self {
            AgentError::Config(_) | AgentError::Unsupported(_) => Exit::Config,
            AgentError::Failed(_) => Exit::Failure,
        }
    }
}

impl From<anyhow::Error> for AgentError {
    /// A failure a run reports untyped (an address in use, cloudflared crash-looping): the
    /// typed kinds above are built where they happen, never guessed from a message.
    fn from(e: anyhow::Error) -> AgentError {
        AgentError::Failed(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_the_documented_ones() {
        let codes: Vec<u8> = Exit::ALL.iter().map(|e| e.code()).collect();
        assert_eq!(codes, [0, 1, 78]);
    }

    #[test]
    fn an_old_cloudflared_is_a_configuration_error_and_other_failures_are_not() {
        let unsupported = Unsupported {
            program: "/usr/bin/cloudflared".into(),
            version: "2024.12.1".into(),
        };
        let shown = unsupported.to_string();
        let e = AgentError::from(unsupported);
        assert_eq!(e.exit(), Exit::Config);
        assert_eq!(e.to_string(), shown);
        let other = AgentError::from(anyhow::anyhow!("address in use").context("proxy.listen"));
        assert_eq!(other.exit(), Exit::Failure);
        assert_eq!(other.to_string(), "proxy.listen: address in use");
    }
}
