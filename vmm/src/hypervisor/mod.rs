//! The KVM boundary: everything that issues KVM ioctls on the VM lives here (the vCPU ioctls live
//! in `vcpu`). The rest of the VMM sees memory, vCPUs, irqfds and ioeventfds.

pub mod state;
pub mod vcpu;

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::layout::{KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR};
use crate::host::{vendor_from_signature, CpuVendor};
use devices::GuestMemory;

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
    #[error("KVM lacks a required capability: {0:?}")]
    MissingCap(Cap),
    #[error("{what} failed: {source}")]
    Ioctl {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

pub(crate) fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> HypervisorError {
    move |source| HypervisorError::Ioctl { what, source }
}

/// Capabilities dormouse cannot work without.
const REQUIRED_CAPS: [Cap; 5] = [
    Cap::Irqchip,
    Cap::Ioeventfd,
    Cap::Irqfd,
    Cap::UserMemory,
    Cap::SetTssAddr,
];

/// An open /dev/kvm with what we learned from it.
pub struct Hypervisor {
    pub kvm: Kvm,
    pub supported_cpuid: CpuId,
    pub vendor: CpuVendor,
    pub tsc_deadline: bool,
}

impl Hypervisor {
    pub fn open() -> Result<Self, HypervisorError> {
        let kvm = Kvm::new().map_err(HypervisorError::OpenKvm)?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(HypervisorError::ApiVersion(version));
        }
        for cap in REQUIRED_CAPS {
            if !kvm.check_extension(cap) {
                return Err(HypervisorError::MissingCap(cap));
            }
        }
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        let vendor = supported_cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == 0)
            .map(|e| vendor_from_signature(e.ebx, e.edx, e.ecx))
            .unwrap_or(CpuVendor::Other);
        let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
        Ok(Self {
            kvm,
            supported_cpuid,
            vendor,
            tsc_deadline,
        })
    }

    /// A VM with the in-kernel irqchip (PIC, IOAPIC, LAPICs) and PIT, ready for memory and vCPUs.
    pub fn create_vm(&self) -> Result<Vm, HypervisorError> {
        let fd = self.kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        fd.set_tss_address(KVM_TSS_ADDR as usize)
            .map_err(ioctl("KVM_SET_TSS_ADDR"))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
            .map_err(ioctl("KVM_SET_IDENTITY_MAP_ADDR"))?;
        fd.create_irq_chip().map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            // Port 0x61 (speaker) is emulated as a dummy in the kernel: no exits for it.
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(ioctl("KVM_CREATE_PIT2"))?;
        Ok(Vm {
            fd,
            memory_slots: Vec::new(),
        })
    }
}

/// One guest memory slot as KVM knows it.
#[derive(Debug, Clone, Copy)]
pub struct MemorySlot {
    pub slot: u32,
    pub guest_addr: u64,
    pub size: u64,
}

pub struct Vm {
    pub fd: VmFd,
    pub memory_slots: Vec<MemorySlot>,
}

impl Vm {
    /// Registers every region of `mem`. With `dirty_log`, KVM records guest writes from now on
    /// (diff snapshots read and reset it).
    pub fn set_memory(
        &mut self,
        mem: &GuestMemory,
        dirty_log: bool,
    ) -> Result<(), HypervisorError> {
        self.memory_slots = mem
            .iter()
            .enumerate()
            .map(|(slot, region)| MemorySlot {
                slot: slot as u32,
                guest_addr: region.start_addr().0,
                size: region.len(),
            })
            .collect();
        self.set_dirty_logging(mem, dirty_log)
    }

    /// (Re-)registers every slot of `mem` with KVM, with or without dirty-page logging.
    pub fn set_dirty_logging(&self, mem: &GuestMemory, on: bool) -> Result<(), HypervisorError> {
        for (slot, region) in self.memory_slots.iter().zip(mem.iter()) {
            let host_addr =
                mem.get_host_address(region.start_addr())
                    .map_err(|_| HypervisorError::Ioctl {
                        what: "guest memory host address",
                        source: kvm_ioctls::Error::new(libc::EFAULT),
                    })?;
            let desc = kvm_userspace_memory_region {
                slot: slot.slot,
                flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
                guest_phys_addr: slot.guest_addr,
                memory_size: slot.size,
                userspace_addr: host_addr as u64,
            };
            // SAFETY: the mapping behind `host_addr` belongs to `mem`, which the VM keeps alive for
            // as long as the VM fd exists (the VM owns a clone of the memory handle).
            unsafe { self.fd.set_user_memory_region(desc) }
                .map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(())
    }

    pub fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), HypervisorError> {
        self.fd.register_irqfd(fd, gsi).map_err(ioctl("KVM_IRQFD"))
    }

    pub fn register_mmio_ioevent(
        &self,
        fd: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), HypervisorError> {
        self.fd
            .register_ioevent(fd, &IoEventAddress::Mmio(addr), datamatch)
            .map_err(ioctl("KVM_IOEVENTFD"))
    }
}
