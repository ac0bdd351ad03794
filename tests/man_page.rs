//! The man page (`packaging/tunnel-agent.1`) against the code, so it cannot go stale: every
//! subcommand and option the real binary's `--help` lists, every health endpoint, and every
//! exit code `main.rs` can return must be documented in it.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

fn man_page() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/tunnel-agent.1");
    let roff = std::fs::read_to_string(&path).expect("read the man page");
    // Plain text out of roff: `\-` is a minus, font escapes go.
    roff.replace("\\-", "-")
        .replace("\\fR", "")
        .replace("\\fP", "")
        .replace("\\fB", "")
        .replace("\\fI", "")
}

/// The lines of one `.SH` section.
fn section<'a>(man: &'a str, name: &str) -> Vec<&'a str> {
    man.lines()
        .skip_while(|l| *l != format!(".SH {name}"))
        .skip(1)
        .take_while(|l| !l.starts_with(".SH "))
        .collect()
}

fn help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tunnel-agent"))
        .args(args)
        .arg("--help")
        .output()
        .expect("run tunnel-agent --help");
    assert!(out.status.success(), "{args:?} --help: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Subcommand names from clap's `Commands:` block.
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// Long (and short) option names from clap's `Options:` block.
fn options(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Options:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .flat_map(|l| {
            l.split_whitespace()
                .take_while(|w| w.starts_with('-'))
                .map(|w| w.trim_end_matches(',').to_owned())
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn every_subcommand_and_option_is_documented() {
    let man = man_page();
    let commands = section(&man, "COMMANDS").join("\n");
    let documented_options = section(&man, "OPTIONS").join("\n");
    let top = help(&[]);
    let subs = subcommands(&top);
    assert!(subs.len() >= 5, "clap's help changed shape:\n{top}");
    let mut missing = Vec::new();
    for sub in &subs {
        if !commands.lines().any(|l| l == format!(".B {sub}")) {
            missing.push(format!("command {sub}"));
        }
        if sub == "help" {
            continue;
        }
        for opt in options(&help(&[sub])) {
            if !documented_options.contains(&opt) {
                missing.push(format!("{sub} {opt}"));
            }
        }
        if !section(&man, "SYNOPSIS").join("\n").contains(sub.as_str()) {
            missing.push(format!("synopsis of {sub}"));
        }
    }
    for opt in options(&top) {
        if !documented_options.contains(&opt) {
            missing.push(format!("option {opt}"));
        }
    }
    assert!(missing.is_empty(), "not in packaging/tunnel-agent.1: {missing:?}");
}

#[test]
fn every_health_endpoint_is_documented() {
    let man = man_page();
    let endpoints = section(&man, "ENDPOINTS");
    let missing: Vec<&str> = tunnel_agent::health::Endpoint::ALL
        .iter()
        .map(|e| e.path())
        .filter(|p| !endpoints.iter().any(|l| *l == format!(".B {p}")))
        .collect();
    assert!(
        missing.is_empty(),
        "endpoints not in the man page's ENDPOINTS: {missing:?}"
    );
    // The config API's routes, which live in their own module.
    let text = endpoints.join("\n");
    for route in ["PUT /config", "GET /config"] {
        assert!(text.contains(route), "{route} not in ENDPOINTS");
    }
}

/// Exit codes: those the agent returns (`tunnel_agent::exit::Exit`, which `main.rs` ends
/// with) and clap's usage error, each an item of EXIT STATUS.
#[test]
fn every_exit_code_is_documented() {
    let main = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("agent/main.rs")).expect("main.rs");
    // Every status main.rs returns is an `Exit`: a raw `ExitCode` would bypass the list below.
    for raw in ["ExitCode::from(", "ExitCode::SUCCESS", "ExitCode::FAILURE"] {
        assert!(
            !main.contains(raw),
            "main.rs returns {raw}…: return a tunnel_agent::exit::Exit (and document its code)"
        );
    }
    let mut codes: BTreeSet<u8> = tunnel_agent::exit::Exit::ALL.iter().map(|e| e.code()).collect();
    let usage = Command::new(env!("CARGO_BIN_EXE_tunnel-agent"))
        .arg("no-such-command")
        .output()
        .expect("run tunnel-agent");
    codes.insert(u8::try_from(usage.status.code().expect("an exit code")).expect("small"));
    assert!(codes.len() >= 4, "{codes:?}");

    let man = man_page();
    let documented: BTreeSet<u8> = section(&man, "EXIT STATUS")
        .windows(2)
        .filter(|w| w[0] == ".TP")
        .filter_map(|w| w[1].strip_prefix(".B ").and_then(|c| c.trim().parse().ok()))
        .collect();
    assert_eq!(
        documented, codes,
        "EXIT STATUS in the man page vs the codes the binary returns"
    );
}
