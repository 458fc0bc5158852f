//! Firecracker-compatible hybrid vsock over Unix sockets.
//!
//! Host-initiated: a client connects to the socket at `path`, writes `CONNECT <port>\n`, gets
//! `OK <host_port>\n` once the guest accepted, then the stream carries the connection.
//! Guest-initiated connections to host port P go to the socket `<path>_<P>`.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{self, ErrorKind, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::{BackendConnectError, ConnectAck, HostConnection, VsockBackend};

/// Clients that connect but never finish the handshake are dropped after this long.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// At most this many clients may be mid-handshake; extra ones are closed at once.
pub const MAX_PENDING_HANDSHAKES: usize = 64;
/// `CONNECT 4294967295\n` is 19 bytes; anything much longer is garbage.
const MAX_LINE: usize = 32;
const LISTENER_TOKEN: u64 = u64::MAX;

#[derive(Debug, thiserror::Error)]
pub enum UdsError {
    #[error("binding vsock socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("vsock socket setup: {0}")]
    Setup(#[from] io::Error),
}

struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

pub struct UdsBackend {
    path: PathBuf,
    listener: UnixListener,
    /// (dev, inode) of the socket file we created, so Drop removes only our own file.
    socket_id: Option<(u64, u64)>,
    epoll: Epoll,
    pending: HashMap<RawFd, Handshake>,
}

impl UdsBackend {
    /// Binds `path`, owner-only (0600 whatever the umask). A stale socket file (nothing
    /// accepting on it) is replaced.
    pub fn bind(path: &Path) -> Result<Self, UdsError> {
        let listener = match bind_private(path) {
            Ok(l) => l,
            Err(e) if e.kind() == ErrorKind::AddrInUse && is_stale_socket(path) => {
                std::fs::remove_file(path).map_err(|source| UdsError::Bind {
                    path: path.into(),
                    source,
                })?;
                bind_private(path).map_err(|source| UdsError::Bind {
                    path: path.into(),
                    source,
                })?
            }
            Err(source) => {
                return Err(UdsError::Bind {
                    path: path.into(),
                    source,
                })
            }
        };
        listener.set_nonblocking(true)?;
        let socket_id = std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
        )?;
        tracing::info!(path = %path.display(), "vsock: hybrid unix-socket backend listening");
        Ok(Self {
            path: path.into(),
            listener,
            socket_id,
            epoll,
            pending: HashMap::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn pending_handshakes(&self) -> usize {
        self.pending.len()
    }

    fn accept_all(&mut self, now: Instant) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    if e.kind() != ErrorKind::WouldBlock {
                        tracing::warn!("vsock: accept on {}: {e}", self.path.display());
                    }
                    return;
                }
            };
            if self.pending.len() >= MAX_PENDING_HANDSHAKES {
                tracing::warn!("vsock: too many unfinished CONNECT handshakes; closing a client");
                continue;
            }
            let fd = stream.as_raw_fd();
            let registered = stream.set_nonblocking(true).and_then(|_| {
                self.epoll.ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, fd as u64),
                )
            });
            if let Err(e) = registered {
                tracing::warn!("vsock: cannot watch accepted client: {e}");
                continue;
            }
            self.pending.insert(
                fd,
                Handshake {
                    stream,
                    line: Vec::with_capacity(MAX_LINE),
                    deadline: now + HANDSHAKE_TIMEOUT,
                },
            );
        }
    }

    /// Reads the handshake one byte at a time so no payload byte after `\n` is consumed.
    fn advance_handshake(&mut self, fd: RawFd) -> Option<HostConnection> {
        let hs = self.pending.get_mut(&fd)?;
        let outcome = loop {
            let mut byte = [0u8; 1];
            match hs.stream.read(&mut byte) {
                Ok(0) => break Some(None),
                Ok(_) if byte[0] == b'\n' => break Some(parse_connect(&hs.line)),
                Ok(_) if hs.line.len() >= MAX_LINE => break Some(None),
                Ok(_) => hs.line.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break None,
                Err(_) => break Some(None),
            }
        };
        // Still waiting for the rest of the line.
        let port = outcome?;
        let hs = self.forget(fd)?;
        match port {
            Some(guest_port) => Some(HostConnection {
                stream: hs.stream,
                guest_port,
                ack: ConnectAck::WriteOk,
            }),
            None => {
                tracing::debug!("vsock: dropping client with a bad CONNECT line");
                None
            }
        }
    }

    fn forget(&mut self, fd: RawFd) -> Option<Handshake> {
        let hs = self.pending.remove(&fd)?;
        // Closing the fd also drops it from the epoll set; this just keeps the set tidy early.
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        Some(hs)
    }
}

