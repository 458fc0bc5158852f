//! `ExecAttach`: replays a session's buffered output, follows it live until the exit, and
//! feeds the attacher's stdin and signals to the process. Ending the call detaches only.

use std::pin::Pin;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_stream::{wrappers::ReceiverStream, Stream};
use tonic::{Status, Streaming};

use super::ring::{Chunk, Stream as Output};
use super::session::Session;
use crate::proto::{
    exec_attach_request::Msg, exec_attach_response::Event, Attached, ExecAttachRequest,
    ExecAttachResponse, OutputChunk,
};

pub type AttachStream = Pin<Box<dyn Stream<Item = Result<ExecAttachResponse, Status>> + Send>>;

/// Chunks taken from the ring at once (each at most one pipe read, 64 KiB).
const BATCH: usize = 16;
/// Reply messages queued ahead of a slow attacher; past this the attacher falls behind the
/// ring, not the process.
const QUEUE: usize = 16;

/// The first request names the session (already looked up by the caller).
pub fn attach(session: Arc<Session>, requests: Streaming<ExecAttachRequest>) -> AttachStream {
    let (sender, receiver) = mpsc::channel(QUEUE);
    tokio::spawn(pump_requests(Arc::clone(&session), requests));
    tokio::spawn(follow(session, sender));
    Box::pin(ReceiverStream::new(receiver))
}

fn event(event: Event) -> Result<ExecAttachResponse, Status> {
    Ok(ExecAttachResponse { event: Some(event) })
}

fn output(chunk: Chunk) -> Event {
    let data = OutputChunk {
        offset: chunk.offset,
        data: chunk.data,
    };
    match chunk.stream {
        Output::Stdout => Event::Stdout(data),
        Output::Stderr => Event::Stderr(data),
    }
}

/// Sends `attached`, the ring from its oldest chunk, live chunks, then the exit.
async fn follow(session: Arc<Session>, sender: mpsc::Sender<Result<ExecAttachResponse, Status>>) {
    let attached = Event::Attached(Attached {
        pid: session.control.pid(),
    });
    if sender.send(event(attached)).await.is_err() {
        return;
    }
    let mut changed = session.subscribe();
    let mut cursor = 0;
    loop {
        changed.borrow_and_update();
        let batch = session.read(cursor, BATCH);
        cursor = batch.next;
        let idle = batch.chunks.is_empty();
        for chunk in batch.chunks {
            if sender.send(event(output(chunk))).await.is_err() {
                return;
            }
        }
        if let Some(status) = batch.exit {
            let _ = sender.send(event(Event::Exit(status))).await;
            return;
        }
        if idle {
            tokio::select! {
                result = changed.changed() => if result.is_err() { return },
                () = sender.closed() => return,
            }
        }
    }
}

/// Applies the attacher's stdin, close and signal requests until it stops sending.
async fn pump_requests(session: Arc<Session>, mut requests: Streaming<ExecAttachRequest>) {
    let mut control = session.control.clone();
    loop {
        let message = tokio::select! {
            message = requests.message() => message,
            () = control.exited() => return,
        };
        let msg = match message {
            Ok(Some(request)) => request.msg,
            // Half-close or a broken call: detach; the process goes on.
            Ok(None) => return,
            Err(status) => {
                tracing::debug!(%status, session = %session.id, "attach stream ended");
                return;
            }
        };
        match msg {
            Some(Msg::Stdin(data)) => {
                let mut stdin = session.stdin.lock().await;
                let Some(pipe) = stdin.as_mut() else { continue };
                let written = tokio::select! {
                    result = pipe.write_all(&data) => result.is_ok(),
                    () = control.exited() => return,
                };
                if !written {
                    // The process closed its stdin; later input is dropped.
                    *stdin = None;
                }
            }
            Some(Msg::CloseStdin(_)) => {
                session.stdin.lock().await.take();
            }
            Some(Msg::Signal(signal)) => {
                if let Err(err) = session.control.signal(signal) {
                    tracing::debug!(%err, signal, "signal not delivered");
                }
            }
            Some(Msg::SessionId(_)) | None => {
                tracing::debug!("ignoring unexpected attach message");
            }
        }
    }
}
