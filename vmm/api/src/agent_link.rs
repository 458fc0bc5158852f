//! The guest agent's gRPC client over a VM's control-API socket, for processes other than the
//! VMM (`dormouse exec`, `dormouse cp`): wait for the agent's readiness (`PUT /v1/agent/wait`),
//! then open each gRPC connection with `PUT /v1/vsock/connect`. Works whatever the vsock backend
//! (the VM uses its in-process handle) and needs only the one socket.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use agent_client::{AgentClient, AGENT_VSOCK_PORT};

use super::client::{ApiClient, ClientError};
use super::types::AgentInfo;

#[derive(Debug, thiserror::Error)]
pub enum AgentLinkError {
    #[error("{0}")]
    Api(#[from] ClientError),
    #[error("the VM on {} has no vsock device, so it has no agent channel: {message}", sock.display())]
    NoVsock { sock: PathBuf, message: String },
    #[error("the guest agent did not announce itself within {}s (is the guest running the agent?)", .0.as_secs_f64())]
    NotReady(Duration),
    #[error("connecting to the guest agent: {0}")]
    Agent(#[from] agent_client::ClientError),
    #[error("the blocking task was lost")]
    TaskLost,
}

/// A vsock stream to guest `port` through the API socket at `sock`, as a tokio stream.
pub async fn vsock_stream(sock: Arc<PathBuf>, port: u32) -> io::Result<tokio::net::UnixStream> {
    let stream =
        tokio::task::spawn_blocking(move || ApiClient::new(sock.as_path()).connect_vsock(port))
            .await
            .map_err(io::Error::other)?
            .map_err(|e| match &e {
                ClientError::Api { status: 503, .. } => {
                    io::Error::new(io::ErrorKind::ConnectionRefused, e)
                }
                ClientError::Api { status: 504, .. } => io::Error::new(io::ErrorKind::TimedOut, e),
                _ => io::Error::other(e),
            })?;
    stream.set_nonblocking(true)?;
    tokio::net::UnixStream::from_std(stream)
}

/// Waits for the agent's readiness (up to `ready_timeout`), then connects its client.
pub async fn connect_agent(
    sock: &Path,
    ready_timeout: Duration,
) -> Result<(AgentClient, AgentInfo), AgentLinkError> {
    let path = sock.to_path_buf();
    let info = tokio::task::spawn_blocking(move || ApiClient::new(path).wait_agent(ready_timeout))
        .await
        .map_err(|_| AgentLinkError::TaskLost)?
        .map_err(|e| match e {
            ClientError::Api {
                status: 409,
                message,
            } => AgentLinkError::NoVsock {
                sock: sock.to_path_buf(),
                message,
            },
            ClientError::Api { status: 504, .. } => AgentLinkError::NotReady(ready_timeout),
            other => AgentLinkError::Api(other),
        })?;
    let sock = Arc::new(sock.to_path_buf());
    let client = AgentClient::connect_with(AGENT_VSOCK_PORT, move |port| {
        vsock_stream(Arc::clone(&sock), port)
    })
    .await?;
    Ok((client, info))
}
