//! Where the agent listens (`vsock:PORT`, `unix:PATH`, `tcp:ADDR`) and the
//! serve loop.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use agent_proto::limits::{
    HTTP2_CONNECTION_WINDOW_BYTES, HTTP2_MAX_FRAME_BYTES, HTTP2_STREAM_WINDOW_BYTES,
};
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_vsock::{VsockAddr, VsockListener, VMADDR_CID_ANY};
use tonic::transport::Server;

use crate::server::AgentService;

/// The agent's well-known vsock port.
pub use agent_proto::AGENT_VSOCK_PORT;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// AF_VSOCK on VMADDR_CID_ANY.
    Vsock(u32),
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl Default for ListenAddr {
    fn default() -> Self {
        Self::Vsock(AGENT_VSOCK_PORT)
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Vsock(port) => write!(f, "vsock:{port}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
            Self::Tcp(addr) => write!(f, "tcp:{addr}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid listen address `{0}` (expected vsock:PORT, unix:PATH or tcp:ADDR)")]
pub struct ParseListenAddrError(String);

impl FromStr for ListenAddr {
    type Err = ParseListenAddrError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = || ParseListenAddrError(text.to_owned());
        let (scheme, rest) = text.split_once(':').ok_or_else(error)?;
        match scheme {
            "vsock" => rest.parse().map(Self::Vsock).map_err(|_| error()),
            "unix" if !rest.is_empty() => Ok(Self::Unix(PathBuf::from(rest))),
            "tcp" => rest.parse().map(Self::Tcp).map_err(|_| error()),
            _ => Err(error()),
        }
    }
}

/// A bound listening socket.
pub enum Listener {
    Vsock(VsockListener),
    Unix(UnixListener),
    Tcp(TcpListener),
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: ListenAddr, source: io::Error },
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

impl Listener {
    /// Binds `addr`. A stale Unix socket file at the path is replaced.
    pub async fn bind(addr: &ListenAddr) -> Result<Self, ServeError> {
        let bind_error = |source| ServeError::Bind {
            addr: addr.clone(),
            source,
        };
        match addr {
            ListenAddr::Vsock(port) => {
                let listener = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, *port))
                    .map_err(bind_error)?;
                if let Err(err) = set_vsock_buffer(&listener, VSOCK_BUFFER_BYTES) {
                    tracing::warn!(%err, "cannot enlarge the vsock receive buffer");
                }
                Ok(Self::Vsock(listener))
            }
            ListenAddr::Unix(path) => {
                if let Ok(metadata) = std::fs::symlink_metadata(path) {
                    if metadata.file_type().is_socket() {
                        std::fs::remove_file(path).map_err(bind_error)?;
                    }
                }
                UnixListener::bind(path).map(Self::Unix).map_err(bind_error)
            }
            ListenAddr::Tcp(addr) => TcpListener::bind(addr)
                .await
                .map(Self::Tcp)
                .map_err(bind_error),
        }
    }
}

/// The receive buffer of every accepted vsock connection (the listener's is inherited): the
/// credit the host may use before the guest must send a credit update. The kernel's 256 KiB made
/// the host stop and wait for credit a few times per MiB; this is also the most the host can make
/// the guest kernel hold per connection.
pub const VSOCK_BUFFER_BYTES: u64 = 2 * 1024 * 1024;

// linux/vm_sockets.h (not in the libc crate).
const SO_VM_SOCKETS_BUFFER_SIZE: libc::c_int = 0;
const SO_VM_SOCKETS_BUFFER_MAX_SIZE: libc::c_int = 2;

fn set_vsock_buffer(listener: &VsockListener, bytes: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = listener.as_raw_fd();
    // The maximum first: the size is clamped to it.
    for option in [SO_VM_SOCKETS_BUFFER_MAX_SIZE, SO_VM_SOCKETS_BUFFER_SIZE] {
        // SAFETY: fd is the listener's open socket; the value is a u64 of the size passed, as
        // these options expect.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::AF_VSOCK,
                option,
                (&bytes as *const u64).cast(),
                std::mem::size_of::<u64>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

impl Listener {
    /// The bound TCP address (useful after binding port 0).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        match self {
            Self::Tcp(listener) => listener.local_addr().ok(),
            Self::Vsock(_) | Self::Unix(_) => None,
        }
    }
}

/// Connections still open this long after a stop request are dropped.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Serves `service` on `listener` until `Shutdown` is handled (or
/// [`AgentService::request_stop`] is called); open calls get
/// [`STOP_GRACE`] to finish.
pub async fn serve(listener: Listener, service: AgentService) -> Result<(), ServeError> {
    let stopped = {
        let service = service.clone();
        async move { service.stopped().await }
    };
    let deadline = {
        let service = service.clone();
        async move {
            service.stopped().await;
            tokio::time::sleep(STOP_GRACE).await;
        }
    };
    let router = Server::builder()
        .max_frame_size(HTTP2_MAX_FRAME_BYTES)
        .initial_stream_window_size(HTTP2_STREAM_WINDOW_BYTES)
        .initial_connection_window_size(HTTP2_CONNECTION_WINDOW_BYTES)
        .add_service(service.into_grpc());
    let serving = async move {
        match listener {
            Listener::Vsock(listener) => {
                router
                    .serve_with_incoming_shutdown(listener.incoming(), stopped)
                    .await
            }
            Listener::Unix(listener) => {
                router
                    .serve_with_incoming_shutdown(UnixListenerStream::new(listener), stopped)
                    .await
            }
            Listener::Tcp(listener) => {
                router
                    .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stopped)
                    .await
            }
        }
    };
    tokio::select! {
        result = serving => result?,
        () = deadline => tracing::warn!("connections still open after the stop grace period; dropping them"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_listen_addresses() {
        assert_eq!(
            "vsock:1024".parse::<ListenAddr>().unwrap(),
            ListenAddr::Vsock(1024)
        );
        assert_eq!(
            "unix:/tmp/a.sock".parse::<ListenAddr>().unwrap(),
            ListenAddr::Unix("/tmp/a.sock".into())
        );
        assert_eq!(
            "tcp:127.0.0.1:5000".parse::<ListenAddr>().unwrap(),
            ListenAddr::Tcp("127.0.0.1:5000".parse().unwrap())
        );
        for bad in ["", "vsock", "vsock:x", "unix:", "tcp:nope", "udp:1"] {
            assert!(bad.parse::<ListenAddr>().is_err(), "{bad}");
        }
    }
}
