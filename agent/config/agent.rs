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

/// Our variable for `agent.log_format`'s default when the file does not set it: the OCI image
/// sets it to `json`, as the gateway controller's proxy logs, so its pods' log pipelines read
/// ours unchanged whether or not a file is mounted.
pub const LOG_FORMAT_VAR: &str = "TUNNEL_AGENT_LOG_FORMAT";

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
    /// How lines are written. `None` in the file: [`LOG_FORMAT_VAR`] decides when the file is
    /// loaded, else `auto` (read it through [`AgentSection::log_format`]).
    pub log_format: Option<LogFormat>,
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
            log_format: None,
            log_stream: None,
            log_level: "info".to_owned(),
            boot_timeout: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// journald when the log stream is the journal stream, text otherwise.
    #[default]
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

    /// How the log is written: the file's `log_format`, else what [`LOG_FORMAT_VAR`] said when
    /// the file was loaded, else `auto`.
    pub fn log_format(&self) -> LogFormat {
        self.log_format.unwrap_or_default()
    }

    /// Takes `stream` and `format`, the values of [`LOG_STREAM_VAR`] and [`LOG_FORMAT_VAR`], as
    /// `log_stream` and `log_format` where the file does not set them. Unset or empty means no
    /// default (as the gateway controller's variables do). A value the key would not take is
    /// a problem naming the variable even when the file decides: it is a mistake in the
    /// deployment either way.
    pub(super) fn log_defaults(&mut self, stream: Option<&OsStr>, format: Option<&OsStr>) -> Vec<Problem> {
        const STREAMS: &[(&str, LogStream)] = &[("stderr", LogStream::Stderr), ("stdout", LogStream::Stdout)];
        const FORMATS: &[(&str, LogFormat)] = &[
            ("auto", LogFormat::Auto),
            ("text", LogFormat::Text),
            ("json", LogFormat::Json),
            ("journald", LogFormat::Journald),
        ];
        let mut problems = Vec::new();
        match from_var(LOG_STREAM_VAR, stream, STREAMS, "agent.log_stream") {
            Ok(v) => self.log_stream = self.log_stream.or(v),
            Err(p) => problems.push(p),
        }
        match from_var(LOG_FORMAT_VAR, format, FORMATS, "agent.log_format") {
            Ok(v) => self.log_format = self.log_format.or(v),
            Err(p) => problems.push(p),
        }
        problems
    }
}

/// The value of variable `name` among `choices`, the values of `key`: `None` when unset or
/// empty, a problem naming the variable and the choices when it is none of them.
fn from_var<T: Copy>(name: &str, var: Option<&OsStr>, choices: &[(&str, T)], key: &str) -> Result<Option<T>, Problem> {
    let Some(var) = var.filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let value = var.to_str().map(str::trim);
    match choices.iter().find(|(word, _)| Some(*word) == value) {
        Some((_, v)) => Ok(Some(*v)),
        None => {
            let words: Vec<&str> = choices.iter().map(|(word, _)| *word).collect();
            Err(Problem {
                key: name.to_owned(),
                reason: format!(
                    "{:?} is not one of {} (the default of {key})",
                    var.to_string_lossy(),
                    words.join(", ")
                ),
            })
        }
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
        let mut problems = agent.log_defaults(Some(OsStr::new(var)), None);
        assert!(problems.len() <= 1);
        (agent.log_stream(), problems.pop())
    }

    #[test]
    fn the_variable_is_the_default_and_the_file_decides() {
        assert_eq!(AgentSection::default().log_stream(), LogStream::Stderr);
        assert_eq!(with_var(None, "stdout"), (LogStream::Stdout, None));
        assert_eq!(with_var(None, " stderr "), (LogStream::Stderr, None));
        assert_eq!(with_var(Some(LogStream::Stderr), "stdout"), (LogStream::Stderr, None));
        assert_eq!(with_var(None, ""), (LogStream::Stderr, None), "empty is unset");
        let mut agent = AgentSection::default();
        assert_eq!(agent.log_defaults(None, None), vec![]);
        assert_eq!(
            (agent.log_stream(), agent.log_format()),
            (LogStream::Stderr, LogFormat::Auto)
        );
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

    #[test]
    fn the_format_variable_is_the_default_and_the_file_decides() {
        let format = |file: Option<LogFormat>, var: &str| {
            let mut agent = AgentSection {
                log_format: file,
                ..AgentSection::default()
            };
            let problems = agent.log_defaults(None, Some(OsStr::new(var)));
            (agent.log_format(), problems)
        };
        assert_eq!(format(None, "json"), (LogFormat::Json, vec![]));
        assert_eq!(format(None, " text"), (LogFormat::Text, vec![]));
        assert_eq!(format(None, ""), (LogFormat::Auto, vec![]), "empty is unset");
        assert_eq!(format(Some(LogFormat::Text), "json"), (LogFormat::Text, vec![]));
        for file in [None, Some(LogFormat::Text)] {
            let (got, problems) = format(file, "JSON");
            assert_eq!(got, file.unwrap_or_default());
            assert_eq!(problems.len(), 1);
            assert_eq!(problems[0].key, LOG_FORMAT_VAR);
            assert_eq!(
                problems[0].reason,
                "\"JSON\" is not one of auto, text, json, journald (the default of agent.log_format)"
            );
        }
    }

    #[test]
    fn both_variables_are_read_and_both_problems_said() {
        let mut agent = AgentSection::default();
        assert_eq!(
            agent.log_defaults(Some(OsStr::new("stdout")), Some(OsStr::new("json"))),
            vec![]
        );
        assert_eq!(
            (agent.log_stream(), agent.log_format()),
            (LogStream::Stdout, LogFormat::Json)
        );
        let problems = AgentSection::default().log_defaults(Some(OsStr::new("x")), Some(OsStr::new("y")));
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, [LOG_STREAM_VAR, LOG_FORMAT_VAR]);
    }
}
