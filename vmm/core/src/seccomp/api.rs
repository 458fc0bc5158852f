//! The control API: its accept thread and the connection threads it starts (one kind: a thread
//! inherits its creator's filter). A connection thread pauses and resumes the VM (kicking vCPU
//! threads), hands a socket to the in-process vsock device (`PUT /v1/vsock/connect`) and takes
//! snapshots: it reads the VM's state (irqchip, clock, PIT, dirty log; dirty logging switched
//! on with KVM_SET_USER_MEMORY_REGION), writes the snapshot directory (or links the guest's
//! memory file and remaps guest RAM copy-on-write over it) and, at the first snapshot of the
//! process, probes which MSRs KVM saves on a throwaway VM (the one reason this thread may
//! create a VM and a vCPU). A rate-limit change (`PATCH /v1/vm/drives|nets/{i}`) of a paused VM
//! is applied here, re-arming the device's limiter timer. A live snapshot write-protects guest
//! memory here (userfaultfd) before starting its two threads. A disk's new file (Firecracker's
//! `PATCH /drives` `path_on_host`) is opened, and the old one closed, here, not on the device
//! thread, which only swaps the two (its filter has no `openat`).

use super::ioctls::*;
use super::rules::Rules;

pub(super) fn rules() -> Rules {
    Rules::base()
        .spawn_threads()
        .allow_all(&[
            // Sockets: accept, request and answer, timeouts.
            libc::SYS_accept4,
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_read,
            libc::SYS_readv,
            libc::SYS_recvfrom,
            libc::SYS_recvmsg,
            libc::SYS_sendto,
            libc::SYS_sendmsg,
            libc::SYS_shutdown,
            libc::SYS_getsockopt,
            libc::SYS_setsockopt,
            libc::SYS_close,
            libc::SYS_fcntl,
            libc::SYS_eventfd2,
            libc::SYS_dup,
            // Pausing kicks the vCPU threads out of KVM_RUN.
            libc::SYS_tgkill,
            // A rate-limit change while the VM is paused runs here (`on_device_thread`) and
            // re-arms the device's limiter timer.
            libc::SYS_timerfd_settime,
            libc::SYS_timerfd_gettime,
            // Snapshot files.
            libc::SYS_openat,
            libc::SYS_mkdirat,
            libc::SYS_mkdir,
            libc::SYS_newfstatat,
            libc::SYS_fstat,
            libc::SYS_statx,
            libc::SYS_lseek,
            libc::SYS_pread64,
            libc::SYS_preadv,
            libc::SYS_pwrite64,
            libc::SYS_pwritev,
            libc::SYS_fsync,
            libc::SYS_fdatasync,
            libc::SYS_fallocate,
            libc::SYS_ftruncate,
            libc::SYS_copy_file_range,
            libc::SYS_linkat,
            libc::SYS_renameat,
            libc::SYS_renameat2,
            libc::SYS_rename,
            libc::SYS_unlinkat,
            libc::SYS_unlink,
            libc::SYS_rmdir,
            libc::SYS_getdents64,
            libc::SYS_fchmod,
            libc::SYS_fchmodat,
            libc::SYS_chmod,
            libc::SYS_readlink,
            libc::SYS_readlinkat,
            libc::SYS_statfs,
            libc::SYS_fstatfs,
            libc::SYS_umask,
            libc::SYS_getcwd,
            libc::SYS_sysinfo,
            // Guest memory: which pages are resident, the copy-on-write remap.
            libc::SYS_mincore,
            libc::SYS_msync,
            // Live snapshots write-protect guest memory (their threads run `snapshot_writer`).
            libc::SYS_userfaultfd,
        ])
        .ioctls(&userfaultfd_ioctls())
        // ... and each of those threads adds its own, narrower filter as it starts.
        .allow_if(
            libc::SYS_seccomp,
            &[(
                0,
                seccompiler::SeccompCmpOp::Eq,
                u64::from(libc::SECCOMP_SET_MODE_FILTER),
            )],
        )
        .unix_sockets()
        .ioctls(&[
            libc::FIONBIO as u32,
            FS_IOC_FIEMAP,
            // The VM's state and dirty log.
            KVM_GET_DIRTY_LOG,
            KVM_SET_USER_MEMORY_REGION,
            KVM_GET_IRQCHIP,
            KVM_GET_CLOCK,
            KVM_GET_PIT2,
            // The MSR probe (first snapshot of the process).
            KVM_CHECK_EXTENSION,
            KVM_GET_MSR_INDEX_LIST,
            KVM_GET_MSR_FEATURE_INDEX_LIST,
            KVM_GET_SUPPORTED_CPUID,
            KVM_GET_VCPU_MMAP_SIZE,
            KVM_CREATE_VM,
            KVM_CREATE_IRQCHIP,
            KVM_CREATE_VCPU,
            KVM_SET_CPUID2,
            KVM_GET_MSRS,
            KVM_SET_MSRS,
        ])
}

fn userfaultfd_ioctls() -> Vec<u32> {
    snapshot::USERFAULTFD_IOCTLS
        .iter()
        .map(|&request| request as u32)
        .collect()
}
