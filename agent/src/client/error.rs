use super::hybrid::HandshakeError;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the agent: {0}")]
    Connect(#[source] tonic::transport::Error),
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error("agent call failed ({}): {}", .0.code(), .0.message())]
    Status(Box<tonic::Status>),
    #[error("unexpected reply from the agent: {0}")]
    Protocol(String),
    #[error("the exec session has ended")]
    SessionClosed,
    /// Reading or writing the local side of a file transfer failed.
    #[error("local I/O: {0}")]
    Local(#[source] std::io::Error),
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
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
}
