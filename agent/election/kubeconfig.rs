//! `role_election.kubeconfig`: the API server and the credentials for the Lease election read
//! from a kubeconfig file, as `kubectl` would use it, for a node outside the cluster.
//!
//! What is taken, from the context `role_election.context` names (else `current-context`):
//! the cluster's `server`, its CA (`certificate-authority`, a path, or
//! `certificate-authority-data`, base64 PEM), and the user's bearer token (`token`, or
//! `tokenFile`, read again for every request as the in-cluster token is) and/or client
//! certificate (`client-certificate[-data]` with `client-key[-data]`). Relative paths are
//! relative to the kubeconfig's directory (client-go's `ResolvePaths` does the same). The
//! context's `namespace` is not used: the Lease's is `role_election.namespace`.
//!
//! Refused, naming the file and the field, rather than half-honoured:
//! - `exec` and `auth-provider`: they run a program (or a cloud SDK's flow) the file names; the
//!   agent runs no program a config file names other than cloudflared.
//! - `insecure-skip-tls-verify: true`: any server on the path could then make this node
//!   active; give the cluster's CA instead.
//! - `username`/`password` (basic auth, gone from Kubernetes since 1.19), impersonation (`as`,
//!   `as-groups`, `as-uid`, `as-user-extra`), `proxy-url` (the agent connects directly) and
//!   `tls-server-name`: not implemented.
//! - A field this module does not know in a `cluster` or `user` entry (it might change how the
//!   server is trusted or who we are); unknown top-level keys (`preferences`, `extensions`) are
//!   ignored.
//! - Both forms of one thing (`certificate-authority` and `-data`, `token` and `tokenFile`):
//!   client-go refuses the first pair too, rather than pick one silently.
//!
//! The file is local configuration but is bounded like input: at most [`FILE_LIMIT`] bytes (a
//! kubeconfig with embedded certificates is a few KiB), and so is each file it names. Secrets
//! it holds (a token, a client key) are held as [`Secret`]s and never appear in an error: a
//! parser's message that would quote a value has the quoted text removed.

use crate::files::read_regular;
use std::path::Path;

use base64::Engine as _;
use serde::de::IgnoredAny;
use serde::Deserialize;

use super::kubernetes::{Access, Token};
use crate::secret::Secret;

/// The largest kubeconfig read, and the largest file it names (CA, certificate, key, token).
pub const FILE_LIMIT: u64 = 1024 * 1024;

/// Why a kubeconfig cannot be used. Its `Display` names the file and the field.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {field}: {reason}")]
pub struct KubeconfigError {
    pub file: String,
    /// The field's path in the file (`users[0].user.exec`), or what was being looked for.
    pub field: String,
    pub reason: String,
}

/// The file as written. Top-level keys this module does not use are ignored. Go writes an
/// empty list as `null`, so every list is optional.
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct File {
    #[serde(default)]
    clusters: Option<Vec<NamedCluster>>,
    #[serde(default)]
    contexts: Option<Vec<NamedContext>>,
    #[serde(default)]
    users: Option<Vec<NamedUser>>,
    #[serde(default)]
    current_context: Option<String>,
}

#[derive(Deserialize)]
struct NamedCluster {
    name: String,
    cluster: Cluster,
}

#[derive(Deserialize)]
struct NamedContext {
    name: String,
    context: Context,
}

