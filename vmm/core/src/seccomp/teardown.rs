//! The teardown helper (`hypervisor::teardown`): a process sharing the CLI's memory that holds
//! the VM's fd until the CLI has exited. After its filter is in place it only arranges to die
//! with its parent, closes the other fds and waits.

use seccompiler::SeccompCmpOp;

use super::rules::Rules;

pub(super) fn rules() -> Rules {
    let rules = Rules::default()
        .allow_if(
            libc::SYS_prctl,
            &[(0, SeccompCmpOp::Eq, libc::PR_SET_PDEATHSIG as u64)],
        )
        .allow_all(&[
            libc::SYS_getppid,
            libc::SYS_close_range,
            libc::SYS_pause,
            libc::SYS_exit,
            libc::SYS_rt_sigreturn,
            // The SIGSYS handler's message and exit.
            libc::SYS_exit_group,
        ])
        .allow_if(
            libc::SYS_write,
            &[(0, SeccompCmpOp::Eq, libc::STDERR_FILENO as u64)],
        );
    // Test builds: the helper can be made to crash (SIGABRT to itself).
    #[cfg(any(test, feature = "fault-injection"))]
    let rules = rules.allow_all(&[libc::SYS_kill, libc::SYS_getpid]);
    rules
}
