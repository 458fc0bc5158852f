//! Host-side endpoints of the userspace datapath. A backend turns host-initiated connection
//! attempts into `HostConnection`s and serves guest-initiated connections to host ports. Every
//! backend hands the muxer a non-blocking `UnixStream`; the muxer does the rest.

pub mod inproc;
pub mod uds;

use std::io;
use std::os::unix::io::RawFd;
use std::os::unix::net::UnixStream;
use std::time::Instant;

pub use inproc::{InProcessBackend, VsockHandle, VsockListener};
pub use uds::UdsBackend;

/// How the host side learns the outcome of a host-initiated connection.
pub enum ConnectAck {
    /// Firecracker's hybrid protocol: write `OK <local_port>\n` to the stream once the guest
    /// accepted; a refused connection is simply closed.
    WriteOk,
    /// In-process callers wait on a callback: `Ok(local_port)` or the reason it failed.
    Notify(Box<dyn FnOnce(io::Result<u32>) + Send>),
}

impl std::fmt::Debug for ConnectAck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectAck::WriteOk => f.write_str("WriteOk"),
            ConnectAck::Notify(_) => f.write_str("Notify"),
        }
    }
}

/// A host-initiated connection to the guest's `guest_port`, ready to be offered to the guest.
#[derive(Debug)]
pub struct HostConnection {
    pub stream: UnixStream,
    pub guest_port: u32,
    pub ack: ConnectAck,
}

impl HostConnection {
    /// The connection will not happen (no room, device reset): tell whoever waits.
    pub fn refuse(self, why: io::ErrorKind) {
        if let ConnectAck::Notify(f) = self.ack {
            f(Err(io::Error::new(why, "vsock connection refused")));
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendConnectError {
    /// Nothing listens on that port here; the muxer tries the next backend, then sends RST.
    #[error("no host listener on port {0}")]
    NotListening(u32),
    #[error("connecting to host port {port}: {source}")]
    Io { port: u32, source: io::Error },
}

pub trait VsockBackend: Send {
    fn name(&self) -> &'static str;

    /// A level-triggered fd that is readable while `poll_host_connections` has work to do.
    fn as_raw_fd(&self) -> RawFd;

    /// Completes whatever host-initiated connection attempts are ready; never blocks.
    fn poll_host_connections(&mut self, now: Instant) -> Vec<HostConnection>;

    /// The guest connects to host `port`. Returns a non-blocking stream.
    fn connect_to_host(
        &mut self,
        port: u32,
        guest_port: u32,
    ) -> Result<UnixStream, BackendConnectError>;

    /// When `poll_host_connections` should run again even without fd activity (timeouts).
    fn next_deadline(&self) -> Option<Instant> {
        None
    }
}
