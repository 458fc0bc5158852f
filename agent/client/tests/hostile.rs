//! A hostile agent: a server speaking the agent protocol that streams without end, lies about
//! sizes and stalls. Each call must fail with the right error within its timeout, and the
//! host's memory must stay bounded.
//!
//! The hostile server runs in a child process (this test binary, re-run as the ignored test
//! `hostile_agent_server`), so the client's peak RSS is measured alone.

use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

// `::`: the glob import below also brings the generated module `agent_client`.
use ::agent_client::{AgentClient, AgentClientConfig, ClientError, ExecCommand, ReplyLimits};
use agent_proto::agent_server::{Agent, AgentServer};
use agent_proto::*;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

const SOCKET_ENV: &str = "DORMOUSE_HOSTILE_AGENT_SOCKET";
const MIB: usize = 1024 * 1024;
const CHUNK: usize = 64 * 1024;
/// What a single oversized message carries.
const HUGE: usize = 200 * MIB;
const CALL_TIMEOUT: Duration = Duration::from_secs(1);

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Lies according to the path or command it is given; `ping` reports the bytes it has put
/// into endless streams so far (in `uptime_ms`).
#[derive(Default, Clone)]
struct Hostile {
    streamed: Arc<AtomicU64>,
}

impl Hostile {
    /// An endless stream of 64 KiB items, counted as they are produced.
    fn endless<T: Send + 'static>(
        &self,
        first: Option<T>,
        mut item: impl FnMut(u64) -> T + Send + 'static,
    ) -> BoxStream<T> {
        let streamed = Arc::clone(&self.streamed);
        let mut offset = 0u64;
        let rest = std::iter::repeat_with(move || {
            streamed.fetch_add(CHUNK as u64, Ordering::Relaxed);
            let next = item(offset);
            offset += CHUNK as u64;
            Ok(next)
        });
        Box::pin(tokio_stream::iter(first.map(Ok).into_iter().chain(rest)))
    }
}

async fn stall<T>() -> T {
    std::future::pending().await
}

#[tonic::async_trait]
impl Agent for Hostile {
    async fn exec(&self, request: Request<ExecRequest>) -> Result<Response<ExecResponse>, Status> {
        let command = request.into_inner().process.unwrap_or_default().command;
        let stdout_len = match command.as_str() {
            "stall" => stall().await,
            // One reply far above any limit.
            "huge" => HUGE,
            // Within the message limit, but ignores the requested truncation.
            _ => 20 * MIB,
        };
        Ok(Response::new(ExecResponse {
            stdout: vec![b'x'; stdout_len],
            status: Some(ExitStatus {
                outcome: Some(exit_status::Outcome::Code(0)),
                timed_out: false,
            }),
            ..ExecResponse::default()
        }))
    }

    type ExecStreamStream = BoxStream<ExecStreamResponse>;

    async fn exec_stream(
        &self,
        request: Request<Streaming<ExecStreamRequest>>,
    ) -> Result<Response<Self::ExecStreamStream>, Status> {
        let mut requests = request.into_inner();
        let start = match requests.message().await?.and_then(|r| r.msg) {
            Some(exec_stream_request::Msg::Start(start)) => start,
            _ => return Err(Status::invalid_argument("no start")),
        };
        if start.process.unwrap_or_default().command == "stall" {
            // Never says `started`.
            return stall().await;
        }
        let started = ExecStreamResponse {
            event: Some(exec_stream_response::Event::Started(Started { pid: 42 })),
        };
        // Output without end, and never an exit.
        let stream = self.endless(Some(started), |_| ExecStreamResponse {
            event: Some(exec_stream_response::Event::Stdout(vec![b'o'; CHUNK])),
        });
        Ok(Response::new(stream))
    }

    async fn kill(&self, _: Request<KillRequest>) -> Result<Response<KillResponse>, Status> {
        Err(Status::unimplemented("kill"))
    }