#[derive(Deserialize)]
struct NamedUser {
    name: String,
    user: User,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct Cluster {
    server: Option<String>,
    certificate_authority: Option<String>,
    certificate_authority_data: Option<String>,
    #[serde(default)]
    insecure_skip_tls_verify: bool,
    tls_server_name: Option<IgnoredAny>,
    proxy_url: Option<IgnoredAny>,
    /// Accepted and not used (a Lease answer is small).
    #[allow(dead_code)]
    disable_compression: Option<IgnoredAny>,
    #[allow(dead_code)]
    extensions: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Context {
    cluster: String,
    user: String,
    /// Not used: the Lease's namespace is `role_election.namespace`.
    #[allow(dead_code)]
    namespace: Option<IgnoredAny>,
    #[allow(dead_code)]
    extensions: Option<IgnoredAny>,
}

/// No `Debug`: it holds the token and key as read.
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct User {
    client_certificate: Option<String>,
    client_certificate_data: Option<String>,
    client_key: Option<String>,
    client_key_data: Option<String>,
    token: Option<String>,
    #[serde(rename = "tokenFile")]
    token_file: Option<String>,
    exec: Option<IgnoredAny>,
    auth_provider: Option<IgnoredAny>,
    username: Option<IgnoredAny>,
    password: Option<IgnoredAny>,
    #[serde(rename = "as")]
    act_as: Option<IgnoredAny>,
    as_uid: Option<IgnoredAny>,
    as_groups: Option<IgnoredAny>,
    as_user_extra: Option<IgnoredAny>,
    #[allow(dead_code)]
    extensions: Option<IgnoredAny>,
}

/// Reads the kubeconfig at `path` and resolves `context` (else its `current-context`) to the
/// server and credentials the Lease client uses. The files it names are read now, except a
/// `tokenFile`, which is read for every request.
pub fn load(path: &Path, context: Option<&str>) -> Result<Access, KubeconfigError> {
    let file = path.display().to_string();
    let fail = |field: &str, reason: String| KubeconfigError {
        file: file.clone(),
        field: field.to_owned(),
        reason,
    };
    let text = read_regular(path, FILE_LIMIT).map_err(|e| fail("(file)", e.to_string()))?;
    let text = String::from_utf8(text).map_err(|_| fail("(file)", "is not UTF-8 text".into()))?;
    let parsed: File = serde_path_to_error::deserialize(serde_yaml_ng::Deserializer::from_str(&text)).map_err(|e| {
        let field = e.path().to_string();
        let message = e.inner().to_string();
        // serde_yaml_ng's message starts with the path too.
        let message = message.strip_prefix(&format!("{field}: ")).unwrap_or(&message);
        fail(&field, without_quoted(message))
    })?;
    let dir = path.parent().unwrap_or(Path::new("."));
    Resolver {
        file: &parsed,
        dir,
        fail: &fail,
    }
    .access(context)
}

/// Looks entries up by name and turns them into an [`Access`].
struct Resolver<'a> {
    file: &'a File,
    dir: &'a Path,
    fail: &'a dyn Fn(&str, String) -> KubeconfigError,
}

impl Resolver<'_> {
    fn access(&self, context: Option<&str>) -> Result<Access, KubeconfigError> {
        let fail = self.fail;
        let name = match context
            .or(self.file.current_context.as_deref())
            .filter(|c| !c.is_empty())
        {
            Some(name) => name,
            None => {
                return Err(fail(
                    "current-context",
                    "unset: set it, or name a context with role_election.context".into(),
                ))
            }
        };
        let contexts = self.file.contexts.as_deref().unwrap_or_default();
        let Some((i, ctx)) = contexts.iter().enumerate().find(|(_, c)| c.name == name) else {
            return Err(fail("contexts", format!("no context named {name:?}")));
        };
        let clusters = self.file.clusters.as_deref().unwrap_or_default();
        let Some((ci, cluster)) = clusters.iter().enumerate().find(|(_, c)| c.name == ctx.context.cluster) else {
            let reason = format!("names cluster {:?}, which is not in clusters", ctx.context.cluster);
            return Err(fail(&format!("contexts[{i}].context.cluster"), reason));
        };
        let users = self.file.users.as_deref().unwrap_or_default();
        let Some((ui, user)) = users.iter().enumerate().find(|(_, u)| u.name == ctx.context.user) else {
            let reason = format!("names user {:?}, which is not in users", ctx.context.user);
            return Err(fail(&format!("contexts[{i}].context.user"), reason));
        };
        let (api_url, ca_pem) = self.cluster(&format!("clusters[{ci}].cluster"), &cluster.cluster)?;
        let (token, identity_pem) = self.user(&format!("users[{ui}].user"), &user.user)?;
        Ok(Access {
            api_url,
            ca_pem,
            token,
            identity_pem,
        })
    }