impl VsockBackend for UdsBackend {
    fn name(&self) -> &'static str {
        "uds"
    }

    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    fn poll_host_connections(&mut self, now: Instant) -> Vec<HostConnection> {
        let mut ready = Vec::new();
        let mut events = [EpollEvent::default(); 32];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("vsock: epoll_wait on uds backend: {e}");
                    0
                }
            };
            for ev in events.iter().take(n) {
                if ev.data() == LISTENER_TOKEN {
                    self.accept_all(now);
                } else if let Some(conn) = self.advance_handshake(ev.data() as RawFd) {
                    ready.push(conn);
                }
            }
            if n < events.len() {
                break;
            }
        }
        let expired: Vec<RawFd> = self
            .pending
            .iter()
            .filter(|(_, hs)| hs.deadline <= now)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in expired {
            tracing::debug!("vsock: CONNECT handshake timed out");
            self.forget(fd);
        }
        ready
    }

    fn connect_to_host(
        &mut self,
        port: u32,
        _guest_port: u32,
    ) -> Result<UnixStream, BackendConnectError> {
        let mut name = OsString::from(self.path.as_os_str());
        name.push(format!("_{port}"));
        connect_nonblocking(Path::new(&name)).map_err(|source| match source.kind() {
            ErrorKind::NotFound | ErrorKind::ConnectionRefused => {
                BackendConnectError::NotListening(port)
            }
            // A full backlog (EAGAIN) refuses rather than blocking the event loop.
            _ => BackendConnectError::Io { port, source },
        })
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().map(|hs| hs.deadline).min()
    }
}

impl Drop for UdsBackend {
    fn drop(&mut self) {
        let ours = std::fs::metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if ours.is_some() && ours == self.socket_id {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A listening Unix socket at `path` with mode 0600. The mode is set between bind(2) and
/// listen(2): until then connects are refused, so there is no window in which another user
/// could connect through a umask-wide mode (binding under a narrowed umask would change the
/// mask of the whole process, threads included).
fn bind_private(path: &Path) -> io::Result<UnixListener> {
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    // Leave room for the terminating NUL; an interior NUL would silently shorten the path.
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            ErrorKind::InvalidInput,
            "not a usable Unix socket path",
        ));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain syscall; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket we own exclusively.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_un for the duration of the call.
    let rc = unsafe {
        libc::bind(
            owned.as_raw_fd(),
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let listening = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| {
            // SAFETY: listen(2) on the socket we own.
            if unsafe { libc::listen(owned.as_raw_fd(), 128) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    if let Err(e) = listening {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(UnixListener::from(owned))
}

/// `CONNECT <port>` (the `\n` already stripped) → port.
pub fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let port = line.strip_prefix("CONNECT ")?.trim();
    port.parse().ok()
}

fn is_stale_socket(path: &Path) -> bool {
    let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
    is_socket
        && matches!(
            connect_nonblocking(path).map_err(|e| e.kind()),
            Err(ErrorKind::ConnectionRefused)
        )
}

/// A Unix-socket connect that never blocks: a full backlog fails with WouldBlock.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    // Leave room for the terminating NUL.
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain syscall; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket we own exclusively.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    loop {
        // SAFETY: `addr` is a valid sockaddr_un for the duration of the call.
        let rc = unsafe {
            libc::connect(
                owned.as_raw_fd(),
                &addr as *const libc::sockaddr_un as *const libc::sockaddr,
                len,
            )
        };
        if rc == 0 {
            return Ok(UnixStream::from(owned));
        }
        let err = io::Error::last_os_error();
        if err.kind() != ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In a child process: the umask is per process and tests run on parallel threads.
    #[test]
    fn the_socket_is_private_under_umask_0() {
        const CHILD: &str = "DORMOUSE_TEST_UDS_UMASK_CHILD";
        if let Some(path) = std::env::var_os(CHILD) {
            // SAFETY: umask only changes this (child) process's file creation mask.
            unsafe { libc::umask(0) };
            let backend = UdsBackend::bind(Path::new(&path)).unwrap();
            // The guest-initiated side is not ours; only `path` is checked by the parent.
            std::mem::forget(backend);
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "virtio::vsock::backend::uds::tests::the_socket_is_private_under_umask_0",
                "--test-threads",
                "1",
            ])
            .env(CHILD, &path)
            .status()
            .unwrap();
        assert!(status.success());
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn parses_connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295"), Some(u32::MAX));
        assert_eq!(parse_connect(b"CONNECT 4294967296"), None);
        assert_eq!(parse_connect(b"connect 52"), None);
        assert_eq!(parse_connect(b"CONNECT"), None);
        assert_eq!(parse_connect(b"CONNECT -1"), None);
        assert_eq!(parse_connect(&[0xff, 0xfe]), None);
    }
}
