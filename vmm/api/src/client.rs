//! A blocking client of the control API (what `dormouse ctl` uses).

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::http::{self, MAX_BODY_BYTES, MAX_HEAD_BYTES};
use super::types::{
    AgentInfo, AgentWaitRequest, ErrorBody, SnapshotInfo, SnapshotRequest, VmInfo,
    VsockConnectRequest,
};

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Writing guest memory to disk can take a while for big VMs.
const DEFAULT_SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no VM is listening on {}: {reason}", path.display())]
    NotListening { path: PathBuf, reason: &'static str },
    #[error("cannot connect to {}: {source}", path.display())]
    Connect { path: PathBuf, source: io::Error },
    #[error("the VM on {} did not answer within {}s", path.display(), timeout.as_secs_f64())]
    Timeout { path: PathBuf, timeout: Duration },
    #[error("talking to the VM on {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("the VM on {} sent a malformed answer: {reason}", path.display())]
    BadResponse { path: PathBuf, reason: String },
    /// The connection closed before any answer (e.g. the VMM ended while serving the request).
    #[error("the VM on {} closed the connection without an answer", path.display())]
    NoAnswer { path: PathBuf },
    /// The VM refused or failed the request; `message` is its explanation.
    #[error("{message} (HTTP {status})")]
    Api { status: u16, message: String },
    #[error("snapshot directory {}: {source}", dir.display())]
    SnapshotDir { dir: PathBuf, source: io::Error },
}

pub struct ApiClient {
    path: PathBuf,
    timeout: Duration,
    snapshot_timeout: Duration,
}

