//! A config file's route contents, checked by the code that compiles the live table, so `check`
//! and a running agent can never disagree. `crate::config` is a leaf and cannot call this itself:
//! [`load_config`] is the whole check, schema and routes, that every caller uses.

use std::collections::BTreeMap;
use std::path::Path;

use crate::config::{Config, ConfigError, Problem, RouteSourceKind};
use crate::routing::compile;

/// The problems in `config`'s routes: `[[route]]` and, for `source = "inline"`, the host
/// map. Remote sources are checked when fetched.
pub fn route_problems(config: &Config) -> Vec<Problem> {
    let empty = BTreeMap::new();
    let hosts = match config.routes.source {
        RouteSourceKind::Inline => &config.routes.hosts,
        _ => &empty,
    };
    match compile::build(config, hosts) {
        Ok(_) => Vec::new(),
        Err(e) => e.problems,
    }
}

/// Reads, parses and validates `path`, routes included.
pub fn load_config(path: &Path) -> Result<Config, ConfigError> {
    Config::load(path, &route_problems)
}

/// Parses and validates `text` (read from `path`), routes included.
pub fn parse_config(path: &Path, text: &str) -> Result<Config, ConfigError> {
    Config::parse(path, text, &route_problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        parse_config(Path::new("/etc/t/agent.toml"), text)
    }

    #[test]
    fn all_semantic_problems_reported_together() {
        let err = parse(
            r#"
            [secrets.tok]
            source = "file"
            var = "X"
            [proxy]
            auth_secret = "missing"
            max_header_bytes = 10
            [routes.hosts]
            "a.example.com" = "ftp://nope"
            "#,
        )
        .unwrap_err();
        let keys: Vec<_> = err.problems.iter().map(|p| p.key.as_str()).collect();
        for want in [
            "secrets.tok.path",
            "secrets.tok.var",
            "proxy.auth_secret",
            "proxy.max_header_bytes",
            "routes.hosts.\"a.example.com\"",
        ] {
            assert!(keys.contains(&want), "missing {want} in {keys:?}");
        }
    }
}
