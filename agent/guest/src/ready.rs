//! Readiness notification: once the server listens, the agent connects to
//! the host (CID 2, port 1023) and sends `READY <version>\n`, so the host
//! never polls.
//!
//! The connection then stays open, and the agent waits on it: when the VMM
//! restores a snapshot it resets the vsock transport, every guest connection
//! fails, and the agent reconnects and announces itself again at once. So
//! "wake -> ready event" is push-based, and a host that sees the connection
//! close knows the agent is gone (or the VM was restored elsewhere).

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::time::Instant;
use tokio_vsock::VMADDR_CID_HOST;

/// Host port the readiness line goes to by default.
pub const DEFAULT_READY_PORT: u32 = agent_proto::AGENT_READY_PORT;

/// Where to send the readiness line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadyTarget {
    pub cid: u32,
    pub port: u32,
}

impl Default for ReadyTarget {
    fn default() -> Self {
        Self {
            cid: VMADDR_CID_HOST,
            port: DEFAULT_READY_PORT,
        }
    }
}

/// The line the host receives.
pub fn ready_line(version: &str) -> String {
    format!("READY {version}\n")
}

/// How eagerly to reconnect.
#[derive(Debug, Clone, Copy)]
pub struct AnnounceTiming {
    /// Pause after the first failed or short-lived attempt; doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// A connection that lived this long ended for a reason (a transport reset after a
    /// restore, a host restart): reconnect at once instead of backing off.
    pub stable_after: Duration,
    /// Bound on one connect + write.
    pub attempt_timeout: Duration,
}

impl Default for AnnounceTiming {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            stable_after: Duration::from_secs(2),
            attempt_timeout: Duration::from_secs(5),
        }
    }
}

/// Announces readiness over AF_VSOCK to `target` for as long as the agent runs.
pub async fn notify_ready(target: ReadyTarget, version: &str) {
    announce_forever(
        move || VsockAnnouncement::connect(target),
        version,
        AnnounceTiming::default(),
    )
    .await
}

/// A connection the readiness line is sent on and then held.
pub trait HeldConnection {
    fn send_line(&mut self, line: &[u8]) -> impl Future<Output = io::Result<()>>;
    /// Returns (with the reason) once the connection has ended.
    fn wait_closed(&mut self) -> impl Future<Output = String>;
}

impl HeldConnection for tokio::net::UnixStream {
    async fn send_line(&mut self, line: &[u8]) -> io::Result<()> {
        self.write_all(line).await
    }

    async fn wait_closed(&mut self) -> String {
        let mut buf = [0u8; 64];
        loop {
            match self.read(&mut buf).await {
                Ok(0) => return "closed by the host".to_owned(),
                Ok(_) => {}
                Err(err) => return err.to_string(),
            }
        }
    }
}

/// An AF_VSOCK connection watched for errors too: a vsock transport reset (after a snapshot
/// restore) leaves the socket with only EPOLLERR set, which a plain async read never sees.
pub struct VsockAnnouncement {
    fd: AsyncFd<OwnedFd>,
}

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

impl VsockAnnouncement {
    pub async fn connect(target: ReadyTarget) -> io::Result<Self> {
        // SAFETY: plain socket creation; the result is checked.
        let raw = cvt(unsafe {
            libc::socket(
                libc::AF_VSOCK,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        })?;
        // SAFETY: `raw` is a fresh descriptor we own.
        let owned = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: all-zero is a valid sockaddr_vm; the fields are set below.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_cid = target.cid;
        addr.svm_port = target.port;
        // SAFETY: `addr` is a valid sockaddr_vm for the duration of the call.
        let rc = unsafe {
            libc::connect(
                raw,
                (&addr as *const libc::sockaddr_vm).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        // SAFETY: the OwnedFd lives inside the AsyncFd, so the descriptor is neither closed nor
        // replaced while registered.
        let fd = unsafe {
            AsyncFd::register_with_interest(
                owned,
                Interest::READABLE | Interest::WRITABLE | Interest::ERROR,
            )
        }?;
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINPROGRESS) {
                return Err(err);
            }
            let _ = fd.ready(Interest::WRITABLE | Interest::ERROR).await?;
            if let Some(err) = socket_error(fd.get_ref())? {
                return Err(err);
            }
        }
        Ok(Self { fd })
    }
}

/// The pending error of a socket (SO_ERROR), if any.
fn socket_error(fd: &OwnedFd) -> io::Result<Option<io::Error>> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    Ok((value != 0).then(|| io::Error::from_raw_os_error(value)))
}

impl HeldConnection for VsockAnnouncement {
    async fn send_line(&mut self, line: &[u8]) -> io::Result<()> {
        let mut sent = 0;
        while let Some(rest) = line.get(sent..).filter(|rest| !rest.is_empty()) {
            let mut guard = self.fd.writable().await?;
            let result = guard.try_io(|fd| {
                // SAFETY: send reads `rest.len()` bytes from `rest`.
                let n = unsafe {
                    libc::send(
                        fd.as_raw_fd(),
                        rest.as_ptr().cast(),
                        rest.len(),
                        libc::MSG_NOSIGNAL,
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n.unsigned_abs())
                }
            });
            match result {
                Ok(Ok(n)) => sent = sent.saturating_add(n),
                Ok(Err(err)) => return Err(err),
                Err(_would_block) => {}
            }
        }
        Ok(())
    }

