//! Host-side client for the dormouse guest agent (`dormouse.agent.v1.Agent`, crate
//! `agent-proto`, re-exported as [`proto`]).
//!
//! Works over any connected byte stream: the VMM's in-process vsock stream
//! ([`AgentClient::connect_with`]), the Firecracker-style hybrid vsock Unix
//! socket ([`AgentClient::connect_hybrid_vsock`]), or plain Unix/TCP sockets
//! when the agent runs on the host (tests).
//!
//! This crate depends on the protocol only, never on the guest crate `agent` (server, PID 1
//! duties): the host links no guest code.

// Guest memory, snapshot files and API requests are hostile input: outside tests, nothing may
// unwrap or expect (a panic would end the VM). Tests may.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod command;
mod detached;
mod error;
mod file_info;
pub mod hybrid;
pub mod limits;
mod list_dir;
mod session;

/// The generated protocol types (crate `agent-proto`), which the client's API uses.
pub use agent_proto as proto;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};

pub use command::{ExecCommand, ExecOutput, ExitOutcome};
pub use detached::{
    AttachEvent, AttachInput, ExecAttachment, ExecSessionId, ExecSessionInfo, ExecSessionState,
    ExecStarted, InvalidSessionId, OutputStream, MAX_SESSIONS, SESSION_OUTPUT_BYTES,
    SESSION_RETENTION,
};
pub use error::{code_name, ClientError};
pub use file_info::{FileInfo, FileKind};
pub use limits::{AgentClientConfig, ReplyLimits, DEFAULT_CALL_TIMEOUT};
pub use session::{ExecEvent, ExecInput, ExecSession};

use crate::proto::agent_client::AgentClient as GrpcClient;
use crate::proto::{
    exec_stream_request, write_file_request, ExecStreamRequest, ExecStreamStart, ExistsRequest,
    KillRequest, ListDirRequest, MakeDirRequest, PingRequest, PingResponse, ReadFileRequest,
    RemoveRequest, RenameRequest, SetTimeRequest, ShutdownAction, ShutdownRequest, StatRequest,
    SyncFsRequest, WriteFileHeader, WriteFileRequest,
};
// Only bounds what the host itself sends; replies are bounded by `limits::ReplyLimits`.
use agent_proto::limits::{
    DEFAULT_READ_CHUNK, HTTP2_CONNECTION_WINDOW_BYTES, HTTP2_MAX_FRAME_BYTES,
    HTTP2_STREAM_WINDOW_BYTES, MAX_MESSAGE_BYTES,
};
use limits::{OutputCollector, MAX_HEADER_LIST_BYTES};

pub use agent_proto::AGENT_VSOCK_PORT;

/// Size of the chunks `write_file` sends: one HTTP/2 frame each (see
/// [`agent_proto::limits::HTTP2_MAX_FRAME_BYTES`]).
const WRITE_CHUNK: usize = DEFAULT_READ_CHUNK;

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Options for [`AgentClient::write_file`]. The default: mode 0o644 for a new file, missing
/// parent directories created (mode 0o755, like every sandbox SDK), the file truncated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteOptions {
    /// Permission bits for a new file; 0 = 0o644.
    pub mode: u32,
    /// Create missing parent directories (default `true`); `false` fails with `NotFound`.
    pub create_parents: bool,
    /// Append instead of truncating (default `false`).
    pub append: bool,
}

impl Default for WriteOptions {
    fn default() -> Self {
        Self {
            mode: 0,
            create_parents: true,
            append: false,
        }
    }
}

/// Typed client; cheap to clone, calls may run concurrently. Every reply is bounded by the
/// client's [`AgentClientConfig`] (defaults unless [`AgentClient::with_config`] says otherwise).
#[derive(Debug, Clone)]
pub struct AgentClient {
    grpc: GrpcClient<Channel>,
    /// Behind one pointer: the client is cloned per call and kept in every sandbox.
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    channel: Channel,
    config: AgentClientConfig,
}

/// Room a `ReadFile` chunk's message needs besides its data (the offset and the fields' tags
/// and lengths take under 32 bytes).
const READ_CHUNK_FRAMING: usize = 64;

