//! `[agent]`: where the agent keeps its files, how it logs, how long boot and shutdown may take.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{duration, Problem};

/// Our variable for `agent.log_stream`'s default when the file does not set it: the OCI image
/// sets it to `stdout`, so both of its starts (a mounted file, `run --from-env` with none) log
/// where a container's logs are expected without a line in any file.
pub const LOG_STREAM_VAR: &str = "TUNNEL_AGENT_LOG_STREAM";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentSection {
    /// Volatile files for operators and children (effective `routes.json`, token file, control
    /// socket). systemd's `RuntimeDirectory=` creates it.
    pub runtime_dir: PathBuf,
    /// Files that must survive a reboot (last good route table, persisted role).
    pub state_dir: PathBuf,
    /// How long in-flight proxy requests may take to finish after SIGTERM.
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::HOUR }>")]
    pub shutdown_grace: Duration,
    /// How long an upgrade in place lets in-flight proxy requests finish before the exec cuts
    /// them; new connections wait in the kernel's queue meanwhile, so this bounds their wait
    /// too (docs/operations.md, "Upgrading").
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::MINUTE }>")]
    pub upgrade_drain: Duration,
    pub log_format: LogFormat,
    /// The stream the text and JSON formats write to. `None` in the file: [`LOG_STREAM_VAR`]
    /// decides when the file is loaded, else stderr (what systemd's units and the journal
    /// expect; read it through [`AgentSection::log_stream`]).
    pub log_stream: Option<LogStream>,
    /// `tracing` filter directive, e.g. `info` or `tunnel_agent=debug,hyper=info`.
    pub log_level: String,
    /// How long boot may keep retrying transient failures (Secret Manager 429/5xx, metadata
    /// server unreachable) before giving up with an error.
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::DAY }>")]
    pub boot_timeout: Duration,
}

impl Default for AgentSection {
    fn default() -> Self {
        AgentSection {
            runtime_dir: PathBuf::from("/run/tunnel-agent"),
            state_dir: PathBuf::from("/var/lib/tunnel-agent"),
            shutdown_grace: Duration::from_secs(30),
            upgrade_drain: Duration::from_secs(10),
            log_format: LogFormat::Auto,
            log_stream: None,
            log_level: "info".to_owned(),
            boot_timeout: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// journald when stderr is the journal stream, text otherwise.
    Auto,
    Text,
    Json,
    Journald,
}

/// Where the agent's log lines go, unless they go to the journal.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    #[default]
    Stderr,
    Stdout,
}

impl LogStream {
    pub fn as_str(self) -> &'static str {
        match self {
            LogStream::Stderr => "stderr",
            LogStream::Stdout => "stdout",
        }
    }
}

impl AgentSection {
    /// The stream the log is written to: the file's `log_stream`, else what
    /// [`LOG_STREAM_VAR`] said when the file was loaded, else stderr.
    pub fn log_stream(&self) -> LogStream {
        self.log_stream.unwrap_or_default()
    }

    /// Takes `var`, the value of [`LOG_STREAM_VAR`], as `log_stream` when the file does not
    /// set it. Unset or empty means no default (as the gateway controller's variables do). A
    /// value that is neither stream is a problem naming the variable even when the file
    /// decides: it is a mistake in the deployment either way.
    pub(super) fn default_log_stream(&mut self, var: Option<&OsStr>) -> Option<Problem> {
        let var = var.filter(|v| !v.is_empty())?;
        let stream = match var.to_str().map(str::trim) {
            Some("stderr") => LogStream::Stderr,
            Some("stdout") => LogStream::Stdout,
            _ => {
                return Some(Problem {
                    key: LOG_STREAM_VAR.to_owned(),
                    reason: format!(
                        "{:?} is not one of stderr, stdout (the default of agent.log_stream)",
                        var.to_string_lossy()
                    ),
                })
            }
        };
        self.log_stream.get_or_insert(stream);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_var(file: Option<LogStream>, var: &str) -> (LogStream, Option<Problem>) {
        let mut agent = AgentSection {
            log_stream: file,
            ..AgentSection::default()
        };
        let problem = agent.default_log_stream(Some(OsStr::new(var)));
        (agent.log_stream(), problem)
    }

    #[test]
    fn the_variable_is_the_default_and_the_file_decides() {
        assert_eq!(AgentSection::default().log_stream(), LogStream::Stderr);
        assert_eq!(with_var(None, "stdout"), (LogStream::Stdout, None));
        assert_eq!(with_var(None, " stderr "), (LogStream::Stderr, None));
        assert_eq!(with_var(Some(LogStream::Stderr), "stdout"), (LogStream::Stderr, None));
        assert_eq!(with_var(None, ""), (LogStream::Stderr, None), "empty is unset");
        let mut agent = AgentSection::default();
        assert_eq!(agent.default_log_stream(None), None);
        assert_eq!(agent.log_stream(), LogStream::Stderr);
    }

    #[test]
    fn a_bad_variable_is_a_problem_naming_it_and_the_streams() {
        for file in [None, Some(LogStream::Stdout)] {
            let (stream, problem) = with_var(file, "STDOUT2");
            assert_eq!(stream, file.unwrap_or_default());
            let problem = problem.expect("a problem");
            assert_eq!(problem.key, LOG_STREAM_VAR);
            assert_eq!(
                problem.reason,
                "\"STDOUT2\" is not one of stderr, stdout (the default of agent.log_stream)"
            );
        }
    }
}
