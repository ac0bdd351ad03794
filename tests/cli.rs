//! The command line as an operator (and systemd's `ExecStartPre=`) uses it: the real binary,
//! real files, exit codes and what lands on stdout/stderr.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const EXIT_CONFIG: i32 = 78;

/// The binary with an environment that cannot leak in from the developer's shell.
fn agent() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tunnel-agent"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("INTERNAL_AUTH_TOKEN")
        .env_remove("GCE_METADATA_HOST")
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null());
    cmd
}

/// A fresh, empty directory for one test.
fn scratch_dir(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli").join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn check(config: &Path) -> Output {
    agent()
        .arg("check")
        .arg("-c")
        .arg(config)
        .output()
        .expect("run tunnel-agent check")
}

/// Replaces exactly one occurrence, so the test notices when the example changes shape.
fn replace_once(haystack: &str, from: &str, to: &str) -> String {
    assert_eq!(
        haystack.matches(from).count(),
        1,
        "expected exactly one {from:?} in the example"
    );
    haystack.replace(from, to)
}

#[test]
fn version_names_the_crate_version_commit_and_build_date() {
    let out = agent().arg("--version").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let line = text(&out.stdout).trim().to_owned();
    let rest = line
        .strip_prefix(&format!("tunnel-agent {} (commit ", env!("CARGO_PKG_VERSION")))
        .unwrap_or_else(|| panic!("unexpected --version: {line:?}"));
    let (commit, date) = rest
        .strip_suffix(')')
        .and_then(|r| r.split_once(", built "))
        .unwrap_or_else(|| panic!("unexpected --version: {line:?}"));
    let d: Vec<&str> = date.split('-').collect();
    assert!(
        d.len() == 3 && d[0].len() == 4 && d.iter().all(|p| p.bytes().all(|b| b.is_ascii_digit())),
        "build date {date:?} is not YYYY-MM-DD"
    );
    // In a checkout the commit is the one built; build.rs reruns when HEAD moves.
    match Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
    {
        Ok(git) if git.status.success() => assert_eq!(commit, text(&git.stdout).trim(), "{line}"),
        _ => {
            eprintln!("no git checkout here: only checking the commit's shape");
            assert_eq!(commit, "unknown", "{line}");
        }
    }
}

#[test]
fn standalone_example_checks_with_its_env_and_names_the_variable_without() {
    let example = Path::new("packaging/examples/standalone.toml");
    let out = agent()
        .args(["check", "-c"])
        .arg(example)
        .env("INTERNAL_AUTH_TOKEN", "dev-token")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim(),
        "packaging/examples/standalone.toml: ok (1 routes)"
    );

    let out = check(example);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG));
    let err = text(&out.stderr);
    assert!(
        err.contains("INTERNAL_AUTH_TOKEN") && err.contains("internal_token"),
        "{err}"
    );
}

#[test]
fn production_example_checks_once_its_routes_file_exists() {
    let dir = scratch_dir("production_example");
    let example = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/examples/agent.toml"))
        .expect("read packaging/examples/agent.toml");
    let routes = dir.join("routes.json");
    // A `routes.json` host map as a gateway VM's Terraform startup script writes it:
    // hostname → Cloud Run URL.
    std::fs::write(
        &routes,
        r#"{
  "api-admin-internal-dev.example.com": "https://svc-access-abc123-ew.a.run.app",
  "api-public-internal-dev.example.com": "https://svc-access-public-abc123-ew.a.run.app"
}"#,
    )
    .unwrap();
    // Its secrets come from Secret Manager, which `check` validates by name without fetching.
    let config = replace_once(
        &example,
        r#"file = "/etc/tunnel-agent/routes.json""#,
        &format!("file = {:?}", routes.display().to_string()),
    );
    let path = dir.join("agent.toml");
    std::fs::write(&path, config).unwrap();

    let out = check(&path);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), format!("{}: ok (2 routes)", path.display()));
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
}

