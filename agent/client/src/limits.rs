//! Host-side limits on what the guest agent sends back.
//!
//! The agent runs inside the guest, and root in the guest can replace it, so the host treats
//! every reply as hostile: each one is bounded here, on the host, whatever the agent claims.
//! Crossing a limit fails the call with [`ClientError::ResponseTooLarge`] and drops the call's
//! HTTP/2 stream (the rest is never read). These limits are the host's own; the guest server's
//! limits (`server::limits`) are not trusted for this.

use std::time::Duration;

use super::ClientError;

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

/// Room for protobuf framing around a payload of known size (tags, lengths, exit status).
pub(crate) const FRAMING_SLACK: usize = 64 * KIB;

/// Longest agent error message kept (longer ones are cut, on a character boundary). The
/// message travels in an HTTP/2 trailer, which is itself bounded by
/// [`MAX_HEADER_LIST_BYTES`].
pub const MAX_ERROR_MESSAGE_BYTES: usize = 1024;

/// Largest HTTP/2 header block (status, error message, metadata) accepted from the agent.
pub const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;

/// Size caps on agent replies. The defaults fit every honest reply the agent sends by default;
/// raise them for bigger files or outputs, or stream instead (`read_file_to`,
/// `ExecSession::next_event`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyLimits {
    /// Largest single reply message of any call not listed below (ping, stat, exists, write
    /// results, each `ReadFile` chunk, each streamed exec event). Default 1 MiB (file reads ask
    /// for 512 KiB chunks, or smaller ones that fit this).
    pub max_message_bytes: usize,
    /// Output collected per stream (stdout, stderr) by `exec` and `ExecSession::wait`. `exec`
    /// asks the agent to truncate at this size (or at the command's smaller
    /// `max_output_bytes`), so only a misbehaving agent crosses it. Default 16 MiB.
    pub max_exec_output_bytes: usize,
    /// Output collected from both streams together. Default 32 MiB.
    pub max_exec_total_bytes: usize,
    /// Bytes `read_file` / `read_file_range` return in memory. Default 64 MiB; `read_file_to`
    /// streams without this cap.
    pub max_file_bytes: usize,
    /// Entries in one `list_dir` reply. Default 100 000.
    pub max_dir_entries: usize,
    /// Encoded size of one `list_dir` reply. Default 16 MiB.
    pub max_dir_bytes: usize,
}

impl Default for ReplyLimits {
    fn default() -> Self {
        Self {
            max_message_bytes: MIB,
            max_exec_output_bytes: 16 * MIB,
            max_exec_total_bytes: 32 * MIB,
            max_file_bytes: 64 * MIB,
            max_dir_entries: 100_000,
            max_dir_bytes: 16 * MIB,
        }
    }
}

/// Default bound on one agent call (see [`AgentClientConfig::call_timeout`]).
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// How an [`super::AgentClient`] treats the agent's replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentClientConfig {
    pub limits: ReplyLimits,
    /// Bound on each call: the whole of a unary call (ping, stat, list_dir, write_file, …), the
    /// wait for each chunk of `read_file*` (a transfer that keeps moving may take longer), the
    /// start of `exec_stream`, and `exec` of a command with a timeout (its timeout plus this).
    /// `exec` of a command without a timeout and the events of an `ExecSession` wait as long as
    /// the command runs: bound them with the command's timeout. `None`: no bound.
    pub call_timeout: Option<Duration>,
}

impl Default for AgentClientConfig {
    fn default() -> Self {
        Self {
            limits: ReplyLimits::default(),
            call_timeout: Some(DEFAULT_CALL_TIMEOUT),
        }
    }
}

impl ReplyLimits {
    /// Per-stream output the client asks the agent for: the command's own limit when smaller.
    pub(crate) fn exec_request_bytes(&self, requested: u64) -> u64 {
        let cap = u64::try_from(self.max_exec_output_bytes).unwrap_or(u64::MAX);
        match requested {
            0 => cap,
            requested => requested.min(cap),
        }
    }

    /// Largest unary `Exec` reply: both streams at their cap plus framing.
    pub(crate) fn exec_message_bytes(&self) -> usize {
        self.max_exec_total_bytes
            .min(self.max_exec_output_bytes.saturating_mul(2))
            .saturating_add(FRAMING_SLACK)
    }

    /// Decoding limit for a caller using the raw generated client: the largest reply any typed
    /// call accepts.
    pub(crate) fn raw_message_bytes(&self) -> usize {
        self.exec_message_bytes()
            .max(self.max_dir_bytes)
            .max(self.max_message_bytes)
    }

    /// Cap on the bytes a file read returns: the requested length (`0` = to the end) but never
    /// more than `max_file_bytes`. The flag says the cap is the requested length.
    pub(crate) fn file_read_cap(&self, length: u64) -> (u64, bool) {
        let file_cap = u64::try_from(self.max_file_bytes).unwrap_or(u64::MAX);
        if length != 0 && length <= file_cap {
            (length, true)
        } else {
            (file_cap, false)
        }
    }
}

/// Collects exec output within the per-stream and total caps.
#[derive(Debug)]
pub(crate) struct OutputCollector {
    per_stream: usize,
    total: usize,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

impl OutputCollector {
    pub fn new(per_stream: usize, total: usize) -> Self {
        Self {
            per_stream,
            total,
            stdout: Vec::new(),
            stderr: Vec::new(),
        }
    }

