//! cloudflared confined with Landlock (landlock(7)): it shares the agent's uid, so without this
//! it could read every credential file and write the state directory (the persisted route
//! table, the role file).
//!
//! Landlock is an allow-list: a ruleset names what a process may still reach beneath which
//! paths, and everything it handles but does not name is denied. The ruleset is built in the
//! parent (opening each path is not async-signal-safe); the child only calls
//! `prctl(PR_SET_NO_NEW_PRIVS)` and `landlock_restrict_self` between fork and exec, both plain
//! syscalls. Raw syscalls through `libc` rather than the `landlock` crate: three syscalls and
//! two structs, and the crate's `restrict_self` is not documented as safe after `fork`.
//!
//! Facts it relies on (landlock(7), the kernel's `include/uapi/linux/landlock.h`):
//! - `landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)` returns the ABI
//!   (0 / an error when the kernel has none, or a seccomp filter returns EPERM).
//! - A rule's rights on a non-directory may only be file rights, else `EINVAL`.
//! - Rights from a newer ABI than the kernel's are refused, so the handled set follows the ABI.
//! - Network (ABI 4) is not handled: cloudflared needs the edge and the origin. Signals and
//!   abstract UNIX sockets are scoped (ABI 6): cloudflared can signal no process outside its
//!   domain (the agent), and reach no abstract socket created outside it.
//! - Path walk, `stat` and `connect` on a named UNIX socket are not restricted by ABI ≤ 7.
#![allow(unsafe_code)]

use std::io::ErrorKind;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::config::Sandbox;

const CREATE_RULESET_VERSION: u32 = 1;
const RULE_PATH_BENEATH: libc::c_int = 1;

const EXECUTE: u64 = 1 << 0;
const WRITE_FILE: u64 = 1 << 1;
const READ_FILE: u64 = 1 << 2;
const READ_DIR: u64 = 1 << 3;
/// Every right ABI 1 knows (remove, make char/dir/reg/sock/fifo/block/sym included).
const ABI1_ALL: u64 = (1 << 13) - 1;
const REFER: u64 = 1 << 13;
const TRUNCATE: u64 = 1 << 14;
const IOCTL_DEV: u64 = 1 << 15;
/// The rights a rule on a file (not a directory) may carry.
const FILE_RIGHTS: u64 = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV;

const SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1 << 0;
const SCOPE_SIGNAL: u64 = 1 << 1;

/// `struct landlock_ruleset_attr`.
#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

/// `struct landlock_path_beneath_attr` (packed in the kernel's header).
#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

/// What cloudflared may do beneath a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read files and list directories.
    Read,
    /// Read and execute.
    ReadExec,
    /// Everything the ruleset handles.
    All,
}

/// What cloudflared may reach, and what must stay out of reach even beneath an allowed path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub mode: Sandbox,
    pub allow: Vec<(PathBuf, Access)>,
    /// Single files the agent's own config names for cloudflared (its program, token file,
    /// ingress, tunnel credentials): allowed even inside a protected directory.
    pub files: Vec<(PathBuf, Access)>,
    /// The credentials directory, the agent's secret files, its state and runtime directories.
    pub protected: Vec<PathBuf>,
}

/// System paths cloudflared (a static Go binary, or the test's Python fake) reads: libraries,
/// `/etc` (resolv.conf, hosts, nsswitch, CA bundles, localtime), `/proc` and `/sys` (Go's
/// runtime reads cgroup limits and `/proc/self`), and resolv.conf's target under
/// systemd-resolved.
const SYSTEM_READ_EXEC: &[&str] = &["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc"];
const SYSTEM_READ: &[&str] = &["/proc", "/sys", "/dev/urandom", "/dev/random", "/run/systemd/resolve"];

/// Most entries of one directory walked to carve a protected path out of an allowed one; a
/// larger directory is left out whole (denied), which is the safe side.
const MAX_SPLIT_ENTRIES: usize = 4096;

impl Policy {
    /// The policy for a cloudflared run as `program`, reading `files` (its token file, ingress,
    /// credentials JSON), with `extra` (`cloudflared.sandbox_allow`) open to it entirely.
    pub fn new(mode: Sandbox, program: &Path, files: &[PathBuf], extra: &[PathBuf], protected: Vec<PathBuf>) -> Policy {
        let mut allow: Vec<(PathBuf, Access)> = SYSTEM_READ_EXEC
            .iter()
            .map(|p| (PathBuf::from(p), Access::ReadExec))
            .chain(SYSTEM_READ.iter().map(|p| (PathBuf::from(p), Access::Read)))
            .collect();
        allow.extend(extra.iter().map(|p| (p.clone(), Access::All)));
        let mut exact = vec![(PathBuf::from("/dev/null"), Access::All)];
        if let Some(program) = resolve_program(program) {
            exact.push((program, Access::ReadExec));
        }
        exact.extend(files.iter().map(|f| (f.clone(), Access::Read)));
        Policy {
            mode,
            allow,
            files: exact,
            protected,
        }
    }
}

