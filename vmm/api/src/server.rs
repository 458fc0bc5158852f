//! The API server: an accept thread waiting on the socket and a stop event, and one thread per
//! connection (bounded), so a slow client, an idle keep-alive one or a long snapshot never
//! stalls the others and nothing here ever runs on a vCPU or device thread. Connections are
//! persistent (HTTP/1.1 keep-alive, as Firecracker's clients expect) until the client says
//! `Connection: close`, a request cannot be read whole, or the connection idles out.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::AssertUnwindSafe;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vmm::thread_guard::panic_reason;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::http::{self, HttpError, Request, Response, MAX_BODY_BYTES, MAX_HEAD_BYTES};
use super::socket::{self, FileIdentity};
use super::{router, upgrade, ApiError, VmControl};

/// How long `stop` waits for answers already being written (e.g. to the shutdown request that
/// led to the stop) before it removes the socket anyway.
const STOP_GRACE: Duration = Duration::from_secs(1);
const READ_CHUNK: usize = 8 * 1024;

#[derive(Clone, Debug)]
pub struct ApiServerConfig {
    /// Time a client has to send its whole request (a slow-loris bound), and to take the answer.
    pub request_timeout: Duration,
    /// Connections served at once; more are answered 503 straight away.
    pub max_connections: usize,
    /// How long a kept-alive connection may wait for its next request before it is closed, so
    /// idle clients cannot hold the connection slots forever.
    pub idle_timeout: Duration,
}

impl Default for ApiServerConfig {
    fn default() -> Self {
        ApiServerConfig {
            request_timeout: Duration::from_secs(5),
            max_connections: 16,
            // Longer than a client's pause between calls around a guest boot (firecracker-rs-sdk
            // keeps one connection and never reopens it).
            idle_timeout: Duration::from_secs(300),
        }
    }
}

/// Counts connection threads so the server can bound them and wait for them on stop.
#[derive(Default)]
struct ConnectionCount {
    active: Mutex<usize>,
    idle: Condvar,
}

struct ConnectionSlot(Arc<ConnectionCount>);

impl ConnectionCount {
    fn try_acquire(self: &Arc<Self>, max: usize) -> Option<ConnectionSlot> {
        let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        if *active >= max {
            return None;
        }
        *active = active.saturating_add(1);
        Some(ConnectionSlot(Arc::clone(self)))
    }

    fn wait_idle(&self, timeout: Duration) {
        let active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        let _ = self
            .idle
            .wait_timeout_while(active, timeout, |active| *active > 0);
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut active = self.0.active.lock().unwrap_or_else(|e| e.into_inner());
        *active = active.saturating_sub(1);
        self.0.idle.notify_all();
    }
}

/// A control socket bound (mode 0600) but not served yet: bound before the VM runs, so the
/// socket exists by the time the guest (or a supervisor watching the console) can see it;
/// clients that connect meanwhile wait in the listen backlog. Dropped unserved, it removes the
/// socket file.
pub struct ApiSocket {
    path: PathBuf,
    listener: Option<UnixListener>,
    identity: FileIdentity,
}

