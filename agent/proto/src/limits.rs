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
/// Default and maximum `ReadFile` chunk sizes.
pub const DEFAULT_READ_CHUNK: usize = 64 * 1024;
pub const MAX_READ_CHUNK: usize = 4 * 1024 * 1024;