/// The policy for the cloudflared of `spec` under `config`: what it is given (its program,
/// token file, ingress and tunnel credentials, `cloudflared.sandbox_allow`) and what it must
/// never reach (`$CREDENTIALS_DIRECTORY`, every `file` secret, the state and runtime dirs).
pub fn policy_for(config: &crate::config::Config, spec: &super::TunnelSpec) -> Policy {
    let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
    let mut protected = vec![config.agent.state_dir.clone(), config.agent.runtime_dir.clone()];
    protected.extend(credentials.clone());
    for secret in config.secrets.values() {
        if let crate::config::SecretSource::File(path) = &secret.source {
            match &credentials {
                Some(dir) if path.is_relative() => protected.push(dir.join(path)),
                _ => protected.push(path.clone()),
            }
        }
    }
    let cf = &config.cloudflared;
    let files: Vec<PathBuf> = spec
        .token_file
        .iter()
        .chain(spec.ingress.iter().map(|(path, _)| path))
        .chain(cf.credentials_file.iter())
        .cloned()
        .collect();
    Policy::new(cf.sandbox, &spec.program, &files, &cf.sandbox_allow, protected)
}

/// The file `program` names: as given when it has a `/`, else the first match in `PATH`.
fn resolve_program(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return Some(program.to_owned());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// The Landlock ABI of this kernel; 0 when it has none (or a seccomp filter forbids asking).
pub fn abi() -> u32 {
    // SAFETY: a NULL attribute with size 0 and the VERSION flag only queries the ABI.
    let r = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<RulesetAttr>(),
            0usize,
            CREATE_RULESET_VERSION,
        )
    };
    u32::try_from(r).unwrap_or(0)
}

fn handled_fs(abi: u32) -> u64 {
    let mut all = ABI1_ALL;
    if abi >= 2 {
        all |= REFER;
    }
    if abi >= 3 {
        all |= TRUNCATE;
    }
    if abi >= 5 {
        all |= IOCTL_DEV;
    }
    all
}

fn rights(access: Access, handled: u64) -> u64 {
    match access {
        Access::Read => READ_FILE | READ_DIR,
        Access::ReadExec => READ_FILE | READ_DIR | EXECUTE,
        // REFER may only be granted where it is handled; it is, from ABI 2.
        Access::All => handled,
    }
}

/// A ruleset ready for `landlock_restrict_self`, built in the parent.
#[derive(Debug)]
pub struct Ruleset {
    fd: OwnedFd,
    pub abi: u32,
}

/// Builds the ruleset for `policy`; `Ok(None)` when the kernel has no Landlock and the policy
/// allows running without it (`auto`), or when the sandbox is off.
pub fn prepare(policy: &Policy) -> anyhow::Result<Option<Ruleset>> {
    if policy.mode == Sandbox::Off {
        return Ok(None);
    }
    let abi = abi();
    if abi == 0 {
        if policy.mode == Sandbox::Landlock {
            anyhow::bail!(
                "cloudflared.sandbox = \"landlock\" but this kernel offers no Landlock (landlock_create_ruleset: {}); \
                 not starting cloudflared unconfined",
                std::io::Error::last_os_error()
            );
        }
        return Ok(None);
    }
    let handled = handled_fs(abi);
    let attr = RulesetAttr {
        handled_access_fs: handled,
        handled_access_net: 0,
        scoped: if abi >= 6 {
            SCOPE_SIGNAL | SCOPE_ABSTRACT_UNIX_SOCKET
        } else {
            0
        },
    };
    // Fields the kernel does not know must not be passed, even zero: older kernels take a
    // shorter struct.
    let size = match abi {
        1..=3 => 8usize,
        4 | 5 => 16,
        _ => std::mem::size_of::<RulesetAttr>(),
    };
    // SAFETY: `attr` is a live `landlock_ruleset_attr` of at least `size` bytes.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            &attr as *const RulesetAttr,
            size,
            0u32,
        )
    };
    let fd = i32::try_from(fd)
        .ok()
        .filter(|fd| *fd >= 0)
        .ok_or_else(|| anyhow::anyhow!("landlock_create_ruleset: {}", std::io::Error::last_os_error()))?;
    // SAFETY: the kernel just returned this descriptor (O_CLOEXEC) and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let protected: Vec<PathBuf> = policy.protected.iter().map(|p| canonical(p)).collect();
    for (path, access) in &policy.allow {
        for beneath in carve(&canonical(path), &protected, 0) {
            add_rule(&fd, &beneath, rights(*access, handled))?;
        }
    }
    for (file, access) in &policy.files {
        add_rule(&fd, &canonical(file), rights(*access, handled))?;
    }
    Ok(Some(Ruleset { fd, abi }))
}

fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned())
}

/// The parts of `root` that hold no `protected` path: `root` itself when none is beneath it,
/// nothing when it is (or is beneath) one, else the same for each of its entries.
fn carve(root: &Path, protected: &[PathBuf], depth: usize) -> Vec<PathBuf> {
    if protected.iter().any(|p| root.starts_with(p)) {
        return Vec::new();
    }
    if !protected.iter().any(|p| p.starts_with(root)) {
        return vec![root.to_owned()];
    }
    // Each step goes one component down towards a protected path, so depth is bounded by the
    // longest one; the check is a second guard.
    if depth > 64 {
        return Vec::new();
    }
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let entries: Vec<PathBuf> = entries
        .take(MAX_SPLIT_ENTRIES + 1)
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    if entries.len() > MAX_SPLIT_ENTRIES {
        tracing::warn!(
            path = %root.display(),
            "cloudflared sandbox: {} has more than {MAX_SPLIT_ENTRIES} entries and holds a protected path; cloudflared gets none of it",
            root.display()
        );
        return Vec::new();
    }
    entries.iter().flat_map(|e| carve(e, protected, depth + 1)).collect()
}

/// Allows `rights` beneath `path`. A path that does not exist (not every system has `/lib32`)
/// or that the agent may not open is skipped: cloudflared, of the same uid, could not open it
/// either.
fn add_rule(ruleset: &OwnedFd, path: &Path, rights: u64) -> anyhow::Result<()> {
    let file = match std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::PermissionDenied) => return Ok(()),
        Err(e) => anyhow::bail!("cloudflared sandbox: cannot open {}: {e}", path.display()),
    };
    let is_dir = file.metadata().map(|m| m.is_dir()).unwrap_or(false);
    let attr = PathBeneathAttr {
        allowed_access: if is_dir { rights } else { rights & FILE_RIGHTS },
        parent_fd: file.as_raw_fd(),
    };
    // SAFETY: both descriptors are open; `attr` is a live `landlock_path_beneath_attr`.
    let r = unsafe {
        libc::syscall(
            libc::SYS_landlock_add_rule,
            ruleset.as_raw_fd(),
            RULE_PATH_BENEATH,
            &attr as *const PathBeneathAttr,
            0u32,
        )
    };
    if r != 0 {
        anyhow::bail!(
            "cloudflared sandbox: landlock_add_rule {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

use std::os::unix::fs::OpenOptionsExt as _;

/// Makes the child of `cmd` restrict itself to `ruleset` just before it execs. `ruleset` must
/// stay open until `spawn` returned.
pub fn confine(cmd: &mut tokio::process::Command, ruleset: &Ruleset) {
    let fd = ruleset.fd.as_raw_fd();
    // SAFETY: the closure runs between fork and exec and calls only prctl(2) and
    // landlock_restrict_self(2), both async-signal-safe syscalls; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::syscall(libc::SYS_landlock_restrict_self, fd, 0u32) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carve_leaves_out_protected_paths_and_keeps_their_siblings() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for d in ["a/secret", "a/other", "b"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let protected = vec![root.join("a/secret")];
        let mut got = carve(root, &protected, 0);
        got.sort();
        assert_eq!(got, vec![root.join("a/other"), root.join("b")]);
        assert!(carve(&root.join("a/secret/x"), &protected, 0).is_empty());
        assert_eq!(carve(&root.join("b"), &protected, 0), vec![root.join("b")]);
    }

    #[test]
    fn handled_rights_follow_the_abi() {
        assert_eq!(handled_fs(1), ABI1_ALL);
        assert_eq!(handled_fs(3), ABI1_ALL | REFER | TRUNCATE);
        assert_eq!(handled_fs(7), ABI1_ALL | REFER | TRUNCATE | IOCTL_DEV);
        assert_eq!(rights(Access::Read, handled_fs(7)) & EXECUTE, 0);
    }
}
