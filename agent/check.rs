//! `tunnel-agent check`: the configuration, its local secrets and its route table loaded as
//! start-up loads them, with every problem in one report (each with file and key), so
//! `ExecStartPre=` and an operator see all of them at once.
//!
//! A file that parses (even with some lines set aside) still has its secrets and routes read,
//! except those a problem already names: a problem is said once, not once per consequence.

use std::path::Path;

use crate::config::{self, Config, ConfigError};
use crate::exit::Exit;
use crate::routing;
use crate::routing::error::{RoutesError, SourceError};
use crate::telemetry::Metrics;

/// What `check` prints and how it exits.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// `PATH: ok (N routes)` when the configuration is valid.
    pub stdout: String,
    /// One line per problem.
    pub stderr: String,
    pub failed: bool,
}

impl Report {
    pub fn exit(&self) -> Exit {
        if self.failed {
            Exit::Config
        } else {
            Exit::Success
        }
    }

    fn problem(&mut self, line: String) {
        self.stderr.push_str(&line);
        self.stderr.push('\n');
        self.failed = true;
    }
}

/// Checks the configuration at `path`.
pub fn check(path: &Path) -> Report {
    let mut report = Report::default();
    let (config, named) = match routing::load_config(path) {
        Ok(c) => (c, Vec::new()),
        Err(e) => {
            report.problem(e.to_string());
            let named = named_keys(&e);
            match e.config {
                Some(c) => (*c, named),
                None => return report,
            }
        }
    };
    let named = Named(named);
    let metrics = Metrics::default();
    // The environment mode without a file (`check --from-env`) has no path to name.
    let file = match path.as_os_str().is_empty() {
        true => "(environment)".to_owned(),
        false => path.display().to_string(),
    };
    check_secrets(&file, &config, &metrics, &named, &mut report);
    check_election(&file, &config, &named, &mut report);
    if !named.covers("routes") && !named.covers("route") {
        check_routes(&file, &config, &metrics, &named, &mut report);
    }
    report
}

/// The keys the configuration's own problems name.
fn named_keys(e: &ConfigError) -> Vec<String> {
    (e.problems.iter().map(|p| p.key.clone()))
        .chain(e.parse.iter().filter_map(|p| p.key.clone()))
        .collect()
}

/// Keys a problem already named.
struct Named(Vec<String>);

impl Named {
    /// Whether a problem named `table` or a key inside it.
    fn covers(&self, table: &str) -> bool {
        self.0
            .iter()
            .any(|k| k == table || k.starts_with(&format!("{table}.")) || k.starts_with(&format!("{table}[")))
    }
}

fn check_secrets(file: &str, config: &Config, metrics: &Metrics, named: &Named, report: &mut Report) {
    let Err(errors) = crate::secrets::resolve::load_local(config, metrics) else {
        return;
    };
    for e in errors {
        let key = e.key();
        let table = key.rsplit_once('.').map_or(key.as_str(), |(t, _)| t);
        if !named.covers(table) {
            report.problem(format!("{}: {key}: {e}", file));
        }
    }
}

/// The kubeconfig a Lease election names, read and used as start-up does.
fn check_election(file: &str, config: &Config, named: &Named, report: &mut Report) {
    let Some(section) = &config.role_election else {
        return;
    };
    if named.covers("role_election") {
        return;
    }
    if let Err(e) = crate::role::election::check_kubeconfig(section) {
        report.problem(format!("{file}: {e}"));
    }
}

fn check_routes(file: &str, config: &Config, metrics: &Metrics, named: &Named, report: &mut Report) {
    let e = match routing::source::load_local(config, metrics) {
        Ok(table) => {
            if !report.failed {
                report.stdout = format!("{}: ok ({} routes)\n", file, table.len());
            }
            return;
        }
        Err(e) => e,
    };
    let key = match config.routes.source {
        config::RouteSourceKind::File => "routes.file",
        _ => "routes",
    };
    // A table's problem can be a setting the report above already named (the proxy's
    // `ca_file` anchors every https route): said once, not twice.
    let message = match e {
        SourceError::Invalid(routes) => {
            let problems: Vec<_> = (routes.problems.iter())
                .filter(|p| !named.covers(&p.key))
                .cloned()
                .collect();
            let new = RoutesError { problems };
            (!new.problems.is_empty()).then(|| format!("invalid routes: {new}"))
        }
        other => Some(other.to_string()),
    };
    match message {
        Some(message) => report.problem(format!("{}: {key}: {message}", file)),
        None => report.failed = true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(test: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("tunnel-agent-check-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    fn config(dir: &Path, extra: &str) -> std::path::PathBuf {
        let path = dir.join("agent.toml");
        let text = format!(
            "[agent]\nruntime_dir = \"{0}/run\"\nstate_dir = \"{0}/state\"\n\n\
             [proxy]\nlisten = \"127.0.0.1:0\"\n\n[health]\nlisten = \"127.0.0.1:0\"\n\n{extra}",
            dir.display()
        );
        std::fs::write(&path, text).expect("write config");
        path
    }

    #[test]
    fn a_valid_configuration_says_ok_with_its_route_count() {
        let dir = scratch("valid");
        let path = config(&dir, "[routes.hosts]\n\"a.example\" = \"http://127.0.0.1:1\"\n");
        let report = check(&path);
        assert_eq!(report.stderr, "");
        assert_eq!(report.stdout, format!("{}: ok (1 routes)\n", path.display()));
        assert_eq!(report.exit(), Exit::Success);
    }

    #[test]
    fn every_problem_once_with_its_key() {
        let dir = scratch("problems");
        let secrets = "[secrets.t]\nsource = \"file\"\npath = \"/nonexistent/tunnel-agent-check\"\n";
        let routes = format!(
            "[routes]\nsource = \"file\"\nfile = \"{}/missing.json\"\n",
            dir.display()
        );
        let path = config(&dir, &format!("{secrets}\n{routes}"));
        let report = check(&path);
        assert_eq!(report.stdout, "", "no ok line beside problems");
        assert_eq!(report.exit(), Exit::Config);
        let lines: Vec<&str> = report.stderr.lines().collect();
        assert_eq!(lines.len(), 2, "{}", report.stderr);
        assert!(
            lines[0].starts_with(&format!("{}: secrets.t", path.display())),
            "{}",
            report.stderr
        );
        assert!(
            lines[1].starts_with(&format!("{}: routes.file: ", path.display())),
            "{}",
            report.stderr
        );
    }

    #[test]
    fn a_problem_in_a_table_is_not_repeated_by_its_consequences() {
        let dir = scratch("named");
        // An unknown key in [routes]: the routes are not read again to fail a second time.
        let path = config(&dir, "[routes]\nsource = \"file\"\nno_such_key = 1\n");
        let report = check(&path);
        assert_eq!(report.exit(), Exit::Config);
        assert!(!report.stderr.contains("routes.file:"), "{}", report.stderr);
        assert!(report.stderr.contains("no_such_key"), "{}", report.stderr);
    }
}
