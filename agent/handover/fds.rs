//! The file descriptors an upgrade carries through `execve(2)`: duplicated, flagged, and the
//! memfd the state travels in. The only place in the hand-over that turns a raw number into an
//! owned descriptor.
//!
//! A number read from the environment is our previous image's, not a stranger's: it still is
//! checked to be open (`F_GETFD`) before anything uses it, and never owned: users get a
//! duplicate, so the carried number stays valid until the hand-over commits or rolls back.

#![allow(unsafe_code)]

use std::fs::File;
use std::io::{self, Read as _, Seek as _, Write as _};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::fcntl::{fcntl, FcntlArg, FdFlag, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};

/// The state is JSON of a few KB (a listener list, counters, secret values); anything larger
/// than this did not come from a sane writer.
pub const MAX_STATE_BYTES: u64 = 4 << 20;

fn errno(e: nix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Whether `fd` is an open descriptor of this process.
pub fn is_open(fd: RawFd) -> bool {
    fd >= 0 && fcntl(fd, FcntlArg::F_GETFD).is_ok()
}

/// A duplicate of `fd` (close-on-exec, numbered 3 or above) that the caller owns.
pub fn dup(fd: RawFd) -> io::Result<OwnedFd> {
    if !is_open(fd) {
        return Err(io::Error::new(io::ErrorKind::NotFound, format!("fd {fd} is not open")));
    }
    let new = fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(3)).map_err(errno)?;
    // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that nothing else refers to.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Sets or clears `FD_CLOEXEC` on `fd`: cleared on exactly the carried descriptors just before
/// the exec, set again by the new image at once, so no child it spawns inherits one.
pub fn set_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    let flags = FdFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFD).map_err(errno)?);
    let flags = if on {
        flags | FdFlag::FD_CLOEXEC
    } else {
        flags - FdFlag::FD_CLOEXEC
    };
    fcntl(fd, FcntlArg::F_SETFD(flags)).map(|_| ()).map_err(errno)
}

/// Closes a carried number once nothing needs it (the hand-over committed).
pub fn close(fd: RawFd) {
    if is_open(fd) {
        // SAFETY: `fd` is a carried number the hand-over owns; every user holds a duplicate.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    }
}

/// Gives up ownership: `fd` stays open under its number, for the next image.
pub fn leak(fd: OwnedFd) -> RawFd {
    use std::os::fd::IntoRawFd as _;
    fd.into_raw_fd()
}

/// A sealed memfd holding `bytes` (read-only from here on: neither image can change what the
/// other wrote).
pub fn write_state(bytes: &[u8]) -> io::Result<OwnedFd> {
    let flags = MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING;
    let fd = memfd_create(c"tunnel-agent-handover", flags).map_err(errno)?;
    let mut file = File::from(fd);
    file.write_all(bytes)?;
    file.rewind()?;
    let seals = SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_SEAL;
    fcntl(file.as_raw_fd(), FcntlArg::F_ADD_SEALS(seals)).map_err(errno)?;
    Ok(OwnedFd::from(file))
}

/// The bytes of the carried state memfd `fd`, read through a duplicate (the number stays for a
/// rollback), at most [`MAX_STATE_BYTES`].
pub fn read_state(fd: RawFd) -> io::Result<Vec<u8>> {
    let mut file = File::from(dup(fd)?);
    file.rewind()?;
    let mut bytes = Vec::new();
    file.take(MAX_STATE_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_STATE_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the carried state is larger than {MAX_STATE_BYTES} bytes"),
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_round_trips_and_is_sealed() {
        let fd = write_state(b"{\"format\":1}").unwrap();
        assert_eq!(read_state(fd.as_raw_fd()).unwrap(), b"{\"format\":1}");
        // Sealed: a write through another descriptor of the same file fails.
        let mut again = File::from(dup(fd.as_raw_fd()).unwrap());
        assert!(again.write_all(b"x").is_err());
        // Reading did not take the number.
        assert!(is_open(fd.as_raw_fd()));
    }

    #[test]
    fn cloexec_is_set_and_cleared() {
        let fd = dup(0).unwrap();
        let flag = |fd| FdFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFD).unwrap());
        assert!(
            flag(fd.as_raw_fd()).contains(FdFlag::FD_CLOEXEC),
            "duplicates are close-on-exec"
        );
        set_cloexec(fd.as_raw_fd(), false).unwrap();
        assert!(!flag(fd.as_raw_fd()).contains(FdFlag::FD_CLOEXEC));
        set_cloexec(fd.as_raw_fd(), true).unwrap();
        assert!(flag(fd.as_raw_fd()).contains(FdFlag::FD_CLOEXEC));
    }

    #[test]
    fn a_number_that_is_not_open_is_refused_not_owned() {
        assert!(!is_open(-1));
        assert!(dup(987_654).is_err());
        assert!(read_state(987_654).is_err());
    }

    #[test]
    fn closing_a_carried_number_closes_it() {
        let raw = leak(dup(0).unwrap());
        assert!(is_open(raw));
        close(raw);
        assert!(!is_open(raw));
    }
}
