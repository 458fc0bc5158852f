//! The gRPC service that runs inside the guest.

mod boot_script;
mod driver;
mod exec;
mod exec_defaults;
mod fast_spawn;
mod files;
mod paths;
mod process;
mod reaper;
mod sessions;
mod status;
mod system;
mod user;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

pub use boot_script::run_boot_script;
pub use driver::ProcessTable;
pub use exec_defaults::{ExecDefaults, EXEC_DEFAULTS_FILE};
pub use process::DEFAULT_PATH;
pub use system::{power_off_now, LinuxSystem, SystemControl};

use crate::proto::agent_server::{Agent, AgentServer};
use crate::proto::*;
use agent_proto::limits::MAX_MESSAGE_BYTES;
use status::{invalid, io_status};

/// Agent version reported by `Ping` and the readiness line.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Delay between answering `Shutdown` and acting on it, so the reply leaves.
const SHUTDOWN_DELAY: Duration = Duration::from_millis(50);

/// How the service interacts with the machine.
#[derive(Clone)]
pub struct AgentConfig {
    /// Clock, sync and power operations.
    pub system: Arc<dyn SystemControl>,
    /// Reported by `Ping`; the real system powers off only when set.
    pub is_init: bool,
}

impl AgentConfig {
    /// Real syscalls; `is_init` from `getpid() == 1`.
    pub fn detect() -> Self {
        let is_init = std::process::id() == 1;
        // Read the image's exec defaults now, before any snapshot of this guest is taken.
        exec_defaults::installed();
        Self {
            system: Arc::new(LinuxSystem { is_init }),
            is_init,
        }
    }
}

/// Implementation of the `dormouse.agent.v1.Agent` service. Cheap to clone.
#[derive(Clone)]
pub struct AgentService {
    processes: ProcessTable,
    sessions: sessions::Sessions,
    system: Arc<dyn SystemControl>,
    is_init: bool,
    started: Instant,
    stop_sender: Arc<watch::Sender<bool>>,
    stop: watch::Receiver<bool>,
}

impl AgentService {
    pub fn new(config: AgentConfig) -> Self {
        let (stop_sender, stop) = watch::channel(false);
        Self {
            processes: ProcessTable::default(),
            sessions: sessions::Sessions::default(),
            system: config.system,
            is_init: config.is_init,
            started: Instant::now(),
            stop_sender: Arc::new(stop_sender),
            stop,
        }
    }

    /// Processes started through `Exec`/`ExecStream`/`ExecStart` that still
    /// run (for SIGTERM forwarding).
    pub fn processes(&self) -> ProcessTable {
        self.processes.clone()
    }

    /// Resolves once `Shutdown` has been handled (or [`Self::request_stop`]).
    pub async fn stopped(&self) {
        let mut stop = self.stop.clone();
        let _ = stop.wait_for(|stopped| *stopped).await;
    }

    /// Makes [`Self::stopped`] resolve: the server stops accepting calls.
    pub fn request_stop(&self) {
        self.stop_sender.send_replace(true);
    }

