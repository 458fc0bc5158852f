//! CPUID normalisation: start from KVM_GET_SUPPORTED_CPUID and give each vCPU its topology
//! (one socket, N cores, one thread each) and APIC id. Hypervisor leaves pass through.
//!
//! On an emulating PVM host the guest sees the host's CPUID whatever is set here (features are
//! then cleared on the guest command line instead); on hardware KVM this is what the guest sees.

use kvm_bindings::kvm_cpuid_entry2;

use crate::host::CpuVendor;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_AMD_EXT_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;

const ECX_HYPERVISOR: u32 = 1 << 31;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const EDX_HTT: u32 = 1 << 28;

/// Topology level types of leaf 0xB/0x1F ECX[15:8].
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Bits needed to hold `count` distinct ids.
fn id_bits(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

/// Rewrites `entries` for vCPU `cpu_index` of `cpu_count`.
pub fn normalize(
    entries: &mut [kvm_cpuid_entry2],
    cpu_index: u8,
    cpu_count: u8,
    vendor: CpuVendor,
    tsc_deadline: bool,
) {
    let apic_id = u32::from(cpu_index);
    let count = u32::from(cpu_count.max(1));
    let core_bits = id_bits(count);
    for entry in entries.iter_mut() {
        match entry.function {
            LEAF_FEATURES => {
                // EBX[31:24] initial APIC id, EBX[23:16] logical processors per package.
                entry.ebx = (entry.ebx & 0x0000_ffff) | (apic_id << 24) | ((count & 0xff) << 16);
                entry.ecx |= ECX_HYPERVISOR;
                if tsc_deadline {
                    entry.ecx |= ECX_TSC_DEADLINE;
                }
                if count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS if vendor == CpuVendor::Intel => {
                // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing this cache - 1.
                let cache_level = (entry.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 { count - 1 } else { 0 };
                entry.eax =
                    (entry.eax & 0x3fff) | ((sharing & 0xfff) << 14) | (((count - 1) & 0x3f) << 26);
            }
            LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
                entry.edx = apic_id;
                match entry.index {
                    0 => {
                        entry.eax = 0; // no SMT: shift 0 to reach the core level
                        entry.ebx = 1;
                        entry.ecx = (LEVEL_SMT << 8) | entry.index;
                    }
                    1 => {
                        entry.eax = core_bits;
                        entry.ebx = count;
                        entry.ecx = (LEVEL_CORE << 8) | entry.index;
                    }
                    _ => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = entry.index;
                    }
                }
            }
            LEAF_AMD_EXT_SIZES if vendor == CpuVendor::Amd => {
                // ECX[15:12] APIC id size, ECX[7:0] number of cores - 1.
                entry.ecx = (entry.ecx & !0xf0ff) | (core_bits << 12) | ((count - 1) & 0xff);
            }
            LEAF_AMD_EXT_APIC_ID if vendor == CpuVendor::Amd => {
                entry.eax = apic_id;
                entry.ebx = apic_id & 0xff; // core id; one thread per core
                entry.ecx = 0; // node id 0, one node
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0x0000_0800,
            ..Default::default()
        }
    }

    #[test]
    fn topology_per_vcpu() {
        for vendor in [CpuVendor::Intel, CpuVendor::Amd] {
            let mut e = vec![
                leaf(1, 0),
                leaf(0xb, 0),
                leaf(0xb, 1),
                leaf(0xb, 2),
                leaf(0x8000_0008, 0),
                leaf(0x8000_001e, 0),
                leaf(0x4000_0000, 0),
            ];
            normalize(&mut e, 3, 4, vendor, true);
            assert_eq!(e[0].ebx >> 24, 3, "APIC id");
            assert_eq!((e[0].ebx >> 16) & 0xff, 4, "logical count");
            assert_eq!(e[0].ebx & 0xffff, 0x800, "low bits kept");
            assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
            assert_ne!(e[0].ecx & ECX_TSC_DEADLINE, 0);
            assert_ne!(e[0].edx & EDX_HTT, 0);
            assert_eq!(e[1].edx, 3);
            assert_eq!((e[1].ecx >> 8) & 0xff, LEVEL_SMT);
            assert_eq!(e[2].eax, 2, "two bits for four cores");
            assert_eq!(e[2].ebx, 4);
            assert_eq!((e[2].ecx >> 8) & 0xff, LEVEL_CORE);
            assert_eq!(e[3].ebx, 0, "levels past core are invalid");
            assert_eq!(e[6].ebx, 0x800, "hypervisor leaf untouched");
            if vendor == CpuVendor::Amd {
                assert_eq!(e[4].ecx & 0xff, 3);
                assert_eq!(e[5].eax, 3);
            }
        }
    }

    #[test]
    fn single_cpu_has_no_htt() {
        let mut e = vec![leaf(1, 0)];
        e[0].edx = EDX_HTT;
        normalize(&mut e, 0, 1, CpuVendor::Intel, false);
        assert_eq!(e[0].edx & EDX_HTT, 0);
        assert_eq!(e[0].ecx & ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn id_bits_values() {
        assert_eq!([1, 2, 3, 4, 5, 32].map(id_bits), [0, 1, 2, 2, 3, 5]);
    }
}
