//! Detached exec sessions: processes that outlive the call (and the host value) that started
//! them. The agent keeps each one's output ([`SESSION_OUTPUT_BYTES`] per stream, oldest bytes
//! dropped first) and, after the exit, its status for [`SESSION_RETENTION`]; at most
//! [`MAX_SESSIONS`] at once (oldest exited ones make room first).
//!
//! Everything here is bounded on the host: list replies and attach events by
//! `ReplyLimits::max_message_bytes`, ids checked for their form, offsets checked for order.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use super::command::{ExecCommand, ExecOutput, ExitOutcome};
use super::limits::{OutputCollector, ReplyLimits, Stream};
use super::{AgentClient, ClientError, Result};
use crate::proto::{
    exec_attach_request::Msg, exec_attach_response::Event, CloseStdin, ExecAttachRequest,
    ExecAttachResponse, ExecKillRequest, ExecListRequest, ExecStartRequest, ExecWaitRequest,
    OutputChunk, SessionInfo,
};
pub use agent_proto::limits::{MAX_SESSIONS, SESSION_OUTPUT_BYTES, SESSION_RETENTION};

/// A detached session's id: 32 lowercase hex characters, checked on parsing.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExecSessionId(String);

impl ExecSessionId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ExecSessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The id is not of the session-id form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an exec session id (32 lowercase hex characters)")]
pub struct InvalidSessionId;

impl FromStr for ExecSessionId {
    type Err = InvalidSessionId;

    fn from_str(id: &str) -> std::result::Result<Self, InvalidSessionId> {
        if agent_proto::limits::is_session_id(id) {
            Ok(Self(id.to_owned()))
        } else {
            Err(InvalidSessionId)
        }
    }
}

fn session_id(id: String) -> Result<ExecSessionId> {
    id.parse()
        .map_err(|_| ClientError::Protocol("malformed session id from the agent".into()))
}

/// Whether a session's process still runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecSessionState {
    Running,
    Exited {
        status: ExitOutcome,
        /// Killed by the agent because the command's timeout elapsed.
        timed_out: bool,
    },
}

/// One entry of [`AgentClient::exec_list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecSessionInfo {
    pub id: ExecSessionId,
    /// The program and its arguments, or the shell line (at most 256 bytes).
    pub command: String,
    pub pid: u32,
    /// The guest's wall clock at the start.
    pub started: SystemTime,
    pub state: ExecSessionState,
}

impl ExecSessionInfo {
    fn from_proto(info: SessionInfo) -> Result<Self> {
        let state = match info.exit {
            None => ExecSessionState::Running,
            Some(exit) => {
                let (status, timed_out) = ExitOutcome::from_status(Some(&exit))?;
                ExecSessionState::Exited { status, timed_out }
            }
        };
        let nanos = u64::try_from(info.started_unix_nanos).unwrap_or(0);
        Ok(Self {
            id: session_id(info.session_id)?,
            command: info.command,
            pid: info.pid,
            started: UNIX_EPOCH + Duration::from_nanos(nanos),
            state,
        })
    }
}

/// Which output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// One event of an attached session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The agent's ring dropped `bytes` of `stream` before the next chunk (the session wrote
    /// more than the ring holds while this attacher was absent or behind).
    Dropped {
        stream: OutputStream,
        bytes: u64,
    },
    /// The last event.
    Exit {
        status: ExitOutcome,
        timed_out: bool,
    },
}

/// Sends stdin and signals to an attached session; cloneable.
#[derive(Debug, Clone)]
pub struct AttachInput {
    sender: mpsc::Sender<ExecAttachRequest>,
}

impl AttachInput {
    async fn send(&self, msg: Msg) -> Result<()> {
        self.sender
            .send(ExecAttachRequest { msg: Some(msg) })
            .await
            .map_err(|_| ClientError::SessionClosed)
    }

    /// Writes to the session's stdin (if it was started with stdin kept open).
    pub async fn write_stdin(&self, data: impl Into<Vec<u8>>) -> Result<()> {
        self.send(Msg::Stdin(data.into())).await
    }

    pub async fn close_stdin(&self) -> Result<()> {
        self.send(Msg::CloseStdin(CloseStdin {})).await
    }