#[test]
fn production_example_with_the_file_secret_variant_names_the_missing_token_file() {
    let dir = scratch_dir("production_example_file_secret");
    let example = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/examples/agent.toml"))
        .expect("read packaging/examples/agent.toml");
    let routes = dir.join("routes.json");
    std::fs::write(&routes, r#"{"a.example.com": "https://a-abc123-ew.a.run.app"}"#).unwrap();
    let token = dir.join("internal-token");
    // The variant the example shows in comments: the token in a file cloud-init wrote.
    let config = replace_once(
        &example,
        "source = \"gcp-secret-manager\"\nname = \"projects/example-project/secrets/internal-auth-token/versions/latest\"",
        &format!("source = \"file\"\npath = {:?}", token.display().to_string()),
    );
    let config = replace_once(
        &config,
        r#"file = "/etc/tunnel-agent/routes.json""#,
        &format!("file = {:?}", routes.display().to_string()),
    );
    let path = dir.join("agent.toml");
    std::fs::write(&path, config).unwrap();

    let out = check(&path);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG));
    let err = text(&out.stderr);
    assert!(
        err.contains("secret \"internal_token\"") && err.contains(&token.display().to_string()),
        "{err}"
    );

    std::fs::write(&token, "0123456789abcdef\n").unwrap();
    let out = check(&path);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), format!("{}: ok (1 routes)", path.display()));
}

#[test]
fn production_example_as_shipped_names_the_missing_routes_file_only() {
    let out = check(Path::new("packaging/examples/agent.toml"));
    assert_eq!(out.status.code(), Some(EXIT_CONFIG));
    let err = text(&out.stderr);
    assert!(err.contains("/etc/tunnel-agent/routes.json"), "{err}");
    // Secret Manager secrets are not fetched by `check`, so they cannot be reported missing.
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn check_lists_every_parser_error_with_file_line_column_and_key() {
    let dir = scratch_dir("parser_errors");
    let path = dir.join("agent.toml");
    std::fs::write(
        &path,
        r#"[agent]
log_format = "xml"

[proxy]
listen = "127.0.0.1:8080"
lsiten = "127.0.0.1:8081"

[proxyy]
listen = 1

[[route]]
hostnames = ["a.example.com"]
upstream = "https://svc.a.run.app"
timeout = "soon"
"#,
    )
    .unwrap();
    let out = check(&path);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG));
    let err = text(&out.stderr);
    let file = path.display();
    let lines: Vec<&str> = err.lines().collect();
    let want = [
        format!("{file}:2:14: agent.log_format: unknown variant `xml`"),
        format!("{file}:6:1: proxy.lsiten: unknown field `lsiten`"),
        format!("{file}:8:2: proxyy: unknown field `proxyy`"),
        format!("{file}:14:11: route[0].timeout: invalid value"),
    ];
    assert_eq!(lines.len(), want.len(), "{err}");
    for (line, want) in lines.iter().zip(&want) {
        assert!(line.starts_with(want.as_str()), "want {want:?}, got {line:?}");
    }
    assert!(out.stdout.is_empty());
}

#[test]
fn check_lists_every_validation_secret_and_route_problem() {
    let dir = scratch_dir("validation_errors");
    let path = dir.join("agent.toml");
    std::fs::write(
        &path,
        r#"[secrets.tok]
source = "file"
path = "/x"
var = "X"

[proxy]
auth_secret = "missing"
max_header_bytes = 10
workers = 100000

[routes.hosts]
"a.example.com" = "ftp://a"
"b.example.com:80" = "https://b"
"#,
    )
    .unwrap();
    let out = check(&path);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG));
    let err = text(&out.stderr);
    let file = path.display();
    for want in [
        format!("{file}: secrets.tok.var: not used by source = \"file\""),
        format!("{file}: proxy.auth_secret: no secret named \"missing\""),
        format!("{file}: proxy.max_header_bytes: must be at least 8192"),
        format!("{file}: proxy.workers: 100000 is more than 256 (0 means one per CPU)"),
        format!("{file}: routes.hosts.\"a.example.com\": "),
        format!("{file}: routes.hosts.\"b.example.com:80\": "),
    ] {
        assert!(err.lines().any(|l| l.starts_with(&want)), "missing {want:?} in:\n{err}");
    }

    // A file that validates: the secret and the routes file are read, and both failures shown.
    let routes = dir.join("routes.json");
    std::fs::write(&routes, r#"{"a.example.com": "gopher://a"}"#).unwrap();
    std::fs::write(
        &path,
        format!(
            "[secrets.tok]\nsource = \"file\"\npath = {:?}\n[proxy]\nauth_secret = \"tok\"\n\
             [routes]\nsource = \"file\"\nfile = {:?}\n",
            dir.join("absent-token").display().to_string(),
            routes.display().to_string()
        ),
    )
    .unwrap();
    let out = check(&path);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG));
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 2, "{err}");
    assert!(err.contains("secret \"tok\"") && err.contains("absent-token"), "{err}");
    assert!(err.contains("gopher"), "{err}");
    // Each with its key, as docs/config.md promises.
    assert!(err.contains(&format!("{file}: secrets.tok.path: ")), "{err}");
    assert!(err.contains(&format!("{file}: routes.file: ")), "{err}");
}

