//! In-process backend for library users: `VsockHandle::connect` / `VsockHandle::listen` give
//! streams to the guest without a Unix-socket path. Each connection is a `UnixStream::pair()`:
//! one end goes to the muxer on the event-loop thread, the other is the caller's (a std stream
//! from `accept_blocking`/`connect_stream`, or, with the `async` feature, a
//! `tokio::net::UnixStream` in the caller's runtime). The handle is `Clone + Send + Sync`.
//!
//! The listener backlog is a small queue of our own (`Backlog`) that serves both a blocking
//! thread and an async task, so the device needs no async runtime unless the caller wants one.

use std::collections::{HashMap, VecDeque};
#[cfg(feature = "async")]
use std::future::Future;
use std::io::{self, ErrorKind};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Poll, Waker};
use std::time::Instant;

#[cfg(feature = "async")]
use tokio::sync::oneshot;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{BackendConnectError, ConnectAck, HostConnection, VsockBackend};

/// Host-initiated connects waiting for the event loop; more fail with WouldBlock.
pub const MAX_QUEUED_CONNECTS: usize = 256;
/// Guest-initiated connections a listener holds before `accept`; more are refused (RST).
pub const LISTENER_BACKLOG: usize = 128;

type Incoming = (UnixStream, u32);

/// A listener's pending guest connections: bounded, woken by the device, read by one listener,
/// either blocking (`Condvar`) or async (`Waker`). Nothing is lost when a waiting `accept` is
/// cancelled: connections stay queued until taken.
#[derive(Default)]
struct Backlog {
    state: Mutex<BacklogState>,
    ready: Condvar,
}

#[derive(Default)]
struct BacklogState {
    queue: VecDeque<Incoming>,
    /// The listener is gone: the device refuses new connections to its port.
    listener_closed: bool,
    /// The device is gone: `accept` fails once the queue is empty.
    device_gone: bool,
    waker: Option<Waker>,
}

enum Offer {
    Queued,
    Full,
    ListenerClosed,
}

impl Backlog {
    fn offer(&self, incoming: Incoming) -> Offer {
        let mut state = lock(&self.state);
        if state.listener_closed {
            return Offer::ListenerClosed;
        }
        if state.queue.len() >= LISTENER_BACKLOG {
            return Offer::Full;
        }
        state.queue.push_back(incoming);
        let waker = state.waker.take();
        drop(state);
        self.ready.notify_one();
        if let Some(waker) = waker {
            waker.wake();
        }
        Offer::Queued
    }

