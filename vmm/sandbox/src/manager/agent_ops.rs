//! Commands and files in a running sandbox: each call delegates to the sandbox's connected
//! `AgentClient` (calls on one sandbox run concurrently; none holds a lock while it runs).

use agent_client::{
    AgentClient, ClientError, ExecCommand, ExecOutput, ExecSession, FileInfo, WriteOptions,
};

use super::SandboxManager;
use crate::error::{Result, SandboxError};
use crate::SandboxId;

impl SandboxManager {
    /// The sandbox's agent client, for calls this API does not wrap. It stops working when the
    /// sandbox hibernates or is killed.
    pub async fn agent(&self, id: &SandboxId) -> Result<AgentClient> {
        self.slot(id)?.agent("agent").await
    }

    pub(super) async fn call<T, F, Fut>(
        &self,
        id: &SandboxId,
        operation: &'static str,
        f: F,
    ) -> Result<T>
    where
        F: FnOnce(AgentClient) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, ClientError>>,
    {
        let agent = self.slot(id)?.agent(operation).await?;
        f(agent)
            .await
            .map_err(|source| SandboxError::agent(id, operation, source))
    }

    /// Runs a command to completion (stdout, stderr, exit status).
    pub async fn exec(&self, id: &SandboxId, command: &ExecCommand) -> Result<ExecOutput> {
        self.call(id, "exec", |a| async move { a.exec(command).await })
            .await
    }

    /// Starts a command with streamed output, stdin and signals.
    pub async fn exec_stream(&self, id: &SandboxId, command: &ExecCommand) -> Result<ExecSession> {
        self.call(id, "exec_stream", |a| async move {
            a.exec_stream(command).await
        })
        .await
    }

    pub async fn read_file(&self, id: &SandboxId, path: &str) -> Result<Vec<u8>> {
        self.call(id, "read_file", |a| async move { a.read_file(path).await })
            .await
    }

    /// Writes `data` to `path`; returns the bytes written.
    pub async fn write_file(
        &self,
        id: &SandboxId,
        path: &str,
        data: &[u8],
        options: WriteOptions,
    ) -> Result<u64> {
        self.call(id, "write_file", |a| async move {
            a.write_file(path, data, options).await
        })
        .await
    }

    pub async fn list_dir(&self, id: &SandboxId, path: &str) -> Result<Vec<FileInfo>> {
        self.call(id, "list_dir", |a| async move { a.list_dir(path).await })
            .await
    }

    pub async fn stat(&self, id: &SandboxId, path: &str) -> Result<FileInfo> {
        self.call(id, "stat", |a| async move { a.stat(path).await })
            .await
    }

    /// `parents` behaves like `mkdir -p`.
    pub async fn mkdir(&self, id: &SandboxId, path: &str, parents: bool) -> Result<()> {
        self.call(id, "mkdir", |a| async move { a.mkdir(path, parents).await })
            .await
    }

    pub async fn remove(&self, id: &SandboxId, path: &str, recursive: bool) -> Result<()> {
        self.call(
            id,
            "remove",
            |a| async move { a.remove(path, recursive).await },
        )
        .await
    }

    pub async fn exists(&self, id: &SandboxId, path: &str) -> Result<bool> {
        self.call(id, "exists", |a| async move { a.exists(path).await })
            .await
    }

    pub async fn rename(&self, id: &SandboxId, from: &str, to: &str) -> Result<()> {
        self.call(id, "rename", |a| async move { a.rename(from, to).await })
            .await
    }
}