#[test]
fn check_names_the_access_log_key_and_reason() {
    let dir = scratch_dir("access_log_errors");
    let path = dir.join("agent.toml");
    std::fs::write(&path, "[proxy.access_log]\nenabled = true\nsample = 1.5\n").unwrap();
    let out = check(&path);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG));
    let err = text(&out.stderr);
    let want = format!("{}: proxy.access_log.sample: must be between 0 and 1", path.display());
    assert!(err.lines().any(|l| l.starts_with(&want)), "missing {want:?} in:\n{err}");

    std::fs::write(&path, "[proxy.access_log]\nformat = \"xml\"\nheaders = true\n").unwrap();
    let out = check(&path);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG));
    let err = text(&out.stderr);
    for key in ["proxy.access_log.format", "proxy.access_log.headers"] {
        assert!(err.contains(&format!(": {key}: ")), "missing {key} in:\n{err}");
    }
}

/// The proxy's `ca_file` anchors every https route, so the route table fails on it too: `check`
/// names it once, under its own key, not again as a route problem.
#[test]
fn check_names_an_unreadable_ca_file_once() {
    let dir = scratch_dir("ca_file_once");
    let path = dir.join("agent.toml");
    let ca = dir.join("missing-ca.pem");
    std::fs::write(
        &path,
        format!(
            "[proxy]\nca_file = {:?}\n[routes.hosts]\n\"a.example.com\" = \"https://127.0.0.1:1\"\n",
            ca.display().to_string()
        ),
    )
    .unwrap();
    let out = check(&path);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG));
    let err = text(&out.stderr);
    let want = format!("{}: proxy.ca_file: cannot read {}", path.display(), ca.display());
    assert!(err.lines().any(|l| l.starts_with(&want)), "missing {want:?} in:\n{err}");
    assert_eq!(err.matches("cannot read").count(), 1, "named more than once:\n{err}");
    assert!(text(&out.stdout).is_empty(), "no ok line after a problem");
}

/// One run, every problem: a parser error does not hide a bad URL, an unreadable secret, a
/// secret no client can send, or the cloudflared checks of a disabled cloudflared; and a token
/// given as `--token=…` is never echoed.
#[test]
fn check_reports_parse_validation_and_secret_problems_in_one_pass() {
    let dir = scratch_dir("one_pass");
    let path = dir.join("agent.toml");
    let doubled = dir.join("doubled-newline");
    std::fs::write(&doubled, "tok-value\n\n").unwrap();
    std::fs::write(
        &path,
        format!(
            r#"[secrets.gone]
source = "file"
path = {gone:?}

[secrets.doubled]
source = "file"
path = {doubled:?}

[proxy]
lsiten = "127.0.0.1:9"
auth_secret = "gone"

[cloudflared]
enabled = false
metrics = "127.0.0.1:8080"
extra_args = ["--token=eyJ-LEAKED-TOKEN", "--protocol", "http2"]

[routes.hosts]
"a.example.com" = "ftp://a"
"#,
            gone = dir.join("absent").display().to_string(),
            doubled = doubled.display().to_string(),
        ),
    )
    .unwrap();
    let out = check(&path);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG));
    let err = text(&out.stderr);
    let file = path.display().to_string();
    for want in [
        format!("{file}:10:1: proxy.lsiten: unknown field"),
        format!("{file}: routes.hosts.\"a.example.com\": "),
        format!("{file}: cloudflared.metrics: 127.0.0.1:8080 is already used by the agent"),
        format!("{file}: cloudflared.extra_args: \"--token\" is managed by the agent"),
        format!("{file}: secrets.gone.path: secret \"gone\": cannot read file"),
        format!("{file}: secrets.doubled.path: secret \"doubled\": value from file"),
    ] {
        assert!(err.lines().any(|l| l.starts_with(&want)), "missing {want:?} in:\n{err}");
    }
    assert!(err.contains("control character (U+000A)"), "{err}");
    assert!(
        !err.contains("LEAKED") && !err.contains("tok-value"),
        "a value was echoed:\n{err}"
    );
    for line in err.lines() {
        assert!(line.starts_with(&format!("{file}:")), "{line}");
    }
}

