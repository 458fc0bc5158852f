//! The threads that fill a lazily restored VM's memory from a snapshot store (`lazy-faults`,
//! `lazy-fetch-N`, and the store client's runtime threads): they wait for the VM's page faults
//! on its userfaultfd and copy chunks in, fetch chunks over HTTP(S) from S3 or read them from a
//! local store, and keep the host's chunk cache (a directory of files) up to date.
//!
//! The only kind that may open internet sockets: S3 is reached over TCP. It cannot open
//! KVM, create VMs or run programs; a VM restored with its memory downloaded first (`restore
//! --dir`, or `--fetch full`) starts none of these threads.

use super::rules::Rules;

pub(super) fn rules() -> Rules {
    let userfaultfd_ioctls: Vec<u32> = snapshot::USERFAULTFD_IOCTLS
        .iter()
        .map(|&request| request as u32)
        .collect();
    let sockets = [libc::AF_INET, libc::AF_INET6, libc::AF_UNIX];
    let mut rules = Rules::base()
        .spawn_threads()
        .ioctls(&userfaultfd_ioctls)
        // Non-blocking sockets (tokio) and TCP_NODELAY and friends.
        .ioctls(&[libc::FIONBIO as u32]);
    for family in sockets {
        rules = rules.allow_if(
            libc::SYS_socket,
            &[(0, seccompiler::SeccompCmpOp::Eq, family as u64)],
        );
    }
    rules.allow_all(&[
        // Waiting for faults and for the store client's I/O.
        libc::SYS_read,
        libc::SYS_readv,
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_pwait2,
        libc::SYS_eventfd2,
        // TCP to the store (and name resolution: UDP, /etc/hosts and friends).
        libc::SYS_connect,
        libc::SYS_getsockopt,
        libc::SYS_setsockopt,
        libc::SYS_getsockname,
        libc::SYS_getpeername,
        libc::SYS_sendto,
        libc::SYS_sendmsg,
        libc::SYS_sendmmsg,
        libc::SYS_recvfrom,
        libc::SYS_recvmsg,
        libc::SYS_shutdown,
        libc::SYS_bind,
        libc::SYS_uname,
        // Files: a file:// store and the chunk cache.
        libc::SYS_openat,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_lseek,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_getdents64,
        libc::SYS_rename,
        libc::SYS_renameat,
        libc::SYS_renameat2,
        libc::SYS_unlink,
        libc::SYS_unlinkat,
        libc::SYS_mkdir,
        libc::SYS_mkdirat,
        libc::SYS_utimensat,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_ftruncate,
        libc::SYS_fchmod,
        libc::SYS_chmod,
        libc::SYS_fchmodat,
        libc::SYS_getcwd,
        libc::SYS_readlink,
        libc::SYS_getuid,
        libc::SYS_geteuid,
    ])
}
