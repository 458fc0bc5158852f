//! Client side of `ExecStream`.

use tokio::sync::mpsc;
use tonic::Streaming;

use super::command::{ExecOutput, ExitOutcome};
use super::detached::SIGKILL;
use super::limits::{OutputCollector, ReplyLimits, Stream};
use super::ClientError;
use crate::proto::{
    exec_stream_request::Msg, exec_stream_response::Event, CloseStdin, ExecStreamRequest,
    ExecStreamResponse,
};

/// One piece of streamed process output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The last event.
    Exit {
        status: ExitOutcome,
        timed_out: bool,
    },
}

/// Sends stdin and signals to a running session; cloneable, so input can be
/// fed from another task while output is read.
#[derive(Debug, Clone)]
pub struct ExecInput {
    sender: mpsc::Sender<ExecStreamRequest>,
}

impl ExecInput {
    async fn send(&self, msg: Msg) -> Result<(), ClientError> {
        self.sender
            .send(ExecStreamRequest { msg: Some(msg) })
            .await
            .map_err(|_| ClientError::SessionClosed)
    }

    pub async fn write_stdin(&self, data: impl Into<Vec<u8>>) -> Result<(), ClientError> {
        self.send(Msg::Stdin(data.into())).await
    }

    pub async fn close_stdin(&self) -> Result<(), ClientError> {
        self.send(Msg::CloseStdin(CloseStdin {})).await
    }

    /// Delivers `signal` to the process group. 0 delivers nothing, as in kill(2) (this stream
    /// carries no answer: probe with `AgentClient::kill(pid, 0, true)`).
    pub async fn signal(&self, signal: i32) -> Result<(), ClientError> {
        self.send(Msg::Signal(signal)).await
    }

    /// SIGKILL to the process group.
    pub async fn kill(&self) -> Result<(), ClientError> {
        self.signal(SIGKILL).await
    }
}

/// A running interactive process, tied to this value: dropping it cancels the call, which makes
/// the agent kill the process group. For a process that outlives its caller use a detached
/// session (`AgentClient::exec_start`, `exec_attach`).
#[derive(Debug)]
pub struct ExecSession {
    pid: u32,
    input: ExecInput,
    output: Streaming<ExecStreamResponse>,
    finished: bool,
    limits: ReplyLimits,
}

impl ExecSession {
    pub(crate) fn new(
        sender: mpsc::Sender<ExecStreamRequest>,
        output: Streaming<ExecStreamResponse>,
        limits: ReplyLimits,
    ) -> Self {
        Self {
            pid: 0,
            input: ExecInput { sender },
            output,
            finished: false,
            limits,
        }
    }

    /// The next reply message, with tonic's refusal of an oversized one made typed.
    async fn message(&mut self) -> Result<Option<ExecStreamResponse>, ClientError> {
        let limit = self.limits.max_message_bytes;
        self.output
            .message()
            .await
            .map_err(|status| ClientError::reply(status, "exec_stream event", limit))
    }

    /// Reads the `started` message that opens every session.
    pub(crate) async fn expect_started(&mut self) -> Result<(), ClientError> {
        match self.message().await?.and_then(|response| response.event) {
            Some(Event::Started(started)) => {
                self.pid = started.pid;
                Ok(())
            }
            other => Err(ClientError::Protocol(format!(
                "expected `started`, got {other:?}"
            ))),
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// A handle for sending input from elsewhere.
    pub fn input(&self) -> ExecInput {
        self.input.clone()
    }

    pub async fn write_stdin(&self, data: impl Into<Vec<u8>>) -> Result<(), ClientError> {
        self.input.write_stdin(data).await
    }

    pub async fn close_stdin(&self) -> Result<(), ClientError> {
        self.input.close_stdin().await
    }

    /// See [`ExecInput::signal`]: 0 delivers nothing.
    pub async fn signal(&self, signal: i32) -> Result<(), ClientError> {
        self.input.signal(signal).await
    }

    /// SIGKILL to the process group (ends the session with `Exit { Signal(9) }`).
    pub async fn kill(&self) -> Result<(), ClientError> {
        self.input.kill().await
    }

    /// Next output event; `None` after the exit event. Each event is at most
    /// `ReplyLimits::max_message_bytes`; it waits as long as the process runs.
    pub async fn next_event(&mut self) -> Result<Option<ExecEvent>, ClientError> {
        if self.finished {
            return Ok(None);
        }
        let Some(response) = self.message().await? else {
            return Err(ClientError::Protocol(
                "stream ended without an exit status".into(),
            ));
        };
        let event = match response.event {
            Some(Event::Stdout(data)) => ExecEvent::Stdout(data),
            Some(Event::Stderr(data)) => ExecEvent::Stderr(data),
            Some(Event::Exit(status)) => {
                self.finished = true;
                let (status, timed_out) = ExitOutcome::from_status(Some(&status))?;
                ExecEvent::Exit { status, timed_out }
            }
            other => {
                return Err(ClientError::Protocol(format!("unexpected event {other:?}")));
            }
        };
        Ok(Some(event))
    }

    /// Collects the remaining output until exit, within `ReplyLimits::max_exec_output_bytes`
    /// per stream and `max_exec_total_bytes` in all: more fails with
    /// [`ClientError::ResponseTooLarge`] and ends the session (the agent kills the process).
    /// It waits as long as the process runs: give the command a timeout to bound it.
    pub async fn wait(mut self) -> Result<ExecOutput, ClientError> {
        let mut output = OutputCollector::new(
            self.limits.max_exec_output_bytes,
            self.limits.max_exec_total_bytes,
        );
        while let Some(event) = self.next_event().await? {
            match event {
                ExecEvent::Stdout(data) => output.push(Stream::Stdout, &data)?,
                ExecEvent::Stderr(data) => output.push(Stream::Stderr, &data)?,
                ExecEvent::Exit { status, timed_out } => {
                    return Ok(ExecOutput {
                        pid: self.pid,
                        stdout: output.stdout,
                        stderr: output.stderr,
                        status,
                        timed_out,
                        stdout_truncated: false,
                        stderr_truncated: false,
                    });
                }
            }
        }
        Err(ClientError::Protocol(
            "stream ended without an exit status".into(),
        ))
    }
}
