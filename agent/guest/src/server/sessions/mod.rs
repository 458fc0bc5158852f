//! Detached exec sessions (`ExecStart`, `ExecList`, `ExecAttach`, `ExecKill`, `ExecWait`):
//! processes that belong to the agent rather than to a call. They live in the agent's memory,
//! so they survive a snapshot (hibernate/wake) with the guest.

mod attach;
mod registry;
mod ring;
mod session;

use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use tokio::io::AsyncWriteExt;
use tonic::{Status, Streaming};

use super::driver::{drive, DrivenProcess, ProcessTable};
use super::process::spawn;
use super::status::{check_size, invalid, io_status};
use crate::proto::{
    exec_attach_request::Msg, ExecAttachRequest, ExecKillRequest, ExecListResponse,
    ExecStartRequest, ExecStartResponse, ExitStatus, ProcessSpec, SessionInfo,
};
use agent_proto::limits::{
    MAX_PAYLOAD_BYTES, MAX_SESSIONS, SESSION_COMMAND_BYTES, SESSION_OUTPUT_BYTES, SESSION_RETENTION,
};
pub use attach::AttachStream;
use registry::Registry;
use session::Session;

/// The agent's sessions; cheap to clone.
#[derive(Clone)]
pub struct Sessions {
    registry: Registry<Session>,
    ring_bytes: usize,
}

impl Default for Sessions {
    fn default() -> Self {
        Self {
            registry: Registry::new(MAX_SESSIONS, SESSION_RETENTION),
            ring_bytes: SESSION_OUTPUT_BYTES,
        }
    }
}

impl Sessions {
    pub async fn start(
        &self,
        request: ExecStartRequest,
        table: &ProcessTable,
    ) -> Result<ExecStartResponse, Status> {
        check_size("stdin", request.stdin.len(), MAX_PAYLOAD_BYTES)?;
        let spec = request
            .process
            .ok_or_else(|| invalid("`process` is required"))?;
        // Refuse before forking when the table is already full of running sessions.
        self.registry.check_room(Instant::now())?;
        let spawned = spawn(&spec).await?;
        let timeout = (spec.timeout_ms > 0).then(|| Duration::from_millis(spec.timeout_ms));
        let DrivenProcess {
            control,
            stdin,
            events,
        } = drive(spawned, timeout, table);
        let pid = control.pid();
        let session = Arc::new(Session::new(
            self.registry.new_id(),
            describe(&spec),
            control.clone(),
            stdin,
            self.ring_bytes,
        ));
        // Initial stdin goes first: take the lock before any attacher can.
        if let Ok(mut pipe) = Arc::clone(&session.stdin).try_lock_owned() {
            let input = request.stdin;
            let keep_open = request.keep_stdin_open;
            let mut exited = control.clone();
            tokio::spawn(async move {
                if let Some(writer) = pipe.as_mut() {
                    // EPIPE just means the process did not read everything; a process that
                    // never reads must not keep the lock past its exit.
                    let written = tokio::select! {
                        result = writer.write_all(&input), if !input.is_empty() => result.is_ok(),
                        () = exited.exited() => false,
                        () = std::future::ready(()), if input.is_empty() => true,
                    };
                    if !written {
                        *pipe = None;
                    }
                }
                if !keep_open {
                    *pipe = None;
                }
            });
        }
        tokio::spawn(Arc::clone(&session).collect(events));
        if let Err(status) = self.registry.insert(Arc::clone(&session), Instant::now()) {
            // Another start took the last slot meanwhile.
            let _ = control.signal(libc::SIGKILL);
            return Err(status);
        }
        tracing::debug!(session = %session.id, pid, "session started");
        Ok(ExecStartResponse {
            session_id: session.id.clone(),
            pid,
        })
    }

    pub fn list(&self) -> ExecListResponse {
        let sessions = self
            .registry
            .list(Instant::now())
            .iter()
            .map(|session| SessionInfo {
                session_id: session.id.clone(),
                command: session.command.clone(),
                pid: session.control.pid(),
                started_unix_nanos: session
                    .started
                    .duration_since(UNIX_EPOCH)
                    .ok()
                    .and_then(|since| i64::try_from(since.as_nanos()).ok())
                    .unwrap_or(0),
                exit: session.exit_status(),
            })
            .collect();
        ExecListResponse { sessions }
    }

    /// Reads the first request (the session id) and attaches.
    pub async fn attach(
        &self,
        mut requests: Streaming<ExecAttachRequest>,
    ) -> Result<AttachStream, Status> {
        let first = requests
            .message()
            .await?
            .ok_or_else(|| invalid("empty request stream"))?;
        let Some(Msg::SessionId(id)) = first.msg else {
            return Err(invalid("the first message must be `session_id`"));
        };
        let session = self.registry.get(&id, Instant::now())?;
        Ok(attach::attach(session, requests))
    }

    /// Signals the session's process group; signal 0 only checks that it still runs.
    pub fn kill(&self, request: &ExecKillRequest) -> Result<(), Status> {
        let session = self.registry.get(&request.session_id, Instant::now())?;
        if session.exit_status().is_some() {
            return Err(Status::failed_precondition(format!(
                "exec session {} has exited",
                session.id
            )));
        }
        session
            .control
            .signal(request.signal)
            .map_err(|err| io_status(format!("cannot signal session {}", session.id), &err))
    }

    pub async fn wait(&self, id: &str) -> Result<ExitStatus, Status> {
        let session = self.registry.get(id, Instant::now())?;
        Ok(session.wait().await)
    }
}

/// The listing's command text: the shell line, or the program and its arguments, cut to
/// [`SESSION_COMMAND_BYTES`] on a character boundary.
fn describe(spec: &ProcessSpec) -> String {
    let full = if spec.shell.is_empty() {
        std::iter::once(spec.command.as_str())
            .chain(spec.args.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" ")
    } else {
        spec.shell.clone()
    };
    let mut end = full.len().min(SESSION_COMMAND_BYTES);
    while !full.is_char_boundary(end) {
        end -= 1;
    }
    full.get(..end).unwrap_or_default().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_commands_are_bounded() {
        let spec = ProcessSpec {
            command: "echo".into(),
            args: vec!["a".into(), "b c".into()],
            ..ProcessSpec::default()
        };
        assert_eq!(describe(&spec), "echo a b c");
        let long = ProcessSpec {
            shell: "é".repeat(SESSION_COMMAND_BYTES),
            ..ProcessSpec::default()
        };
        let cut = describe(&long);
        assert_eq!(cut.len(), SESSION_COMMAND_BYTES);
        assert!(cut.chars().all(|c| c == 'é'));
    }
}
