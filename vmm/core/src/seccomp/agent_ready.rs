//! The guest agent's readiness listener (`agent_ready`) and the short-lived thread it starts
//! per announcing connection (one kind: a thread inherits its creator's filter). It accepts
//! from the in-process vsock backend and reads one line with a timeout from a Unix socket.

use super::rules::Rules;

pub(super) fn rules() -> Rules {
    Rules::base()
        .spawn_threads()
        // Accepted streams are switched back to blocking mode.
        .ioctls(&[libc::FIONBIO as u32])
        .allow_all(&[
            libc::SYS_read,
            libc::SYS_recvfrom,
            libc::SYS_setsockopt,
            libc::SYS_getsockopt,
            libc::SYS_poll,
            libc::SYS_close,
            libc::SYS_fcntl,
        ])
}