    /// Delivers `signal` to the process group; 0 delivers nothing (kill(2)'s probe; this
    /// stream carries no answer: probe with [`AgentClient::exec_kill`]).
    pub async fn signal(&self, signal: i32) -> Result<()> {
        self.send(Msg::Signal(signal)).await
    }

    /// SIGKILL to the process group.
    pub async fn kill(&self) -> Result<()> {
        self.signal(SIGKILL).await
    }
}

/// SIGKILL's number in the (Linux) guest.
pub(crate) const SIGKILL: i32 = 9;

/// Next expected offset per stream: finds the gaps the agent's ring left and refuses overlaps.
#[derive(Debug, Default)]
struct Offsets([u64; 2]);

impl Offsets {
    /// Accepts `len` bytes of `stream` at `offset`; returns the bytes dropped before them.
    fn accept(&mut self, stream: OutputStream, offset: u64, len: usize) -> Result<u64> {
        let slot = match stream {
            OutputStream::Stdout => 0,
            OutputStream::Stderr => 1,
        };
        let expected = self.0[slot];
        if offset < expected {
            return Err(ClientError::Protocol(format!(
                "output at offset {offset} repeats bytes before {expected}"
            )));
        }
        self.0[slot] = offset.saturating_add(len as u64);
        Ok(offset - expected)
    }
}

/// A connection to a detached session: its buffered output first, then live output, then the
/// exit. Dropping it detaches; the process keeps running (input still queued in the call may
/// be lost with it: wait for the process's answer, or its exit, before dropping).
#[derive(Debug)]
pub struct ExecAttachment {
    id: ExecSessionId,
    pid: u32,
    input: AttachInput,
    output: Streaming<ExecAttachResponse>,
    limits: ReplyLimits,
    offsets: Offsets,
    /// Data that follows a reported gap.
    pending: Option<AttachEvent>,
    finished: bool,
}

impl ExecAttachment {
    pub fn id(&self) -> &ExecSessionId {
        &self.id
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn input(&self) -> AttachInput {
        self.input.clone()
    }

    pub async fn write_stdin(&self, data: impl Into<Vec<u8>>) -> Result<()> {
        self.input.write_stdin(data).await
    }

    pub async fn close_stdin(&self) -> Result<()> {
        self.input.close_stdin().await
    }

    /// See [`AttachInput::signal`].
    pub async fn signal(&self, signal: i32) -> Result<()> {
        self.input.signal(signal).await
    }

    /// SIGKILL to the process group.
    pub async fn kill(&self) -> Result<()> {
        self.input.kill().await
    }

    async fn message(&mut self) -> Result<Option<ExecAttachResponse>> {
        let limit = self.limits.max_message_bytes;
        self.output
            .message()
            .await
            .map_err(|status| ClientError::reply(status, "exec_attach event", limit))
    }

    /// Reads the `attached` message that opens every attach call.
    async fn expect_attached(&mut self) -> Result<()> {
        match self.message().await?.and_then(|response| response.event) {
            Some(Event::Attached(attached)) => {
                self.pid = attached.pid;
                Ok(())
            }
            other => Err(ClientError::Protocol(format!(
                "expected `attached`, got {other:?}"
            ))),
        }
    }

    /// Checks `chunk` against the stream's expected offset: a gap becomes a
    /// [`AttachEvent::Dropped`] before the data, an overlap is a protocol error.
    fn output(&mut self, stream: OutputStream, chunk: OutputChunk) -> Result<AttachEvent> {
        let dropped = self
            .offsets
            .accept(stream, chunk.offset, chunk.data.len())?;
        let data = match stream {
            OutputStream::Stdout => AttachEvent::Stdout(chunk.data),
            OutputStream::Stderr => AttachEvent::Stderr(chunk.data),
        };
        if dropped == 0 {
            return Ok(data);
        }
        self.pending = Some(data);
        Ok(AttachEvent::Dropped {
            stream,
            bytes: dropped,
        })
    }

    /// Next event; `None` after the exit. Each message is at most
    /// `ReplyLimits::max_message_bytes`; it waits as long as the process runs.
    pub async fn next_event(&mut self) -> Result<Option<AttachEvent>> {
        if let Some(event) = self.pending.take() {
            return Ok(Some(event));
        }
        if self.finished {
            return Ok(None);
        }
        let Some(response) = self.message().await? else {
            return Err(ClientError::Protocol(
                "attach stream ended without an exit status".into(),
            ));
        };
        let event = match response.event {
            Some(Event::Stdout(chunk)) => self.output(OutputStream::Stdout, chunk)?,
            Some(Event::Stderr(chunk)) => self.output(OutputStream::Stderr, chunk)?,
            Some(Event::Exit(status)) => {
                self.finished = true;
                let (status, timed_out) = ExitOutcome::from_status(Some(&status))?;
                AttachEvent::Exit { status, timed_out }
            }
            other => {
                return Err(ClientError::Protocol(format!("unexpected event {other:?}")));
            }
        };
        Ok(Some(event))
    }

    /// Collects the output (buffered and live) until the exit, within
    /// `ReplyLimits::max_exec_output_bytes` per stream and `max_exec_total_bytes` in all.
    /// `*_truncated` says the ring dropped older output.
    pub async fn wait(mut self) -> Result<ExecOutput> {
        let mut output = OutputCollector::new(
            self.limits.max_exec_output_bytes,
            self.limits.max_exec_total_bytes,
        );
        let (mut stdout_truncated, mut stderr_truncated) = (false, false);
        while let Some(event) = self.next_event().await? {
            match event {
                AttachEvent::Stdout(data) => output.push(Stream::Stdout, &data)?,
                AttachEvent::Stderr(data) => output.push(Stream::Stderr, &data)?,
                AttachEvent::Dropped { stream, .. } => match stream {
                    OutputStream::Stdout => stdout_truncated = true,
                    OutputStream::Stderr => stderr_truncated = true,
                },
                AttachEvent::Exit { status, timed_out } => {
                    return Ok(ExecOutput {
                        pid: self.pid,
                        stdout: output.stdout,
                        stderr: output.stderr,
                        status,
                        timed_out,
                        stdout_truncated,
                        stderr_truncated,
                    });
                }
            }
        }
        Err(ClientError::Protocol(
            "attach stream ended without an exit status".into(),
        ))
    }
}

/// What [`AgentClient::exec_start`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecStarted {
    pub id: ExecSessionId,
    pub pid: u32,
}