/// The chunk size a file read asks for: the agent's default (one HTTP/2 frame), or less when a
/// reply message may not be that big, so that every chunk fits `max_message_bytes`.
fn read_chunk_for(max_message_bytes: usize) -> u32 {
    let fits = max_message_bytes.saturating_sub(READ_CHUNK_FRAMING).max(1);
    u32::try_from(DEFAULT_READ_CHUNK.min(fits)).unwrap_or(u32::MAX)
}

fn endpoint() -> Endpoint {
    // The authority is irrelevant: the connector decides where bytes go. The header list (the
    // agent's status, error message and metadata) is bounded like any reply.
    // The frame size and windows bound what the guest can make the host buffer per connection
    // (see the limits' docs); they are the agent's, so big transfers take few frames each way.
    Endpoint::from_static("http://dormouse-agent")
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
        .max_frame_size(HTTP2_MAX_FRAME_BYTES)
        .initial_stream_window_size(HTTP2_STREAM_WINDOW_BYTES)
        .initial_connection_window_size(HTTP2_CONNECTION_WINDOW_BYTES)
}

impl AgentClient {
    /// Connects through `connect(port)`, which must yield a connected stream
    /// to the agent's vsock `port` (e.g. the VMM's in-process vsock). The
    /// closure is called again whenever the channel reconnects.
    pub async fn connect_with<F, Fut, S>(port: u32, connect: F) -> Result<Self>
    where
        F: Fn(u32) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = io::Result<S>> + Send + 'static,
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let connect = Arc::new(connect);
        let connector = tower::service_fn(move |_: Uri| {
            let connect = Arc::clone(&connect);
            async move { connect(port).await.map(TokioIo::new) }
        });
        let channel = endpoint()
            .connect_with_connector(connector)
            .await
            .map_err(ClientError::Connect)?;
        Ok(Self::from_channel(channel))
    }

    /// Connects through a Firecracker-style hybrid vsock Unix socket
    /// (`CONNECT <port>\n` / `OK <n>\n`), e.g. from a process other than the
    /// VMM.
    pub async fn connect_hybrid_vsock(uds_path: impl AsRef<Path>, port: u32) -> Result<Self> {
        let path: Arc<PathBuf> = Arc::new(uds_path.as_ref().to_path_buf());
        // Fail early with the handshake's own error rather than a generic
        // transport error.
        let first = hybrid::connect(&path, port).await?;
        let first = Arc::new(std::sync::Mutex::new(Some(first)));
        Self::connect_with(port, move |port| {
            let path = Arc::clone(&path);
            let first = first
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            async move {
                match first {
                    Some(stream) => Ok(stream),
                    None => hybrid::connect(&path, port).await.map_err(io::Error::other),
                }
            }
        })
        .await
    }

    /// Connects to an agent serving on a Unix socket (`--listen unix:PATH`).
    pub async fn connect_unix(path: impl AsRef<Path>) -> Result<Self> {
        let path = Arc::new(path.as_ref().to_path_buf());
        Self::connect_with(0, move |_| {
            let path = Arc::clone(&path);
            async move { tokio::net::UnixStream::connect(path.as_path()).await }
        })
        .await
    }

    /// Connects to an agent serving on TCP (`--listen tcp:ADDR`).
    pub async fn connect_tcp(addr: SocketAddr) -> Result<Self> {
        Self::connect_with(0, move |_| async move {
            let stream = tokio::net::TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            Ok(stream)
        })
        .await
    }

    /// Wraps an existing channel (with the default [`AgentClientConfig`]).
    pub fn from_channel(channel: Channel) -> Self {
        Self {
            grpc: GrpcClient::new(channel.clone()).max_encoding_message_size(MAX_MESSAGE_BYTES),
            shared: Arc::new(Shared {
                channel,
                config: AgentClientConfig::default(),
            }),
        }
    }

    /// The same connection with other reply limits and call timeout.
    pub fn with_config(mut self, config: AgentClientConfig) -> Self {
        self.shared = Arc::new(Shared {
            channel: self.shared.channel.clone(),
            config,
        });
        self
    }

    pub fn config(&self) -> &AgentClientConfig {
        &self.shared.config
    }

    /// The generated client, for calls the typed API does not cover. It decodes reply messages
    /// up to the largest reply a typed call accepts; other caps are the caller's business.
    pub fn grpc(&self) -> GrpcClient<Channel> {
        self.limited(self.shared.config.limits.raw_message_bytes())
    }

    /// The generated client, refusing reply messages over `limit` bytes before reading them.
    fn limited(&self, limit: usize) -> GrpcClient<Channel> {
        self.grpc.clone().max_decoding_message_size(limit)
    }

    /// Runs `fut` within the call timeout.
    async fn bounded<T>(&self, operation: &'static str, fut: impl Future<Output = T>) -> Result<T> {
        within(self.shared.config.call_timeout, operation, fut).await
    }

    /// A unary call whose reply is one small message (`max_message_bytes`), within the call
    /// timeout.
    async fn unary<T, F, Fut>(&self, operation: &'static str, call: F) -> Result<T>
    where
        F: FnOnce(GrpcClient<Channel>) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let limit = self.shared.config.limits.max_message_bytes;
        let response = self
            .bounded(operation, call(self.limited(limit)))
            .await?
            .map_err(|status| ClientError::reply(status, operation, limit))?;
        Ok(response.into_inner())
    }

    /// Runs a command to completion. The output is capped per stream at the command's
    /// `max_output_bytes` or [`ReplyLimits::max_exec_output_bytes`], whichever is smaller (the
    /// agent truncates there and sets `*_truncated`). A command with a timeout gets that long
    /// plus the call timeout; one without waits as long as it runs.
    pub async fn exec(&self, command: &ExecCommand) -> Result<ExecOutput> {
        let limits = self.shared.config.limits;
        let mut request = command.to_request();
        request.max_output_bytes = limits.exec_request_bytes(request.max_output_bytes);
        let per_stream = usize::try_from(request.max_output_bytes).unwrap_or(usize::MAX);
        let limit = limits.exec_message_bytes();
        let timeout = match (command.spec().timeout_ms, self.shared.config.call_timeout) {
            (0, _) | (_, None) => None,
            (ms, Some(slack)) => Some(Duration::from_millis(ms).saturating_add(slack)),
        };
        let mut grpc = self.limited(limit);
        let call = grpc.exec(request);
        let response = within(timeout, "exec", call)
            .await?
            .map_err(|status| ClientError::reply(status, "exec", limit))?
            .into_inner();
        // Within the message limit, but an agent that ignores the requested truncation is
        // refused all the same.
        OutputCollector::new(per_stream, limits.max_exec_total_bytes)
            .check(response.stdout.len(), response.stderr.len())?;
        ExecOutput::from_response(response)
    }

    /// Starts an interactive process (stdin, signals, streamed output). The start (until the
    /// agent reports the pid, and stdin given on the command) is bounded by the call timeout;
    /// the session's events then come as the process produces them, each message at most
    /// [`ReplyLimits::max_message_bytes`].
    pub async fn exec_stream(&self, command: &ExecCommand) -> Result<ExecSession> {
        let (sender, receiver) = mpsc::channel(16);
        let start = ExecStreamRequest {
            msg: Some(exec_stream_request::Msg::Start(ExecStreamStart {
                process: Some(command.spec().clone()),
            })),
        };
        sender
            .send(start)
            .await
            .map_err(|_| ClientError::SessionClosed)?;
        let limits = self.shared.config.limits;
        let limit = limits.max_message_bytes;
        let mut grpc = self.limited(limit);
        let starting = async move {
            let output = grpc
                .exec_stream(ReceiverStream::new(receiver))
                .await
                .map_err(|status| ClientError::reply(status, "exec_stream", limit))?
                .into_inner();
            let mut session = ExecSession::new(sender, output, limits);
            session.expect_started().await?;
            // Stdin given on the command is sent up front.
            if !command.stdin_bytes().is_empty() {
                session.write_stdin(command.stdin_bytes().to_vec()).await?;
                session.close_stdin().await?;
            }
            Ok(session)
        };
        self.bounded("exec_stream", starting).await?
    }

    /// Sends `signal` to `pid`, or to its process group. Signal 0 probes, as in kill(2):
    /// nothing is delivered, and the call fails (`NOT_FOUND`) when the target is gone. (Before,
    /// 0 meant SIGKILL here while `ExecSession::signal(0)` did nothing; now both follow
    /// kill(2). Use `libc::SIGKILL` or [`ExecSession::kill`] to kill.)
    pub async fn kill(&self, pid: u32, signal: i32, process_group: bool) -> Result<()> {
        let request = KillRequest {
            pid,
            signal,
            process_group,
        };
        self.unary("kill", |mut g| async move { g.kill(request).await })
            .await?;
        Ok(())
    }

    /// Reads a whole file (at most [`ReplyLimits::max_file_bytes`]; `read_file_to` streams
    /// bigger ones).
    pub async fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        self.read_file_range(path, 0, 0).await
    }

    /// Reads `length` bytes (0 = to the end) from `offset`, at most
    /// [`ReplyLimits::max_file_bytes`]. An agent that sends more than was asked for is refused
    /// ([`ClientError::ResponseTooLarge`]); nothing past the cap is kept. The call timeout
    /// bounds the wait for each chunk.
    pub async fn read_file_range(&self, path: &str, offset: u64, length: u64) -> Result<Vec<u8>> {
        let (cap, is_length) = self.shared.config.limits.file_read_cap(length);
        let what = if is_length {
            "read_file (requested length)"
        } else {
            "read_file"
        };
        let mut stream = self.read_stream(path, offset, length).await?;
        let mut data = Vec::new();
        let mut expected_offset = offset;
        while let Some(chunk) = stream.next(expected_offset).await? {
            let total = (data.len() as u64).saturating_add(chunk.len() as u64);
            if total > cap {
                return Err(ClientError::ResponseTooLarge {
                    what,
                    limit: cap,
                    at_least: total,
                });
            }
            expected_offset = expected_offset.saturating_add(chunk.len() as u64);
            data.extend_from_slice(&chunk);
        }
        Ok(data)
    }

    async fn read_stream(&self, path: &str, offset: u64, length: u64) -> Result<ChunkStream<'_>> {
        let limit = self.shared.config.limits.max_message_bytes;
        let request = ReadFileRequest {
            path: path.to_owned(),
            offset,
            length,
            chunk_size: read_chunk_for(limit),
        };
        let mut grpc = self.limited(limit);
        let call = grpc.read_file(request);
        let stream = self
            .bounded("read_file", call)
            .await?
            .map_err(|status| ClientError::reply(status, "read_file", limit))?
            .into_inner();
        Ok(ChunkStream {
            client: self,
            stream,
            limit,
        })
    }

    /// Writes `data` to `path` in chunks; returns the bytes written.
    pub async fn write_file(&self, path: &str, data: &[u8], options: WriteOptions) -> Result<u64> {
        let header = WriteFileRequest {
            msg: Some(write_file_request::Msg::Header(WriteFileHeader {
                path: path.to_owned(),
                mode: options.mode,
                create_parents: options.create_parents,
                append: options.append,
            })),
        };
        let chunks = data.chunks(WRITE_CHUNK).map(|chunk| WriteFileRequest {
            msg: Some(write_file_request::Msg::Data(chunk.to_vec())),
        });
        let requests: Vec<WriteFileRequest> = std::iter::once(header).chain(chunks).collect();
        let response = self
            .unary("write_file", |mut g| async move {
                g.write_file(tokio_stream::iter(requests)).await
            })
            .await?;
        Ok(response.bytes_written)
    }

    /// Streams a whole file into `writer`; returns the bytes copied. No size cap (the writer
    /// decides where the bytes go); each chunk is at most [`ReplyLimits::max_message_bytes`]
    /// and must arrive within the call timeout.
    pub async fn read_file_to<W>(&self, path: &str, writer: &mut W) -> Result<u64>
    where
        W: AsyncWrite + Unpin,
    {
        let mut stream = self.read_stream(path, 0, 0).await?;
        let mut copied: u64 = 0;
        while let Some(chunk) = stream.next(copied).await? {
            writer.write_all(&chunk).await.map_err(ClientError::Local)?;
            copied = copied.saturating_add(chunk.len() as u64);
        }
        writer.flush().await.map_err(ClientError::Local)?;
        Ok(copied)
    }

    /// Streams `reader` into `path` without buffering it whole; returns the
    /// bytes written. If reading fails, the call is cancelled (the agent
    /// reports an error instead of completing a truncated write). Not bounded by
    /// the call timeout (the reader sets the pace): wrap it in a timeout of your own.
    pub async fn write_file_from<R>(
        &self,
        path: &str,
        mut reader: R,
        options: WriteOptions,
    ) -> Result<u64>
    where
        R: AsyncRead + Unpin,
    {
        let (sender, receiver) = mpsc::channel::<WriteFileRequest>(4);
        let limit = self.shared.config.limits.max_message_bytes;
        let mut grpc = self.limited(limit);
        let mut call = Box::pin(grpc.write_file(ReceiverStream::new(receiver)));
        let header = WriteFileRequest {
            msg: Some(write_file_request::Msg::Header(WriteFileHeader {
                path: path.to_owned(),
                mode: options.mode,
                create_parents: options.create_parents,
                append: options.append,
            })),
        };
        // Returns the sender on failure so the request stream is still open
        // (not cleanly ended) when the call is dropped.
        let feed = async move {
            if sender.send(header).await.is_err() {
                return Ok(());
            }
            loop {
                let mut chunk = Vec::with_capacity(WRITE_CHUNK);
                match (&mut reader)
                    .take(WRITE_CHUNK as u64)
                    .read_to_end(&mut chunk)
                    .await
                {
                    Ok(0) => return Ok(()),
                    Ok(_) => {
                        let request = WriteFileRequest {
                            msg: Some(write_file_request::Msg::Data(chunk)),
                        };
                        if sender.send(request).await.is_err() {
                            // The call ended early; its result says why.
                            return Ok(());
                        }
                    }
                    Err(err) => return Err((err, sender)),
                }
            }
        };
        tokio::pin!(feed);
        let response = tokio::select! {
            biased;
            fed = &mut feed => match fed {
                Ok(()) => call
                    .await
                    .map_err(|status| ClientError::reply(status, "write_file", limit))?,
                Err((err, sender)) => {
                    drop(call);
                    drop(sender);
                    return Err(ClientError::Local(err));
                }
            },
            response = &mut call => {
                response.map_err(|status| ClientError::reply(status, "write_file", limit))?
            }
        };
        Ok(response.into_inner().bytes_written)
    }

    /// Directory entries sorted by name (symlinks not followed). At most
    /// [`ReplyLimits::max_dir_entries`] entries in a reply of at most
    /// [`ReplyLimits::max_dir_bytes`].
    pub async fn list_dir(&self, path: &str) -> Result<Vec<FileInfo>> {
        let limits = self.shared.config.limits;
        let codec = list_dir::ListDirCodec::new(limits.max_dir_entries);
        let request = ListDirRequest {
            path: path.to_owned(),
        };
        let mut grpc = tonic::client::Grpc::new(self.shared.channel.clone())
            .max_decoding_message_size(limits.max_dir_bytes);
        let call = {
            let codec = codec.clone();
            async move {
                grpc.ready().await.map_err(|e| {
                    tonic::Status::unavailable(format!("the agent connection is not ready: {e}"))
                })?;
                let path = tonic::codegen::http::uri::PathAndQuery::from_static(list_dir::PATH);
                grpc.unary(tonic::Request::new(request), path, codec).await
            }
        };
        let result = self.bounded("list_dir", call).await?;
        if let Some(seen) = codec.exceeded() {
            return Err(ClientError::too_large(
                "list_dir (entries)",
                limits.max_dir_entries,
                seen,
            ));
        }
        let response = result
            .map_err(|status| ClientError::reply(status, "list_dir", limits.max_dir_bytes))?;
        Ok(response
            .into_inner()
            .entries
            .into_iter()
            .map(|entry| FileInfo::in_dir(path, entry))
            .collect())
    }

    /// Metadata of `path`, following symlinks.
    pub async fn stat(&self, path: &str) -> Result<FileInfo> {
        let request = StatRequest {
            path: path.to_owned(),
            no_follow_symlinks: false,
        };
        let response = self
            .unary("stat", |mut g| async move { g.stat(request).await })
            .await?;
        response
            .info
            .map(|info| FileInfo::at(path, info))
            .ok_or_else(|| ClientError::Protocol("stat reply without info".into()))
    }

    /// Creates a directory (mode 0o755); `parents` behaves like `mkdir -p`.
    pub async fn mkdir(&self, path: &str, parents: bool) -> Result<()> {
        let request = MakeDirRequest {
            path: path.to_owned(),
            mode: 0,
            parents,
        };
        self.unary("mkdir", |mut g| async move { g.make_dir(request).await })
            .await?;
        Ok(())
    }

    /// Removes a file or directory (`recursive` for non-empty directories).
    pub async fn remove(&self, path: &str, recursive: bool) -> Result<()> {
        let request = RemoveRequest {
            path: path.to_owned(),
            recursive,
        };
        self.unary("remove", |mut g| async move { g.remove(request).await })
            .await?;
        Ok(())
    }

    pub async fn exists(&self, path: &str) -> Result<bool> {
        let request = ExistsRequest {
            path: path.to_owned(),
        };
        let response = self
            .unary("exists", |mut g| async move { g.exists(request).await })
            .await?;
        Ok(response.exists)
    }

    pub async fn rename(&self, from: &str, to: &str) -> Result<()> {
        let request = RenameRequest {
            from: from.to_owned(),
            to: to.to_owned(),
        };
        self.unary("rename", |mut g| async move { g.rename(request).await })
            .await?;
        Ok(())
    }

    pub async fn ping(&self) -> Result<PingResponse> {
        self.unary("ping", |mut g| async move { g.ping(PingRequest {}).await })
            .await
    }

    pub async fn sync_fs(&self) -> Result<()> {
        self.unary("sync_fs", |mut g| async move {
            g.sync_fs(SyncFsRequest {}).await
        })
        .await?;
        Ok(())
    }

    /// Sets the guest's wall clock.
    pub async fn set_time(&self, time: SystemTime) -> Result<()> {
        let unix_nanos = time
            .duration_since(UNIX_EPOCH)
            .ok()
            .and_then(|since| i64::try_from(since.as_nanos()).ok())
            .ok_or_else(|| ClientError::Protocol("time not representable".into()))?;
        self.unary("set_time", |mut g| async move {
            g.set_time(SetTimeRequest { unix_nanos }).await
        })
        .await?;
        Ok(())
    }

    /// Syncs and powers off / reboots the guest (or stops a non-init agent).
    pub async fn shutdown(&self, action: ShutdownAction) -> Result<()> {
        let request = ShutdownRequest {
            action: action.into(),
        };
        self.unary("shutdown", |mut g| async move { g.shutdown(request).await })
            .await?;
        Ok(())
    }
}

