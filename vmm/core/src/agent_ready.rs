//! The guest agent's readiness, pushed by the guest: the agent connects to host vsock port
//! [`AGENT_READY_PORT`], writes `READY <version>\n` and keeps the connection open. The VMM takes
//! that port through its in-process vsock backend (which the device asks before the hybrid
//! socket, so `<uds>_1023` never sees it), records the announcement and publishes it on a
//! `tokio::sync::watch` channel. When the connection ends (the agent died, or a restore reset
//! the vsock transport) the state goes back to "not ready"; after a restore the agent notices
//! the reset and announces itself to the new VMM at once, so wake → ready is an event too.
//!
//! One `agent-ready` thread per VM accepts; each announcement is read on a short-lived thread of
//! its own (at most [`MAX_ANNOUNCERS`] at once: a well-behaved guest has one).

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use devices::virtio::vsock::VsockHandle;
#[cfg(feature = "async")]
use tokio::sync::watch;

/// Host vsock port the agent announces itself on. The same as `agent_proto::AGENT_READY_PORT`
/// (a test checks it), spelled out so that the VM core needs no gRPC crate.
pub const AGENT_READY_PORT: u32 = 1023;
/// Guest connections to the readiness port served at once; more are closed straight away.
pub const MAX_ANNOUNCERS: usize = 4;
/// The guest has this long to send its line once connected.
const LINE_TIMEOUT: Duration = Duration::from_secs(5);
/// `READY ` plus a version; longer lines are not an announcement (the guest is untrusted: the
/// line is read byte by byte up to this cap and the connection closed, never drained).
const MAX_LINE: usize = 128;

/// One announcement of the guest agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentReady {
    /// What the agent said its version is.
    pub version: String,
    /// Time from this VM's start (boot or restore) to the announcement.
    pub after_start: Duration,
    /// When the announcement arrived.
    pub at: Instant,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentReadyError {
    #[error(
        "the VM has no vsock device on the userspace datapath, so the agent cannot announce itself"
    )]
    NoVsock,
    #[error("the guest agent did not announce itself within {0:?}")]
    Timeout(Duration),
}

/// Parses `READY <version>` (newline already stripped). The version is printable ASCII.
pub fn parse_ready_line(line: &[u8]) -> Option<String> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let version = line.strip_prefix(b"READY ")?;
    let valid = !version.is_empty() && version.iter().all(|b| b.is_ascii_graphic());
    valid.then(|| String::from_utf8_lossy(version).into_owned())
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    /// Async subscribers (the `async` feature).
    #[cfg(feature = "async")]
    watch: watch::Sender<Option<AgentReady>>,
    started: Instant,
    announcers: AtomicUsize,
}

#[derive(Default)]
struct State {
    current: Option<AgentReady>,
    /// Bumped per announcement, so a connection that ends clears only its own state.
    generation: u64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn announce(&self, version: String) -> u64 {
        let ready = AgentReady {
            version,
            after_start: self.started.elapsed(),
            at: Instant::now(),
        };
        tracing::info!(
            "guest agent ready: version {} after {} ms",
            ready.version,
            ready.after_start.as_millis()
        );
        let mut state = self.lock();
        state.generation = state.generation.wrapping_add(1);
        state.current = Some(ready.clone());
        #[cfg(feature = "async")]
        self.watch.send_replace(Some(ready));
        self.changed.notify_all();
        state.generation
    }

    fn gone(&self, generation: u64) {
        let mut state = self.lock();
        if state.generation == generation && state.current.is_some() {
            tracing::info!("guest agent's readiness connection closed");
            state.current = None;
            #[cfg(feature = "async")]
            self.watch.send_replace(None);
            self.changed.notify_all();
        }
    }
}

/// Whether (and since when) the guest agent is ready; cheap to clone.
#[derive(Clone)]
pub struct AgentReadiness {
    shared: Arc<Shared>,
    /// False when the VM cannot hear announcements (no vsock, or the vhost datapath).
    listening: bool,
}

impl std::fmt::Debug for AgentReadiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentReadiness")
            .field("listening", &self.listening)
            .field("current", &self.current())
            .finish()
    }
}