    async fn wait_closed(&mut self) -> String {
        loop {
            let mut guard = match self.fd.ready(Interest::READABLE | Interest::ERROR).await {
                Ok(guard) => guard,
                Err(err) => return err.to_string(),
            };
            match socket_error(self.fd.get_ref()) {
                Ok(Some(err)) => return err.to_string(),
                Ok(None) => {}
                Err(err) => return err.to_string(),
            }
            let mut buf = [0u8; 64];
            // SAFETY: recv writes at most `buf.len()` bytes into `buf`.
            let n = unsafe {
                libc::recv(
                    self.fd.get_ref().as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            match n {
                0 => return "closed by the host".to_owned(),
                n if n > 0 => {}
                _ => {
                    let err = io::Error::last_os_error();
                    if err.kind() != io::ErrorKind::WouldBlock {
                        return err.to_string();
                    }
                    guard.clear_ready();
                }
            }
        }
    }
}

/// Connects with `connect`, sends the readiness line, holds the connection
/// until the host side ends (EOF, reset), then does it again. Never returns.
pub async fn announce_forever<C, Fut, S>(connect: C, version: &str, timing: AnnounceTiming)
where
    C: Fn() -> Fut,
    Fut: Future<Output = io::Result<S>>,
    S: HeldConnection,
{
    let line = ready_line(version);
    let mut backoff = timing.initial_backoff;
    let mut failures: u32 = 0;
    loop {
        let attempt = async {
            let mut stream = connect().await?;
            stream.send_line(line.as_bytes()).await?;
            Ok::<_, io::Error>(stream)
        };
        let outcome = match tokio::time::timeout(timing.attempt_timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "timed out")),
        };
        match outcome {
            Ok(mut stream) => {
                failures = 0;
                tracing::info!("readiness announced to the host");
                let since = Instant::now();
                let why = stream.wait_closed().await;
                let lived = since.elapsed();
                tracing::info!(reason = %why, "host readiness connection ended; announcing again");
                if lived >= timing.stable_after {
                    backoff = timing.initial_backoff;
                    continue;
                }
            }
            Err(err) => {
                // The first failure is worth seeing on the console; a host without a
                // listener would otherwise fill it.
                if failures == 0 {
                    tracing::warn!(%err, "cannot announce readiness; retrying in the background");
                } else {
                    tracing::debug!(%err, failures, "cannot announce readiness");
                }
                failures = failures.saturating_add(1);
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = backoff.saturating_mul(2).min(timing.max_backoff);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::{UnixListener, UnixStream};

    #[test]
    fn line_format_and_default_target() {
        assert_eq!(ready_line("1.2.3"), "READY 1.2.3\n");
        assert_eq!(ReadyTarget::default(), ReadyTarget { cid: 2, port: 1023 });
    }

    async fn read_line(stream: UnixStream) -> (String, BufReader<UnixStream>) {
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        (line, reader)
    }

    #[tokio::test]
    async fn announces_holds_the_connection_and_reannounces_after_it_ends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ready.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let timing = AnnounceTiming {
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
            stable_after: Duration::from_millis(100),
            attempt_timeout: Duration::from_secs(5),
        };
        let connect_path = path.clone();
        let announcer = tokio::spawn(async move {
            announce_forever(
                move || UnixStream::connect(connect_path.clone()),
                "9.9.9",
                timing,
            )
            .await
        });

        let (first, _) = listener.accept().await.unwrap();
        let (line, first) = read_line(first).await;
        assert_eq!(line, "READY 9.9.9\n");
        // Held open: no second connection while the first lives.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), listener.accept())
                .await
                .is_err(),
            "the agent reconnected while its connection was open"
        );
        // Ending it (what a transport reset does) brings a new announcement promptly.
        drop(first);
        let started = Instant::now();
        let (second, _) = tokio::time::timeout(Duration::from_secs(5), listener.accept())
            .await
            .expect("no re-announcement")
            .unwrap();
        let (line, _second) = read_line(second).await;
        assert_eq!(line, "READY 9.9.9\n");
        assert!(started.elapsed() < Duration::from_secs(1));
        announcer.abort();
    }

    #[tokio::test]
    async fn retries_until_the_host_listens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("late.sock");
        let timing = AnnounceTiming {
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(40),
            ..AnnounceTiming::default()
        };
        let connect_path = path.clone();
        let announcer = tokio::spawn(async move {
            announce_forever(
                move || UnixStream::connect(connect_path.clone()),
                "1",
                timing,
            )
            .await
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let listener = UnixListener::bind(&path).unwrap();
        let (stream, _) = tokio::time::timeout(Duration::from_secs(5), listener.accept())
            .await
            .expect("the agent gave up")
            .unwrap();
        assert_eq!(read_line(stream).await.0, "READY 1\n");
        announcer.abort();
    }
}