    async fn exec_start(
        &self,
        request: Request<ExecStartRequest>,
    ) -> Result<Response<ExecStartResponse>, Status> {
        let command = request.into_inner().process.unwrap_or_default().command;
        let session_id = match command.as_str() {
            "bad-id" => "../../etc/passwd".to_owned(),
            _ => "a".repeat(32),
        };
        Ok(Response::new(ExecStartResponse {
            session_id,
            pid: 42,
        }))
    }

    async fn exec_list(
        &self,
        _: Request<ExecListRequest>,
    ) -> Result<Response<ExecListResponse>, Status> {
        // Far more (and longer) entries than any agent holds: over the message limit.
        let session = SessionInfo {
            session_id: "a".repeat(32),
            command: "c".repeat(4096),
            ..SessionInfo::default()
        };
        Ok(Response::new(ExecListResponse {
            sessions: vec![session; 1024],
        }))
    }

    type ExecAttachStream = BoxStream<ExecAttachResponse>;

    async fn exec_attach(
        &self,
        request: Request<Streaming<ExecAttachRequest>>,
    ) -> Result<Response<Self::ExecAttachStream>, Status> {
        let mut requests = request.into_inner();
        let id = match requests.message().await?.and_then(|r| r.msg) {
            Some(exec_attach_request::Msg::SessionId(id)) => id,
            _ => return Err(Status::invalid_argument("no session id")),
        };
        let attached = ExecAttachResponse {
            event: Some(exec_attach_response::Event::Attached(Attached { pid: 42 })),
        };
        // "b…": the same bytes again and again (offset 0); otherwise output without end.
        let repeats = id.starts_with('b');
        let stream = self.endless(Some(attached), move |offset| ExecAttachResponse {
            event: Some(exec_attach_response::Event::Stdout(OutputChunk {
                offset: if repeats { 0 } else { offset },
                data: vec![b'o'; CHUNK],
            })),
        });
        Ok(Response::new(stream))
    }

    async fn exec_kill(
        &self,
        _: Request<ExecKillRequest>,
    ) -> Result<Response<ExecKillResponse>, Status> {
        Err(Status::unimplemented("exec_kill"))
    }

    async fn exec_wait(&self, _: Request<ExecWaitRequest>) -> Result<Response<ExitStatus>, Status> {
        // An exit status without an outcome.
        Ok(Response::new(ExitStatus::default()))
    }

    type ReadFileStream = BoxStream<FileChunk>;

    async fn read_file(
        &self,
        request: Request<ReadFileRequest>,
    ) -> Result<Response<Self::ReadFileStream>, Status> {
        let request = request.into_inner();
        let start = request.offset;
        let stream: BoxStream<FileChunk> = match request.path.as_str() {
            "/huge-chunk" => Box::pin(tokio_stream::once(Ok(FileChunk {
                offset: start,
                data: vec![b'h'; HUGE],
            }))),
            "/stall" => {
                let first = tokio_stream::once(Ok(FileChunk {
                    offset: start,
                    data: vec![b's'; 10],
                }));
                Box::pin(tokio_stream::StreamExt::chain(
                    first,
                    tokio_stream::pending(),
                ))
            }
            // Whatever length was asked for: chunks without end, at the right offsets.
            _ => self.endless(None, move |offset| FileChunk {
                offset: start + offset,
                data: vec![b'f'; CHUNK],
            }),
        };
        Ok(Response::new(stream))
    }

    async fn write_file(
        &self,
        _: Request<Streaming<WriteFileRequest>>,
    ) -> Result<Response<WriteFileResponse>, Status> {
        Err(Status::unimplemented("write_file"))
    }

    async fn list_dir(
        &self,
        request: Request<ListDirRequest>,
    ) -> Result<Response<ListDirResponse>, Status> {
        let entries = match request.into_inner().path.as_str() {
            "/stall" => stall().await,
            // Three million empty entries: 6 MB on the wire, ~270 MB decoded naively.
            "/millions" => vec![FileInfo::default(); 3_000_000],
            // Few entries, far more bytes than the listing limit.
            _ => vec![
                FileInfo {
                    name: "n".repeat(1000),
                    ..FileInfo::default()
                };
                40_000
            ],
        };
        Ok(Response::new(ListDirResponse { entries }))
    }