impl AgentClient {
    /// Starts `command` as a detached session: it runs until it exits (or its timeout, or a
    /// kill), whoever is attached. Stdin given on the command is written first; then stdin is
    /// closed unless `keep_stdin_open` (attachers write to it). Fails with
    /// `RESOURCE_EXHAUSTED` when [`MAX_SESSIONS`] sessions are running.
    pub async fn exec_start(
        &self,
        command: &ExecCommand,
        keep_stdin_open: bool,
    ) -> Result<ExecStarted> {
        let request = ExecStartRequest {
            process: Some(command.spec().clone()),
            stdin: command.stdin_bytes().to_vec(),
            keep_stdin_open,
        };
        let response = self
            .unary(
                "exec_start",
                |mut g| async move { g.exec_start(request).await },
            )
            .await?;
        Ok(ExecStarted {
            id: session_id(response.session_id)?,
            pid: response.pid,
        })
    }

    /// The agent's sessions (running, and exited ones still retained), oldest first.
    pub async fn exec_list(&self) -> Result<Vec<ExecSessionInfo>> {
        let response = self
            .unary("exec_list", |mut g| async move {
                g.exec_list(ExecListRequest {}).await
            })
            .await?;
        response
            .sessions
            .into_iter()
            .map(ExecSessionInfo::from_proto)
            .collect()
    }

    /// Attaches to a session: its buffered output, then live output, then its exit. Any number
    /// of attachments may be open at once; dropping one leaves the process running. The attach
    /// itself is bounded by the call timeout; events come as the process produces them.
    pub async fn exec_attach(&self, id: &ExecSessionId) -> Result<ExecAttachment> {
        let (sender, receiver) = mpsc::channel(16);
        let first = ExecAttachRequest {
            msg: Some(Msg::SessionId(id.as_str().to_owned())),
        };
        sender
            .send(first)
            .await
            .map_err(|_| ClientError::SessionClosed)?;
        let limits = self.shared.config.limits;
        let limit = limits.max_message_bytes;
        let mut grpc = self.limited(limit);
        let id = id.clone();
        let attaching = async move {
            let output = grpc
                .exec_attach(ReceiverStream::new(receiver))
                .await
                .map_err(|status| ClientError::reply(status, "exec_attach", limit))?
                .into_inner();
            let mut attachment = ExecAttachment {
                id,
                pid: 0,
                input: AttachInput { sender },
                output,
                limits,
                offsets: Offsets::default(),
                pending: None,
                finished: false,
            };
            attachment.expect_attached().await?;
            Ok(attachment)
        };
        self.bounded("exec_attach", attaching).await?
    }