/// Two ports held by the test: if the agent tried to listen before validating, it would fail
/// with "cannot listen" (exit 1) instead of reporting the configuration (exit 78).
#[test]
fn run_with_a_bad_config_exits_78_before_listening() {
    let dir = scratch_dir("run_bad_config");
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let health = TcpListener::bind("127.0.0.1:0").unwrap();
    let valid_but_held = format!(
        "[proxy]\nlisten = \"{}\"\n[health]\nlisten = \"{}\"\n",
        proxy.local_addr().unwrap(),
        health.local_addr().unwrap()
    );
    for (name, broken) in [
        ("parse", format!("{valid_but_held}[agent]\nshutdown_grce = \"5s\"\n")),
        (
            "validate",
            format!("{valid_but_held}[agent]\nshutdown_grace = \"0s\"\n"),
        ),
    ] {
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, broken).unwrap();
        let mut child = agent()
            .args(["run", "-c"])
            .arg(&path)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if tokio::time::Instant::now() > deadline {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!("{name}: agent still running after 10 s: {}", text(&out.stderr));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = child.wait_with_output().unwrap();
        let err = text(&out.stderr);
        assert_eq!(status.code(), Some(EXIT_CONFIG), "{name}: {err}");
        assert!(err.contains("shutdown_gr"), "{name}: {err}");
        assert!(
            !err.contains("cannot listen") && !err.contains("listener up"),
            "{name}: {err}"
        );
    }
    drop((proxy, health));
}

#[test]
fn check_never_prints_a_secret_value() {
    let dir = scratch_dir("secret_not_printed");
    // Digits are valid JSON and TOML-ish, the kind of value a parser likes to quote back.
    let secret = "8817263548";
    let token = dir.join("internal-token");
    std::fs::write(&token, format!("{secret}\n")).unwrap();
    let quoted = dir.join("quoted-token");
    std::fs::write(&quoted, format!("\"{secret}\"\n")).unwrap();
    let env_secret = "s3cr3t-from-env";

    // Misconfigurations that make the agent read a secret file as something else.
    let cases = [
        (
            "routes file is the token",
            format!("file = {:?}", token.display().to_string()),
        ),
        (
            "routes file is a quoted token",
            format!("file = {:?}", quoted.display().to_string()),
        ),
    ];
    for (what, routes_file) in cases {
        let path = dir.join("agent.toml");
        std::fs::write(
            &path,
            format!(
                "[secrets.tok]\nsource = \"file\"\npath = {:?}\n[secrets.env]\nsource = \"env\"\nvar = \"TA_TEST_SECRET\"\n\
                 [proxy]\nauth_secret = \"tok\"\n[routes]\nsource = \"file\"\n{routes_file}\n",
                token.display().to_string()
            ),
        )
        .unwrap();
        let out = agent()
            .args(["check", "-c"])
            .arg(&path)
            .env("TA_TEST_SECRET", env_secret)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{what}");
        let all = text(&out.stdout) + &text(&out.stderr);
        assert!(all.contains("routes") || all.contains("JSON"), "{what}: {all}");
        assert!(
            !all.contains(secret) && !all.contains(env_secret),
            "{what} leaked: {all}"
        );
    }

    // The token file given as the configuration itself.
    for file in [&token, &quoted] {
        let out = check(file);
        assert_eq!(out.status.code(), Some(EXIT_CONFIG));
        let all = text(&out.stdout) + &text(&out.stderr);
        assert!(all.contains(&file.display().to_string()), "{all}");
        assert!(!all.contains(secret), "leaked: {all}");
    }
}

/// `check` and `--version` into a pipe nobody reads any more (`| head -1` after `head` exited):
/// a quiet exit with the usual code, no panic (101/134) and nothing on stderr.
#[test]
fn output_into_a_closed_pipe_exits_quietly() {
    for args in [
        vec!["check", "-c", "packaging/examples/standalone.toml"],
        vec!["--version"],
    ] {
        let (read, write) = nix::unistd::pipe().expect("pipe");
        drop(read);
        let out = agent()
            .args(&args)
            .env("INTERNAL_AUTH_TOKEN", "dev-token")
            .stdout(Stdio::from(write))
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {:?} {}",
            out.status,
            text(&out.stderr)
        );
        assert_eq!(text(&out.stderr), "", "{args:?}");
    }
}