impl AgentReadiness {
    /// Starts listening on the VM's in-process vsock, if it has one. `started` is the VM's start
    /// (or restore) time. Never fails: without a usable vsock the agent is simply never ready.
    /// Its threads belong to the VM `exit` ends: a panic on one ends that VM.
    pub fn start(
        vsock: Option<&VsockHandle>,
        started: Instant,
        exit: Arc<crate::hypervisor::vcpu::ExitSink>,
        seccomp: crate::seccomp::SeccompLevel,
    ) -> Self {
        #[cfg(feature = "async")]
        let (watch, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            #[cfg(feature = "async")]
            watch,
            started,
            announcers: AtomicUsize::new(0),
        });
        let listening = match vsock.map(|v| v.listen(AGENT_READY_PORT)) {
            None => false,
            Some(Err(e)) => {
                tracing::info!("vsock: not listening for the guest agent's readiness: {e}");
                false
            }
            Some(Ok(listener)) => {
                let thread_shared = Arc::clone(&shared);
                let spawned = crate::thread_guard::spawn("agent-ready".into(), exit.clone(), {
                    let exit = exit.clone();
                    move || {
                        // The connection threads it starts inherit this filter.
                        let kind = crate::seccomp::ThreadKind::AgentReady;
                        if let Err(e) = crate::seccomp::install(kind, seccomp) {
                            exit.report(crate::exit::VmExit::Failed(format!("agent-ready: {e}")));
                            return;
                        }
                        accept_loop(listener, &thread_shared, &exit)
                    }
                });
                match spawned {
                    Ok(_) => true,
                    Err(e) => {
                        tracing::warn!("cannot start the agent readiness thread: {e}");
                        false
                    }
                }
            }
        };
        AgentReadiness { shared, listening }
    }

    /// Whether announcements can arrive at all.
    pub fn is_listening(&self) -> bool {
        self.listening
    }

    /// The current announcement, if the agent is ready.
    pub fn current(&self) -> Option<AgentReady> {
        self.shared.lock().current.clone()
    }

    /// A receiver that sees every change (`Some` when the agent announced, `None` when its
    /// connection ended).
    #[cfg(feature = "async")]
    pub fn subscribe(&self) -> watch::Receiver<Option<AgentReady>> {
        self.shared.watch.subscribe()
    }

    /// Waits (async) until the agent is ready.
    #[cfg(feature = "async")]
    pub async fn wait(&self, timeout: Duration) -> Result<AgentReady, AgentReadyError> {
        if !self.listening {
            return Err(AgentReadyError::NoVsock);
        }
        let mut rx = self.subscribe();
        let waited = tokio::time::timeout(timeout, async {
            rx.wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|ready| ready.clone())
        })
        .await;
        match waited {
            Ok(Some(ready)) => Ok(ready),
            _ => Err(AgentReadyError::Timeout(timeout)),
        }
    }

    /// Waits (blocking the thread) until the agent is ready.
    pub fn wait_blocking(&self, timeout: Duration) -> Result<AgentReady, AgentReadyError> {
        if !self.listening {
            return Err(AgentReadyError::NoVsock);
        }
        let state = self.shared.lock();
        let (state, _) = self
            .shared
            .changed
            .wait_timeout_while(state, timeout, |s| s.current.is_none())
            .unwrap_or_else(|e| e.into_inner());
        state
            .current
            .clone()
            .ok_or(AgentReadyError::Timeout(timeout))
    }
}

