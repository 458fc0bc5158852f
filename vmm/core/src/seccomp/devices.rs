//! The device thread (event loop): it waits in epoll, reads and writes queue eventfds and
//! irqfds, serves virtio-blk requests on the disk files (positioned reads and writes, flush,
//! discard), moves frames to and from TAPs, runs the vsock muxer over Unix sockets (the hybrid
//! socket's listener and the `<uds>_<port>` connections it opens for guest connections, the
//! in-process backend's socket pairs) and reads stdin for the serial console. It never opens
//! files, creates VMs or vCPUs, or touches KVM at all.

use super::ioctls::*;
use super::rules::Rules;

pub(super) fn rules() -> Rules {
    Rules::base()
        .allow_all(&[
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_ctl,
            libc::SYS_eventfd2,
            // The vsock muxer's connection timers.
            libc::SYS_timerfd_settime,
            libc::SYS_timerfd_gettime,
            libc::SYS_read,
            libc::SYS_readv,
            libc::SYS_pread64,
            libc::SYS_preadv,
            libc::SYS_preadv2,
            libc::SYS_pwrite64,
            libc::SYS_pwritev,
            libc::SYS_pwritev2,
            libc::SYS_lseek,
            libc::SYS_fsync,
            libc::SYS_fdatasync,
            libc::SYS_fallocate,
            libc::SYS_close,
            libc::SYS_fcntl,
            libc::SYS_accept4,
            libc::SYS_connect,
            libc::SYS_recvfrom,
            libc::SYS_recvmsg,
            libc::SYS_sendto,
            libc::SYS_sendmsg,
            libc::SYS_shutdown,
            libc::SYS_getsockopt,
            libc::SYS_setsockopt,
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_tgkill,
        ])
        .unix_sockets()
        .ioctls(&[libc::FIONBIO as u32, TUNSETOFFLOAD])
}
