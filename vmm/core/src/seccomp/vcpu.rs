//! A vCPU thread: `KVM_RUN` and the exits it dispatches. Port-I/O and MMIO exits run device
//! code on this thread: the serial port writes guest output (stdout or the embedder's writer),
//! a virtio transport's activation or reset clones queue eventfds, kicks the device thread
//! through an eventfd and sets TAP offloads; a vsock transport reset drops the muxer's
//! connections (epoll, timer). A snapshot reads the vCPU's state here while the
//! vCPU is parked (the KVM_GET_* ioctls, and KVM_RUN with `immediate_exit` to complete a
//! pending I/O exit). Nothing else: no files, no sockets, no VM or vCPU creation.

use super::ioctls::*;
use super::rules::Rules;

pub(super) fn rules(vhost_vsock: bool) -> Rules {
    let rules = Rules::base()
        .allow_all(&[
            libc::SYS_read,
            libc::SYS_close,
            libc::SYS_fcntl,
            // Kicking a parked sibling is the owner's job, but a vCPU that ends the VM (the
            // i8042 reset) wakes the owner and, in the library, its exit callbacks.
            libc::SYS_tgkill,
            // A vsock transport reset (the guest driver's, or a restore's) drops every
            // connection from the muxer's epoll set and re-arms its timer.
            libc::SYS_epoll_ctl,
            libc::SYS_timerfd_settime,
            libc::SYS_timerfd_gettime,
            libc::SYS_shutdown,
        ])
        .ioctls(&[
            KVM_RUN,
            KVM_GET_REGS,
            KVM_GET_SREGS,
            KVM_GET_FPU,
            KVM_GET_XSAVE,
            KVM_GET_XSAVE2,
            KVM_GET_XCRS,
            KVM_GET_DEBUGREGS,
            KVM_GET_LAPIC,
            KVM_GET_CPUID2,
            KVM_GET_TSC_KHZ,
            KVM_GET_MSRS,
            KVM_GET_VCPU_EVENTS,
            KVM_GET_MP_STATE,
            TUNSETOFFLOAD,
        ]);
    if !vhost_vsock {
        return rules;
    }
    // Activation of a vhost-vsock device opens /dev/vhost-vsock (read-write, never creating a
    // file) and hands it the queues and guest memory.
    let creating = (libc::O_CREAT | libc::O_TRUNC | libc::O_TMPFILE) as u64;
    rules
        .allow_if(
            libc::SYS_openat,
            &[(2, seccompiler::SeccompCmpOp::MaskedEq(creating), 0)],
        )
        .allow(libc::SYS_eventfd2)
        .ioctls(&[
            VHOST_GET_FEATURES,
            VHOST_SET_FEATURES,
            VHOST_SET_OWNER,
            VHOST_SET_MEM_TABLE,
            VHOST_SET_VRING_NUM,
            VHOST_SET_VRING_ADDR,
            VHOST_SET_VRING_BASE,
            VHOST_SET_VRING_KICK,
            VHOST_SET_VRING_CALL,
            VHOST_VSOCK_SET_GUEST_CID,
            VHOST_VSOCK_SET_RUNNING,
        ])
}
