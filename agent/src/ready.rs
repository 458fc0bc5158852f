//! Readiness notification: once the server listens, the agent connects to
//! the host (CID 2) and sends `READY <version>\n`, so the host never polls.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio_vsock::{VsockAddr, VsockStream, VMADDR_CID_HOST};

/// Host port the readiness line goes to by default.
pub const DEFAULT_READY_PORT: u32 = 1023;

/// Where to send the readiness line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadyTarget {
    pub cid: u32,
    pub port: u32,
}

impl Default for ReadyTarget {
    fn default() -> Self {
        Self {
            cid: VMADDR_CID_HOST,
            port: DEFAULT_READY_PORT,
        }
    }
}

/// The line the host receives.
pub fn ready_line(version: &str) -> String {
    format!("READY {version}\n")
}

/// Sends the readiness line; failures are logged and otherwise ignored (the
/// host may not be listening, e.g. when the agent runs outside a VM).
pub async fn notify_ready(target: ReadyTarget, version: &str) {
    let line = ready_line(version);
    let attempt = async {
        let mut stream = VsockStream::connect(VsockAddr::new(target.cid, target.port)).await?;
        stream.write_all(line.as_bytes()).await?;
        stream.shutdown(std::net::Shutdown::Both)
    };
    match tokio::time::timeout(Duration::from_secs(5), attempt).await {
        Ok(Ok(())) => tracing::debug!(?target, "readiness sent"),
        Ok(Err(err)) => tracing::warn!(?target, %err, "cannot send readiness"),
        Err(_) => tracing::warn!(?target, "readiness connection timed out"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_format_and_default_target() {
        assert_eq!(ready_line("1.2.3"), "READY 1.2.3\n");
        assert_eq!(ReadyTarget::default(), ReadyTarget { cid: 2, port: 1023 });
    }
}