fn accept_loop(
    mut listener: devices::virtio::vsock::VsockListener,
    shared: &Arc<Shared>,
    exit: &Arc<crate::hypervisor::vcpu::ExitSink>,
) {
    loop {
        let stream = match listener.accept_blocking() {
            Ok((stream, _guest_port)) => stream,
            // The device is gone: the VM has stopped.
            Err(_) => return,
        };
        if shared.announcers.fetch_add(1, Ordering::AcqRel) >= MAX_ANNOUNCERS {
            shared.announcers.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!("vsock: too many connections to the readiness port; closing one");
            continue;
        }
        let thread_shared = Arc::clone(shared);
        let spawned =
            crate::thread_guard::spawn("agent-ready-conn".into(), Arc::clone(exit), move || {
                serve_announcer(stream, &thread_shared);
                thread_shared.announcers.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            shared.announcers.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!("cannot start a readiness connection thread: {e}");
        }
    }
}

/// Reads the announcement, then holds the connection until it ends.
fn serve_announcer(mut stream: UnixStream, shared: &Shared) {
    let line = match read_line(&mut stream, LINE_TIMEOUT) {
        Ok(line) => line,
        Err(e) => {
            tracing::debug!("vsock: readiness connection without an announcement: {e}");
            return;
        }
    };
    let Some(version) = parse_ready_line(&line) else {
        tracing::warn!(
            "vsock: unexpected line on the readiness port: {:?}",
            String::from_utf8_lossy(&line)
        );
        return;
    };
    let generation = shared.announce(version);
    // Nothing more is expected; whatever arrives is ignored until the connection ends.
    let _ = stream.set_read_timeout(None);
    let mut sink = [0u8; 256];
    loop {
        match stream.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    shared.gone(generation);
}

fn read_line(stream: &mut UnixStream, timeout: Duration) -> io::Result<Vec<u8>> {
    stream.set_read_timeout(Some(timeout))?;
    let mut line = Vec::with_capacity(32);
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(_) if byte[0] == b'\n' => return Ok(line),
            Ok(_) if line.len() >= MAX_LINE => {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"))
            }
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_port_is_the_agents() {
        // The guest agent announces itself on the port the protocol crate names.
        assert_eq!(AGENT_READY_PORT, agent_proto::AGENT_READY_PORT);
    }

    #[test]
    fn ready_lines() {
        assert_eq!(parse_ready_line(b"READY 0.1.0"), Some("0.1.0".into()));
        assert_eq!(parse_ready_line(b"READY 1\r"), Some("1".into()));
        for bad in [
            &b"READY "[..],
            b"READY a b",
            b"ready 1",
            b"HELLO",
            b"READY \xff",
        ] {
            assert_eq!(parse_ready_line(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn long_or_missing_lines_are_cut_short() {
        use std::io::Write;
        // A line without end: refused after MAX_LINE bytes, the rest left unread.
        let (mut host, guest) = UnixStream::pair().unwrap();
        (&guest).write_all(&[b'A'; 10_000]).unwrap();
        let error = read_line(&mut host, Duration::from_secs(5)).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        drop(guest);
        let mut rest = Vec::new();
        host.read_to_end(&mut rest).unwrap();
        assert_eq!(rest.len(), 10_000 - MAX_LINE - 1);

        // A guest that connects and says nothing: the read times out.
        let (mut host, _guest) = UnixStream::pair().unwrap();
        let started = Instant::now();
        let error = read_line(&mut host, Duration::from_millis(100)).unwrap_err();
        assert!(
            matches!(
                error.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "{error}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));

        // A line of exactly MAX_LINE bytes is still read.
        let (mut host, guest) = UnixStream::pair().unwrap();
        let mut line = b"READY ".to_vec();
        line.resize(MAX_LINE, b'1');
        (&guest).write_all(&line).unwrap();
        (&guest).write_all(b"\n").unwrap();
        assert_eq!(read_line(&mut host, Duration::from_secs(5)).unwrap(), line);
    }

    #[test]
    fn announcements_and_their_end_are_published() {
        let readiness = AgentReadiness {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                changed: Condvar::new(),
                #[cfg(feature = "async")]
                watch: watch::channel(None).0,
                started: Instant::now(),
                announcers: AtomicUsize::new(0),
            }),
            listening: true,
        };
        #[cfg(feature = "async")]
        let rx = readiness.subscribe();
        assert!(readiness.wait_blocking(Duration::from_millis(10)).is_err());

        let (host, guest) = UnixStream::pair().unwrap();
        let shared = Arc::clone(&readiness.shared);
        let server = std::thread::spawn(move || serve_announcer(host, &shared));
        use std::io::Write;
        (&guest).write_all(b"READY 7.7\n").unwrap();
        let ready = readiness.wait_blocking(Duration::from_secs(5)).unwrap();
        assert_eq!(ready.version, "7.7");
        #[cfg(feature = "async")]
        assert_eq!(
            rx.borrow().as_ref().map(|r| r.version.clone()),
            Some("7.7".into())
        );
        // Still ready while the connection lives.
        std::thread::sleep(Duration::from_millis(50));
        assert!(readiness.current().is_some());
        drop(guest);
        server.join().unwrap();
        assert!(readiness.current().is_none());
        #[cfg(feature = "async")]
        assert!(rx.borrow().is_none());

        let no_vsock = AgentReadiness::start(
            None,
            Instant::now(),
            Arc::default(),
            crate::seccomp::SeccompLevel::Off,
        );
        assert!(matches!(
            no_vsock.wait_blocking(Duration::from_secs(1)),
            Err(AgentReadyError::NoVsock)
        ));
    }
}