    fn set(&self, update: impl FnOnce(&mut BacklogState)) {
        let mut state = lock(&self.state);
        update(&mut state);
        let waker = state.waker.take();
        drop(state);
        self.ready.notify_all();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn is_listener_closed(&self) -> bool {
        lock(&self.state).listener_closed
    }

    fn take(state: &mut BacklogState) -> Option<io::Result<Incoming>> {
        match state.queue.pop_front() {
            Some(incoming) => Some(Ok(incoming)),
            None if state.device_gone => Some(Err(io::Error::new(
                ErrorKind::NotConnected,
                "vsock device is gone",
            ))),
            None => None,
        }
    }

    fn recv_blocking(&self) -> io::Result<Incoming> {
        let mut state = lock(&self.state);
        loop {
            if let Some(result) = Self::take(&mut state) {
                return result;
            }
            state = self.ready.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    #[cfg_attr(not(feature = "async"), allow(dead_code))]
    fn poll_recv(&self, waker: &Waker) -> Poll<io::Result<Incoming>> {
        let mut state = lock(&self.state);
        match Self::take(&mut state) {
            Some(result) => Poll::Ready(result),
            None => {
                state.waker = Some(waker.clone());
                Poll::Pending
            }
        }
    }
}

struct Shared {
    requests: Mutex<VecDeque<HostConnection>>,
    wake: EventFd,
    listeners: Mutex<HashMap<u32, Arc<Backlog>>>,
    /// The device is gone (or runs the vhost datapath, which this backend cannot serve).
    closed: AtomicBool,
    unsupported: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not take vsock down with it: the data is still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn check_open(&self) -> io::Result<()> {
        if self.unsupported.load(Ordering::Acquire) {
            return Err(io::Error::new(
                ErrorKind::Unsupported,
                "in-process vsock needs the userspace datapath",
            ));
        }
        if self.closed.load(Ordering::Acquire) {
            return Err(io::Error::new(
                ErrorKind::NotConnected,
                "vsock device is gone",
            ));
        }
        Ok(())
    }

    /// Queues a host-initiated connection for the event loop and wakes it.
    fn queue(&self, conn: HostConnection) -> io::Result<()> {
        {
            let mut q = lock(&self.requests);
            if q.len() >= MAX_QUEUED_CONNECTS {
                return Err(io::Error::new(
                    ErrorKind::WouldBlock,
                    "too many vsock connects in flight",
                ));
            }
            q.push_back(conn);
        }
        self.wake.write(1)
    }
}

/// Cloneable entry point for library users; usable from any thread.
#[derive(Clone)]
pub struct VsockHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for VsockHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockHandle").finish_non_exhaustive()
    }
}

impl VsockHandle {
    /// Connects to the guest's `port`. Resolves once the guest accepted (or refused: then
    /// `ConnectionRefused`). Must be awaited inside a tokio runtime with IO enabled. There is
    /// no built-in timeout while the guest driver is not up yet: wrap it in
    /// `tokio::time::timeout` if that matters. (With the `async` feature.)
    #[cfg(feature = "async")]
    pub fn connect(
        &self,
        port: u32,
    ) -> impl Future<Output = io::Result<tokio::net::UnixStream>> + Send + 'static {
        let shared = self.shared.clone();
        async move {
            shared.check_open()?;
            let (ours, theirs) = UnixStream::pair()?;
            ours.set_nonblocking(true)?;
            theirs.set_nonblocking(true)?;
            let (tx, rx) = oneshot::channel();
            let conn = HostConnection {
                stream: theirs,
                guest_port: port,
                ack: ConnectAck::Notify(Box::new(move |r| {
                    // The caller may have stopped waiting; nothing to do then.
                    let _ = tx.send(r);
                })),
            };
            shared.queue(conn)?;
            match rx.await {
                Ok(Ok(_local_port)) => tokio::net::UnixStream::from_std(ours),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(io::Error::new(
                    ErrorKind::ConnectionReset,
                    "vsock device dropped the connection attempt",
                )),
            }
        }
    }

    /// Hands an existing host socket to the device as a connection to the guest's `port`, with
    /// no copy in between (e.g. a control-API client that asked to be switched to vsock).
    /// `on_answer` runs on the device thread once the guest accepted (`Ok(local_port)`) or the
    /// attempt failed, before any guest byte reaches `stream`: whatever it writes to a clone of
    /// `stream` comes first. It must not block. Works without a tokio runtime.
    pub fn connect_stream(
        &self,
        stream: UnixStream,
        port: u32,
        on_answer: impl FnOnce(io::Result<u32>) + Send + 'static,
    ) -> io::Result<()> {
        self.shared.check_open()?;
        stream.set_nonblocking(true)?;
        self.shared.queue(HostConnection {
            stream,
            guest_port: port,
            ack: ConnectAck::Notify(Box::new(on_answer)),
        })
    }

    /// Accepts guest connections to host `port`. Only one listener per port.
    pub fn listen(&self, port: u32) -> io::Result<VsockListener> {
        self.shared.check_open()?;
        let mut listeners = lock(&self.shared.listeners);
        if listeners
            .get(&port)
            .is_some_and(|backlog| !backlog.is_listener_closed())
        {
            return Err(io::Error::new(
                ErrorKind::AddrInUse,
                format!("vsock port {port} already has a listener"),
            ));
        }
        let backlog = Arc::new(Backlog::default());
        listeners.insert(port, backlog.clone());
        Ok(VsockListener {
            port,
            backlog,
            shared: self.shared.clone(),
        })
    }
}

/// Guest-initiated connections to one host port.
pub struct VsockListener {
    port: u32,
    backlog: Arc<Backlog>,
    shared: Arc<Shared>,
}

