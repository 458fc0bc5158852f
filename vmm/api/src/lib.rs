//! The control API of a running VM: JSON over HTTP/1.1 on a Unix socket (docs/api.md).
//!
//! The VM implements [`VmControl`]; [`ApiServer`] serves it on its own threads with a small,
//! strict HTTP parser ([`http`]); [`client::ApiClient`] is the other end (`dormouse ctl`).
//!
//! | Method | Path              | Body                          | Success                  |
//! |--------|-------------------|-------------------------------|--------------------------|
//! | GET    | `/v1/vm`          | –                             | 200 [`VmInfo`]           |
//! | PUT    | `/v1/vm/pause`    | –                             | 204                      |
//! | PUT    | `/v1/vm/resume`   | –                             | 204                      |
//! | PUT    | `/v1/vm/snapshot` | [`SnapshotRequest`]           | 200 [`SnapshotInfo`]     |
//! | PUT    | `/v1/vm/shutdown` | –                             | 204                      |
//! | PUT    | `/v1/agent/wait`  | [`AgentWaitRequest`]          | 200 [`AgentInfo`]        |
//! | PUT    | `/v1/vsock/connect` | [`VsockConnectRequest`]     | 101, then a raw stream   |
//! | PATCH  | `/v1/vm/drives/{i}` | [`DriveUpdate`]             | 200 [`DriveUpdate`]      |
//! | PATCH  | `/v1/vm/nets/{i}` | [`NetUpdate`]                 | 200 [`NetUpdate`]        |
//! | PUT    | `/v1/vm/balloon`  | [`BalloonUpdate`]             | 200 [`BalloonInfo`]      |

// Guest memory, snapshot files and API requests are hostile input: outside tests, nothing may
// unwrap or expect (a panic would end the VM). Tests may.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod agent_link;
pub mod client;
mod error;
pub mod http;
/// Public so the fuzz targets (tests/fuzz) can route parsed requests to a fake VM.
pub mod router;
mod server;
mod socket;
mod types;
mod upgrade;
mod vm_control;

pub use vm_control::balloon_info;

#[cfg(test)]
mod tests;

pub use error::ApiError;
pub use server::{ApiServer, ApiServerConfig, ApiSocket};
pub use types::{
    AgentInfo, AgentWaitRequest, BalloonInfo, BalloonUpdate, DeviceInfo, DriveUpdate, ErrorBody,
    NetUpdate, RateLimiter, SnapshotInfo, SnapshotRequest, TokenBucket, VmInfo, VmState,
    VsockConnectRequest,
};

/// Called once with the outcome of a [`VmControl::vsock_connect`]: `Ok(host port)` when the
/// guest accepted, before any guest byte is forwarded.
pub type VsockAnswer = Box<dyn FnOnce(std::io::Result<u32>) + Send>;

/// What a VM offers its control API. Methods are called from API connection threads, possibly
/// concurrently, never from a vCPU or device thread; each returns when its request is done.
///
/// The error variant picks the HTTP status: [`ApiError::WrongState`] → 409,
/// [`ApiError::InvalidRequest`] → 400, anything else → 500.
pub trait VmControl: Send + Sync + 'static {
    /// Stops all vCPUs (they are out of KVM_RUN when this returns). 409 if already paused.
    fn pause(&self) -> Result<(), ApiError>;
    /// Lets paused vCPUs run again. 409 if not paused.
    fn resume(&self) -> Result<(), ApiError>;
    /// Writes a snapshot to `req.dir` (an absolute path; the router checks). A running VM is
    /// paused for the duration and resumed afterwards; a paused one stays paused. With
    /// `req.diff`, only pages dirtied since the previous snapshot are written (409 if there is
    /// no previous snapshot to be the parent).
    fn snapshot(&self, req: SnapshotRequest) -> Result<SnapshotInfo, ApiError>;
    /// Asks the VM to stop and returns at once; the VM tears down (and drops the
    /// [`ApiServer`]) afterwards on its own thread, so the answer still reaches the client.
    fn shutdown(&self) -> Result<(), ApiError>;
    fn info(&self) -> Result<VmInfo, ApiError>;
    /// Answers a request outside dormouse's own `/v1/` routes (the Firecracker-compatible API
    /// of `vmm-fc-api` serves its paths this way on the same socket). `None`: 404.
    fn route_foreign(&self, request: &http::Request) -> Option<http::Response> {
        let _ = request;
        None
    }
    /// The VM's counters (docs/metrics.md): `GET /metrics` shows them and the server counts
    /// its requests there. `None`: 404 and nothing counted.
    fn metrics(&self) -> Option<vmm_metrics::VmMetrics> {
        None
    }
    /// Ends the VM as failed: the API thread serving it panicked (see `thread_guard`).
    fn report_failure(&self, reason: String) {
        tracing::error!("{reason}");
    }
    /// Test builds only: makes `thread` of the VM panic or make a forbidden system call (see
    /// `vmm::fault`).
    #[cfg(feature = "fault-injection")]
    fn inject_fault(
        &self,
        thread: vmm::fault::FaultThread,
        kind: vmm::fault::FaultKind,
    ) -> Result<(), ApiError> {
        let _ = (thread, kind);
        Err(ApiError::wrong_state("this VM cannot inject faults"))
    }
    /// The seccomp level of the VM's threads: the server's threads install the `api` filter
    /// at the same level (see `vmm::seccomp`). Unfiltered unless the VM says otherwise.
    fn seccomp_level(&self) -> vmm::seccomp::SeccompLevel {
        vmm::seccomp::SeccompLevel::Off
    }
    /// Waits up to `timeout` for the guest agent's readiness announcement. 409 when the VM
    /// cannot hear one (no vsock device), 504 on timeout.
    fn wait_agent(&self, timeout: std::time::Duration) -> Result<AgentInfo, ApiError> {
        let _ = timeout;
        Err(ApiError::wrong_state("this VM has no guest agent channel"))
    }
    /// Changes the I/O limits of disk `index` (Firecracker's PATCH semantics: an absent bucket
    /// is kept, a zero-sized one switched off) and answers the limits now in force. 400 for a
    /// disk the VM does not have.
    fn update_drive(&self, index: usize, update: DriveUpdate) -> Result<DriveUpdate, ApiError> {
        let _ = (index, update);
        Err(ApiError::wrong_state(
            "this VM cannot change its disks' limits",
        ))
    }
    /// As [`Self::update_drive`] for network device `index` (RX and TX limits).
    fn update_net(&self, index: usize, update: NetUpdate) -> Result<NetUpdate, ApiError> {
        let _ = (index, update);
        Err(ApiError::wrong_state(
            "this VM cannot change its network devices' limits",
        ))
    }
    /// Changes the balloon's target and/or statistics interval and answers its state. 409
    /// without a balloon device, 400 for a target larger than the VM's memory.
    fn set_balloon(&self, update: BalloonUpdate) -> Result<BalloonInfo, ApiError> {
        let _ = update;
        Err(ApiError::wrong_state("this VM has no balloon device"))
    }
    /// Hands `stream` to the vsock device as a connection to guest `port` and returns at once;
    /// `on_answer` reports the guest's answer (see [`VsockAnswer`]). 409 when the VM has no
    /// in-process vsock.
    fn vsock_connect(
        &self,
        stream: std::os::unix::net::UnixStream,
        port: u32,
        on_answer: VsockAnswer,
    ) -> Result<(), ApiError> {
        let _ = (stream, port, on_answer);
        Err(ApiError::wrong_state("this VM has no vsock device"))
    }
}
