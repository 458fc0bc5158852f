//! Host-side client for the guest agent.
//!
//! Works over any connected byte stream: the VMM's in-process vsock stream
//! ([`AgentClient::connect_with`]), the Firecracker-style hybrid vsock Unix
//! socket ([`AgentClient::connect_hybrid_vsock`]), or plain Unix/TCP sockets
//! when the agent runs on the host (tests).

mod command;
mod error;
pub mod hybrid;
mod session;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};

pub use command::{ExecCommand, ExecOutput, ExitOutcome};
pub use error::ClientError;
pub use session::{ExecEvent, ExecInput, ExecSession};

use crate::proto::agent_client::AgentClient as GrpcClient;
use crate::proto::{
    exec_stream_request, write_file_request, ExecStreamRequest, ExecStreamStart, ExistsRequest,
    FileInfo, KillRequest, ListDirRequest, MakeDirRequest, PingRequest, PingResponse,
    ReadFileRequest, RemoveRequest, RenameRequest, SetTimeRequest, ShutdownAction, ShutdownRequest,
    StatRequest, SyncFsRequest, WriteFileHeader, WriteFileRequest,
};
use crate::server::limits::MAX_MESSAGE_BYTES;

pub use crate::listen::AGENT_VSOCK_PORT;

/// Size of the chunks `write_file` sends.
const WRITE_CHUNK: usize = 256 * 1024;

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Options for [`AgentClient::write_file`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteOptions {
    /// Permission bits for a new file; 0 = 0o644.
    pub mode: u32,
    pub create_parents: bool,
    pub append: bool,
}

/// Typed client; cheap to clone, calls may run concurrently.
#[derive(Debug, Clone)]
pub struct AgentClient {
    grpc: GrpcClient<Channel>,
}

fn endpoint() -> Endpoint {
    // The authority is irrelevant: the connector decides where bytes go.
    Endpoint::from_static("http://dormouse-agent")
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

    /// Wraps an existing channel.
    pub fn from_channel(channel: Channel) -> Self {
        Self {
            grpc: GrpcClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        }
    }

    /// The generated client, for calls the typed API does not cover.
    pub fn grpc(&self) -> GrpcClient<Channel> {
        self.grpc.clone()
    }

    /// Runs a command to completion.
    pub async fn exec(&self, command: &ExecCommand) -> Result<ExecOutput> {
        let response = self.grpc().exec(command.to_request()).await?.into_inner();
        ExecOutput::from_response(response)
    }

    /// Starts an interactive process (stdin, signals, streamed output).
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
        let output = self
            .grpc()
            .exec_stream(ReceiverStream::new(receiver))
            .await?
            .into_inner();
        let mut session = ExecSession::new(sender, output);
        session.expect_started().await?;
        // Stdin given on the command is sent up front.
        if !command.stdin_bytes().is_empty() {
            session.write_stdin(command.stdin_bytes().to_vec()).await?;
            session.close_stdin().await?;
        }
        Ok(session)
    }

    /// Sends `signal` (0 = SIGKILL) to `pid`, or to its process group.
    pub async fn kill(&self, pid: u32, signal: i32, process_group: bool) -> Result<()> {
        self.grpc()
            .kill(KillRequest {
                pid,
                signal,
                process_group,
            })
            .await?;
        Ok(())
    }

    /// Reads a whole file.
    pub async fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        self.read_file_range(path, 0, 0).await
    }

    /// Reads `length` bytes (0 = to the end) from `offset`.
    pub async fn read_file_range(&self, path: &str, offset: u64, length: u64) -> Result<Vec<u8>> {
        let mut stream = self
            .grpc()
            .read_file(ReadFileRequest {
                path: path.to_owned(),
                offset,
                length,
                chunk_size: 0,
            })
            .await?
            .into_inner();
        let mut data = Vec::new();
        let mut expected_offset = offset;
        while let Some(chunk) = stream.message().await? {
            if chunk.offset != expected_offset {
                return Err(ClientError::Protocol(format!(
                    "chunk at offset {} where {expected_offset} was expected",
                    chunk.offset
                )));
            }
            expected_offset = expected_offset.saturating_add(chunk.data.len() as u64);
            data.extend_from_slice(&chunk.data);
        }
        Ok(data)
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
            .grpc()
            .write_file(tokio_stream::iter(requests))
            .await?
            .into_inner();
        Ok(response.bytes_written)
    }

    /// Streams a whole file into `writer`; returns the bytes copied.
    pub async fn read_file_to<W>(&self, path: &str, writer: &mut W) -> Result<u64>
    where
        W: AsyncWrite + Unpin,
    {
        let mut stream = self
            .grpc()
            .read_file(ReadFileRequest {
                path: path.to_owned(),
                ..ReadFileRequest::default()
            })
            .await?
            .into_inner();
        let mut copied: u64 = 0;
        while let Some(chunk) = stream.message().await? {
            if chunk.offset != copied {
                return Err(ClientError::Protocol(format!(
                    "chunk at offset {} where {copied} was expected",
                    chunk.offset
                )));
            }
            writer
                .write_all(&chunk.data)
                .await
                .map_err(ClientError::Local)?;
            copied = copied.saturating_add(chunk.data.len() as u64);
        }
        writer.flush().await.map_err(ClientError::Local)?;
        Ok(copied)
    }

    /// Streams `reader` into `path` without buffering it whole; returns the
    /// bytes written. If reading fails, the call is cancelled (the agent
    /// reports an error instead of completing a truncated write).
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
        let mut grpc = self.grpc();
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
                Ok(()) => call.await?,
                Err((err, sender)) => {
                    drop(call);
                    drop(sender);
                    return Err(ClientError::Local(err));
                }
            },
            response = &mut call => response?,
        };
        Ok(response.into_inner().bytes_written)
    }

    /// Directory entries sorted by name (symlinks not followed).
    pub async fn list_dir(&self, path: &str) -> Result<Vec<FileInfo>> {
        let response = self
            .grpc()
            .list_dir(ListDirRequest {
                path: path.to_owned(),
            })
            .await?
            .into_inner();
        Ok(response.entries)
    }

    /// Metadata of `path`, following symlinks.
    pub async fn stat(&self, path: &str) -> Result<FileInfo> {
        let response = self
            .grpc()
            .stat(StatRequest {
                path: path.to_owned(),
                no_follow_symlinks: false,
            })
            .await?
            .into_inner();
        response
            .info
            .ok_or_else(|| ClientError::Protocol("stat reply without info".into()))
    }

    /// Creates a directory (mode 0o755); `parents` behaves like `mkdir -p`.
    pub async fn mkdir(&self, path: &str, parents: bool) -> Result<()> {
        self.grpc()
            .make_dir(MakeDirRequest {
                path: path.to_owned(),
                mode: 0,
                parents,
            })
            .await?;
        Ok(())
    }

    /// Removes a file or directory (`recursive` for non-empty directories).
    pub async fn remove(&self, path: &str, recursive: bool) -> Result<()> {
        self.grpc()
            .remove(RemoveRequest {
                path: path.to_owned(),
                recursive,
            })
            .await?;
        Ok(())
    }

    pub async fn exists(&self, path: &str) -> Result<bool> {
        let response = self
            .grpc()
            .exists(ExistsRequest {
                path: path.to_owned(),
            })
            .await?
            .into_inner();
        Ok(response.exists)
    }

    pub async fn rename(&self, from: &str, to: &str) -> Result<()> {
        self.grpc()
            .rename(RenameRequest {
                from: from.to_owned(),
                to: to.to_owned(),
            })
            .await?;
        Ok(())
    }

    pub async fn ping(&self) -> Result<PingResponse> {
        Ok(self.grpc().ping(PingRequest {}).await?.into_inner())
    }

    pub async fn sync_fs(&self) -> Result<()> {
        self.grpc().sync_fs(SyncFsRequest {}).await?;
        Ok(())
    }

    /// Sets the guest's wall clock.
    pub async fn set_time(&self, time: SystemTime) -> Result<()> {
        let unix_nanos = time
            .duration_since(UNIX_EPOCH)
            .ok()
            .and_then(|since| i64::try_from(since.as_nanos()).ok())
            .ok_or_else(|| ClientError::Protocol("time not representable".into()))?;
        self.grpc().set_time(SetTimeRequest { unix_nanos }).await?;
        Ok(())
    }

    /// Syncs and powers off / reboots the guest (or stops a non-init agent).
    pub async fn shutdown(&self, action: ShutdownAction) -> Result<()> {
        self.grpc()
            .shutdown(ShutdownRequest {
                action: action.into(),
            })
            .await?;
        Ok(())
    }
}
