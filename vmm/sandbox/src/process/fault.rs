//! Test builds only: a fault injected into a sandbox process over its control API
//! (`PUT /v1/fault`, served by fault-injection builds of `dormouse`).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::child::SandboxProcess;

impl SandboxProcess {
    /// Sends the fault; the process may die before it answers (a forbidden call on the API
    /// thread), which counts as delivered.
    pub(crate) fn inject_fault(
        &self,
        thread: vmm::fault::FaultThread,
        kind: vmm::fault::FaultKind,
    ) -> std::io::Result<()> {
        #[derive(serde::Serialize)]
        struct Request {
            thread: vmm::fault::FaultThread,
            fault: vmm::fault::FaultKind,
        }
        let body = serde_json::to_vec(&Request {
            thread,
            fault: kind,
        })
        .map_err(std::io::Error::other)?;
        let mut stream = UnixStream::connect(self.paths().api_host())?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let head = format!(
            "PUT /v1/fault HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes())?;
        stream.write_all(&body)?;
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        let status = String::from_utf8_lossy(&answer);
        match status.split_whitespace().nth(1) {
            None | Some("204") | Some("200") => Ok(()),
            Some(_) => Err(std::io::Error::other(format!(
                "the sandbox process refused the fault: {}",
                status.lines().last().unwrap_or_default()
            ))),
        }
    }
}