    async fn stat(&self, request: Request<StatRequest>) -> Result<Response<StatResponse>, Status> {
        match request.into_inner().path.as_str() {
            "/stall" => stall().await,
            "/long-error" => Err(Status::not_found("e".repeat(10_000))),
            _ => Ok(Response::new(StatResponse {
                info: Some(FileInfo {
                    name: "n".repeat(HUGE),
                    ..FileInfo::default()
                }),
            })),
        }
    }

    async fn make_dir(
        &self,
        _: Request<MakeDirRequest>,
    ) -> Result<Response<MakeDirResponse>, Status> {
        stall().await
    }

    async fn remove(&self, _: Request<RemoveRequest>) -> Result<Response<RemoveResponse>, Status> {
        stall().await
    }

    async fn exists(&self, _: Request<ExistsRequest>) -> Result<Response<ExistsResponse>, Status> {
        stall().await
    }

    async fn rename(&self, _: Request<RenameRequest>) -> Result<Response<RenameResponse>, Status> {
        stall().await
    }

    async fn ping(&self, _: Request<PingRequest>) -> Result<Response<PingResponse>, Status> {
        Ok(Response::new(PingResponse {
            version: "hostile".into(),
            uptime_ms: self.streamed.load(Ordering::Relaxed),
            ..PingResponse::default()
        }))
    }

    async fn sync_fs(&self, _: Request<SyncFsRequest>) -> Result<Response<SyncFsResponse>, Status> {
        stall().await
    }

    async fn set_time(
        &self,
        _: Request<SetTimeRequest>,
    ) -> Result<Response<SetTimeResponse>, Status> {
        stall().await
    }

    async fn shutdown(
        &self,
        _: Request<ShutdownRequest>,
    ) -> Result<Response<ShutdownResponse>, Status> {
        stall().await
    }
}

/// The child process: serves the hostile agent until killed. Does nothing when run by hand.
#[test]
#[ignore = "the hostile agent's server process, started by `hostile_agent_is_contained`"]
fn hostile_agent_server() {
    let Some(socket) = std::env::var_os(SOCKET_ENV) else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        tonic::transport::Server::builder()
            .add_service(AgentServer::new(Hostile::default()))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
            .await
            .unwrap();
    });
}

