//! Maps a parsed request to a [`VmControl`] call and its result to a response.

use super::http::{Request, Response};
use super::types::SnapshotRequest;
use super::{ApiError, VmControl};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Endpoint {
    Info,
    Pause,
    Resume,
    Snapshot,
    Shutdown,
}

impl Endpoint {
    fn from_path(path: &str) -> Option<Self> {
        Some(match path {
            "/v1/vm" => Endpoint::Info,
            "/v1/vm/pause" => Endpoint::Pause,
            "/v1/vm/resume" => Endpoint::Resume,
            "/v1/vm/snapshot" => Endpoint::Snapshot,
            "/v1/vm/shutdown" => Endpoint::Shutdown,
            _ => return None,
        })
    }

    /// Each endpoint answers exactly one method: GET reads, PUT acts.
    fn method(self) -> &'static str {
        match self {
            Endpoint::Info => "GET",
            _ => "PUT",
        }
    }
}

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
    })
}

pub fn route(control: &dyn VmControl, request: &Request) -> Response {
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
