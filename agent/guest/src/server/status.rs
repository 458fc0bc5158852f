//! Maps operating-system errors to gRPC status codes.

use std::fmt::Display;
use std::io;

use tonic::{Code, Status};

/// Converts `err` into a [`Status`] whose code reflects the errno, with
/// `context` (what was being done, to which path) in the message.
pub fn io_status(context: impl Display, err: &io::Error) -> Status {
    Status::new(io_code(err), bounded(format!("{context}: {err}")))
}

/// Longest status message sent back. Messages echo request fields (paths), and a client may
/// send huge ones: the message travels in an HTTP/2 trailer, which many gRPC clients refuse
/// beyond 8–16 KiB, and nobody needs more than the start of a path to see what failed.
pub const MAX_STATUS_MESSAGE: usize = 1024;

/// `message`, cut to at most [`MAX_STATUS_MESSAGE`] bytes (on a character boundary) with a
/// marker saying it was cut.
pub fn bounded(mut message: String) -> String {
    const MARKER: &str = "… (truncated)";
    if message.len() <= MAX_STATUS_MESSAGE {
        return message;
    }
    let mut end = MAX_STATUS_MESSAGE - MARKER.len();
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message.truncate(end);
    message.push_str(MARKER);
    message
}

/// The gRPC code that best describes an I/O error.
pub fn io_code(err: &io::Error) -> Code {
    if let Some(errno) = err.raw_os_error() {
        return errno_code(errno);
    }
    match err.kind() {
        io::ErrorKind::NotFound => Code::NotFound,
        io::ErrorKind::PermissionDenied => Code::PermissionDenied,
        io::ErrorKind::AlreadyExists => Code::AlreadyExists,
        io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData => Code::InvalidArgument,
        io::ErrorKind::TimedOut => Code::DeadlineExceeded,
        io::ErrorKind::OutOfMemory => Code::ResourceExhausted,
        io::ErrorKind::UnexpectedEof | io::ErrorKind::BrokenPipe => Code::Aborted,
        _ => Code::Internal,
    }
}

fn errno_code(errno: i32) -> Code {
    match errno {
        libc::ENOENT | libc::ESRCH | libc::ENXIO | libc::ENODEV => Code::NotFound,
        libc::EACCES | libc::EPERM | libc::EROFS | libc::ETXTBSY => Code::PermissionDenied,
        libc::EEXIST => Code::AlreadyExists,
        libc::EINVAL
        | libc::ENAMETOOLONG
        | libc::ELOOP
        | libc::EXDEV
        | libc::ENOEXEC
        | libc::E2BIG => Code::InvalidArgument,
        libc::ENOTDIR | libc::EISDIR | libc::ENOTEMPTY | libc::EBUSY => Code::FailedPrecondition,
        libc::ENOSPC
        | libc::EDQUOT
        | libc::EMFILE
        | libc::ENFILE
        | libc::ENOMEM
        | libc::EFBIG
        | libc::EAGAIN => Code::ResourceExhausted,
        libc::ETIMEDOUT => Code::DeadlineExceeded,
        _ => Code::Internal,
    }
}

/// `InvalidArgument` with a message.
pub fn invalid(message: impl Into<String>) -> Status {
    Status::invalid_argument(bounded(message.into()))
}

/// Rejects a request field larger than `limit` bytes with `ResourceExhausted`.
pub fn check_size(field: &str, len: usize, limit: usize) -> Result<(), Status> {
    if len > limit {
        return Err(Status::resource_exhausted(format!(
            "{field} is {len} bytes, the limit is {limit} bytes"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_are_cut_on_a_character_boundary() {
        let short = "cannot read /tmp/x: not found".to_string();
        assert_eq!(bounded(short.clone()), short);

        let huge = format!("cannot read /tmp/{}: name too long", "é".repeat(40_000));
        let cut = bounded(huge);
        assert!(cut.len() <= MAX_STATUS_MESSAGE, "{}", cut.len());
        assert!(cut.starts_with("cannot read /tmp/é"));
        assert!(cut.ends_with("(truncated)"));

        let status = io_status(
            format!("cannot read /tmp/{}", "x".repeat(64 * 1024)),
            &io::Error::from_raw_os_error(libc::ENAMETOOLONG),
        );
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().len() <= MAX_STATUS_MESSAGE);
        assert!(invalid("y".repeat(100_000)).message().len() <= MAX_STATUS_MESSAGE);
    }

    #[test]
    fn errno_mapping() {
        let code = |e| io_code(&io::Error::from_raw_os_error(e));
        assert_eq!(code(libc::ENOENT), Code::NotFound);
        assert_eq!(code(libc::EACCES), Code::PermissionDenied);
        assert_eq!(code(libc::EROFS), Code::PermissionDenied);
        assert_eq!(code(libc::EEXIST), Code::AlreadyExists);
        assert_eq!(code(libc::ENOTEMPTY), Code::FailedPrecondition);
        assert_eq!(code(libc::ENOSPC), Code::ResourceExhausted);
        assert_eq!(code(libc::EIO), Code::Internal);
        assert_eq!(
            io_code(&io::Error::new(io::ErrorKind::InvalidInput, "x")),
            Code::InvalidArgument
        );
    }

    #[test]
    fn size_check() {
        assert!(check_size("stdin", 10, 10).is_ok());
        let err = check_size("stdin", 11, 10).unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted);
    }
}
