//! Errors of the Firecracker-compatible API. Firecracker answers every failed request with 400
//! and `{"fault_message": …}`; so does this API, whatever the cause (a request dormouse cannot
//! honour, a wrong state, a VM that failed to start).

use vmm_api::http::Response;

use super::types::Fault;

pub const NOT_SUPPORTED_PRE_BOOT: &str =
    "The requested operation is not supported before starting the microVM.";
pub const NOT_SUPPORTED_POST_BOOT: &str =
    "The requested operation is not supported after starting the microVM.";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FcError {
    /// Firecracker's `OperationNotSupportedPreBoot`.
    #[error("{NOT_SUPPORTED_PRE_BOOT}")]
    PreBoot,
    /// Firecracker's `OperationNotSupportedPostBoot`.
    #[error("{NOT_SUPPORTED_POST_BOOT}")]
    PostBoot,
    /// A field or value Firecracker accepts that dormouse cannot honour.
    #[error("{what} is not supported by dormouse: {why}")]
    Unsupported { what: String, why: String },
    /// Anything else the client got wrong, or a failure carrying out a valid request.
    #[error("{0}")]
    Bad(String),
}

impl FcError {
    pub fn bad(message: impl Into<String>) -> Self {
        FcError::Bad(message.into())
    }

    pub fn unsupported(what: impl Into<String>, why: impl Into<String>) -> Self {
        FcError::Unsupported {
            what: what.into(),
            why: why.into(),
        }
    }
}

/// Firecracker's error answer.
pub fn fault(status: u16, message: impl Into<String>) -> Response {
    let mut response = Response::json(
        status,
        &Fault {
            fault_message: message.into(),
        },
    );
    response.allow = None;
    response
}

impl From<&FcError> for Response {
    fn from(e: &FcError) -> Self {
        fault(400, e.to_string())
    }
}
