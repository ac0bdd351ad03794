//! cloudflared's version, asked with `cloudflared --version` at boot and on every reload.
//!
//! It decides what the agent may ask of the binary: `--token-file` (and `TUNNEL_TOKEN_FILE`)
//! exist since 2025.4. An older cloudflared given `--token-file` prints "Incorrect Usage" and
//! exits 0, which the supervisor would restart forever; refusing at boot says why instead.

use std::path::Path;
use std::time::Duration;

use crate::config::TokenDelivery;

/// The first release with `--token-file`.
pub const TOKEN_FILE_SINCE: (u32, u32) = (2025, 4);

/// What `cloudflared --version` said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudflaredVersion {
    /// The version as printed, e.g. `2026.8.2`.
    pub version: String,
    /// `(year, month, patch)` when `version` is a calendar version.
    pub parsed: Option<(u32, u32, u32)>,
}

impl CloudflaredVersion {
    /// Whether this version knows `--token-file`. An unparsable version (a development build)
    /// gets the benefit of the doubt.
    pub fn has_token_file(&self) -> bool {
        self.parsed.is_none_or(|(y, m, _)| (y, m) >= TOKEN_FILE_SINCE)
    }
}

/// Parses the first line of `cloudflared --version`: `cloudflared version 2026.8.2 (built …)`.
pub fn parse(output: &str) -> Option<CloudflaredVersion> {
    let line = output.lines().find(|l| l.contains("version"))?;
    let mut words = line.split_whitespace();
    words.find(|w| *w == "version")?;
    let version = words.next()?.trim_start_matches('v').to_owned();
    if version.is_empty() || !version.chars().all(|c| c.is_ascii_alphanumeric() || ".-+".contains(c)) {
        return None;
    }
    let mut parts = version.split(['.', '-', '+']).map(str::parse::<u32>);
    let parsed = match (parts.next(), parts.next(), parts.next()) {
        (Some(Ok(y)), Some(Ok(m)), patch) => Some((y, m, patch.and_then(Result::ok).unwrap_or(0))),
        _ => None,
    };
    Some(CloudflaredVersion { version, parsed })
}

/// Why `cloudflared --version` told nothing. Not fatal by itself: boot warns, a reload to a
/// new path refuses.
#[derive(Debug, thiserror::Error)]
pub enum VersionError {
    #[error("`{program} --version` did not answer within {timeout:?}")]
    Timeout { program: String, timeout: Duration },
    #[error("cannot run `{program} --version`: {error}")]
    Run { program: String, error: std::io::Error },
    /// `first` is the start of what it printed (at most 120 characters); `exit` its exit code,
    /// or "by signal".
    #[error("`{program} --version` printed no version (exit {exit}): {first:?}")]
    NoVersion {
        program: String,
        exit: String,
        first: String,
    },
}

/// Runs `PROGRAM --version` (bounded by `timeout`, with cloudflared's scrubbed environment) and
/// parses what it printed.
pub async fn detect(program: &Path, timeout: Duration) -> Result<CloudflaredVersion, VersionError> {
    let run = crate::tunnel::command(program)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let shown = || program.display().to_string();
    let out = match tokio::time::timeout(timeout, run).await {
        Err(_) => {
            return Err(VersionError::Timeout {
                program: shown(),
                timeout,
            })
        }
        Ok(Err(error)) => {
            return Err(VersionError::Run {
                program: shown(),
                error,
            })
        }
        Ok(Ok(out)) => out,
    };
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    parse(&text).ok_or_else(|| VersionError::NoVersion {
        program: shown(),
        exit: out
            .status
            .code()
            .map_or_else(|| "by signal".to_owned(), |c| c.to_string()),
        first: text.lines().next().unwrap_or("").chars().take(120).collect(),
    })
}

/// A configuration this cloudflared cannot run. Restarting does not help: the agent exits
/// with EX_CONFIG (78), which the unit does not restart.
#[derive(Debug, thiserror::Error)]
#[error("cloudflared.token_delivery = \"file\" needs cloudflared {}.{} or later (for --token-file); {program} is {version}: upgrade cloudflared or use token_delivery = \"env\"", TOKEN_FILE_SINCE.0, TOKEN_FILE_SINCE.1)]
pub struct Unsupported {
    pub program: String,
    pub version: String,
}

/// Refuses a token delivery `version` does not support.
pub fn check_delivery(
    program: &Path,
    version: &CloudflaredVersion,
    delivery: TokenDelivery,
) -> Result<(), Unsupported> {
    if delivery == TokenDelivery::File && !version.has_token_file() {
        return Err(Unsupported {
            program: program.display().to_string(),
            version: version.version.clone(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_release_and_odd_versions() {
        let v = parse("cloudflared version 2026.8.2 (built local)\n").unwrap();
        assert_eq!(v.version, "2026.8.2");
        assert_eq!(v.parsed, Some((2026, 8, 2)));
        assert!(v.has_token_file());
        let old = parse("cloudflared version 2024.12.1 (built 2024-12-10-1200 UTC)").unwrap();
        assert!(!old.has_token_file());
        assert!(parse("cloudflared version 2025.4.0 (built x)")
            .unwrap()
            .has_token_file());
        assert!(!parse("cloudflared version 2025.3.9 (built x)")
            .unwrap()
            .has_token_file());
        let dev = parse("cloudflared version DEV (built unknown)").unwrap();
        assert_eq!(dev.parsed, None);
        assert!(dev.has_token_file());
        assert_eq!(parse("Incorrect Usage: flag provided but not defined"), None);
        assert_eq!(parse("cloudflared version $(rm -rf)"), None);
        assert_eq!(parse(""), None);
    }

    #[test]
    fn refuses_token_file_on_old_versions_with_the_reason() {
        let old = parse("cloudflared version 2024.12.1 (built x)").unwrap();
        let err = check_delivery(Path::new("/usr/bin/cloudflared"), &old, TokenDelivery::File).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("token_delivery = \"file\""), "{msg}");
        assert!(msg.contains("2025.4"), "{msg}");
        assert!(msg.contains("/usr/bin/cloudflared is 2024.12.1"), "{msg}");
        assert!(check_delivery(Path::new("c"), &old, TokenDelivery::Env).is_ok());
    }

    #[tokio::test]
    async fn a_program_that_prints_no_version_is_named_with_its_exit_and_output() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("tunnel-agent-version-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let program = dir.join("not-cloudflared");
        std::fs::write(&program, "#!/bin/sh\necho 'Incorrect Usage'\nexit 3\n").unwrap();
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = detect(&program, Duration::from_secs(10)).await.unwrap_err();
        assert!(matches!(e, VersionError::NoVersion { .. }), "{e:?}");
        let want = format!(
            "`{} --version` printed no version (exit 3): \"Incorrect Usage\"",
            program.display()
        );
        assert_eq!(e.to_string(), want);
        let e = detect(&dir.join("missing"), Duration::from_secs(10)).await.unwrap_err();
        assert!(matches!(e, VersionError::Run { .. }), "{e:?}");
        assert!(e.to_string().starts_with("cannot run `"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
