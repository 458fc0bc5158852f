//! Detached exec sessions in a running sandbox: started by one caller, listed, attached to,
//! killed and waited on by others (e.g. the HTTP handlers of a worker). The sessions live in
//! the guest agent, so they survive hibernate/wake with the guest's memory; an attachment
//! broken by a hibernate is simply attached again after the wake.

use agent_client::{
    ExecAttachment, ExecCommand, ExecSessionId, ExecSessionInfo, ExecSessionState, ExecStarted,
};

use super::SandboxManager;
use crate::error::Result;
use crate::SandboxId;

impl SandboxManager {
    /// Starts `command` as a detached session and returns its id (and pid). Stdin given on the
    /// command is written, then closed unless `keep_stdin_open`.
    pub async fn exec_start(
        &self,
        id: &SandboxId,
        command: &ExecCommand,
        keep_stdin_open: bool,
    ) -> Result<ExecStarted> {
        self.call(id, "exec_start", |a| async move {
            a.exec_start(command, keep_stdin_open).await
        })
        .await
    }

    /// The sandbox's sessions, running and recently exited, oldest first.
    pub async fn exec_list(&self, id: &SandboxId) -> Result<Vec<ExecSessionInfo>> {
        self.call(id, "exec_list", |a| async move { a.exec_list().await })
            .await
    }

    /// Attaches to a session: buffered output, then live output and the exit. Dropping the
    /// attachment does not kill the session.
    pub async fn exec_attach(
        &self,
        id: &SandboxId,
        session: &ExecSessionId,
    ) -> Result<ExecAttachment> {
        self.call(id, "exec_attach", |a| async move {
            a.exec_attach(session).await
        })
        .await
    }

    /// Signals the session's process group (0 probes: succeeds while it runs).
    pub async fn exec_kill(
        &self,
        id: &SandboxId,
        session: &ExecSessionId,
        signal: i32,
    ) -> Result<()> {
        self.call(id, "exec_kill", |a| async move {
            a.exec_kill(session, signal).await
        })
        .await
    }

    /// Waits for the session's exit (or reads it after the fact, within the retention).
    pub async fn exec_wait(
        &self,
        id: &SandboxId,
        session: &ExecSessionId,
    ) -> Result<ExecSessionState> {
        self.call(
            id,
            "exec_wait",
            |a| async move { a.exec_wait(session).await },
        )
        .await
    }
}