    /// The server's URL and the CA bundle (PEM) it must chain to.
    fn cluster(&self, at: &str, c: &Cluster) -> Result<(String, Option<Vec<u8>>), KubeconfigError> {
        let fail = |k: &str, reason: String| (self.fail)(&format!("{at}.{k}"), reason);
        let unsupported = [
            ("tls-server-name", c.tls_server_name.is_some()),
            ("proxy-url", c.proxy_url.is_some()),
        ];
        if let Some((k, _)) = unsupported.iter().find(|(_, set)| *set) {
            return Err(fail(k, "not supported by tunnel-agent; remove it".into()));
        }
        if c.insecure_skip_tls_verify {
            return Err(fail(
                "insecure-skip-tls-verify",
                "refused: without verifying the server any host on the path could make this node active; give the cluster's CA (certificate-authority or certificate-authority-data)".into(),
            ));
        }
        let server = c.server.as_deref().unwrap_or("");
        if !(server.starts_with("https://") || server.starts_with("http://")) || server.len() < "http://x".len() {
            return Err(fail(
                "server",
                "must be an http:// or https:// URL, with its host".into(),
            ));
        }
        let ca = self.file_or_data(
            at,
            "certificate-authority",
            &c.certificate_authority,
            &c.certificate_authority_data,
        )?;
        Ok((server.to_owned(), ca))
    }

    /// The bearer token's source and the client certificate with its key (one PEM).
    fn user(&self, at: &str, u: &User) -> Result<(Token, Option<Secret>), KubeconfigError> {
        let fail = |k: &str, reason: String| (self.fail)(&format!("{at}.{k}"), reason);
        if u.exec.is_some() || u.auth_provider.is_some() {
            let k = if u.exec.is_some() { "exec" } else { "auth-provider" };
            return Err(fail(
                k,
                "refused: tunnel-agent does not run a program a config file names; give the user a token, tokenFile or client certificate".into(),
            ));
        }
        let unsupported = [
            ("username", u.username.is_some()),
            ("password", u.password.is_some()),
            ("as", u.act_as.is_some()),
            ("as-uid", u.as_uid.is_some()),
            ("as-groups", u.as_groups.is_some()),
            ("as-user-extra", u.as_user_extra.is_some()),
        ];
        if let Some((k, _)) = unsupported.iter().find(|(_, set)| *set) {
            return Err(fail(
                k,
                "not supported by tunnel-agent (use a token, tokenFile or client certificate)".into(),
            ));
        }
        let token = match (&u.token, &u.token_file) {
            (Some(_), Some(_)) => return Err(fail("token", "set either token or tokenFile, not both".into())),
            (Some(t), None) if t.trim().is_empty() => return Err(fail("token", "is empty".into())),
            // It goes into an Authorization header as it is.
            (Some(t), None) if !t.trim().bytes().all(|b| b.is_ascii_graphic()) => {
                return Err(fail("token", "must be one word of printable ASCII".into()))
            }
            (Some(t), None) => Token::Fixed(Secret::new(t.trim())),
            (None, Some(p)) => Token::File(self.dir.join(p)),
            (None, None) => Token::None,
        };
        let cert = self.file_or_data(
            at,
            "client-certificate",
            &u.client_certificate,
            &u.client_certificate_data,
        )?;
        let key = self.file_or_data(at, "client-key", &u.client_key, &u.client_key_data)?;
        let identity = match (cert, key) {
            (Some(mut pem), Some(key)) => {
                pem.push(b'\n');
                pem.extend_from_slice(&key);
                let pem = String::from_utf8(pem).map_err(|_| fail("client-key", "is not PEM text".into()))?;
                Some(Secret::new(pem))
            }
            (None, None) => None,
            (Some(_), None) => return Err(fail("client-key", "required with a client certificate".into())),
            (None, Some(_)) => return Err(fail("client-certificate", "required with a client key".into())),
        };
        if matches!(token, Token::None) && identity.is_none() {
            return Err(fail(
                "token",
                "the user has no credentials tunnel-agent can use: give it a token, tokenFile or client certificate and key".into(),
            ));
        }
        Ok((token, identity))
    }