    /// The tonic service with the agent's message size limits.
    pub fn into_grpc(self) -> AgentServer<Self> {
        AgentServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn exec(&self, request: Request<ExecRequest>) -> Result<Response<ExecResponse>, Status> {
        exec::exec(request.into_inner(), &self.processes)
            .await
            .map(Response::new)
    }

    type ExecStreamStream = exec::ExecEventStream;

    async fn exec_stream(
        &self,
        request: Request<Streaming<ExecStreamRequest>>,
    ) -> Result<Response<Self::ExecStreamStream>, Status> {
        exec::exec_stream(request.into_inner(), &self.processes)
            .await
            .map(Response::new)
    }

    async fn kill(&self, request: Request<KillRequest>) -> Result<Response<KillResponse>, Status> {
        let request = request.into_inner();
        let pid = libc::pid_t::try_from(request.pid)
            .ok()
            .filter(|pid| *pid > 0)
            .ok_or_else(|| invalid(format!("invalid pid {}", request.pid)))?;
        if request.pid == std::process::id() || pid == 1 {
            return Err(invalid("refusing to signal the agent or init"));
        }
        // Signal 0 probes, as in kill(2): nothing is sent, ESRCH says the target is gone.
        let target = if request.process_group { -pid } else { pid };
        // SAFETY: kill has no memory effects.
        if unsafe { libc::kill(target, request.signal) } == -1 {
            let err = std::io::Error::last_os_error();
            return Err(io_status(format!("cannot signal {pid}"), &err));
        }
        Ok(Response::new(KillResponse {}))
    }

    async fn exec_start(
        &self,
        request: Request<ExecStartRequest>,
    ) -> Result<Response<ExecStartResponse>, Status> {
        self.sessions
            .start(request.into_inner(), &self.processes)
            .await
            .map(Response::new)
    }

    async fn exec_list(
        &self,
        _request: Request<ExecListRequest>,
    ) -> Result<Response<ExecListResponse>, Status> {
        Ok(Response::new(self.sessions.list()))
    }

    type ExecAttachStream = sessions::AttachStream;

    async fn exec_attach(
        &self,
        request: Request<Streaming<ExecAttachRequest>>,
    ) -> Result<Response<Self::ExecAttachStream>, Status> {
        self.sessions
            .attach(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn exec_kill(
        &self,
        request: Request<ExecKillRequest>,
    ) -> Result<Response<ExecKillResponse>, Status> {
        self.sessions.kill(&request.into_inner())?;
        Ok(Response::new(ExecKillResponse {}))
    }

    async fn exec_wait(
        &self,
        request: Request<ExecWaitRequest>,
    ) -> Result<Response<ExitStatus>, Status> {
        self.sessions
            .wait(&request.into_inner().session_id)
            .await
            .map(Response::new)
    }

    type ReadFileStream = files::ChunkStream;

    async fn read_file(
        &self,
        request: Request<ReadFileRequest>,
    ) -> Result<Response<Self::ReadFileStream>, Status> {
        files::read_file(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn write_file(
        &self,
        request: Request<Streaming<WriteFileRequest>>,
    ) -> Result<Response<WriteFileResponse>, Status> {
        files::write_file(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_dir(
        &self,
        request: Request<ListDirRequest>,
    ) -> Result<Response<ListDirResponse>, Status> {
        files::list_dir(&request.into_inner().path)
            .await
            .map(Response::new)
    }

    async fn stat(&self, request: Request<StatRequest>) -> Result<Response<StatResponse>, Status> {
        let request = request.into_inner();
        let info = files::stat(&request.path, !request.no_follow_symlinks).await?;
        Ok(Response::new(StatResponse { info: Some(info) }))
    }

    async fn make_dir(
        &self,
        request: Request<MakeDirRequest>,
    ) -> Result<Response<MakeDirResponse>, Status> {
        let request = request.into_inner();
        files::make_dir(&request.path, request.mode, request.parents).await?;
        Ok(Response::new(MakeDirResponse {}))
    }

    async fn remove(
        &self,
        request: Request<RemoveRequest>,
    ) -> Result<Response<RemoveResponse>, Status> {
        let request = request.into_inner();
        files::remove(&request.path, request.recursive).await?;
        Ok(Response::new(RemoveResponse {}))
    }

    async fn exists(
        &self,
        request: Request<ExistsRequest>,
    ) -> Result<Response<ExistsResponse>, Status> {
        files::exists(&request.into_inner().path)
            .await
            .map(Response::new)
    }

    async fn rename(
        &self,
        request: Request<RenameRequest>,
    ) -> Result<Response<RenameResponse>, Status> {
        let request = request.into_inner();
        files::rename(&request.from, &request.to).await?;
        Ok(Response::new(RenameResponse {}))
    }

    async fn ping(&self, _request: Request<PingRequest>) -> Result<Response<PingResponse>, Status> {
        Ok(Response::new(PingResponse {
            version: VERSION.to_owned(),
            is_init: self.is_init,
            uptime_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            running_processes: u32::try_from(self.processes.len()).unwrap_or(u32::MAX),
        }))
    }

    async fn sync_fs(
        &self,
        _request: Request<SyncFsRequest>,
    ) -> Result<Response<SyncFsResponse>, Status> {
        let system = self.system.clone();
        tokio::task::spawn_blocking(move || system.sync())
            .await
            .map_err(|err| Status::internal(format!("sync task failed: {err}")))?;
        Ok(Response::new(SyncFsResponse {}))
    }

    async fn set_time(
        &self,
        request: Request<SetTimeRequest>,
    ) -> Result<Response<SetTimeResponse>, Status> {
        let unix_nanos = request.into_inner().unix_nanos;
        if unix_nanos <= 0 {
            return Err(invalid("unix_nanos must be positive"));
        }
        self.system
            .set_time(unix_nanos)
            .map_err(|err| io_status("cannot set the clock", &err))?;
        Ok(Response::new(SetTimeResponse {}))
    }

    async fn shutdown(
        &self,
        request: Request<ShutdownRequest>,
    ) -> Result<Response<ShutdownResponse>, Status> {
        let action = ShutdownAction::try_from(request.into_inner().action)
            .map_err(|_| invalid("unknown shutdown action"))?;
        let system = self.system.clone();
        tokio::task::spawn_blocking(move || system.sync())
            .await
            .map_err(|err| Status::internal(format!("sync task failed: {err}")))?;
        let service = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(SHUTDOWN_DELAY).await;
            tracing::info!(?action, "shutting down");
            let system = service.system.clone();
            let _ = tokio::task::spawn_blocking(move || system.power(action)).await;
            service.request_stop();
        });
        Ok(Response::new(ShutdownResponse {}))
    }
}