impl ApiSocket {
    /// Binds `path` (a stale socket there is replaced, a live one or a non-socket file is an
    /// error).
    pub fn bind(path: &Path) -> Result<ApiSocket, ApiError> {
        let (listener, identity) = socket::bind_private(path)?;
        Ok(ApiSocket {
            path: path.to_path_buf(),
            listener: Some(listener),
            identity,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves `control` on this socket with the default limits.
    pub fn serve(self, control: Arc<dyn VmControl>) -> Result<ApiServer, ApiError> {
        self.serve_with(control, ApiServerConfig::default())
    }

    pub fn serve_with(
        mut self,
        control: Arc<dyn VmControl>,
        config: ApiServerConfig,
    ) -> Result<ApiServer, ApiError> {
        let path = self.path.clone();
        let path = path.as_path();
        let identity = self.identity;
        let stop_event = EventFd::new(EFD_NONBLOCK)
            .map(Arc::new)
            .map_err(|e| ApiError::socket(path, "cannot create the stop event", Some(e)))?;
        let Some(listener) = self.listener.take() else {
            return Err(ApiError::socket(
                path,
                "the socket was already served",
                None,
            ));
        };
        let connections = Arc::new(ConnectionCount::default());
        let thread_stop = Arc::clone(&stop_event);
        let thread_connections = Arc::clone(&connections);
        let accept_thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                // Before the first request; the connection threads inherit it.
                let level = control.seccomp_level();
                if let Err(e) = vmm::seccomp::install(vmm::seccomp::ThreadKind::Api, level) {
                    control.report_failure(format!("api thread: {e}"));
                    return;
                }
                let served = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    accept_loop(
                        &listener,
                        &thread_stop,
                        &control,
                        &config,
                        &thread_connections,
                    )
                }));
                if let Err(payload) = served {
                    control.report_failure(panic_reason("api", payload.as_ref()));
                }
            })
            .map_err(|e| {
                socket::remove_if_ours(path, identity);
                ApiError::socket(path, "cannot start the server thread", Some(e))
            })?;
        tracing::info!("control API listening on {}", path.display());
        Ok(ApiServer {
            path: path.to_path_buf(),
            identity,
            stop_event,
            accept_thread: Some(accept_thread),
            connections,
        })
    }
}

impl Drop for ApiSocket {
    fn drop(&mut self) {
        // Still ours and never served: nobody else will remove it.
        if self.listener.is_some() {
            socket::remove_if_ours(&self.path, self.identity);
        }
    }
}

/// Serves the control API of one VM on a Unix socket until stopped or dropped.
pub struct ApiServer {
    path: PathBuf,
    identity: FileIdentity,
    stop_event: Arc<EventFd>,
    accept_thread: Option<JoinHandle<()>>,
    connections: Arc<ConnectionCount>,
}

impl ApiServer {
    /// Starts serving on `path` (created with mode 0600; a stale socket there is replaced, a live
    /// one or a non-socket file is an error).
    pub fn start(path: &Path, control: Arc<dyn VmControl>) -> Result<ApiServer, ApiError> {
        ApiServer::start_with(path, control, ApiServerConfig::default())
    }

