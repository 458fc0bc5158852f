//! Host detection: what kind of KVM we run on, and the quirks that follow from it.
//!
//! Quirks are data attached to the host kind (guest command-line additions, ioctls to avoid),
//! applied in one place (the boot path and the snapshot path) and logged at start.

use std::fmt;
use std::path::Path;

/// CPU vendor of the host, as KVM's supported CPUID reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CpuVendor {
    Intel,
    Amd,
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum HostKind {
    /// KVM on VT-x/SVM: guests run natively.
    HardwareKvm { vendor: CpuVendor },
    /// KVM from the PVM hypervisor (`kvm_pvm`), for hosts without nested virtualization.
    /// `emulates_ring0` is true when an unmodified guest's kernel code is run by KVM's
    /// instruction emulator (the guest sees the host's CPUID and needs features cleared).
    Pvm { emulates_ring0: bool },
}

impl HostKind {
    pub fn is_pvm(&self) -> bool {
        matches!(self, HostKind::Pvm { .. })
    }

    /// The quirks dormouse applies on this host unless told not to.
    pub fn quirks(&self) -> HostQuirks {
        match self {
            HostKind::HardwareKvm { .. } => HostQuirks::default(),
            HostKind::Pvm { emulates_ring0 } => HostQuirks {
                // The PVM hypervisor has no nested state; the ioctl fails there.
                skip_nested_state: true,
                guest_cmdline: if *emulates_ring0 {
                    EMULATED_RING0_CMDLINE.to_string()
                } else {
                    String::new()
                },
            },
        }
    }
}

impl fmt::Display for HostKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostKind::HardwareKvm { vendor } => write!(f, "hardware KVM ({vendor:?})"),
            HostKind::Pvm {
                emulates_ring0: true,
            } => write!(
                f,
                "PVM (kvm_pvm), guest ring 0 emulated: unmodified guests boot slowly"
            ),
            HostKind::Pvm {
                emulates_ring0: false,
            } => write!(f, "PVM (kvm_pvm) with a PVM-aware guest"),
        }
    }
}

/// Guest command-line options an emulating PVM host needs (see guest-kernel/README.md).
/// `clearcpuid=`: the guest sees the host's CPUID whatever the VMM sets, and the emulator cannot
/// run these instructions in ring 0. The kernel reads at most 127 characters of the value, so two
/// long names are given as feature bit numbers: 311 is `clflushopt` (word 9, bit 23) and 129 is
/// `pclmulqdq` (word 4, bit 1). `erms` and `fsrm` are not faults but speed: the emulator runs
/// one `REP` iteration about as fast as one plain instruction, so without them the kernel copies
/// to and from user space with `REP MOVSQ` (8 bytes an iteration) instead of `REP MOVSB` (1 byte):
/// a 1 MiB agent `WriteFile` took about half the time (guest-kernel/README.md has the figures, and
/// the project's kernel also routes `memcpy` to `REP MOVSQ` then).
/// `rodata=off` and `noreplace-smp` each save over a second of emulated boot.
/// `GLIBC_TUNABLES=…` (the kernel hands it to init as an environment variable, and every process
/// inherits it): guest user space still sees AVX in the host's CPUID, but a kernel without XSAVE
/// does not preserve the YMM upper halves across context switches, so glibc's AVX string
/// functions would corrupt data. The value matches the agent's own fallback
/// (`agent_proto::NO_AVX_TUNABLE`), so the agent does not re-execute itself.
pub const EMULATED_RING0_CMDLINE: &str = "clearcpuid=smap,smep,xsave,cx16,pcid,fsgsbase,umip,popcnt,rdrand,rdseed,rdpid,clwb,311,avx,avx2,aes,129,sha_ni,movbe,bmi1,erms,fsrm rodata=off noreplace-smp GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-AVX_Fast_Unaligned_Load,-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ";

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostQuirks {
    pub skip_nested_state: bool,
    pub guest_cmdline: String,
}

/// What the guest kernel is, as far as the host kind cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestKernelKind {
    /// A PVM-aware kernel (built with CONFIG_PVM_GUEST): runs natively on PVM.
    PvmAware,
    Unmodified,
}

/// Detects the host kind. `sysfs` is normally "/sys"; tests pass a fake tree.
pub fn detect(sysfs: &Path, vendor: CpuVendor, guest: GuestKernelKind) -> HostKind {
    if sysfs.join("module/kvm_pvm").exists() {
        HostKind::Pvm {
            emulates_ring0: guest == GuestKernelKind::Unmodified,
        }
    } else {
        HostKind::HardwareKvm { vendor }
    }
}

