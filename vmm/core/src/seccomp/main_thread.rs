//! The CLI's main thread once the VM is built: it waits for the VM's end, stops the vCPU and
//! device threads (kicks, eventfd, joins), restores the terminal, stops the API server
//! (removing its socket), prints why the VM ended and exits, starting the teardown helper
//! (`hypervisor::teardown`: a pipe, a stack, `clone`). The helper inherits this filter, so the
//! calls it makes before its own filter is in place (and the ones it makes under its own) are
//! here too.

use seccompiler::SeccompCmpOp;

use super::ioctls::*;
use super::rules::Rules;

pub(super) fn rules() -> Rules {
    let rules = Rules::base()
        .allow_all(&[
            libc::SYS_read,
            libc::SYS_close,
            libc::SYS_tgkill,
            libc::SYS_poll,
            libc::SYS_shutdown,
            // The API socket's removal checks it is still ours.
            libc::SYS_newfstatat,
            libc::SYS_statx,
            libc::SYS_unlink,
            libc::SYS_unlinkat,
            // The teardown helper: started here, then its own calls.
            libc::SYS_pipe2,
            libc::SYS_getppid,
            libc::SYS_close_range,
            libc::SYS_pause,
        ])
        .allow_if(
            libc::SYS_clone,
            &[(0, SeccompCmpOp::Eq, (libc::CLONE_VM | libc::SIGCHLD) as u64)],
        )
        .allow_if(
            libc::SYS_prctl,
            &[(0, SeccompCmpOp::Eq, libc::PR_SET_PDEATHSIG as u64)],
        )
        .allow_if(
            libc::SYS_prctl,
            &[(0, SeccompCmpOp::Eq, libc::PR_SET_NO_NEW_PRIVS as u64)],
        )
        .allow_if(
            libc::SYS_seccomp,
            &[(
                0,
                SeccompCmpOp::Eq,
                u64::from(libc::SECCOMP_SET_MODE_FILTER),
            )],
        )
        .ioctls(&[TCGETS, TCSETS]);
    // Test builds: the helper can be made to crash (SIGABRT to itself) before its own filter
    // would allow it.
    #[cfg(any(test, feature = "fault-injection"))]
    let rules = rules.allow_all(&[libc::SYS_kill]);
    rules
}
