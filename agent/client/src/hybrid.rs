//! Firecracker-style hybrid vsock: the VMM exposes guest vsock ports through
//! one Unix socket. The host writes `CONNECT <port>\n` and the VMM answers
//! `OK <host-side port>\n`; from then on the stream is the guest connection.

use std::io;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;

/// Longest acceptable answer line (`OK 4294967295\n` is 14 bytes).
const MAX_REPLY: usize = 64;
/// How long [`connect`] waits for the reply: the VMM answers once the guest accepts or refuses
/// the connection, and a guest that does neither must not hang the host.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("hybrid vsock socket {path}: {source}")]
    Connect { path: String, source: io::Error },
    #[error("hybrid vsock handshake I/O: {0}")]
    Io(#[from] io::Error),
    #[error(
        "hybrid vsock connection closed before the reply (is anything listening on port {port}?)"
    )]
    Closed { port: u32 },
    #[error("unexpected hybrid vsock reply `{0}`")]
    BadReply(String),
    #[error("no hybrid vsock reply for port {port} within {timeout:?}")]
    Timeout { port: u32, timeout: Duration },
}

/// Sends `CONNECT <port>` on `stream` and consumes exactly the reply line,
/// returning the port number in `OK <n>`. Reads byte by byte so no bytes of
/// the following protocol are swallowed.
pub async fn handshake<S>(stream: &mut S, port: u32) -> Result<u32, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await?;
    stream.flush().await?;
    let mut line = Vec::with_capacity(16);
    loop {
        let mut byte = [0u8; 1];
        if stream.read(&mut byte).await? == 0 {
            return Err(HandshakeError::Closed { port });
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
        if line.len() > MAX_REPLY {
            return Err(HandshakeError::BadReply(
                String::from_utf8_lossy(&line).into_owned(),
            ));
        }
    }
    parse_reply(&line)
}

/// Parses `OK <n>` (without the newline).
pub fn parse_reply(line: &[u8]) -> Result<u32, HandshakeError> {
    let bad = || HandshakeError::BadReply(String::from_utf8_lossy(line).into_owned());
    let text = std::str::from_utf8(line).map_err(|_| bad())?;
    let text = text.strip_suffix('\r').unwrap_or(text);
    let number = text.strip_prefix("OK ").ok_or_else(bad)?;
    number.trim().parse().map_err(|_| bad())
}

/// Connects to the hybrid vsock socket at `path` and performs the handshake
/// for guest `port`, within [`HANDSHAKE_TIMEOUT`].
pub async fn connect(path: &Path, port: u32) -> Result<UnixStream, HandshakeError> {
    connect_within(path, port, HANDSHAKE_TIMEOUT).await
}

async fn connect_within(
    path: &Path,
    port: u32,
    timeout: Duration,
) -> Result<UnixStream, HandshakeError> {
    let attempt = async {
        let mut stream =
            UnixStream::connect(path)
                .await
                .map_err(|source| HandshakeError::Connect {
                    path: path.display().to_string(),
                    source,
                })?;
        handshake(&mut stream, port).await?;
        Ok(stream)
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| HandshakeError::Timeout { port, timeout })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_parsing() {
        assert_eq!(parse_reply(b"OK 1073741824").unwrap(), 1_073_741_824);
        assert_eq!(parse_reply(b"OK 5\r").unwrap(), 5);
        for bad in [&b"NOK 5"[..], b"OK", b"OK x", b"ok 5", b"\xff"] {
            assert!(parse_reply(bad).is_err());
        }
    }

    #[tokio::test]
    async fn handshake_keeps_following_bytes() {
        let (mut host, mut vmm) = tokio::io::duplex(256);
        let fake_vmm = tokio::spawn(async move {
            let mut request = [0u8; 13];
            vmm.read_exact(&mut request).await.unwrap();
            // The reply and the first protocol bytes arrive in one write.
            vmm.write_all(b"OK 42\nHELLO").await.unwrap();
            request
        });
        assert_eq!(handshake(&mut host, 1024).await.unwrap(), 42);
        assert_eq!(&fake_vmm.await.unwrap(), b"CONNECT 1024\n");
        let mut rest = [0u8; 5];
        host.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"HELLO");
    }

    #[tokio::test]
    async fn handshake_rejects_closed_and_garbage() {
        let (mut host, vmm) = tokio::io::duplex(256);
        drop(vmm);
        assert!(handshake(&mut host, 1024).await.is_err());

        let (mut host, mut vmm) = tokio::io::duplex(256);
        tokio::spawn(async move {
            let mut request = [0u8; 13];
            vmm.read_exact(&mut request).await.unwrap();
            vmm.write_all(&[b'x'; 100]).await.unwrap();
        });
        assert!(matches!(
            handshake(&mut host, 1024).await,
            Err(HandshakeError::BadReply(_))
        ));
    }

    #[tokio::test]
    async fn a_silent_peer_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hybrid.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        // Accepts and reads the request, never answers.
        let silent = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut sink = Vec::new();
            let _ = stream.read_to_end(&mut sink).await;
        });
        let started = std::time::Instant::now();
        let result = connect_within(&path, 1024, Duration::from_millis(200)).await;
        assert!(
            matches!(result, Err(HandshakeError::Timeout { port: 1024, .. })),
            "{result:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        silent.abort();
    }
}