    /// Fails when output of these sizes crosses a cap.
    pub fn check(&self, stdout: usize, stderr: usize) -> Result<(), ClientError> {
        for (what, len) in [("exec stdout", stdout), ("exec stderr", stderr)] {
            if len > self.per_stream {
                return Err(ClientError::too_large(what, self.per_stream, len));
            }
        }
        let total = stdout.saturating_add(stderr);
        if total > self.total {
            return Err(ClientError::too_large("exec output", self.total, total));
        }
        Ok(())
    }

    /// Appends `data`, or fails (appending nothing) when a cap would be crossed.
    pub fn push(&mut self, stream: Stream, data: &[u8]) -> Result<(), ClientError> {
        let (stdout, stderr) = match stream {
            Stream::Stdout => (
                self.stdout.len().saturating_add(data.len()),
                self.stderr.len(),
            ),
            Stream::Stderr => (
                self.stdout.len(),
                self.stderr.len().saturating_add(data.len()),
            ),
        };
        self.check(stdout, stderr)?;
        match stream {
            Stream::Stdout => self.stdout.extend_from_slice(data),
            Stream::Stderr => self.stderr.extend_from_slice(data),
        }
        Ok(())
    }
}

/// Whether `status` is tonic's own refusal of a reply message above the decoding limit. (An
/// agent could send the same status itself; it would only fail its own call.)
pub(crate) fn is_decode_limit(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::OutOfRange
        && status
            .message()
            .starts_with("Error, decoded message length too large")
}

/// Cuts `message` to at most `max` bytes on a character boundary.
pub(crate) fn truncate_message(message: &str, max: usize) -> String {
    if message.len() <= max {
        return message.to_owned();
    }
    let mut end = max;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes cut)", &message[..end], message.len() - end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> ReplyLimits {
        ReplyLimits {
            max_exec_output_bytes: 10,
            max_exec_total_bytes: 15,
            ..ReplyLimits::default()
        }
    }

    #[test]
    fn reply_sizes_are_checked_together() {
        let out = OutputCollector::new(10, 15);
        out.check(10, 5).unwrap();
        assert!(matches!(
            out.check(11, 0),
            Err(ClientError::ResponseTooLarge {
                what: "exec stdout",
                ..
            })
        ));
        assert!(matches!(
            out.check(0, 11),
            Err(ClientError::ResponseTooLarge {
                what: "exec stderr",
                ..
            })
        ));
        assert!(matches!(
            out.check(8, 8),
            Err(ClientError::ResponseTooLarge {
                what: "exec output",
                limit: 15,
                at_least: 16
            })
        ));
    }

    #[test]
    fn collector_caps_each_stream_and_the_total() {
        let mut out = OutputCollector::new(10, 15);
        out.push(Stream::Stdout, b"0123456789").unwrap();
        let err = out.push(Stream::Stdout, b"x").unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::ResponseTooLarge {
                    what: "exec stdout",
                    limit: 10,
                    at_least: 11
                }
            ),
            "{err}"
        );
        assert_eq!(out.stdout.len(), 10, "nothing appended past the cap");
        out.push(Stream::Stderr, b"01234").unwrap();
        let err = out.push(Stream::Stderr, b"5").unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::ResponseTooLarge {
                    what: "exec output",
                    limit: 15,
                    at_least: 16
                }
            ),
            "{err}"
        );
        assert_eq!(out.stderr, b"01234");
    }

    #[test]
    fn exec_request_never_exceeds_the_host_cap() {
        let limits = small();
        assert_eq!(limits.exec_request_bytes(0), 10);
        assert_eq!(limits.exec_request_bytes(4), 4);
        assert_eq!(limits.exec_request_bytes(u64::MAX), 10);
        // Both streams at their cap, bounded by the total, plus framing.
        assert_eq!(limits.exec_message_bytes(), 15 + FRAMING_SLACK);
        let defaults = ReplyLimits::default();
        assert_eq!(defaults.exec_message_bytes(), 32 * MIB + FRAMING_SLACK);
        assert!(defaults.raw_message_bytes() >= defaults.max_dir_bytes);
    }

    #[test]
    fn file_read_cap_is_the_length_or_the_file_cap() {
        let limits = ReplyLimits {
            max_file_bytes: 100,
            ..ReplyLimits::default()
        };
        assert_eq!(limits.file_read_cap(0), (100, false));
        assert_eq!(limits.file_read_cap(7), (7, true));
        assert_eq!(limits.file_read_cap(100), (100, true));
        assert_eq!(limits.file_read_cap(101), (100, false));
    }

    #[test]
    fn messages_are_cut_on_char_boundaries() {
        assert_eq!(truncate_message("short", 10), "short");
        let cut = truncate_message("ééééé", 3);
        assert!(cut.starts_with("é…"), "{cut}");
        assert!(cut.ends_with("(8 bytes cut)"), "{cut}");
    }

    #[test]
    fn only_tonics_decode_refusal_counts() {
        let refused = tonic::Status::out_of_range(
            "Error, decoded message length too large: found 9 bytes, the limit is: 1 bytes",
        );
        assert!(is_decode_limit(&refused));
        assert!(!is_decode_limit(&tonic::Status::out_of_range("offset")));
        assert!(!is_decode_limit(&tonic::Status::internal(
            "Error, decoded message length too large"
        )));
    }
}
