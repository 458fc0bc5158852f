//! `Exec` (run to completion) and `ExecStream` (interactive) handlers.

use std::pin::Pin;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio_stream::{wrappers::ReceiverStream, Stream, StreamExt};
use tonic::{Status, Streaming};

use super::driver::{drive, DrivenProcess, ProcessEvent, ProcessTable};
use super::process::spawn;
use super::status::{check_size, invalid};
use crate::proto::{
    exec_stream_request::Msg, exec_stream_response::Event, ExecRequest, ExecResponse,
    ExecStreamRequest, ExecStreamResponse, ProcessSpec, Started,
};
use agent_proto::limits::{DEFAULT_OUTPUT_BYTES, MAX_OUTPUT_BYTES, MAX_PAYLOAD_BYTES};

pub type ExecEventStream = Pin<Box<dyn Stream<Item = Result<ExecStreamResponse, Status>> + Send>>;

fn timeout_of(spec: &ProcessSpec) -> Option<Duration> {
    (spec.timeout_ms > 0).then(|| Duration::from_millis(spec.timeout_ms))
}

async fn start(spec: &ProcessSpec, table: &ProcessTable) -> Result<DrivenProcess, Status> {
    let spawned = spawn(spec).await?;
    Ok(drive(spawned, timeout_of(spec), table))
}

/// Runs the process, feeds `stdin`, and collects its (capped) output.
pub async fn exec(request: ExecRequest, table: &ProcessTable) -> Result<ExecResponse, Status> {
    check_size("stdin", request.stdin.len(), MAX_PAYLOAD_BYTES)?;
    let spec = request
        .process
        .ok_or_else(|| invalid("`process` is required"))?;
    let limit = match request.max_output_bytes {
        0 => DEFAULT_OUTPUT_BYTES,
        requested => usize::try_from(requested)
            .unwrap_or(usize::MAX)
            .min(MAX_OUTPUT_BYTES),
    };

    let DrivenProcess {
        control,
        mut stdin,
        mut events,
    } = start(&spec, table).await?;

    let input = request.stdin;
    tokio::spawn(async move {
        // EPIPE just means the process did not read everything.
        if !input.is_empty() {
            let _ = stdin.write_all(&input).await;
        }
        // Dropping `stdin` closes the pipe: the child sees EOF.
    });

    let mut response = ExecResponse {
        pid: control.pid(),
        ..ExecResponse::default()
    };
    while let Some(event) = events.recv().await {
        match event {
            ProcessEvent::Stdout(data) => {
                response.stdout_truncated |= append_capped(&mut response.stdout, &data, limit);
            }
            ProcessEvent::Stderr(data) => {
                response.stderr_truncated |= append_capped(&mut response.stderr, &data, limit);
            }
            ProcessEvent::Exit(status) => {
                response.status = Some(status);
                return Ok(response);
            }
        }
    }
    Err(Status::internal(
        "process driver ended without an exit status",
    ))
}

/// Appends what fits under `limit`; true when something was dropped.
fn append_capped(buffer: &mut Vec<u8>, data: &[u8], limit: usize) -> bool {
    let room = limit.saturating_sub(buffer.len());
    let take = data.len().min(room);
    buffer.extend_from_slice(data.get(..take).unwrap_or_default());
    take < data.len()
}

/// Starts the process from the first message, then pumps the rest of the
/// request stream (stdin, close, signals) into it while output streams back.
pub async fn exec_stream(
    mut requests: Streaming<ExecStreamRequest>,
    table: &ProcessTable,
) -> Result<ExecEventStream, Status> {
    let first = requests
        .message()
        .await?
        .ok_or_else(|| invalid("empty request stream"))?;
    let spec = match first.msg {
        Some(Msg::Start(start)) => start
            .process
            .ok_or_else(|| invalid("`process` is required"))?,
        _ => return Err(invalid("the first message must be `start`")),
    };
    let DrivenProcess {
        control,
        stdin,
        events,
    } = start(&spec, table).await?;
    let pid = control.pid();

    tokio::spawn(pump_requests(requests, stdin, control));

    let started = ExecStreamResponse {
        event: Some(Event::Started(Started { pid })),
    };
    let outputs = ReceiverStream::new(events).map(|event| {
        let event = match event {
            ProcessEvent::Stdout(data) => Event::Stdout(data),
            ProcessEvent::Stderr(data) => Event::Stderr(data),
            ProcessEvent::Exit(status) => Event::Exit(status),
        };
        Ok(ExecStreamResponse { event: Some(event) })
    });
    Ok(Box::pin(tokio_stream::once(Ok(started)).chain(outputs)))
}

async fn pump_requests(
    mut requests: Streaming<ExecStreamRequest>,
    stdin: tokio::net::unix::pipe::Sender,
    mut control: super::driver::ProcessControl,
) {
    let mut stdin = Some(stdin);
    loop {
        let message = tokio::select! {
            message = requests.message() => message,
            _ = control.exited() => return,
        };
        let msg = match message {
            Ok(Some(request)) => request.msg,
            // Half-close: the client sends nothing more; the process goes on.
            Ok(None) => return,
            Err(status) => {
                tracing::debug!(%status, "exec stream broken, killing process");
                let _ = control.signal(libc::SIGKILL);
                return;
            }
        };
        match msg {
            Some(Msg::Stdin(data)) => {
                let Some(pipe) = stdin.as_mut() else { continue };
                // Signals queue behind a blocked write (the child is not
                // reading); exit still unblocks it, as does the Kill RPC.
                let written = tokio::select! {
                    result = pipe.write_all(&data) => result.is_ok(),
                    _ = control.exited() => return,
                };
                if !written {
                    // The process closed its stdin; later input is dropped.
                    stdin = None;
                }
            }
            Some(Msg::CloseStdin(_)) => stdin = None,
            Some(Msg::Signal(signal)) => {
                if let Err(err) = control.signal(signal) {
                    tracing::debug!(%err, signal, "signal not delivered");
                }
            }
            Some(Msg::Start(_)) | None => {
                tracing::debug!("ignoring unexpected exec stream message");
            }
        }
    }
}
