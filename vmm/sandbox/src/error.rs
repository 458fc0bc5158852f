//! Everything a sandbox operation can fail with, naming the sandbox and the step.

use std::path::PathBuf;
use std::time::Duration;

use agent_client::ClientError;

use super::SandboxId;
use vmm::vm::SnapshotVmError;
use vmm::vm::{ControlError, VmError};

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
    /// A snapshot store (a template URL): unreachable, missing snapshot, damaged chunk, ….
    #[error("snapshot store: {0}")]
    Store(#[from] snapshot_store::StoreError),
    #[error("sandbox {id}: the guest agent did not answer within {timeout:?} (last error: {last_error})")]
    AgentNotReady {
        id: SandboxId,
        timeout: Duration,
        last_error: String,
    },
    /// `sandbox sb-1: agent exec: not found: working directory `/x` does not exist`.
    #[error("sandbox {id}: agent {operation}: {}", agent_detail(source))]
    Agent {
        id: SandboxId,
        operation: &'static str,
        #[source]
        source: ClientError,
    },
    /// The agent's reply crossed a host-side limit (`SandboxConfig::agent_client`); the call's
    /// stream was dropped. The sandbox stays usable.
    #[error("sandbox {id}: agent {operation}: the {what} reply exceeds the host's limit of {limit} (got at least {at_least})")]
    ResponseTooLarge {
        id: SandboxId,
        operation: &'static str,
        what: &'static str,
        limit: u64,
        at_least: u64,
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
    /// The manager's isolation cannot be set up (no `dormouse` binary, a jail without root).
    #[error("sandbox isolation: {0}")]
    Isolation(String),
    #[error("sandbox {id}: starting its dormouse process {}: {source}", binary.display())]
    ProcessSpawn {
        id: SandboxId,
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The sandbox's `dormouse` process ended during the step (Process isolation); `reason`
    /// gives its exit status or signal and its last telling stderr line.
    #[error("sandbox {id}: its dormouse process ended: {reason}")]
    ProcessExited { id: SandboxId, reason: String },
    /// The sandbox process's control API failed a request (Process isolation).
    #[error("sandbox {id}: {operation} over the sandbox process's API: {source}")]
    ProcessControl {
        id: SandboxId,
        operation: &'static str,
        #[source]
        source: vmm_api::client::ClientError,
    },
    /// The operation needs the VM inside this process (`Isolation::InProcess`), e.g.
    /// `vm_controller`.
    #[error("sandbox {id}: {operation} needs Isolation::InProcess (the sandbox runs in its own process)")]
    NotInProcess {
        id: SandboxId,
        operation: &'static str,
    },
    /// A blocking task panicked or the runtime is shutting down.
    #[error("{0}: the task did not complete")]
    TaskLost(&'static str),

    #[error("sandbox {id}: pushing its checkpoint failed ({reason}); it stays hibernated in {}", kept.display())]
    StorePush {
        id: SandboxId,
        kept: PathBuf,
        reason: String,
    },
}

impl SandboxError {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            what,
            path: path.into(),
            source,
        }
    }

    /// An agent call's failure: size and time limits get their own variants.
    pub(crate) fn agent(id: &SandboxId, operation: &'static str, source: ClientError) -> Self {
        match source {
            ClientError::ResponseTooLarge {
                what,
                limit,
                at_least,
            } => Self::ResponseTooLarge {
                id: id.clone(),
                operation,
                what,
                limit,
                at_least,
            },
            ClientError::Timeout { timeout, .. } => Self::AgentTimeout {
                id: id.clone(),
                operation,
                timeout,
            },
            source => Self::Agent {
                id: id.clone(),
                operation,
                source,
            },
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

/// The agent's answer as `<code name>: <its message>` (the client's own wording otherwise).
fn agent_detail(source: &ClientError) -> String {
    match source {
        ClientError::Status(status) => format!(
            "{}: {}",
            agent_client::code_name(status.code()),
            status.message()
        ),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_limits_get_their_own_variants() {
        let id = SandboxId::new("sb-1");
        let too_large = ClientError::ResponseTooLarge {
            what: "exec stdout",
            limit: 10,
            at_least: 11,
        };
        let error = SandboxError::agent(&id, "exec", too_large);
        assert!(
            matches!(
                &error,
                SandboxError::ResponseTooLarge {
                    operation: "exec",
                    what: "exec stdout",
                    limit: 10,
                    at_least: 11,
                    ..
                }
            ),
            "{error}"
        );
        assert!(error.to_string().contains("sb-1"), "{error}");

        let timeout = ClientError::Timeout {
            operation: "stat",
            timeout: Duration::from_secs(3),
        };
        assert!(matches!(
            SandboxError::agent(&id, "stat", timeout),
            SandboxError::AgentTimeout {
                operation: "stat",
                timeout,
                ..
            } if timeout == Duration::from_secs(3)
        ));

        let status = ClientError::from(tonic::Status::not_found("gone"));
        let error = SandboxError::agent(&id, "read_file", status);
        assert_eq!(error.agent_code(), Some(tonic::Code::NotFound));
        assert_eq!(
            error.to_string(),
            "sandbox sb-1: agent read_file: not found: gone"
        );
    }
}