/// Vendor from CPUID leaf 0's signature registers (EBX, EDX, ECX).
pub fn vendor_from_signature(ebx: u32, edx: u32, ecx: u32) -> CpuVendor {
    let mut sig = [0u8; 12];
    sig[0..4].copy_from_slice(&ebx.to_le_bytes());
    sig[4..8].copy_from_slice(&edx.to_le_bytes());
    sig[8..12].copy_from_slice(&ecx.to_le_bytes());
    match &sig {
        b"GenuineIntel" => CpuVendor::Intel,
        b"AuthenticAMD" | b"HygonGenuine" => CpuVendor::Amd,
        _ => CpuVendor::Other,
    }
}

/// A PVM-aware guest kernel is linked in the PVM guest address range (the top 2 GiB are
/// reserved for the PVM host); unmodified kernels start at 0xffffffff80000000 or are bzImages.
/// Detection is from the ELF entry point so that no guest cooperation is needed.
pub fn guest_kernel_kind(elf_entry: Option<u64>) -> GuestKernelKind {
    match elf_entry {
        Some(entry) if (0xffff_d900_0000_0000..0xffff_ff00_0000_0000).contains(&entry) => {
            GuestKernelKind::PvmAware
        }
        _ => GuestKernelKind::Unmodified,
    }
}

/// Page-table depth of the host (4 or 5 levels): a snapshot is only restorable on a host whose
/// guests see the same depth. Read from the CPU flags; `la57` means 5-level paging is available.
pub fn host_paging_levels() -> u8 {
    match std::fs::read_to_string("/proc/cpuinfo") {
        Ok(s)
            if s.lines()
                .any(|l| l.starts_with("flags") && l.contains(" la57")) =>
        {
            5
        }
        _ => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_pvm_from_sysfs_module() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            detect(dir.path(), CpuVendor::Amd, GuestKernelKind::Unmodified),
            HostKind::HardwareKvm {
                vendor: CpuVendor::Amd
            }
        );
        std::fs::create_dir_all(dir.path().join("module/kvm_pvm")).unwrap();
        let host = detect(dir.path(), CpuVendor::Amd, GuestKernelKind::Unmodified);
        assert_eq!(
            host,
            HostKind::Pvm {
                emulates_ring0: true
            }
        );
        assert!(host.quirks().guest_cmdline.contains("clearcpuid="));
        assert!(host.quirks().skip_nested_state);
        let pvm_aware = detect(dir.path(), CpuVendor::Amd, GuestKernelKind::PvmAware);
        assert!(pvm_aware.quirks().guest_cmdline.is_empty());
    }

    #[test]
    fn vendor_signatures() {
        // "GenuineIntel" = EBX "Genu", EDX "ineI", ECX "ntel"
        let v = vendor_from_signature(0x756e_6547, 0x4965_6e69, 0x6c65_746e);
        assert_eq!(v, CpuVendor::Intel);
        let v = vendor_from_signature(0x6874_7541, 0x6974_6e65, 0x444d_4163);
        assert_eq!(v, CpuVendor::Amd);
        assert_eq!(vendor_from_signature(0, 0, 0), CpuVendor::Other);
    }

    #[test]
    fn clearcpuid_value_fits_the_kernel_limit() {
        let value = EMULATED_RING0_CMDLINE
            .split_whitespace()
            .find_map(|o| o.strip_prefix("clearcpuid="))
            .unwrap();
        // cmdline_find_option() copies into a 128-byte buffer, NUL included.
        assert!(value.len() <= 127, "{} chars", value.len());
    }

    #[test]
    fn guest_user_space_is_told_not_to_use_avx() {
        let tunables = EMULATED_RING0_CMDLINE
            .split_whitespace()
            .find_map(|o| o.strip_prefix("GLIBC_TUNABLES="))
            .unwrap();
        assert_eq!(tunables, agent_proto::NO_AVX_TUNABLE);
    }

    #[test]
    fn pvm_aware_kernel_from_entry() {
        assert_eq!(
            guest_kernel_kind(Some(0xffff_ffff_8100_0000)),
            GuestKernelKind::Unmodified
        );
        assert_eq!(
            guest_kernel_kind(Some(0xffff_d900_0100_0000)),
            GuestKernelKind::PvmAware
        );
        assert_eq!(guest_kernel_kind(None), GuestKernelKind::Unmodified);
    }
}