impl ApiClient {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        ApiClient {
            path: path.into(),
            timeout: DEFAULT_TIMEOUT,
            snapshot_timeout: DEFAULT_SNAPSHOT_TIMEOUT,
        }
    }

    /// How long to wait for the VM's answer, for every request (snapshots included).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self.snapshot_timeout = timeout;
        self
    }

    pub fn info(&self) -> Result<VmInfo, ClientError> {
        let body = self.call("GET", "/v1/vm", None, self.timeout)?;
        self.decode(&body)
    }

    pub fn pause(&self) -> Result<(), ClientError> {
        self.call("PUT", "/v1/vm/pause", None, self.timeout)
            .map(drop)
    }

    pub fn resume(&self) -> Result<(), ClientError> {
        self.call("PUT", "/v1/vm/resume", None, self.timeout)
            .map(drop)
    }

    /// Snapshots into `dir`; a relative `dir` is taken relative to this process's working
    /// directory (the VM's may differ). `replace` allows overwriting a snapshot already there.
    pub fn snapshot(
        &self,
        dir: &Path,
        diff: bool,
        replace: bool,
    ) -> Result<SnapshotInfo, ClientError> {
        let dir = std::path::absolute(dir).map_err(|source| ClientError::SnapshotDir {
            dir: dir.to_path_buf(),
            source,
        })?;
        self.snapshot_with(SnapshotRequest {
            dir,
            diff,
            replace,
            live: false,
        })
    }

    /// Sends a snapshot request as given (its `dir` made absolute, as in [`Self::snapshot`]).
    pub fn snapshot_with(&self, mut request: SnapshotRequest) -> Result<SnapshotInfo, ClientError> {
        request.dir =
            std::path::absolute(&request.dir).map_err(|source| ClientError::SnapshotDir {
                dir: request.dir.clone(),
                source,
            })?;
        let body = serde_json::to_vec(&request).map_err(|e| ClientError::BadResponse {
            path: self.path.clone(),
            reason: format!("cannot encode the request: {e}"),
        })?;
        let body = self.call("PUT", "/v1/vm/snapshot", Some(&body), self.snapshot_timeout)?;
        self.decode(&body)
    }

    /// Changes disk `index`'s rate limiter (`PATCH /v1/vm/drives/{index}`); returns the limits
    /// now in force.
    pub fn update_drive(
        &self,
        index: usize,
        update: &crate::DriveUpdate,
    ) -> Result<crate::DriveUpdate, ClientError> {
        let body = self.encode(update)?;
        let target = format!("/v1/vm/drives/{index}");
        let body = self.call("PATCH", &target, Some(&body), self.timeout)?;
        self.decode(&body)
    }

    /// Changes the balloon's target and/or statistics interval (`PUT /v1/vm/balloon`).
    pub fn set_balloon(
        &self,
        update: &crate::BalloonUpdate,
    ) -> Result<crate::BalloonInfo, ClientError> {
        let body = self.encode(update)?;
        let body = self.call("PUT", "/v1/vm/balloon", Some(&body), self.timeout)?;
        self.decode(&body)
    }

    /// Changes network device `index`'s rate limiters (`PATCH /v1/vm/nets/{index}`).
    pub fn update_net(
        &self,
        index: usize,
        update: &crate::NetUpdate,
    ) -> Result<crate::NetUpdate, ClientError> {
        let body = self.encode(update)?;
        let target = format!("/v1/vm/nets/{index}");
        let body = self.call("PATCH", &target, Some(&body), self.timeout)?;
        self.decode(&body)
    }

    pub fn shutdown(&self) -> Result<(), ClientError> {
        self.call("PUT", "/v1/vm/shutdown", None, self.timeout)
            .map(drop)
    }

    /// Test builds only (`vmm::fault`): `PUT /v1/fault`, making `thread` of the VM fail with
    /// `kind`. A fault that ends the VMM before it answers gives [`ClientError::NoAnswer`] or
    /// [`ClientError::Io`].
    #[cfg(feature = "fault-injection")]
    pub fn inject_fault(
        &self,
        thread: vmm::fault::FaultThread,
        kind: vmm::fault::FaultKind,
    ) -> Result<(), ClientError> {
        #[derive(serde::Serialize)]
        struct FaultRequest {
            thread: vmm::fault::FaultThread,
            fault: vmm::fault::FaultKind,
        }
        let body = self.encode(&FaultRequest {
            thread,
            fault: kind,
        })?;
        self.call("PUT", "/v1/fault", Some(&body), self.timeout)
            .map(drop)
    }

    /// Waits up to `timeout` for the guest agent's readiness announcement (HTTP 504 when it
    /// did not come, 409 when the VM has no vsock).
    pub fn wait_agent(&self, timeout: Duration) -> Result<AgentInfo, ClientError> {
        let request = AgentWaitRequest {
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        };
        let body = self.encode(&request)?;
        // The VM answers when the wait ends; give the answer itself a little more.
        let answer_timeout = timeout.saturating_add(self.timeout);
        let body = self.call("PUT", "/v1/agent/wait", Some(&body), answer_timeout)?;
        self.decode(&body)
    }

    /// Opens a byte stream to guest vsock `port` through the VM's API socket
    /// (`PUT /v1/vsock/connect`, answered `101`). The returned socket is blocking, without
    /// timeouts; whatever the guest's server sends first is still unread in it.
    pub fn connect_vsock(&self, port: u32) -> Result<UnixStream, ClientError> {
        let body = self.encode(&VsockConnectRequest { port })?;
        let mut stream = self.connect()?;
        let timeout = self.timeout;
        let request = format!(
            "PUT /v1/vsock/connect HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: vsock\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let mut bytes = request.into_bytes();
        bytes.extend_from_slice(&body);
        stream
            .set_write_timeout(Some(timeout))
            .and_then(|()| stream.set_read_timeout(Some(timeout)))
            .and_then(|()| stream.write_all(&bytes))
            .map_err(|e| self.io_error(e, timeout))?;
        let head = self.read_head(&mut stream, timeout)?;
        // Only the status line matters here: an error's body is read below.
        let switched = head
            .split(|b| *b == b'\n')
            .next()
            .is_some_and(|line| line.starts_with(b"HTTP/1.1 101 "));
        if switched {
            stream
                .set_read_timeout(None)
                .and_then(|()| stream.set_write_timeout(None))
                .map_err(|e| self.io_error(e, timeout))?;
            return Ok(stream);
        }
        // An error answer: its body follows and the VM closes the connection.
        let mut rest = head;
        (&mut stream)
            .take(MAX_BODY_BYTES as u64)
            .read_to_end(&mut rest)
            .map_err(|e| self.io_error(e, timeout))?;
        let response = http::parse_response(&rest).map_err(|reason| ClientError::BadResponse {
            path: self.path.clone(),
            reason,
        })?;
        Err(Self::api_error(&response))
    }

    /// Reads a response head byte by byte, so nothing after it is consumed.
    fn read_head(
        &self,
        stream: &mut UnixStream,
        timeout: Duration,
    ) -> Result<Vec<u8>, ClientError> {
        let mut head = Vec::with_capacity(128);
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && !head.ends_with(b"\n\n") {
            if head.len() >= MAX_HEAD_BYTES {
                return Err(ClientError::BadResponse {
                    path: self.path.clone(),
                    reason: "response head too large".into(),
                });
            }
            let n = stream
                .read(&mut byte)
                .map_err(|e| self.io_error(e, timeout))?;
            if n == 0 {
                return Err(ClientError::NoAnswer {
                    path: self.path.clone(),
                });
            }
            head.push(byte[0]);
        }
        Ok(head)
    }

    fn encode<T: serde::Serialize>(&self, value: &T) -> Result<Vec<u8>, ClientError> {
        serde_json::to_vec(value).map_err(|e| ClientError::BadResponse {
            path: self.path.clone(),
            reason: format!("cannot encode the request: {e}"),
        })
    }

    fn api_error(response: &http::ParsedResponse) -> ClientError {
        let message = serde_json::from_slice::<ErrorBody>(&response.body)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&response.body).into_owned());
        ClientError::Api {
            status: response.status,
            message,
        }
    }

    fn decode<T: DeserializeOwned>(&self, body: &[u8]) -> Result<T, ClientError> {
        serde_json::from_slice(body).map_err(|e| ClientError::BadResponse {
            path: self.path.clone(),
            reason: format!("unexpected JSON: {e}"),
        })
    }

    fn connect(&self) -> Result<UnixStream, ClientError> {
        UnixStream::connect(&self.path).map_err(|source| {
            let reason = match source.kind() {
                io::ErrorKind::ConnectionRefused => "connection refused",
                io::ErrorKind::NotFound => "no such socket",
                _ => {
                    return ClientError::Connect {
                        path: self.path.clone(),
                        source,
                    }
                }
            };
            ClientError::NotListening {
                path: self.path.clone(),
                reason,
            }
        })
    }

    fn io_error(&self, source: io::Error, timeout: Duration) -> ClientError {
        if matches!(
            source.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            ClientError::Timeout {
                path: self.path.clone(),
                timeout,
            }
        } else {
            ClientError::Io {
                path: self.path.clone(),
                source,
            }
        }
    }

    /// Sends one request and returns the body of a 2xx answer.
    fn call(
        &self,
        method: &str,
        target: &str,
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Vec<u8>, ClientError> {
        let mut stream = self.connect()?;
        let body = body.unwrap_or_default();
        let mut request = format!(
            "{method} {target} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        if !body.is_empty() {
            request.push_str("Content-Type: application/json\r\n");
        }
        request.push_str("\r\n");
        let mut bytes = request.into_bytes();
        bytes.extend_from_slice(body);

        let timeout = if timeout.is_zero() {
            DEFAULT_TIMEOUT
        } else {
            timeout
        };
        stream
            .set_write_timeout(Some(timeout))
            .and_then(|()| stream.set_read_timeout(Some(timeout)))
            .and_then(|()| stream.write_all(&bytes))
            .map_err(|e| self.io_error(e, timeout))?;
        let _ = stream.shutdown(Shutdown::Write);

        let limit = (MAX_HEAD_BYTES + MAX_BODY_BYTES) as u64;
        let mut answer = Vec::new();
        (&mut stream)
            .take(limit)
            .read_to_end(&mut answer)
            .map_err(|e| self.io_error(e, timeout))?;
        if answer.is_empty() {
            return Err(ClientError::NoAnswer {
                path: self.path.clone(),
            });
        }
        let response =
            http::parse_response(&answer).map_err(|reason| ClientError::BadResponse {
                path: self.path.clone(),
                reason,
            })?;
        if (200..300).contains(&response.status) {
            return Ok(response.body);
        }
        Err(Self::api_error(&response))
    }
}
