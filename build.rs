//! Build facts for `--version`, the first log line, `/status` and `tunnel_agent_build_info`:
//! the git commit and the build date, as `TUNNEL_AGENT_COMMIT` / `TUNNEL_AGENT_BUILD_DATE`.
//!
//! A build outside a git checkout (a source tarball, a vendored copy) gets `unknown` for the
//! commit unless the builder passes `TUNNEL_AGENT_COMMIT` itself. The date honours
//! `SOURCE_DATE_EPOCH` (reproducible builds, Debian's packaging sets it) and is otherwise today.

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

fn main() {
    println!("cargo:rerun-if-env-changed=TUNNEL_AGENT_COMMIT");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    println!("cargo:rerun-if-changed=build.rs");
    let commit = std::env::var("TUNNEL_AGENT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(git_commit)
        .unwrap_or_else(|| "unknown".to_owned());
    // A new commit (HEAD moved, or the branch it names did) must rebuild with the new hash.
    // Only paths that exist are watched: cargo takes a missing one as changed and would rerun
    // this script, and rebuild the crate, on every build (a fresh `git init`, refs never
    // packed). HEAD always exists and changes on a checkout; the branch's loose ref file
    // changes on a commit, and while it does not exist (no commit yet, or packed) the
    // `refs/heads` directory is watched instead, which cargo scans for new files;
    // `packed-refs` is watched when present, and a `git pack-refs` that creates it removes the
    // loose ref file, which reruns this script.
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
    // `--git-path` answers relative to the working directory (the manifest's), as cargo reads it.
    let exists = |p: &String| std::path::Path::new(&dir).join(p).exists();
    let mut watched: Vec<String> = ["HEAD", "packed-refs"]
        .iter()
        .filter_map(|path| git(&["rev-parse", "--git-path", path]))
        .collect();
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        let loose = git(&["rev-parse", "--git-path", &branch]).filter(exists);
        watched.extend(loose.or_else(|| git(&["rev-parse", "--git-path", "refs/heads"])));
    }
    for p in watched.iter().filter(|p| exists(p)) {
        println!("cargo:rerun-if-changed={p}");
    }
    let epoch = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()));
    println!("cargo:rustc-env=TUNNEL_AGENT_COMMIT={commit}");
    println!("cargo:rustc-env=TUNNEL_AGENT_BUILD_DATE={}", civil_date(epoch));
}

/// The abbreviated commit of the checkout being built, if it is one.
fn git_commit() -> Option<String> {
    git(&["rev-parse", "--short=12", "HEAD"]).filter(|c| c.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn git(args: &[&str]) -> Option<String> {
    let dir = std::env::var("CARGO_MANIFEST_DIR").ok()?;
    let out = Command::new("git").args(args).current_dir(dir).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!s.is_empty()).then_some(s)
}

/// `YYYY-MM-DD` (UTC) of a Unix time: Howard Hinnant's `civil_from_days`, which saves a date
/// crate for one line of output.
fn civil_date(epoch_secs: u64) -> String {
    let z = (epoch_secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}
