//! What is wrong with a configuration file: every problem, with its key and, for the parser's,
//! its line and column.

use std::fmt;
use std::path::PathBuf;

use super::Config;

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `secrets.internal_token.path`.
    pub key: String,
    pub reason: String,
}

/// A syntax or type error found by the TOML parser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseProblem {
    /// Dotted key path (`proxy.listen`, `route[0].upstream`) when the error points at a key or
    /// value; `None` for plain syntax errors.
    pub key: Option<String>,
    /// 1-based line and column (in characters) when the parser knows the position.
    pub position: Option<(usize, usize)>,
    pub reason: String,
}

/// Everything wrong with one file, reported together.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    /// Errors from the TOML parser (syntax, unknown keys, wrong types).
    pub parse: Vec<ParseProblem>,
    /// Validation problems: of the whole file, or, beside parser errors, of what parsed once
    /// the bad lines were set aside (without keys next to a set-aside line, which may be ours).
    pub problems: Vec<Problem>,
    /// What parsed, when anything did: `check` still reads its secrets and routes file so one
    /// run lists every problem.
    pub config: Option<Box<Config>>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The environment mode without a file.
        let file = if self.file.as_os_str().is_empty() {
            std::borrow::Cow::Borrowed("(environment)")
        } else {
            self.file.to_string_lossy()
        };
        let mut lines = Vec::new();
        // `file:line:column:` is the shape editors and CI annotators recognise.
        for p in &self.parse {
            let at = match p.position {
                Some((line, column)) => format!("{file}:{line}:{column}"),
                None => file.to_string(),
            };
            lines.push(match &p.key {
                Some(key) => format!("{at}: {key}: {}", p.reason),
                None => format!("{at}: {}", p.reason),
            });
        }
        for p in &self.problems {
            lines.push(format!("{file}: {}: {}", p.key, p.reason));
        }
        f.write_str(&lines.join("\n"))
    }
}
