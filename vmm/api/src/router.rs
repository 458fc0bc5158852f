//! Maps a parsed request to a [`VmControl`] call and its result to a response.

use super::http::{Request, Response};
use std::time::Duration;

use super::types::{
    AgentWaitRequest, BalloonUpdate, DriveUpdate, NetUpdate, SnapshotRequest, VsockConnectRequest,
};
use super::{ApiError, VmControl};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Endpoint {
    Info,
    Pause,
    Resume,
    Snapshot,
    Shutdown,
    AgentWait,
    /// `PATCH /v1/vm/drives/{index}`: a disk's rate limiter.
    Drive(usize),
    /// `PATCH /v1/vm/nets/{index}`: a network device's rate limiters.
    Net(usize),
    /// `PUT /v1/vm/balloon`: the balloon's target and statistics interval.
    Balloon,
    /// Test builds only (`vmm::fault`).
    #[cfg(feature = "fault-injection")]
    Fault,
}

/// `PUT /v1/vsock/connect` turns the connection into a vsock stream, so the server handles it
/// itself (see `upgrade`); the router only recognises it.
pub const VSOCK_CONNECT_PATH: &str = "/v1/vsock/connect";
/// Longest `PUT /v1/agent/wait` the API serves; clients loop for longer waits.
pub const MAX_AGENT_WAIT: Duration = Duration::from_secs(600);

pub fn is_vsock_connect(request: &Request) -> bool {
    request.path == VSOCK_CONNECT_PATH && request.method == "PUT"
}

pub fn vsock_connect_request(body: &[u8]) -> Result<VsockConnectRequest, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid_request(format!(
            r#"vsock connect needs a JSON body like {{"port": 1024}}: {e}"#
        ))
    })
}

fn agent_wait_request(body: &[u8]) -> Result<Duration, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Duration::ZERO);
    }
    let request: AgentWaitRequest = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid_request(format!("invalid JSON body: {e}")))?;
    Ok(Duration::from_millis(request.timeout_ms).min(MAX_AGENT_WAIT))
}

impl Endpoint {
    fn from_path(path: &str) -> Option<Self> {
        Some(match path {
            "/v1/vm" => Endpoint::Info,
            "/v1/vm/pause" => Endpoint::Pause,
            "/v1/vm/resume" => Endpoint::Resume,
            "/v1/vm/snapshot" => Endpoint::Snapshot,
            "/v1/vm/shutdown" => Endpoint::Shutdown,
            "/v1/agent/wait" => Endpoint::AgentWait,
            "/v1/vm/balloon" => Endpoint::Balloon,
            #[cfg(feature = "fault-injection")]
            "/v1/fault" => Endpoint::Fault,
            _ => {
                if let Some(index) = path.strip_prefix("/v1/vm/drives/") {
                    return device_index(index).map(Endpoint::Drive);
                }
                if let Some(index) = path.strip_prefix("/v1/vm/nets/") {
                    return device_index(index).map(Endpoint::Net);
                }
                return None;
            }
        })
    }

    /// Each endpoint answers exactly one method: GET reads, PUT acts, PATCH changes a device.
    fn method(self) -> &'static str {
        match self {
            Endpoint::Info => "GET",
            Endpoint::Drive(_) | Endpoint::Net(_) => "PATCH",
            _ => "PUT",
        }
    }
}

/// A device index in a path: decimal digits only (no sign, no spaces), at most 4 of them.
fn device_index(s: &str) -> Option<usize> {
    if s.is_empty() || s.len() > 4 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn patch_body<T: serde::de::DeserializeOwned>(body: &[u8], example: &str) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::invalid_request(format!(
            "this request needs a JSON body like {example}"
        )));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid_request(format!("invalid JSON body: {e}")))
}

const DRIVE_EXAMPLE: &str =
    r#"{"rate_limiter": {"bandwidth": {"size": 52428800, "refill_time": 1000}}}"#;
const BALLOON_EXAMPLE: &str = r#"{"target_mib": 512}"#;
const NET_EXAMPLE: &str = r#"{"rx_rate_limiter": {"ops": {"size": 1000, "refill_time": 1000}}}"#;

fn from_api_error(error: &ApiError) -> Response {
    let status = error.status();
    if status >= 500 {
        tracing::warn!("control API: {error}");
    }
    Response::error(status, error.to_string())
}

fn snapshot_request(body: &[u8]) -> Result<SnapshotRequest, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::invalid_request(
            r#"snapshot needs a JSON body: {"dir": "/absolute/path", "diff": false}"#,
        ));
    }
    let request: SnapshotRequest = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid_request(format!("invalid JSON body: {e}")))?;
    if request.dir.as_os_str().is_empty() {
        return Err(ApiError::invalid_request("\"dir\" is empty"));
    }
    if !request.dir.is_absolute() {
        return Err(ApiError::invalid_request(format!(
            "\"dir\" must be an absolute path, got {:?}",
            request.dir
        )));
    }
    Ok(request)
}

