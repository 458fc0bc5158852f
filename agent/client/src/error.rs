use std::time::Duration;

use super::hybrid::HandshakeError;
use super::limits::{is_decode_limit, truncate_message, MAX_ERROR_MESSAGE_BYTES};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the agent: {0}")]
    Connect(#[source] tonic::transport::Error),
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// The agent's error: `agent call failed: not found: working directory `/x` does not exist`.
    #[error("agent call failed: {}: {}", code_name(.0.code()), .0.message())]
    Status(Box<tonic::Status>),
    #[error("unexpected reply from the agent: {0}")]
    Protocol(String),
    /// The agent sent more than a host-side limit allows (`ReplyLimits`); the call was
    /// abandoned without reading the rest.
    #[error(
        "the agent's {what} reply exceeds the host's limit of {limit} (got at least {at_least})"
    )]
    ResponseTooLarge {
        what: &'static str,
        limit: u64,
        at_least: u64,
    },
    /// The agent did not complete the call within the client's call timeout.
    #[error("agent {operation} did not answer within {timeout:?}")]
    Timeout {
        operation: &'static str,
        timeout: Duration,
    },
    #[error("the exec session has ended")]
    SessionClosed,
    /// Reading or writing the local side of a file transfer failed.
    #[error("local I/O: {0}")]
    Local(#[source] std::io::Error),
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        // The message comes from the guest: keep a bounded, log-friendly part of it.
        let status = if status.message().len() > MAX_ERROR_MESSAGE_BYTES {
            tonic::Status::new(
                status.code(),
                truncate_message(status.message(), MAX_ERROR_MESSAGE_BYTES),
            )
        } else {
            status
        };
        Self::Status(Box::new(status))
    }
}

impl ClientError {
    /// The gRPC status code, when the agent answered with an error.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Self::Status(status) => Some(status.code()),
            _ => None,
        }
    }

    pub(crate) fn too_large(what: &'static str, limit: usize, at_least: usize) -> Self {
        Self::ResponseTooLarge {
            what,
            limit: u64::try_from(limit).unwrap_or(u64::MAX),
            at_least: u64::try_from(at_least).unwrap_or(u64::MAX),
        }
    }

    /// Maps a failed reply of call `what` whose messages were decoded with `limit`: tonic's
    /// refusal of a larger message becomes [`Self::ResponseTooLarge`].
    pub(crate) fn reply(status: tonic::Status, what: &'static str, limit: usize) -> Self {
        if !is_decode_limit(&status) {
            return status.into();
        }
        // "… found {len} bytes, the limit is …"
        let found = status
            .message()
            .split("found ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse::<usize>().ok());
        Self::too_large(what, limit, found.unwrap_or(limit.saturating_add(1)))
    }
}

/// A gRPC code as short lowercase words (`not found`), for messages; tonic's `Display` gives
/// its description ("Some requested entity was not found"), which reads like a message.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown error",
        Code::InvalidArgument => "invalid argument",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::PermissionDenied => "permission denied",
        Code::ResourceExhausted => "resource exhausted",
        Code::FailedPrecondition => "failed precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out of range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal error",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_errors_print_a_code_name_and_the_agents_message() {
        let err = ClientError::from(tonic::Status::not_found(
            "working directory `/x` does not exist",
        ));
        let shown = err.to_string();
        assert_eq!(
            shown,
            "agent call failed: not found: working directory `/x` does not exist"
        );
        assert!(!shown.contains("Some requested entity"), "{shown}");
        let denied = ClientError::from(tonic::Status::permission_denied("no"));
        assert_eq!(
            denied.to_string(),
            "agent call failed: permission denied: no"
        );
    }
}
