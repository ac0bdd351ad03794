//! Files other programs read while we write them: written whole or not at all. Files the
//! host's admin names for us to read: read bounded, and only when they are regular files.

use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Why [`read_regular`] read nothing.
#[derive(Debug)]
pub enum ReadError {
    /// Opening or reading failed.
    Io(std::io::Error),
    /// A FIFO, a device, a socket or a directory.
    NotRegular,
    /// Larger than the bound it was read with.
    TooLarge(u64),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Io(e) => write!(f, "cannot read: {e}"),
            ReadError::NotRegular => f.write_str("is not a regular file"),
            ReadError::TooLarge(limit) => write!(f, "larger than {limit} bytes"),
        }
    }
}

/// Reads `path` whole when it is a regular file of at most `limit` bytes. A FIFO would block
/// the control runtime that reads it, a device such as `/dev/zero` would grow memory for ever:
/// the file is opened with `O_NONBLOCK` (so that a FIFO swapped in after a `stat` cannot block
/// the open either) and its type checked on the open file.
pub fn read_regular(path: &Path, limit: u64) -> Result<Vec<u8>, ReadError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(ReadError::Io)?;
    if !file.metadata().map_err(ReadError::Io)?.is_file() {
        return Err(ReadError::NotRegular);
    }
    let mut bytes = Vec::new();
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(ReadError::Io)?;
    if bytes.len() as u64 > limit {
        return Err(ReadError::TooLarge(limit));
    }
    Ok(bytes)
}

/// Writes `data` to `path` atomically: a temp file in the same directory (same filesystem, so the
/// rename is atomic), fsync, rename over the target, fsync the directory so the rename survives
/// a crash. Readers see the old content or the new, never a mix. Creates the directory if needed.
///
/// The temp file has a random name and is created with `O_EXCL | O_NOFOLLOW`, mode 0600 until
/// it holds all of `data` (then `mode`): whoever can write the directory cannot plant a link
/// at a predictable name that makes us write through it, nor read a secret half written.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let (tmp, mut f) = create_temp(dir, name)?;
    let result = (|| {
        f.write_all(data)?;
        if mode != 0o600 {
            f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A new temp file beside `name` in `dir`, never one that existed (a name taken is retried with
/// another random name a few times).
fn create_temp(dir: &Path, name: &str) -> std::io::Result<(std::path::PathBuf, std::fs::File)> {
    let mut attempt = 0;
    loop {
        let tmp = dir.join(format!(".{name}.tmp.{:016x}", crate::random::random_u64()));
        let opened = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .mode(0o600)
            .open(&tmp);
        match opened {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 8 => attempt += 1,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_whole_file_with_mode_and_leaves_no_temp() {
        let dir = std::env::temp_dir().join(format!("ta-files-{}", std::process::id()));
        let path = dir.join("sub/token");
        write_atomic(&path, b"one", 0o600).unwrap();
        write_atomic(&path, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let leftovers: Vec<_> = std::fs::read_dir(dir.join("sub")).unwrap().collect();
        assert_eq!(leftovers.len(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_link_planted_at_the_old_predictable_temp_name_is_not_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"keep me").unwrap();
        // The name main used: `.NAME.tmp.PID`.
        let planted = dir.path().join(format!(".routes.json.tmp.{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        let target = dir.path().join("routes.json");
        write_atomic(&target, b"new", 0o644).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        assert!(!std::fs::symlink_metadata(&target).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::metadata(&target).unwrap().permissions().mode() & 0o777, 0o644);
    }

    /// Only a regular file within the bound is read: a FIFO nobody writes is refused at once
    /// (it would block the runtime reading it), a device and a directory are refused, a file
    /// one byte over the bound too.
    #[test]
    fn read_regular_refuses_what_is_not_a_bounded_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ca.pem");
        std::fs::write(&file, b"12345").unwrap();
        assert_eq!(read_regular(&file, 5).unwrap(), b"12345");
        assert!(matches!(read_regular(&file, 4), Err(ReadError::TooLarge(4))));
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let started = tokio::time::Instant::now();
        assert!(matches!(read_regular(&fifo, 5), Err(ReadError::NotRegular)));
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        for other in [Path::new("/dev/zero"), dir.path()] {
            assert!(
                matches!(read_regular(other, 5), Err(ReadError::NotRegular)),
                "{other:?}"
            );
        }
        let missing = read_regular(&dir.path().join("absent"), 5).unwrap_err().to_string();
        assert!(missing.starts_with("cannot read: "), "{missing}");
        assert_eq!(ReadError::NotRegular.to_string(), "is not a regular file");
    }
}
