//! The API's Unix socket file: created owner-only, replacing a stale one, removed only if it is
//! still ours.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use super::ApiError;

/// Device and inode of the socket file we bound, so we never delete a successor's socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileIdentity {
    dev: u64,
    ino: u64,
}

impl FileIdentity {
    fn of(path: &Path) -> io::Result<Self> {
        let meta = std::fs::symlink_metadata(path)?;
        Ok(FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

/// Removes a socket file nobody listens on; refuses to touch a live socket or a non-socket.
fn clear_stale(path: &Path) -> Result<(), ApiError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(ApiError::socket(
                path,
                "cannot inspect the existing file",
                Some(e),
            ))
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ApiError::socket(
            path,
            "exists and is not a socket; refusing to replace it",
            None,
        ));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ApiError::socket(
            path,
            "another process is already serving on it",
            None,
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::debug!("replacing stale API socket {}", path.display());
            std::fs::remove_file(path)
                .map_err(|e| ApiError::socket(path, "cannot remove the stale socket", Some(e)))
        }
        Err(e) => Err(ApiError::socket(
            path,
            "cannot check whether it is in use",
            Some(e),
        )),
    }
}

fn os_error(path: &Path, what: &str) -> ApiError {
    ApiError::socket(path, what, Some(io::Error::last_os_error()))
}

/// Binds, restricts the file to its owner, and only then listens: connections are refused until
/// the mode is 0600, so there is no window in which others could connect.
pub fn bind_private(path: &Path) -> Result<(UnixListener, FileIdentity), ApiError> {
    clear_stale(path)?;
    // SAFETY: all-zero is a valid sockaddr_un (family and path filled in below).
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let bytes = path.as_os_str().as_bytes();
    // sun_path needs a terminating NUL; interior NULs would silently shorten the path.
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(ApiError::socket(
            path,
            format!(
                "not a usable Unix socket path (1 to {} bytes, no NUL)",
                addr.sun_path.len() - 1
            ),
            None,
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let addr_len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;

    // SAFETY: plain socket(2); the result is checked before use.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(os_error(path, "cannot create a socket"));
    }
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: `addr` is an initialised sockaddr_un and `addr_len` does not exceed its size.
    let rc = unsafe {
        libc::bind(
            raw,
            (&addr as *const libc::sockaddr_un).cast::<libc::sockaddr>(),
            addr_len as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(os_error(path, "cannot bind"));
    }
    let restricted = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| FileIdentity::of(path));
    let identity = match restricted {
        Ok(identity) => identity,
        Err(e) => {
            let _ = std::fs::remove_file(path);
            return Err(ApiError::socket(
                path,
                "cannot restrict the socket to its owner",
                Some(e),
            ));
        }
    };
    // SAFETY: listen(2) on the socket we own.
    if unsafe { libc::listen(raw, 64) } != 0 {
        let error = os_error(path, "cannot listen");
        let _ = std::fs::remove_file(path);
        return Err(error);
    }
    let listener = UnixListener::from(fd);
    listener
        .set_nonblocking(true)
        .map_err(|e| ApiError::socket(path, "cannot make the socket non-blocking", Some(e)))?;
    Ok((listener, identity))
}

/// Deletes the socket file if it is still the one we created.
pub fn remove_if_ours(path: &Path, identity: FileIdentity) {
    if FileIdentity::of(path).is_ok_and(|current| current == identity) {
        if let Err(e) = std::fs::remove_file(path) {
            tracing::warn!("cannot remove API socket {}: {e}", path.display());
        }
    }
}
