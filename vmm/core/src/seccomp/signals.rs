//! The CLI's signal thread: it waits for SIGINT, SIGTERM or SIGHUP and stops the VM; once,
//! shortly after start, it reads `/proc/self/smaps` and drops the page-table entries of
//! read-only file mappings (`madvise`, see the CLI's `resident`).

use seccompiler::SeccompCmpOp;

use super::rules::Rules;

pub(super) fn rules() -> Rules {
    Rules::base()
        .allow_all(&[
            libc::SYS_rt_sigtimedwait,
            libc::SYS_read,
            libc::SYS_close,
            libc::SYS_fstat,
            libc::SYS_statx,
            libc::SYS_newfstatat,
            libc::SYS_lseek,
            libc::SYS_tgkill,
        ])
        // Read-only opens of existing files (smaps).
        .allow_if(
            libc::SYS_openat,
            &[
                (
                    2,
                    SeccompCmpOp::MaskedEq(libc::O_ACCMODE as u64),
                    libc::O_RDONLY as u64,
                ),
                (
                    2,
                    SeccompCmpOp::MaskedEq((libc::O_CREAT | libc::O_TMPFILE) as u64),
                    0,
                ),
            ],
        )
}