    pub fn start_with(
        path: &Path,
        control: Arc<dyn VmControl>,
        config: ApiServerConfig,
    ) -> Result<ApiServer, ApiError> {
        ApiSocket::bind(path)?.serve_with(control, config)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting, lets in-flight answers finish (briefly), removes the socket file.
    /// Idempotent. Must not be called from inside a [`VmControl`] method (it would wait for
    /// its own connection for the grace period).
    pub fn stop(&mut self) {
        let Some(thread) = self.accept_thread.take() else {
            return;
        };
        if let Err(e) = self.stop_event.write(1) {
            tracing::warn!("cannot signal the API thread to stop: {e}");
        }
        if thread.join().is_err() {
            tracing::warn!("the API thread panicked");
        }
        self.connections.wait_idle(STOP_GRACE);
        socket::remove_if_ours(&self.path, self.identity);
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

enum Wake {
    Stop,
    Listener,
}

fn wait_for_work(listener: &UnixListener, stop: &EventFd) -> io::Result<Wake> {
    let mut fds = [
        libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfd that outlives the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc >= 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    let [listener_fd, stop_fd] = fds;
    if stop_fd.revents != 0 {
        Ok(Wake::Stop)
    } else if listener_fd.revents & libc::POLLIN != 0 {
        Ok(Wake::Listener)
    } else {
        Err(io::Error::other(format!(
            "unexpected poll events {:#x}",
            listener_fd.revents
        )))
    }
}

fn accept_loop(
    listener: &UnixListener,
    stop: &Arc<EventFd>,
    control: &Arc<dyn VmControl>,
    config: &ApiServerConfig,
    connections: &Arc<ConnectionCount>,
) {
    loop {
        match wait_for_work(listener, stop) {
            Ok(Wake::Stop) => return,
            Ok(Wake::Listener) => {}
            Err(e) => {
                tracing::warn!("control API: waiting for connections: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        }
        loop {
            match listener.accept() {
                Ok((stream, _)) => dispatch(stream, stop, control, config, connections),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // E.g. out of descriptors: back off instead of spinning on a readable socket.
                    tracing::warn!("control API: accept: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                    break;
                }
            }
        }
    }
}

fn dispatch(
    mut stream: UnixStream,
    stop: &Arc<EventFd>,
    control: &Arc<dyn VmControl>,
    config: &ApiServerConfig,
    connections: &Arc<ConnectionCount>,
) {
    let Some(slot) = connections.try_acquire(config.max_connections) else {
        // A fresh socket's send buffer is empty, so this small write does not block; the
        // timeout is a belt for the braces.
        let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
        let _ = stream
            .write_all(&Response::error(503, "too many connections to the control API").to_bytes());
        return;
    };
    let control = Arc::clone(control);
    let stop = Arc::clone(stop);
    let limits = Limits {
        request: config.request_timeout,
        idle: config.idle_timeout,
    };
    let spawned = std::thread::Builder::new()
        .name("api-conn".into())
        .spawn(move || {
            let _slot = slot;
            let served = std::panic::catch_unwind(AssertUnwindSafe(|| {
                serve_connection(stream, control.as_ref(), limits, &stop)
            }));
            if let Err(payload) = served {
                control.report_failure(panic_reason("api-conn", payload.as_ref()));
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("control API: cannot start a connection thread: {e}");
    }
}

enum ReadError {
    Http(HttpError),
    /// The peer went away without sending anything, or the socket failed: nobody to answer.
    Gone,
}

impl From<HttpError> for ReadError {
    fn from(e: HttpError) -> Self {
        ReadError::Http(e)
    }
}

#[derive(Clone, Copy)]
struct Limits {
    request: Duration,
    idle: Duration,
}

/// Reads up to `max` more bytes into `buf` before `deadline`; returns how many (0 at EOF).
fn read_some(
    stream: &mut UnixStream,
    buf: &mut Vec<u8>,
    max: usize,
    deadline: Instant,
) -> Result<usize, ReadError> {
    let mut chunk = [0u8; READ_CHUNK];
    let want = max.min(READ_CHUNK);
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(HttpError::Timeout.into());
        }
        stream
            .set_read_timeout(Some(remaining))
            .map_err(|_| ReadError::Gone)?;
        match stream.read(chunk.get_mut(..want).unwrap_or_default()) {
            Ok(n) => {
                buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
                return Ok(n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(HttpError::Timeout.into())
            }
            Err(_) => return Err(ReadError::Gone),
        }
    }
}

/// One request read off a connection.
struct Incoming {
    request: Request,
    keep_alive: bool,
    /// Bytes past its body had arrived (pipelining), which an upgrade to a vsock stream must
    /// not swallow.
    extra: bool,
}

/// Reads one request. `buf` holds what the previous request left (pipelined bytes) and keeps
/// what arrives past this one's body for the next; it stays below the head limit plus one read.
fn read_request(
    stream: &mut UnixStream,
    buf: &mut Vec<u8>,
    deadline: Instant,
) -> Result<Incoming, ReadError> {
    let mut scanned: usize = 0;
    let (head_len, body_start) = loop {
        // The blank line may straddle two reads, hence the 3-byte look-back; scanning only new
        // bytes keeps a one-byte-at-a-time client from costing quadratic work.
        if let Some(found) = http::find_head_end(buf, scanned.saturating_sub(3)) {
            break found;
        }
        if buf.len() >= MAX_HEAD_BYTES {
            return Err(HttpError::HeadTooLarge.into());
        }
        scanned = buf.len();
        if read_some(stream, buf, READ_CHUNK, deadline)? == 0 {
            return Err(if buf.is_empty() {
                ReadError::Gone
            } else {
                HttpError::Truncated.into()
            });
        }
    };
    if body_start > MAX_HEAD_BYTES {
        return Err(HttpError::HeadTooLarge.into());
    }
    let head = http::parse_head(buf.get(..head_len).unwrap_or_default())?;
    let mut body = buf.split_off(body_start.min(buf.len()));
    buf.clear();
    let length = head.content_length.min(MAX_BODY_BYTES);
    if head.expects_continue && body.len() < length {
        let _ = stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
    }
    while body.len() < length {
        let missing = length.saturating_sub(body.len());
        if read_some(stream, &mut body, missing, deadline)? == 0 {
            return Err(HttpError::Truncated.into());
        }
    }
    *buf = body.split_off(length.min(body.len()));
    Ok(Incoming {
        request: Request {
            method: head.method,
            path: head.path,
            body,
        },
        keep_alive: head.keep_alive,
        extra: !buf.is_empty(),
    })
}

/// Waits until the client sends the next request (or hangs up: `true` too, the read sees it),
/// the connection idles out or the server stops (`false`).
fn next_request_arrives(stream: &UnixStream, stop: &EventFd, idle: Duration) -> bool {
    let deadline = Instant::now().checked_add(idle);
    loop {
        let mut fds = [
            libc::pollfd {
                fd: stream.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let wait = deadline.map_or(Duration::from_secs(86_400), |d| {
            d.saturating_duration_since(Instant::now())
        });
        let millis = libc::c_int::try_from(wait.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `fds` is a valid array of two pollfd that outlives the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, millis) };
        if rc < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        let [client, stop] = fds;
        if stop.revents != 0 {
            return false;
        }
        if client.revents != 0 {
            return true;
        }
        if rc == 0 && deadline.is_some_and(|d| Instant::now() >= d) {
            return false;
        }
    }
}

/// Answers one request, or `None` when nobody is left to answer (or the stream was handed to a
/// vsock connection).
fn answer(
    stream: UnixStream,
    control: &dyn VmControl,
    read: Result<Incoming, ReadError>,
) -> Option<(UnixStream, Response, bool)> {
    let incoming = match read {
        Ok(incoming) => incoming,
        Err(ReadError::Http(e)) => {
            tracing::debug!("control API: rejected request: {e}");
            // The rest of the request may still be on its way: what follows is not a request.
            return Some((stream, Response::error(e.status(), e.to_string()), false));
        }
        Err(ReadError::Gone) => return None,
    };
    let request = incoming.request;
    if router::is_vsock_connect(&request) {
        return match upgrade::vsock_connect(stream, control, &request, incoming.extra) {
            Ok(()) => None,
            Err((stream, response)) => Some((stream, response, false)),
        };
    }
    let response = std::panic::catch_unwind(AssertUnwindSafe(|| router::route(control, &request)))
        .unwrap_or_else(|payload| {
            // The handler may have left the VM half-updated: end it.
            let reason = format!(
                "{} (serving {} {})",
                panic_reason("api-conn", payload.as_ref()),
                request.method,
                request.path
            );
            control.report_failure(reason.clone());
            Response::error(500, format!("internal error: {reason}; the VM stops"))
        });
    tracing::debug!(
        "control API: {} {} -> {}",
        request.method,
        request.path,
        response.status
    );
    if let Some(m) = control.metrics() {
        m.api().requests_count.inc();
        if response.status >= 400 {
            m.api().requests_fails.inc();
        }
    }
    Some((stream, response, incoming.keep_alive))
}

fn serve_connection(
    mut stream: UnixStream,
    control: &dyn VmControl,
    limits: Limits,
    stop: &EventFd,
) {
    let _ = stream.set_write_timeout(Some(limits.request));
    let mut pending = Vec::with_capacity(1024);
    let mut first = true;
    loop {
        // The first request's clock starts at the connection (a client that connects and says
        // nothing gets its 408); later ones' at their first byte, after an idle wait.
        if !first && pending.is_empty() && !next_request_arrives(&stream, stop, limits.idle) {
            return;
        }
        first = false;
        let now = Instant::now();
        // A configured timeout too large to add means "effectively none"; a day is plenty.
        let deadline = now
            .checked_add(limits.request)
            .unwrap_or_else(|| now + Duration::from_secs(86_400));
        let read = read_request(&mut stream, &mut pending, deadline);
        let Some((back, response, keep_alive)) = answer(stream, control, read) else {
            return;
        };
        stream = back;
        if let Err(e) = stream.write_all(&response.render(keep_alive)) {
            tracing::debug!("control API: cannot send the answer: {e}");
            return;
        }
        if !keep_alive {
            let _ = stream.shutdown(Shutdown::Write);
            return;
        }
    }
}