    /// The bytes of `key` (a path the kubeconfig names, relative to its directory, read
    /// bounded) or of `key-data` (base64 in the file): one of them, never both.
    fn file_or_data(
        &self,
        at: &str,
        key: &str,
        path: &Option<String>,
        data: &Option<String>,
    ) -> Result<Option<Vec<u8>>, KubeconfigError> {
        let fail = |k: &str, reason: String| (self.fail)(&format!("{at}.{k}"), reason);
        match (path, data) {
            (Some(_), Some(_)) => Err(fail(key, format!("set either {key} or {key}-data, not both"))),
            (Some(path), None) => {
                let full = self.dir.join(path);
                read_regular(&full, FILE_LIMIT)
                    .map(Some)
                    .map_err(|e| fail(key, format!("{}: {e}", full.display())))
            }
            (None, Some(data)) => decode(data).map(Some).map_err(|r| fail(&format!("{key}-data"), r)),
            (None, None) => Ok(None),
        }
    }
}

/// A `*-data` field: standard base64 (Go's `[]byte` in YAML), whitespace allowed.
fn decode(data: &str) -> Result<Vec<u8>, String> {
    let compact: String = data.split_ascii_whitespace().collect();
    base64::engine::general_purpose::STANDARD
        .decode(compact)
        .map_err(|_| "is not base64".to_owned())
}