/// Kills the server process when the test ends, however it ends.
struct ServerProcess(Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|line| line.starts_with(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Runs `call`, expecting it to fail within `within`; returns the error.
async fn fails<T: std::fmt::Debug>(
    what: &str,
    within: Duration,
    call: impl std::future::Future<Output = Result<T, ClientError>>,
) -> ClientError {
    let started = Instant::now();
    let result = tokio::time::timeout(within + Duration::from_secs(10), call)
        .await
        .unwrap_or_else(|_| panic!("{what}: still running long after its timeout"));
    let elapsed = started.elapsed();
    let error = result.expect_err(what);
    assert!(
        elapsed <= within,
        "{what}: failed after {elapsed:?}, allowed {within:?}"
    );
    let mut message = error.to_string();
    message.truncate(200);
    println!("{what}: {message} ({elapsed:?})");
    error
}

fn too_large(error: &ClientError, expected_what: &str, expected_limit: usize) {
    match error {
        ClientError::ResponseTooLarge {
            what,
            limit,
            at_least,
        } => {
            assert_eq!(*what, expected_what, "{error}");
            assert_eq!(*limit, expected_limit as u64, "{error}");
            assert!(at_least > limit, "{error}");
        }
        other => panic!("expected ResponseTooLarge({expected_what}), got {other:?}"),
    }
}

fn timed_out(error: &ClientError, expected: &str) {
    timed_out_after(error, expected, CALL_TIMEOUT);
}

fn timed_out_after(error: &ClientError, expected: &str, expected_timeout: Duration) {
    match error {
        ClientError::Timeout { operation, timeout } => {
            assert_eq!(*operation, expected);
            assert_eq!(*timeout, expected_timeout);
        }
        other => panic!("expected Timeout({expected}), got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_agent_is_contained() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("hostile.sock");
    let _server = ServerProcess(
        Command::new(std::env::current_exe().unwrap())
            .args([
                "hostile_agent_server",
                "--exact",
                "--ignored",
                "--nocapture",
            ])
            .env(SOCKET_ENV, &socket)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "the hostile server did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let limits = ReplyLimits {
        // Small enough that the whole run must stay far below what the server sends.
        max_file_bytes: 16 * MIB,
        ..ReplyLimits::default()
    };
    let client = AgentClient::connect_unix(&socket)
        .await
        .unwrap()
        .with_config(AgentClientConfig {
            limits,
            call_timeout: Some(CALL_TIMEOUT),
        });
    assert_eq!(client.ping().await.unwrap().version, "hostile");
    // The same connection with room for the server to build its huge replies (slow in a debug
    // build); the size checks must fire long before this.
    let patient = client.clone().with_config(AgentClientConfig {
        limits,
        call_timeout: Some(Duration::from_secs(60)),
    });

    // Peak RSS from here on ("5" resets VmHWM to the current RSS).
    let rss_before = status_kib("VmRSS:");
    if let Err(e) = std::fs::write("/proc/self/clear_refs", "5") {
        // Without the reset the peak since start counts, which only makes the check stricter.
        println!("cannot reset VmHWM ({e}); measuring from the process start");
    }
    let quick = Duration::from_secs(30);
    let stalled = CALL_TIMEOUT + Duration::from_secs(2);

    // (a) Output without end: `wait` stops at the per-stream cap and drops the stream.
    let session = client
        .exec_stream(&ExecCommand::new("endless"))
        .await
        .unwrap();
    let error = fails(
        "endless exec_stream wait",
        Duration::from_secs(30),
        session.wait(),
    )
    .await;
    too_large(&error, "exec stdout", limits.max_exec_output_bytes);
    // Dropped, not drained: the server stops producing once its stream is reset.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = patient.ping().await.unwrap().uptime_ms;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent_later = patient.ping().await.unwrap().uptime_ms;
    println!(
        "endless exec: the server produced {} MiB before the reset",
        sent / MIB as u64
    );
    assert_eq!(
        sent, sent_later,
        "the server kept streaming after the error"
    );
    assert!(sent < 64 * MIB as u64, "the client drained {sent} bytes");

    // Whole-file read of an endless file: stops at max_file_bytes.
    let error = fails(
        "endless read_file",
        Duration::from_secs(30),
        patient.read_file("/endless"),
    )
    .await;
    too_large(&error, "read_file", limits.max_file_bytes);

    // (b) Lies about sizes. A range read gets more than it asked for.
    let error = fails(
        "lying range read",
        quick,
        patient.read_file_range("/f", 10, 1000),
    )
    .await;
    too_large(&error, "read_file (requested length)", 1000);
    // One huge chunk: refused from its length prefix, before it is buffered.
    let error = fails(
        "200 MiB read chunk",
        quick,
        patient.read_file("/huge-chunk"),
    )
    .await;
    too_large(&error, "read_file", limits.max_message_bytes);
    // A 200 MiB exec reply.
    let error = fails(
        "200 MiB exec reply",
        quick,
        patient.exec(&ExecCommand::new("huge")),
    )
    .await;
    too_large(&error, "exec", limits.max_exec_total_bytes + 64 * 1024);
    // An exec reply that ignores the requested truncation.
    let command = ExecCommand::new("ignores-truncation").max_output_bytes(1024);
    let error = fails("untruncated exec reply", quick, patient.exec(&command)).await;
    too_large(&error, "exec stdout", 1024);
    // Millions of (2-byte) directory entries.
    let error = fails("3M-entry listing", quick, patient.list_dir("/millions")).await;
    too_large(&error, "list_dir (entries)", limits.max_dir_entries);
    // A listing above the byte limit.
    let error = fails("40 MB listing", quick, patient.list_dir("/bulky")).await;
    too_large(&error, "list_dir", limits.max_dir_bytes);
    // A 200 MiB stat reply.
    let error = fails("200 MiB stat reply", quick, patient.stat("/huge")).await;
    too_large(&error, "stat", limits.max_message_bytes);
    // A 10 kB error message is cut to 1 KiB.
    let error = fails("long error message", quick, patient.stat("/long-error")).await;
    assert_eq!(error.code(), Some(tonic::Code::NotFound));
    assert!(
        error.to_string().len() < 1200,
        "{}",
        error.to_string().len()
    );

    // (c) Stalls: each call ends at its timeout.
    timed_out(
        &fails("stalled stat", stalled, client.stat("/stall")).await,
        "stat",
    );
    timed_out(
        &fails("stalled list_dir", stalled, client.list_dir("/stall")).await,
        "list_dir",
    );
    timed_out(
        &fails("stalled mkdir", stalled, client.mkdir("/x", false)).await,
        "mkdir",
    );
    timed_out(
        &fails("stalled sync_fs", stalled, client.sync_fs()).await,
        "sync_fs",
    );
    let error = fails(
        "stalled read_file chunk",
        stalled,
        client.read_file("/stall"),
    )
    .await;
    timed_out(&error, "read_file");
    let error = fails(
        "stalled exec_stream start",
        stalled,
        client.exec_stream(&ExecCommand::new("stall")),
    )
    .await;
    timed_out(&error, "exec_stream");
    // exec of a command with a timeout: that timeout plus the call timeout.
    let command = ExecCommand::new("stall").timeout(Duration::from_secs(1));
    let error = fails(
        "stalled exec",
        stalled + Duration::from_secs(1),
        client.exec(&command),
    )
    .await;
    timed_out_after(&error, "exec", Duration::from_secs(1) + CALL_TIMEOUT);

    // Detached sessions: a malformed id, an oversized list, endless and repeated output, an
    // exit status without an outcome.
    let error = fails(
        "malformed session id",
        quick,
        client.exec_start(&ExecCommand::new("bad-id"), false),
    )
    .await;
    assert!(matches!(error, ClientError::Protocol(_)), "{error}");
    let error = fails("oversized exec_list", quick, client.exec_list()).await;
    too_large(&error, "exec_list", limits.max_message_bytes);
    let started = client
        .exec_start(&ExecCommand::new("x"), false)
        .await
        .unwrap();
    let attachment = client.exec_attach(&started.id).await.unwrap();
    let error = fails(
        "endless exec_attach wait",
        Duration::from_secs(30),
        attachment.wait(),
    )
    .await;
    too_large(&error, "exec stdout", limits.max_exec_output_bytes);
    let repeating: ::agent_client::ExecSessionId = "b".repeat(32).parse().unwrap();
    let mut attachment = client.exec_attach(&repeating).await.unwrap();
    attachment.next_event().await.unwrap();
    let error = fails("repeated output", quick, attachment.next_event()).await;
    assert!(matches!(error, ClientError::Protocol(_)), "{error}");
    let error = fails("outcome-less wait", quick, client.exec_wait(&started.id)).await;
    assert!(matches!(error, ClientError::Protocol(_)), "{error}");

    // The connection still works after all that.
    assert_eq!(client.ping().await.unwrap().version, "hostile");

    let peak = status_kib("VmHWM:");
    let growth_mib = peak.saturating_sub(rss_before) / 1024;
    println!(
        "client RSS before {} MiB, peak {} MiB, growth {growth_mib} MiB",
        rss_before / 1024,
        peak / 1024
    );
    assert!(growth_mib < 64, "client peak RSS grew by {growth_mib} MiB");
}