impl VsockListener {
    pub fn port(&self) -> u32 {
        self.port
    }

    /// Next connection and the guest's source port. Fails once the device is gone. Cancel-safe:
    /// a connection that arrives after the future is dropped waits for the next `accept`.
    /// (With the `async` feature.)
    #[cfg(feature = "async")]
    pub async fn accept(&mut self) -> io::Result<(tokio::net::UnixStream, u32)> {
        let backlog = self.backlog.clone();
        let (stream, guest_port) =
            std::future::poll_fn(move |cx| backlog.poll_recv(cx.waker())).await?;
        Ok((tokio::net::UnixStream::from_std(stream)?, guest_port))
    }

    /// Like `accept`, for a plain thread (not inside an async runtime): blocks until the next
    /// connection and returns it as a blocking std stream.
    pub fn accept_blocking(&mut self) -> io::Result<(UnixStream, u32)> {
        let (stream, guest_port) = self.backlog.recv_blocking()?;
        stream.set_nonblocking(false)?;
        Ok((stream, guest_port))
    }
}

impl Drop for VsockListener {
    fn drop(&mut self) {
        self.backlog.set(|state| state.listener_closed = true);
        let mut listeners = lock(&self.shared.listeners);
        if listeners
            .get(&self.port)
            .is_some_and(|backlog| Arc::ptr_eq(backlog, &self.backlog))
        {
            listeners.remove(&self.port);
        }
    }
}

/// The muxer side of `VsockHandle`.
pub struct InProcessBackend {
    shared: Arc<Shared>,
}

impl InProcessBackend {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            shared: Arc::new(Shared {
                requests: Mutex::new(VecDeque::new()),
                wake: EventFd::new(EFD_NONBLOCK)?,
                listeners: Mutex::new(HashMap::new()),
                closed: AtomicBool::new(false),
                unsupported: AtomicBool::new(false),
            }),
        })
    }

    pub fn handle(&self) -> VsockHandle {
        VsockHandle {
            shared: self.shared.clone(),
        }
    }
}

/// A handle for a device whose datapath cannot serve in-process connections (vhost-kernel).
pub fn unsupported_handle() -> io::Result<VsockHandle> {
    let backend = InProcessBackend::new()?;
    backend.shared.unsupported.store(true, Ordering::Release);
    Ok(backend.handle())
}

impl VsockBackend for InProcessBackend {
    fn name(&self) -> &'static str {
        "in-process"
    }

    fn as_raw_fd(&self) -> RawFd {
        self.shared.wake.as_raw_fd()
    }

    fn poll_host_connections(&mut self, _now: Instant) -> Vec<HostConnection> {
        // Drain the counter first: a connect queued after this read re-arms it.
        let _ = self.shared.wake.read();
        lock(&self.shared.requests).drain(..).collect()
    }

    fn connect_to_host(
        &mut self,
        port: u32,
        guest_port: u32,
    ) -> Result<UnixStream, BackendConnectError> {
        let io_err = |source| BackendConnectError::Io { port, source };
        let mut listeners = lock(&self.shared.listeners);
        let tx = listeners
            .get(&port)
            .ok_or(BackendConnectError::NotListening(port))?;
        let (ours, theirs) = UnixStream::pair().map_err(io_err)?;
        ours.set_nonblocking(true).map_err(io_err)?;
        theirs.set_nonblocking(true).map_err(io_err)?;
        match tx.offer((theirs, guest_port)) {
            Offer::Queued => Ok(ours),
            Offer::Full => Err(io_err(io::Error::new(
                ErrorKind::WouldBlock,
                "listener backlog full",
            ))),
            Offer::ListenerClosed => {
                listeners.remove(&port);
                Err(BackendConnectError::NotListening(port))
            }
        }
    }
}

impl Drop for InProcessBackend {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        let pending: Vec<HostConnection> = lock(&self.shared.requests).drain(..).collect();
        for conn in pending {
            conn.refuse(ErrorKind::ConnectionReset);
        }
        // Every listener's `accept` fails once its queue is drained.
        for (_, backlog) in lock(&self.shared.listeners).drain() {
            backlog.set(|state| state.device_gone = true);
        }
    }
}