/// `PUT /v1/fault` (test builds only): `{"thread": "vcpu"}` (a panic) or
/// `{"thread": "vcpu", "fault": "syscall"}` (a system call no seccomp allowlist has).
#[cfg(feature = "fault-injection")]
#[derive(serde::Deserialize)]
struct FaultRequest {
    thread: vmm::fault::FaultThread,
    #[serde(default)]
    fault: vmm::fault::FaultKind,
}

fn call(control: &dyn VmControl, endpoint: Endpoint, body: &[u8]) -> Result<Response, ApiError> {
    Ok(match endpoint {
        Endpoint::Info => Response::json(200, &control.info()?),
        Endpoint::Pause => {
            control.pause()?;
            Response::no_content()
        }
        Endpoint::Resume => {
            control.resume()?;
            Response::no_content()
        }
        Endpoint::Snapshot => Response::json(200, &control.snapshot(snapshot_request(body)?)?),
        Endpoint::Shutdown => {
            control.shutdown()?;
            Response::no_content()
        }
        Endpoint::AgentWait => Response::json(200, &control.wait_agent(agent_wait_request(body)?)?),
        Endpoint::Drive(index) => {
            let update: DriveUpdate = patch_body(body, DRIVE_EXAMPLE)?;
            Response::json(200, &control.update_drive(index, update)?)
        }
        Endpoint::Net(index) => {
            let update: NetUpdate = patch_body(body, NET_EXAMPLE)?;
            Response::json(200, &control.update_net(index, update)?)
        }
        Endpoint::Balloon => {
            let update: BalloonUpdate = patch_body(body, BALLOON_EXAMPLE)?;
            Response::json(200, &control.set_balloon(update)?)
        }
        #[cfg(feature = "fault-injection")]
        Endpoint::Fault => {
            let request: FaultRequest = serde_json::from_slice(body)
                .map_err(|e| ApiError::invalid_request(format!("invalid JSON body: {e}")))?;
            if request.thread == vmm::fault::FaultThread::Api {
                // On this connection thread, whatever the VM behind the API is.
                match request.fault {
                    vmm::fault::FaultKind::Panic => vmm::fault::inject_panic(),
                    vmm::fault::FaultKind::Syscall => vmm::fault::forbidden_syscall(),
                }
                return Ok(Response::no_content());
            }
            control.inject_fault(request.thread, request.fault)?;
            Response::no_content()
        }
    })
}

/// Prometheus' scrape path, beside the `/v1/` routes (Prometheus' default).
pub const METRICS_PATH: &str = "/metrics";

/// `GET /metrics`: every counter of the VM, cumulative, in Prometheus' text format.
fn metrics(control: &dyn VmControl) -> Response {
    let Some(metrics) = control.metrics() else {
        return Response::error(404, "this VM has no metrics");
    };
    match metrics.prometheus_text() {
        Ok(text) => Response::text(200, vmm_metrics::PROMETHEUS_CONTENT_TYPE, text),
        Err(e) => from_api_error(&ApiError::Internal(e.to_string())),
    }
}

pub fn route(control: &dyn VmControl, request: &Request) -> Response {
    // Before the foreign routes: Firecracker's API has `PUT /metrics` (its metrics file), and
    // answers GET there with an error, so GET is free for Prometheus.
    if request.path == METRICS_PATH && request.method == "GET" {
        return metrics(control);
    }
    if !request.path.starts_with("/v1/") {
        if let Some(response) = control.route_foreign(request) {
            return response;
        }
    }
    if request.path == METRICS_PATH {
        return Response::error(
            405,
            format!(
                "{METRICS_PATH} does not support {}; use GET",
                request.method
            ),
        )
        .with_allow("GET");
    }
    if request.path == VSOCK_CONNECT_PATH {
        // Only PUT reaches the upgrade; anything else is the wrong method.
        return Response::error(
            405,
            format!(
                "{} does not support {}; use PUT",
                request.path, request.method
            ),
        )
        .with_allow("PUT");
    }
    let Some(endpoint) = Endpoint::from_path(&request.path) else {
        return Response::error(404, format!("no such endpoint: {}", request.path));
    };
    let allowed = endpoint.method();
    if request.method != allowed {
        return Response::error(
            405,
            format!(
                "{} does not support {}; use {allowed}",
                request.path, request.method
            ),
        )
        .with_allow(allowed);
    }
    call(control, endpoint, &request.body).unwrap_or_else(|e| from_api_error(&e))
}
