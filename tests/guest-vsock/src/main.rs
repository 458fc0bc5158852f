//! `dormouse-vsock-test`: runs inside a dormouse guest and serves the vsock end-to-end tests
//! (see `guest_vsock::protocol` for the ports). Built as a static binary and packed into the
//! test initrd by tests/tests/vsock.rs.

use std::process::ExitCode;

fn main() -> ExitCode {
    let mode = std::env::args().nth(1);
    match mode.as_deref() {
        None | Some("serve") => match guest_vsock::server::serve() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("dormouse-vsock-test: {e}");
                ExitCode::FAILURE
            }
        },
        Some(other) => {
            eprintln!("usage: dormouse-vsock-test [serve]   (unknown mode {other:?})");
            ExitCode::from(2)
        }
    }
}
