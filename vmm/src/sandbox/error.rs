//! Everything a sandbox operation can fail with, naming the sandbox and the step.

use std::path::PathBuf;
use std::time::Duration;

use agent::client::ClientError;

use super::SandboxId;
use crate::vm::{ControlError, VmError};
use crate::vm_snapshot::SnapshotVmError;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("no sandbox with id {0}")]
    UnknownSandbox(SandboxId),
    #[error("sandbox {id} is {state}: {operation} needs it {needs}")]
    WrongState {
        id: SandboxId,
        state: &'static str,
        operation: &'static str,
        needs: &'static str,
    },
    #[error("invalid sandbox config: {0}")]
    InvalidConfig(String),
    #[error("sandbox {id}: the guest agent did not answer within {timeout:?} (last error: {last_error})")]
    AgentNotReady {
        id: SandboxId,
        timeout: Duration,
        last_error: String,
    },
    #[error("sandbox {id}: agent {operation}: {source}")]
    Agent {
        id: SandboxId,
        operation: &'static str,
        #[source]
        source: ClientError,
    },
    #[error("sandbox {id}: agent {operation} did not answer within {timeout:?}")]
    AgentTimeout {
        id: SandboxId,
        operation: &'static str,
        timeout: Duration,
    },
    #[error("sandbox {id}: starting the VM: {source}")]
    VmStart {
        id: SandboxId,
        #[source]
        source: Box<VmError>,
    },
    #[error("sandbox {id}: {operation}: {source}")]
    VmControl {
        id: SandboxId,
        operation: &'static str,
        #[source]
        source: ControlError,
    },
    #[error("sandbox {id}: snapshot to {}: {source}", dir.display())]
    Snapshot {
        id: SandboxId,
        dir: PathBuf,
        #[source]
        source: Box<SnapshotVmError>,
    },
    #[error("sandbox {id}: the VM has no in-process vsock (the template lacks vsock, or it runs on vhost-vsock)")]
    NoVsock { id: SandboxId },
    #[error("checkpoint {}: {message}", dir.display())]
    BadCheckpoint { dir: PathBuf, message: String },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("copying disk {} to {}: {source}", from.display(), to.display())]
    DiskCopy {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A blocking task panicked or the runtime is shutting down.
    #[error("{0}: the task did not complete")]
    TaskLost(&'static str),
}

impl SandboxError {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            what,
            path: path.into(),
            source,
        }
    }

    /// The agent's gRPC status code, when the agent answered with an error (e.g. `NotFound`
    /// for a missing file).
    pub fn agent_code(&self) -> Option<tonic::Code> {
        match self {
            Self::Agent { source, .. } => source.code(),
            _ => None,
        }
    }
}

pub type Result<T, E = SandboxError> = std::result::Result<T, E>;
