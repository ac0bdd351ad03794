//! `build.rs` watches only git paths that exist: cargo treats a missing `rerun-if-changed`
//! path as changed, so a checkout without `.git/packed-refs` (a fresh `git init`, refs never
//! packed) would rerun the script and rebuild the crate on every `cargo build`.
//!
//! The check builds our real `build.rs` in a throwaway crate with no dependencies (a few
//! seconds), in a fresh repository: a second build must not run the script again, and a new
//! commit must.

use std::path::Path;
use std::process::Command;

fn run(dir: &Path, program: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        // The outer `cargo test`'s settings must not leak into the inner build.
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.invalid")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.invalid")
        .output()
        .unwrap_or_else(|e| panic!("{program} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Whether `cargo build -v` ran the build script this time.
fn build_ran_script(dir: &Path) -> bool {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = run(dir, &cargo, &["build", "-v", "--offline"]);
    let err = String::from_utf8_lossy(&out.stderr);
    err.contains("build-script-build`")
}

#[test]
fn a_second_build_in_a_fresh_git_init_is_a_no_op() {
    if Command::new("git").arg("--version").output().is_err() {
        eprintln!("SKIP a_second_build_in_a_fresh_git_init_is_a_no_op: git is not installed");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    std::fs::write(
        dir.join("Cargo.toml"),
        "[package]\nname = \"build-script-check\"\nversion = \"0.0.0\"\nedition = \"2021\"\n",
    )
    .expect("Cargo.toml");
    std::fs::create_dir(dir.join("src")).expect("src");
    std::fs::write(dir.join("src/lib.rs"), "").expect("lib.rs");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("build.rs"),
        dir.join("build.rs"),
    )
    .expect("build.rs");
    run(dir, "git", &["init", "-q", "-b", "main"]);
    run(dir, "git", &["add", "-A"]);
    run(dir, "git", &["commit", "-q", "-m", "first"]);
    assert!(
        !dir.join(".git/packed-refs").exists(),
        "a fresh repository has no packed-refs"
    );

    assert!(build_ran_script(dir), "the first build runs the build script");
    assert!(!build_ran_script(dir), "a second build reran the build script");
    // A new commit changes the hash the binary reports: that must rerun it.
    run(dir, "git", &["commit", "-q", "--allow-empty", "-m", "second"]);
    assert!(build_ran_script(dir), "a new commit did not rerun the build script");
    assert!(!build_ran_script(dir), "a build after the commit's rebuild reran it");
    // Packing the refs moves the branch into packed-refs: the next commit must still be seen.
    run(dir, "git", &["pack-refs", "--all"]);
    build_ran_script(dir);
    run(dir, "git", &["commit", "-q", "--allow-empty", "-m", "third"]);
    assert!(
        build_ran_script(dir),
        "a commit after pack-refs did not rerun the build script"
    );
    assert!(
        !build_ran_script(dir),
        "a second build after pack-refs reran the build script"
    );
}
