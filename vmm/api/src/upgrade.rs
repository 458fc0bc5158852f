//! `PUT /v1/vsock/connect`: the API connection itself becomes a byte stream to a guest vsock
//! port. The socket is handed to the VM's in-process vsock device (no copying thread in
//! between); when the guest accepts, the device thread writes `101 Switching Protocols` on it
//! before any guest byte, and from then on the bytes are the guest's. If the guest refuses or
//! does not answer, an ordinary JSON error answers instead and the connection closes.

use std::io::{self, Write};
use std::os::unix::net::UnixStream;

use super::http::{Request, Response};
use super::{router, ApiError, VmControl};

/// The answer that switches the connection to the guest's stream.
pub const SWITCHING_PROTOCOLS: &[u8] =
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: vsock\r\n\r\n";

/// The error answer for a failed guest connection.
pub fn connect_failure(port: u32, error: &io::Error) -> Response {
    let (status, message) = match error.kind() {
        io::ErrorKind::ConnectionRefused => (
            503,
            format!("nothing in the guest listens on vsock port {port} (is the agent running?)"),
        ),
        io::ErrorKind::TimedOut => (
            504,
            format!("the guest did not answer the connection to vsock port {port}"),
        ),
        io::ErrorKind::ConnectionReset | io::ErrorKind::NotConnected => (
            503,
            format!("the vsock device was reset while connecting to port {port}"),
        ),
        _ => (500, format!("vsock connection to port {port}: {error}")),
    };
    Response::error(status, message)
}

/// Serves the upgrade. `Ok` when the stream now belongs to the vsock device (it answers);
/// otherwise the stream comes back with the error to send.
pub fn vsock_connect(
    stream: UnixStream,
    control: &dyn VmControl,
    request: &Request,
    extra_bytes: bool,
) -> Result<(), (UnixStream, Response)> {
    let fail =
        |stream, error: ApiError| Err((stream, Response::error(error.status(), error.to_string())));
    if extra_bytes {
        return fail(
            stream,
            ApiError::invalid_request(
                "send nothing after the vsock connect request until the 101 answer arrived",
            ),
        );
    }
    let port = match router::vsock_connect_request(&request.body) {
        Ok(r) => r.port,
        Err(e) => return fail(stream, e),
    };
    let (reply, answer) = match (stream.try_clone(), stream.try_clone()) {
        (Ok(reply), Ok(answer)) => (reply, answer),
        _ => {
            return fail(
                stream,
                ApiError::internal("cannot duplicate the connection"),
            )
        }
    };
    let on_answer = Box::new(move |outcome: io::Result<u32>| {
        // Runs on the device thread: a fresh socket has room for these few bytes, and the
        // socket is non-blocking by now, so this never stalls the device.
        let bytes = match &outcome {
            Ok(_) => SWITCHING_PROTOCOLS.to_vec(),
            Err(e) => connect_failure(port, e).to_bytes(),
        };
        if let Err(e) = (&answer).write_all(&bytes) {
            tracing::debug!("control API: cannot answer the vsock connect: {e}");
        }
        match outcome {
            Ok(local) => tracing::debug!(
                "control API: vsock stream to guest port {port} (host port {local})"
            ),
            Err(e) => tracing::debug!("control API: vsock connect to port {port} failed: {e}"),
        }
    });
    match control.vsock_connect(stream, port, on_answer) {
        Ok(()) => Ok(()),
        Err(e) => fail(reply, e),
    }
}
