//! The KVM boundary: everything that issues KVM ioctls on the VM lives here (the vCPU ioctls live
//! in `vcpu`). The rest of the VMM sees memory, vCPUs, irqfds and ioeventfds.

pub mod state;
pub mod teardown;
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
    /// Read on first use: KVM_GET_SUPPORTED_CPUID runs the CPUID instruction for every leaf,
    /// and each one traps to the hypervisor when this host is itself a VM (about half a
    /// millisecond here). A restore takes CPUID from its snapshot and never asks.
    supported_cpuid: std::sync::Arc<std::sync::OnceLock<CpuId>>,
    /// Answers when a `CpuidPrefetch` job has filled `supported_cpuid` (or was dropped).
    cpuid_prefetch: std::sync::Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    pub vendor: CpuVendor,
    pub tsc_deadline: bool,
}

/// Reads KVM's supported CPUID on its own /dev/kvm fd ([`Hypervisor::prefetch_supported_cpuid`]).
pub struct CpuidPrefetch {
    kvm: Kvm,
    cell: std::sync::Arc<std::sync::OnceLock<CpuId>>,
    done: std::sync::mpsc::Sender<()>,
}

impl CpuidPrefetch {
    /// One ioctl; then, for a later snapshot's state reads, the KVM capabilities on the same fd
    /// (after the answer, so the VM's builder does not wait for them). Closes the fd.
    pub fn run(self) {
        if let Ok(cpuid) = self.kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES) {
            let _ = self.cell.set(cpuid);
        }
        let _ = self.done.send(());
        state::probe_host_caps_with(&self.kvm);
    }
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
        // KVM reports the host's vendor signature in leaf 0 unchanged: one CPUID here says the
        // same without the full KVM_GET_SUPPORTED_CPUID.
        #[allow(unused_unsafe)]
        // SAFETY: CPUID leaf 0 exists on every x86_64 CPU and has no side effects.
        let leaf0 = unsafe { std::arch::x86_64::__cpuid(0) };
        let vendor = vendor_from_signature(leaf0.ebx, leaf0.edx, leaf0.ecx);
        let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
        Ok(Self {
            kvm,
            supported_cpuid: Default::default(),
            cpuid_prefetch: Default::default(),
            vendor,
            tsc_deadline,
        })
    }

    /// A job that reads the supported CPUID through a second /dev/kvm fd, for another thread to
    /// run while the caller builds the VM (`Vm::start` gives it to vCPU 0's thread, which runs it
    /// before installing its seccomp filter); [`Self::supported_cpuid`] waits for it. `None`
    /// without a second fd: the read then stays lazy. A job dropped unrun leaves the read to
    /// [`Self::supported_cpuid`].
    pub fn prefetch_supported_cpuid(&self) -> Option<CpuidPrefetch> {
        let kvm = Kvm::new().ok()?;
        let (done, waiting) = std::sync::mpsc::channel();
        *self
            .cpuid_prefetch
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(waiting);
        Some(CpuidPrefetch {
            kvm,
            cell: self.supported_cpuid.clone(),
            done,
        })
    }

    /// The CPUID KVM can give guests (KVM_GET_SUPPORTED_CPUID), read once.
    pub fn supported_cpuid(&self) -> Result<&CpuId, HypervisorError> {
        let prefetch = self
            .cpuid_prefetch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(waiting) = prefetch {
            // Answered when the job has run, or disconnected when it was dropped or failed: an
            // empty cell then sends the read below.
            let _ = waiting.recv();
        }
        if let Some(cpuid) = self.supported_cpuid.get() {
            return Ok(cpuid);
        }
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        Ok(self.supported_cpuid.get_or_init(|| cpuid))
    }

    /// A VM with `mem` registered and the in-kernel irqchip (PIC, IOAPIC, LAPICs), plus the PIT
    /// when `setup.pit` says so: ready for devices and vCPUs.
    ///
    /// The order matters for start time. Creating the irqchip registers its port-I/O devices,
    /// which leaves an SRCU grace period of KVM's in flight for several milliseconds (jiffies on
    /// some hosts); a memory slot registered during it waits for it to end. Registered first,
    /// the memory costs only its own bookkeeping.
    pub fn create_vm(&self, mem: &GuestMemory, setup: VmSetup) -> Result<Vm, HypervisorError> {
        let fd = self.kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        fd.set_tss_address(KVM_TSS_ADDR as usize)
            .map_err(ioctl("KVM_SET_TSS_ADDR"))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
            .map_err(ioctl("KVM_SET_IDENTITY_MAP_ADDR"))?;
        let mut vm = Vm {
            fd,
            memory_slots: Vec::new(),
            pit: false,
        };
        vm.set_memory(mem, setup.dirty_log)?;
        vm.fd
            .create_irq_chip()
            .map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
        if setup.pit {
            let pit = kvm_pit_config {
                // Port 0x61 (speaker) is emulated as a dummy in the kernel: no exits for it.
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            vm.fd.create_pit2(pit).map_err(ioctl("KVM_CREATE_PIT2"))?;
            vm.pit = true;
        }
        Ok(vm)
    }

    /// Whether a guest booted on this host needs the in-kernel PIT (i8254).
    ///
    /// A Linux guest with kvmclock and the TSC-deadline timer never uses it: it knows the TSC
    /// and LAPIC frequencies without calibrating against the PIT, and its timer interrupts come
    /// from the LAPIC. Without the TSC-deadline timer Linux calibrates the LAPIC timer against
    /// the PIT, so it is created then. The PIT costs milliseconds twice: a kernel thread at
    /// creation, and an SRCU grace period when the VM is destroyed.
    pub fn guest_needs_pit(&self) -> bool {
        !self.tsc_deadline
    }
}

/// How `Hypervisor::create_vm` sets a VM up.
#[derive(Debug, Clone, Copy, Default)]
pub struct VmSetup {
    /// Create the in-kernel PIT (i8254); see `Hypervisor::guest_needs_pit`.
    pub pit: bool,
    /// Log guest writes from the start (diff snapshots read and reset the log).
    pub dirty_log: bool,
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
    /// Whether the VM has the in-kernel PIT (its state is saved and restored with the VM's).
    pub pit: bool,
}

impl Vm {
    /// Registers every region of `mem`. With `dirty_log`, KVM records guest writes from now on
    /// (diff snapshots read and reset it).
    fn set_memory(&mut self, mem: &GuestMemory, dirty_log: bool) -> Result<(), HypervisorError> {
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