    /// Sends `signal` to the session's process group. Signal 0 probes, as in kill(2): it
    /// succeeds while the session runs. A session that has exited fails with
    /// `FAILED_PRECONDITION`, an unknown (or reaped) one with `NOT_FOUND`.
    pub async fn exec_kill(&self, id: &ExecSessionId, signal: i32) -> Result<()> {
        let request = ExecKillRequest {
            session_id: id.as_str().to_owned(),
            signal,
        };
        self.unary(
            "exec_kill",
            |mut g| async move { g.exec_kill(request).await },
        )
        .await?;
        Ok(())
    }

    /// Waits for the session's exit and returns its status (also long after the exit, within
    /// the retention). Not bounded by the call timeout: it waits as long as the process runs.
    pub async fn exec_wait(&self, id: &ExecSessionId) -> Result<ExecSessionState> {
        let request = ExecWaitRequest {
            session_id: id.as_str().to_owned(),
        };
        let limit = self.shared.config.limits.max_message_bytes;
        let status = self
            .limited(limit)
            .exec_wait(request)
            .await
            .map_err(|status| ClientError::reply(status, "exec_wait", limit))?
            .into_inner();
        let (status, timed_out) = ExitOutcome::from_status(Some(&status))?;
        Ok(ExecSessionState::Exited { status, timed_out })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_are_checked_when_parsed() {
        let id: ExecSessionId = "00112233445566778899aabbccddeeff".parse().unwrap();
        assert_eq!(id.to_string(), "00112233445566778899aabbccddeeff");
        assert_eq!("short".parse::<ExecSessionId>(), Err(InvalidSessionId));
        assert!(session_id("../../etc".into()).is_err());
    }

    #[test]
    fn offsets_reveal_gaps_and_refuse_overlaps() {
        let mut offsets = Offsets::default();
        assert_eq!(offsets.accept(OutputStream::Stdout, 0, 5).unwrap(), 0);
        // A late attacher's first chunk after the ring dropped 100 bytes of stderr.
        assert_eq!(offsets.accept(OutputStream::Stderr, 100, 1).unwrap(), 100);
        assert_eq!(offsets.accept(OutputStream::Stdout, 5, 1).unwrap(), 0);
        assert_eq!(offsets.accept(OutputStream::Stdout, 10, 1).unwrap(), 4);
        assert!(offsets.accept(OutputStream::Stdout, 3, 1).is_err());
        assert!(offsets.accept(OutputStream::Stderr, 100, 1).is_err());
    }

    #[test]
    fn list_entries_decode_states() {
        let running = ExecSessionInfo::from_proto(SessionInfo {
            session_id: "0".repeat(32),
            command: "sleep 9".into(),
            pid: 7,
            started_unix_nanos: 1_000_000_000,
            exit: None,
        })
        .unwrap();
        assert_eq!(running.state, ExecSessionState::Running);
        assert_eq!(running.started, UNIX_EPOCH + Duration::from_secs(1));
        let exited = ExecSessionInfo::from_proto(SessionInfo {
            session_id: "f".repeat(32),
            exit: Some(crate::proto::ExitStatus {
                outcome: Some(crate::proto::exit_status::Outcome::Code(3)),
                timed_out: false,
            }),
            ..SessionInfo::default()
        })
        .unwrap();
        assert_eq!(
            exited.state,
            ExecSessionState::Exited {
                status: ExitOutcome::Code(3),
                timed_out: false
            }
        );
        // A hostile agent's malformed id or outcome-less status is refused.
        assert!(ExecSessionInfo::from_proto(SessionInfo::default()).is_err());
        assert!(ExecSessionInfo::from_proto(SessionInfo {
            session_id: "f".repeat(32),
            exit: Some(crate::proto::ExitStatus::default()),
            ..SessionInfo::default()
        })
        .is_err());
    }
}
