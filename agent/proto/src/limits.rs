//! Size limits shared by server and client.

/// Largest gRPC message either side decodes.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// Largest payload accepted in one request field (Exec stdin, a WriteFile
/// chunk); larger ones get `ResourceExhausted`.
pub const MAX_PAYLOAD_BYTES: usize = 16 * 1024 * 1024;
/// Exec output captured per stream unless the request says otherwise.
pub const DEFAULT_OUTPUT_BYTES: usize = 16 * 1024 * 1024;
/// Upper bound for a requested per-stream capture (keeps the reply below
/// [`MAX_MESSAGE_BYTES`]).
pub const MAX_OUTPUT_BYTES: usize = 24 * 1024 * 1024;
/// Default and maximum `ReadFile` chunk sizes. The default is one HTTP/2 frame: on an emulating
/// host every chunk's channel hop, frame and system call costs guest time, bytes hardly do.
pub const DEFAULT_READ_CHUNK: usize = 512 * 1024;
pub const MAX_READ_CHUNK: usize = 4 * 1024 * 1024;

/// HTTP/2 settings the agent and the host client both advertise. The largest frame a peer may
/// send: read whole before it is decoded (the default 16 KiB made a 1 MiB transfer 64 frames,
/// each a few system calls in the guest). Fits a `ReadFile` chunk or a `WriteFile` chunk of
/// [`DEFAULT_READ_CHUNK`] bytes and its gRPC/protobuf framing in one frame.
pub const HTTP2_MAX_FRAME_BYTES: u32 = 1024 * 1024;
/// Flow-control windows: the DATA a peer may send on one stream, and on one connection, before
/// the receiver's WINDOW_UPDATE. They bound what a peer can make the other side buffer: per
/// connection at most [`HTTP2_CONNECTION_WINDOW_BYTES`] of unread DATA plus one frame being read.
/// A 1 MiB file moves without waiting for a WINDOW_UPDATE.
pub const HTTP2_STREAM_WINDOW_BYTES: u32 = 2 * 1024 * 1024;
pub const HTTP2_CONNECTION_WINDOW_BYTES: u32 = 4 * 1024 * 1024;

// Checked when compiling: a default chunk, its gRPC prefix (5 bytes) and protobuf framing (far
// below 64 bytes) fit one frame, a frame fits the windows, and the frame size is one HTTP/2
// allows (at most 2^24 - 1).
const _: () = {
    assert!(DEFAULT_READ_CHUNK + 64 <= HTTP2_MAX_FRAME_BYTES as usize);
    assert!(HTTP2_STREAM_WINDOW_BYTES >= HTTP2_MAX_FRAME_BYTES);
    assert!(HTTP2_CONNECTION_WINDOW_BYTES >= HTTP2_STREAM_WINDOW_BYTES);
    assert!(HTTP2_MAX_FRAME_BYTES < 1 << 24);
    assert!(DEFAULT_READ_CHUNK <= MAX_READ_CHUNK && DEFAULT_READ_CHUNK <= MAX_PAYLOAD_BYTES);
};

/// Output a detached exec session keeps per stream (stdout, stderr): older
/// output is dropped first.
pub const SESSION_OUTPUT_BYTES: usize = 1024 * 1024;
/// Sessions the agent holds at once (running or exited but retained).
pub const MAX_SESSIONS: usize = 256;
/// How long an exited session stays listed, attachable and waitable.
pub const SESSION_RETENTION: std::time::Duration = std::time::Duration::from_secs(10 * 60);
/// Length of a session id (lowercase hex).
pub const SESSION_ID_LEN: usize = 32;
/// Longest `SessionInfo::command` the agent sends.
pub const SESSION_COMMAND_BYTES: usize = 256;

/// Whether `id` has the form of a session id (it may still be unknown).
pub fn is_session_id(id: &str) -> bool {
    id.len() == SESSION_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_are_32_lowercase_hex() {
        assert!(is_session_id("0123456789abcdef0123456789abcdef"));
        assert!(!is_session_id("0123456789ABCDEF0123456789abcdef"));
        assert!(!is_session_id("0123456789abcdef0123456789abcde"));
        assert!(!is_session_id("0123456789abcdef0123456789abcdef0"));
        assert!(!is_session_id("../3456789abcdef0123456789abcdef"));
        assert!(!is_session_id(""));
    }
}
