//! The ioctl request numbers the allowlists name, computed as the kernel's `_IO*` macros do
//! (direction, size of the argument, type, number), so a filter never depends on a crate's
//! private constant. `tests` checks a few against their well-known values.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_dirty_log, kvm_fpu, kvm_irqchip,
    kvm_lapic_state, kvm_mp_state, kvm_msr_list, kvm_msrs, kvm_pit_state2, kvm_regs, kvm_sregs,
    kvm_userspace_memory_region, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};

const NONE: u32 = 0;
const WRITE: u32 = 1;
const READ: u32 = 2;

const fn ioc(dir: u32, ty: u32, nr: u32, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | (ty << 8) | nr
}

const KVMIO: u32 = 0xAE;
const VHOSTIO: u32 = 0xAF;

const fn kvm_io(nr: u32) -> u32 {
    ioc(NONE, KVMIO, nr, 0)
}
const fn kvm_ior<T>(nr: u32) -> u32 {
    ioc(READ, KVMIO, nr, std::mem::size_of::<T>())
}
const fn kvm_iow<T>(nr: u32) -> u32 {
    ioc(WRITE, KVMIO, nr, std::mem::size_of::<T>())
}
const fn kvm_iowr<T>(nr: u32) -> u32 {
    ioc(READ | WRITE, KVMIO, nr, std::mem::size_of::<T>())
}

// /dev/kvm (system) ioctls.
pub const KVM_CREATE_VM: u32 = kvm_io(0x01);
pub const KVM_GET_MSR_INDEX_LIST: u32 = kvm_iowr::<kvm_msr_list>(0x02);
pub const KVM_CHECK_EXTENSION: u32 = kvm_io(0x03);
pub const KVM_GET_VCPU_MMAP_SIZE: u32 = kvm_io(0x04);
pub const KVM_GET_SUPPORTED_CPUID: u32 = kvm_iowr::<kvm_cpuid2>(0x05);
pub const KVM_GET_MSR_FEATURE_INDEX_LIST: u32 = kvm_iowr::<kvm_msr_list>(0x0a);

// VM ioctls.
pub const KVM_CREATE_VCPU: u32 = kvm_io(0x41);
pub const KVM_GET_DIRTY_LOG: u32 = kvm_iow::<kvm_dirty_log>(0x42);
pub const KVM_SET_USER_MEMORY_REGION: u32 = kvm_iow::<kvm_userspace_memory_region>(0x46);
pub const KVM_CREATE_IRQCHIP: u32 = kvm_io(0x60);
pub const KVM_GET_IRQCHIP: u32 = kvm_iowr::<kvm_irqchip>(0x62);
pub const KVM_GET_CLOCK: u32 = kvm_ior::<kvm_clock_data>(0x7c);
pub const KVM_GET_PIT2: u32 = kvm_ior::<kvm_pit_state2>(0x9f);

// vCPU ioctls.
pub const KVM_RUN: u32 = kvm_io(0x80);
pub const KVM_GET_REGS: u32 = kvm_ior::<kvm_regs>(0x81);
pub const KVM_GET_SREGS: u32 = kvm_ior::<kvm_sregs>(0x83);
pub const KVM_GET_MSRS: u32 = kvm_iowr::<kvm_msrs>(0x88);
pub const KVM_SET_MSRS: u32 = kvm_iow::<kvm_msrs>(0x89);
pub const KVM_GET_FPU: u32 = kvm_ior::<kvm_fpu>(0x8c);
pub const KVM_GET_LAPIC: u32 = kvm_ior::<kvm_lapic_state>(0x8e);
pub const KVM_SET_CPUID2: u32 = kvm_iow::<kvm_cpuid2>(0x90);
pub const KVM_GET_CPUID2: u32 = kvm_iowr::<kvm_cpuid2>(0x91);
pub const KVM_GET_MP_STATE: u32 = kvm_ior::<kvm_mp_state>(0x98);
pub const KVM_GET_VCPU_EVENTS: u32 = kvm_ior::<kvm_vcpu_events>(0x9f);
pub const KVM_GET_DEBUGREGS: u32 = kvm_ior::<kvm_debugregs>(0xa1);
pub const KVM_GET_TSC_KHZ: u32 = kvm_io(0xa3);
pub const KVM_GET_XSAVE: u32 = kvm_ior::<kvm_xsave>(0xa4);
pub const KVM_GET_XCRS: u32 = kvm_ior::<kvm_xcrs>(0xa6);
pub const KVM_GET_XSAVE2: u32 = kvm_ior::<kvm_xsave>(0xcf);

// vhost-vsock (the vhost datapath is started when the guest driver activates the device).
pub const VHOST_GET_FEATURES: u32 = ioc(READ, VHOSTIO, 0x00, 8);
pub const VHOST_SET_FEATURES: u32 = ioc(WRITE, VHOSTIO, 0x00, 8);
pub const VHOST_SET_OWNER: u32 = ioc(NONE, VHOSTIO, 0x01, 0);
/// `struct vhost_memory` is 8 bytes before its flexible array of regions.
pub const VHOST_SET_MEM_TABLE: u32 = ioc(WRITE, VHOSTIO, 0x03, 8);
pub const VHOST_SET_VRING_NUM: u32 = ioc(WRITE, VHOSTIO, 0x10, 8);
pub const VHOST_SET_VRING_ADDR: u32 = ioc(WRITE, VHOSTIO, 0x11, 40);
pub const VHOST_SET_VRING_BASE: u32 = ioc(WRITE, VHOSTIO, 0x12, 8);
pub const VHOST_SET_VRING_KICK: u32 = ioc(WRITE, VHOSTIO, 0x20, 8);
pub const VHOST_SET_VRING_CALL: u32 = ioc(WRITE, VHOSTIO, 0x21, 8);
pub const VHOST_VSOCK_SET_GUEST_CID: u32 = ioc(WRITE, VHOSTIO, 0x60, 8);
pub const VHOST_VSOCK_SET_RUNNING: u32 = ioc(WRITE, VHOSTIO, 0x61, 4);

// TAP: the offloads follow the guest driver's features (activation and reset).
pub const TUNSETOFFLOAD: u32 = libc::TUNSETOFFLOAD as u32;

// Terminal: the CLI's raw-mode guard restores stdin's settings on the way out.
pub const TCGETS: u32 = libc::TCGETS as u32;
pub const TCSETS: u32 = libc::TCSETS as u32;

// File-system ioctls a snapshot may use on its files (extent map, reflink-free data copy).
pub const FS_IOC_FIEMAP: u32 = 0xC020_660B;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_match_the_kernel_headers() {
        assert_eq!(KVM_CREATE_VM, 0xAE01);
        assert_eq!(KVM_RUN, 0xAE80);
        assert_eq!(KVM_GET_REGS, 0x8090_AE81);
        assert_eq!(KVM_SET_USER_MEMORY_REGION, 0x4020_AE46);
        assert_eq!(KVM_GET_SUPPORTED_CPUID, 0xC008_AE05);
        assert_eq!(KVM_GET_MSRS, 0xC008_AE88);
        assert_eq!(KVM_GET_DIRTY_LOG, 0x4010_AE42);
        assert_eq!(KVM_GET_XSAVE, 0x9000_AEA4);
        assert_eq!(VHOST_SET_OWNER, 0xAF01);
        assert_eq!(VHOST_VSOCK_SET_RUNNING, 0x4004_AF61);
        assert_eq!(TUNSETOFFLOAD, 0x4004_54D0);
    }
}
