//! Small task helpers: blocking work on tokio's blocking pool, lifecycle steps as their own
//! tasks, agent calls with a deadline.

use std::future::Future;
use std::time::Duration;

use super::error::{Result, SandboxError};
use super::SandboxId;

/// Runs `f` on tokio's blocking pool.
pub async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| SandboxError::TaskLost(what))
}

/// Runs `fut` as its own task, so a caller that stops waiting (a dropped future, a timeout)
/// cannot leave a sandbox half-hibernated: the step completes either way.
pub async fn detached<T: Send + 'static>(
    what: &'static str,
    fut: impl Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    tokio::spawn(fut)
        .await
        .map_err(|_| SandboxError::TaskLost(what))?
}

pub async fn agent_call<T>(
    id: &SandboxId,
    operation: &'static str,
    timeout: Duration,
    call: impl Future<Output = std::result::Result<T, agent_client::ClientError>>,
) -> Result<T> {
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result.map_err(|source| SandboxError::agent(id, operation, source)),
        Err(_) => Err(SandboxError::AgentTimeout {
            id: id.clone(),
            operation,
            timeout,
        }),
    }
}