/// Runs `fut`, failing with [`ClientError::Timeout`] after `timeout` (if any).
async fn within<T>(
    timeout: Option<Duration>,
    operation: &'static str,
    fut: impl Future<Output = T>,
) -> Result<T> {
    match timeout {
        Some(timeout) => tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| ClientError::Timeout { operation, timeout }),
        None => Ok(fut.await),
    }
}

/// The chunks of one `ReadFile` call, checked for order, each within the call timeout.
struct ChunkStream<'a> {
    client: &'a AgentClient,
    stream: tonic::Streaming<crate::proto::FileChunk>,
    limit: usize,
}

impl ChunkStream<'_> {
    /// The next chunk's data, which must start at `expected_offset`; `None` at the end.
    async fn next(&mut self, expected_offset: u64) -> Result<Option<Vec<u8>>> {
        let message = self
            .client
            .bounded("read_file", self.stream.message())
            .await?
            .map_err(|status| ClientError::reply(status, "read_file", self.limit))?;
        let Some(chunk) = message else {
            return Ok(None);
        };
        if chunk.offset != expected_offset {
            return Err(ClientError::Protocol(format!(
                "chunk at offset {} where {expected_offset} was expected",
                chunk.offset
            )));
        }
        Ok(Some(chunk.data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_chunks_fit_the_reply_limit() {
        assert_eq!(read_chunk_for(MAX_MESSAGE_BYTES), DEFAULT_READ_CHUNK as u32);
        assert_eq!(
            read_chunk_for(limits::ReplyLimits::default().max_message_bytes),
            DEFAULT_READ_CHUNK as u32
        );
        assert_eq!(read_chunk_for(64 * 1024), 64 * 1024 - 64);
        // Never 0: that would ask for the agent's default.
        assert_eq!(read_chunk_for(10), 1);
    }
}