/// A parser's message without the text it quotes: serde quotes a value it did not expect
/// (`invalid type: string "…"`), which may be a token written in the wrong place.
fn without_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut quoted = false;
    for c in message.chars() {
        match (c, quoted) {
            ('"', false) => {
                quoted = true;
                out.push_str("\"…");
            }
            ('"', true) => {
                quoted = false;
                out.push('"');
            }
            (c, false) => out.push(c),
            (_, true) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "kubeconfig-token-5d1e";
    /// Any base64 stands in for a PEM here: the client is not built.
    const CA_DATA: &str = "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg==";

    fn kubeconfig(dir: &Path, cluster: &str, user: &str) -> std::path::PathBuf {
        let text = format!(
            "apiVersion: v1\nkind: Config\npreferences: {{}}\ncurrent-context: main\nclusters:\n- name: c1\n  cluster:\n{cluster}\ncontexts:\n- name: main\n  context:\n    cluster: c1\n    user: u1\n    namespace: ignored\n- name: other\n  context:\n    cluster: c1\n    user: u2\nusers:\n- name: u1\n  user:\n{user}\n- name: u2\n  user:\n    tokenFile: tokens/u2\n"
        );
        let path = dir.join("config");
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }

    fn refused(dir: &Path, cluster: &str, user: &str) -> String {
        let path = kubeconfig(dir, cluster, user);
        match load(&path, None) {
            Ok(_) => panic!("accepted:\n{cluster}\n{user}"),
            Err(e) => e.to_string(),
        }
    }

    const SERVER: &str = "    server: https://127.0.0.1:6443";

    #[test]
    fn the_current_context_gives_server_ca_and_token() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cluster = format!("{SERVER}\n    certificate-authority-data: {CA_DATA}\n    extensions: []");
        let path = kubeconfig(dir.path(), &cluster, &format!("    token: {TOKEN}"));
        let access = load(&path, None).expect("usable");
        assert_eq!(access.api_url, "https://127.0.0.1:6443");
        assert!(access.ca_pem.expect("a CA").starts_with(b"-----BEGIN CERTIFICATE-----"));
        assert!(matches!(&access.token, Token::Fixed(t) if t.expose() == TOKEN));
        assert!(access.identity_pem.is_none());
        // A named context wins over current-context; its tokenFile is relative to the file.
        let access = load(&path, Some("other")).expect("usable");
        assert!(matches!(&access.token, Token::File(p) if *p == dir.path().join("tokens/u2")));
        let e = load(&path, Some("absent")).expect_err("no such context").to_string();
        assert!(e.contains("config: contexts: no context named \"absent\""), "{e}");
    }

    /// Paths are relative to the kubeconfig's directory; a client certificate and key become
    /// one PEM, held as a secret.
    #[test]
    fn relative_paths_and_a_client_certificate() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("pki")).expect("mkdir");
        std::fs::write(dir.path().join("pki/ca.pem"), "CA PEM").expect("write");
        std::fs::write(dir.path().join("pki/key.pem"), "KEY PEM").expect("write");
        let cluster = format!("{SERVER}\n    certificate-authority: pki/ca.pem");
        let user = "    client-certificate-data: Q0VSVCBQRU0=\n    client-key: pki/key.pem";
        let access = load(&kubeconfig(dir.path(), &cluster, user), None).expect("usable");
        assert_eq!(access.ca_pem.as_deref(), Some(&b"CA PEM"[..]));
        assert!(matches!(access.token, Token::None));
        assert_eq!(access.identity_pem.expect("identity").expose(), "CERT PEM\nKEY PEM");
        let e = refused(dir.path(), &cluster, "    client-certificate-data: Q0VSVCBQRU0=");
        assert!(
            e.contains("users[0].user.client-key: required with a client certificate"),
            "{e}"
        );
        let e = refused(
            dir.path(),
            "    server: https://h\n    certificate-authority: pki/missing.pem",
            "    token: x",
        );
        assert!(
            e.contains("clusters[0].cluster.certificate-authority: ") && e.contains("pki/missing.pem: cannot read"),
            "{e}"
        );
    }

    /// A file the kubeconfig names that is not a regular file (a FIFO here, which would block
    /// the read) is refused at once, naming the field.
    #[test]
    fn a_named_file_that_is_not_regular_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        nix::unistd::mkfifo(&dir.path().join("ca.pem"), nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
        let e = refused(
            dir.path(),
            &format!("{SERVER}\n    certificate-authority: ca.pem"),
            "    token: x",
        );
        assert!(
            e.contains("clusters[0].cluster.certificate-authority: ") && e.contains("ca.pem: is not a regular file"),
            "{e}"
        );
    }

    /// What is not supported is refused, naming the file and the field.
    #[test]
    fn plugins_insecure_tls_and_unknown_fields_are_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("config").display().to_string();
        let exec = "    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: aws\n      args: [eks, get-token]";
        for (cluster, user, needle) in [
            (
                SERVER.to_owned(),
                exec.to_owned(),
                "users[0].user.exec: refused: tunnel-agent does not run a program",
            ),
            (
                SERVER.to_owned(),
                "    auth-provider:\n      name: gcp".to_owned(),
                "users[0].user.auth-provider: refused",
            ),
            (
                format!("{SERVER}\n    insecure-skip-tls-verify: true"),
                "    token: x".to_owned(),
                "clusters[0].cluster.insecure-skip-tls-verify: refused",
            ),
            (
                format!("{SERVER}\n    proxy-url: http://proxy:3128"),
                "    token: x".to_owned(),
                "clusters[0].cluster.proxy-url: not supported",
            ),
            (
                SERVER.to_owned(),
                "    username: admin\n    password: hunter2".to_owned(),
                "users[0].user.username: not supported",
            ),
            (
                SERVER.to_owned(),
                "    token: x\n    as: admin".to_owned(),
                "users[0].user.as: not supported",
            ),
            (
                SERVER.to_owned(),
                "    token: x\n    tokenFile: t".to_owned(),
                "users[0].user.token: set either token or tokenFile",
            ),
            (
                SERVER.to_owned(),
                "    token: x\n    colour: blue".to_owned(),
                "users[0].user: unknown field `colour`",
            ),
            (
                SERVER.to_owned(),
                "    extensions: []".to_owned(),
                "users[0].user.token: the user has no credentials",
            ),
            (
                SERVER.to_owned(),
                "    token: \"hunter2 hunter2\"".to_owned(),
                "users[0].user.token: must be one word",
            ),
            (
                "    server: ftp://h".to_owned(),
                "    token: x".to_owned(),
                "clusters[0].cluster.server: must be an http:// or https:// URL",
            ),
            (
                format!("{SERVER}\n    certificate-authority: a\n    certificate-authority-data: {CA_DATA}"),
                "    token: x".to_owned(),
                "clusters[0].cluster.certificate-authority: set either",
            ),
            (
                format!("{SERVER}\n    certificate-authority-data: '%%%'"),
                "    token: x".to_owned(),
                "certificate-authority-data: is not base64",
            ),
        ] {
            let e = refused(dir.path(), &cluster, &user);
            assert!(e.starts_with(&format!("{file}: ")), "{e}");
            assert!(e.contains(needle), "{needle}: {e}");
            assert!(!e.contains("hunter2"), "{e}");
        }
    }

    /// The token and the key never reach an error or a `Debug` rendering, even written where a
    /// structure was expected (serde would quote the value).
    #[test]
    fn secrets_stay_out_of_errors_and_debug() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config");
        std::fs::write(
            &path,
            format!("current-context: main\nusers:\n- name: u1\n  user: {TOKEN}\n"),
        )
        .expect("write");
        let e = load(&path, None).expect_err("a user that is a string").to_string();
        assert!(e.contains("users[0].user: invalid type: string"), "{e}");
        assert!(!e.contains(TOKEN), "{e}");
        let user = format!(
            "    token: {TOKEN}\n    client-certificate-data: Q0VSVCBQRU0=\n    client-key-data: U0VDUkVUIEtFWQ=="
        );
        let access = load(&kubeconfig(dir.path(), SERVER, &user), None).expect("usable");
        let shown = format!("{access:?}");
        assert!(!shown.contains(TOKEN) && !shown.contains("SECRET KEY"), "{shown}");
    }

    /// Go writes an empty list as `null`: such a file is read, and says what is missing.
    #[test]
    fn null_lists_are_empty_lists() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config");
        std::fs::write(
            &path,
            "apiVersion: v1\nclusters: null\ncontexts: null\nusers: null\ncurrent-context: \"\"\n",
        )
        .expect("write");
        let e = load(&path, None).expect_err("no context").to_string();
        assert!(e.contains("current-context: unset"), "{e}");
    }

    /// A file over the bound is not parsed. One whose aliases would expand to 10^12 nodes (a
    /// "billion laughs" document) under a key this module ignores is read at once: ignored
    /// values are skipped, aliases included, never expanded.
    #[test]
    fn oversized_files_are_refused_and_alias_bombs_not_expanded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config");
        std::fs::write(&path, "#".repeat(FILE_LIMIT as usize + 1)).expect("write");
        let e = load(&path, None).expect_err("too large").to_string();
        assert!(e.contains("config: (file): larger than 1048576 bytes"), "{e}");
        let path = kubeconfig(dir.path(), SERVER, "    token: x");
        let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for level in 1..12 {
            let prev = (b'a' + level - 1) as char;
            let this = (b'a' + level) as char;
            let refs = vec![format!("*{prev}"); 10].join(", ");
            bomb.push_str(&format!("{this}: &{this} [{refs}]\n"));
        }
        bomb.push_str("preferences: *l\n");
        let text = std::fs::read_to_string(&path).expect("read");
        std::fs::write(&path, text.replace("preferences: {}\n", &bomb)).expect("write");
        let started = tokio::time::Instant::now();
        load(&path, None).expect("usable");
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }
}
