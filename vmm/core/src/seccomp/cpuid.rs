//! The thread that reads KVM's supported CPUID (`Hypervisor::prefetch_supported_cpuid`) on its
//! own /dev/kvm fd while the VM is built: one ioctl, then it closes the fd.

use super::ioctls::*;
use super::rules::Rules;

pub(super) fn rules() -> Rules {
    Rules::base()
        .allow(libc::SYS_close)
        .ioctls(&[KVM_GET_SUPPORTED_CPUID])
}
