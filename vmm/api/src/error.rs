//! Errors of the control API's server side: what a [`super::VmControl`] reports, and why the
//! server could not start.

use std::path::PathBuf;

/// An error a [`super::VmControl`] returns (its variant picks the HTTP status), or a failure to
/// start the server.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is well-formed HTTP but asks for something invalid (HTTP 400).
    #[error("{0}")]
    InvalidRequest(String),
    /// The VM is in the wrong state for the request, e.g. resume while running (HTTP 409).
    #[error("{0}")]
    WrongState(String),
    /// The VM failed to carry out a valid request (HTTP 500).
    #[error("{0}")]
    Internal(String),
    /// Something in the guest is not there (yet), e.g. nothing listens on a vsock port (HTTP 503).
    #[error("{0}")]
    Unavailable(String),
    /// The guest did not answer in time (HTTP 504).
    #[error("{0}")]
    Timeout(String),
    /// The API socket could not be set up.
    #[error("API socket {}: {reason}", path.display())]
    Socket {
        path: PathBuf,
        reason: String,
        #[source]
        source: Option<std::io::Error>,
    },
}

impl ApiError {
    pub fn invalid_request(msg: impl Into<String>) -> Self {
        ApiError::InvalidRequest(msg.into())
    }

    pub fn wrong_state(msg: impl Into<String>) -> Self {
        ApiError::WrongState(msg.into())
    }

    pub fn internal(msg: impl Into<String>) -> Self {
        ApiError::Internal(msg.into())
    }

    pub(crate) fn socket(
        path: &std::path::Path,
        reason: impl Into<String>,
        source: Option<std::io::Error>,
    ) -> Self {
        ApiError::Socket {
            path: path.to_path_buf(),
            reason: reason.into(),
            source,
        }
    }

    /// The HTTP status this error is answered with.
    pub fn status(&self) -> u16 {
        match self {
            ApiError::InvalidRequest(_) => 400,
            ApiError::WrongState(_) => 409,
            ApiError::Unavailable(_) => 503,
            ApiError::Timeout(_) => 504,
            ApiError::Internal(_) | ApiError::Socket { .. } => 500,
        }
    }
}
