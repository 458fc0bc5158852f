//! MSRs: which ones this host lets us save and restore, and reading/writing them in batches.
//!
//! KVM_GET_MSRS and KVM_SET_MSRS stop at the first MSR KVM refuses and return how many they
//! handled, so a refused MSR is skipped by restarting the batch just after it.

use std::collections::BTreeSet;
use std::sync::{Mutex, OnceLock};

use kvm_bindings::{kvm_msr_entry, Msrs, KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use super::StateError;

pub const MSR_IA32_TSC: u32 = 0x10;

/// MSRs per KVM_GET_MSRS/KVM_SET_MSRS call: KVM refuses (E2BIG) batches of MAX_IO_MSRS (256,
/// kvm-bindings' `KVM_MAX_MSR_ENTRIES`) or more.
const MSR_BATCH: usize = KVM_MAX_MSR_ENTRIES - 1;
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// MSRs held in `kvm_sregs` (APIC base, EFER, FS/GS base): saved there, never twice.
const SAVED_IN_SREGS: [u32; 4] = [0x1b, 0xc000_0080, 0xc000_0100, 0xc000_0101];

/// MSRs worth probing beyond KVM's index lists, which leave out some that guests write: MTRRs
/// (default type, 8 variable pairs, the fixed ranges), TSC_AUX, SPEC_CTRL, XSS, and the whole
/// 0x4b564dxx block where KVM's paravirtual MSRs and PVM's own live ("KVM" in ASCII). Whatever
/// the host does not know is dropped by the probe.
fn extra_candidates() -> impl Iterator<Item = u32> {
    const MTRR_DEF_TYPE: u32 = 0x2ff;
    const MTRR_VARIABLE: std::ops::RangeInclusive<u32> = 0x200..=0x20f;
    const MTRR_FIXED: [u32; 3] = [0x250, 0x258, 0x259];
    const MTRR_FIXED_4K: std::ops::RangeInclusive<u32> = 0x268..=0x26f;
    const OTHERS: [u32; 3] = [0xc000_0103, 0x48, 0xda0];
    const KVM_AND_PVM: std::ops::RangeInclusive<u32> = 0x4b56_4d00..=0x4b56_4dff;
    std::iter::once(MTRR_DEF_TYPE)
        .chain(MTRR_VARIABLE)
        .chain(MTRR_FIXED)
        .chain(MTRR_FIXED_4K)
        .chain(OTHERS)
        .chain(KVM_AND_PVM)
}

/// One MSR's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrEntry {
    pub index: u32,
    pub value: u64,
}

/// MSRs this host's KVM both reads and takes back, in the order to save them: KVM's index list,
/// its feature-MSR list, then [`extra_candidates`]. Probed on a throwaway VM and vCPU given
/// KVM's supported CPUID, so CPUID-gated MSRs count. Read-only MSRs (their value is the host's,
/// nothing to restore) and unknown ones are left out and logged at debug level.
///
/// The answer is the host's, so it is probed once per process (~20 ms, most of it making the
/// throwaway VM) and then served from memory.
pub fn supported_msr_indices(kvm: &Kvm) -> Result<Vec<u32>, StateError> {
    static SUPPORTED: OnceLock<Vec<u32>> = OnceLock::new();
    if let Some(indices) = SUPPORTED.get() {
        return Ok(indices.clone());
    }
    let indices = probe_msr_indices(kvm)?;
    Ok(SUPPORTED.get_or_init(|| indices).clone())
}

fn probe_msr_indices(kvm: &Kvm) -> Result<Vec<u32>, StateError> {
    let probe_err = |ioctl| move |source| StateError::ProbeIoctl { ioctl, source };
    let mut candidates: Vec<u32> = Vec::new();
    let mut seen = BTreeSet::new();
    let index_list = kvm
        .get_msr_index_list()
        .map_err(probe_err("KVM_GET_MSR_INDEX_LIST"))?;
    let feature_list = if kvm.check_extension(Cap::GetMsrFeatures) {
        kvm.get_msr_feature_index_list()
            .map(|l| l.as_slice().to_vec())
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    for index in index_list
        .as_slice()
        .iter()
        .copied()
        .chain(feature_list)
        .chain(extra_candidates())
    {
        if !SAVED_IN_SREGS.contains(&index) && seen.insert(index) {
            candidates.push(index);
        }
    }

    let vm = kvm.create_vm().map_err(probe_err("KVM_CREATE_VM"))?;
    // LAPIC-backed MSRs (TSC deadline) need the in-kernel irqchip, as real VMs have.
    vm.create_irq_chip()
        .map_err(probe_err("KVM_CREATE_IRQCHIP"))?;
    let vcpu = vm.create_vcpu(0).map_err(probe_err("KVM_CREATE_VCPU"))?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(probe_err("KVM_GET_SUPPORTED_CPUID"))?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(probe_err("KVM_SET_CPUID2"))?;

    let read = read_msrs(&vcpu, &candidates).map_err(probe_err("KVM_GET_MSRS"))?;
    let written = write_msrs(&vcpu, &read.values).map_err(probe_err("KVM_SET_MSRS"))?;
    let read_only: Vec<u32> = written.rejected.iter().map(|m| m.index).collect();
    tracing::debug!(
        "KVM saves {} MSRs; unknown to it: {}; read-only: {}",
        written.accepted.len(),
        hex_list(&read.rejected),
        hex_list(&read_only)
    );
    Ok(written.accepted.iter().map(|m| m.index).collect())
}

/// What a batched KVM_GET_MSRS pass returned.
#[derive(Debug, Default)]
pub(super) struct MsrRead {
    pub values: Vec<MsrEntry>,
    /// Indices KVM refused to read.
    pub rejected: Vec<u32>,
}

/// Reads `indices`, skipping the ones KVM refuses.
pub(super) fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<MsrRead, kvm_ioctls::Error> {
    let mut out = MsrRead {
        values: Vec::with_capacity(indices.len()),
        rejected: Vec::new(),
    };
    let mut rest = indices;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(MSR_BATCH)];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| too_big())?;
        let read = fd.get_msrs(&mut msrs)?;
        out.values
            .extend(msrs.as_slice().iter().take(read).map(|e| MsrEntry {
                index: e.index,
                value: e.data,
            }));
        rest = skip_past(rest, batch.len(), read, |index| out.rejected.push(index));
    }
    Ok(out)
}

/// What a batched KVM_SET_MSRS pass did.
#[derive(Debug, Default)]
pub(super) struct MsrWrite {
    pub accepted: Vec<MsrEntry>,
    pub rejected: Vec<MsrEntry>,
}

/// Writes `entries`, skipping the ones KVM refuses.
pub(super) fn write_msrs(fd: &VcpuFd, entries: &[MsrEntry]) -> Result<MsrWrite, kvm_ioctls::Error> {
    let mut out = MsrWrite::default();
    let mut rest = entries;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(MSR_BATCH)];
        let raw: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: m.value,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&raw).map_err(|_| too_big())?;
        let written = fd.set_msrs(&msrs)?;
        out.accepted.extend(batch.iter().take(written));
        rest = skip_past(rest, batch.len(), written, |m| out.rejected.push(m));
    }
    Ok(out)
}

/// The remainder after a batch of `batch_len` of which the first `done` succeeded: all of it
/// done, or the first failure reported to `rejected` and skipped.
fn skip_past<T: Copy>(
    rest: &[T],
    batch_len: usize,
    done: usize,
    mut rejected: impl FnMut(T),
) -> &[T] {
    if done >= batch_len {
        return rest.get(batch_len..).unwrap_or_default();
    }
    if let Some(&failed) = rest.get(done) {
        rejected(failed);
    }
    rest.get(done + 1..).unwrap_or_default()
}

fn too_big() -> kvm_ioctls::Error {
    kvm_ioctls::Error::new(libc::E2BIG)
}

/// Logs at debug level the MSRs a vCPU refused to read, each index once per process (every
/// vCPU of every snapshot would repeat the same list).
pub(super) fn log_unreadable_once(vcpu: u8, indices: &[u32]) {
    static LOGGED: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());
    let mut logged = LOGGED.lock().unwrap_or_else(|e| e.into_inner());
    let new: Vec<u32> = indices
        .iter()
        .copied()
        .filter(|i| logged.insert(*i))
        .collect();
    if !new.is_empty() {
        tracing::debug!(
            "vCPU {vcpu}: KVM refused to read MSRs {}; not saved",
            hex_list(&new)
        );
    }
}

/// "0x10 0x4b564d08-0x4b564d0f": consecutive indices as ranges (the probe refuses whole blocks).
fn hex_list(indices: &[u32]) -> String {
    let mut runs: Vec<(u32, u32)> = Vec::new();
    for &index in indices {
        match runs.last_mut() {
            Some((_, end)) if end.checked_add(1) == Some(index) => *end = index,
            _ => runs.push((index, index)),
        }
    }
    if runs.is_empty() {
        return "none".to_string();
    }
    runs.iter()
        .map(|&(start, end)| {
            if start == end {
                format!("{start:#x}")
            } else {
                format!("{start:#x}-{end:#x}")
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skipping_a_refused_entry_resumes_after_it() {
        let all = [1, 2, 3, 4, 5];
        let mut refused = Vec::new();
        // A batch of 3 of which 1 went through: entry 2 refused, resume at 3.
        let rest = skip_past(&all, 3, 1, |i| refused.push(i));
        assert_eq!(rest, &[3, 4, 5]);
        assert_eq!(refused, [2]);
        // A full batch: nothing refused.
        let rest = skip_past(rest, 3, 3, |i| refused.push(i));
        assert!(rest.is_empty());
        assert_eq!(refused, [2]);
        // The last entry refused: nothing left.
        let rest = skip_past(&all[4..], 1, 0, |i| refused.push(i));
        assert!(rest.is_empty());
        assert_eq!(refused, [2, 5]);
    }

    #[test]
    fn hex_lists_fold_runs() {
        assert_eq!(hex_list(&[]), "none");
        assert_eq!(
            hex_list(&[0x10, 0x20, 0x21, 0x22, 0x30]),
            "0x10 0x20-0x22 0x30"
        );
        assert_eq!(hex_list(&[u32::MAX, 0]), "0xffffffff 0x0");
    }

    #[test]
    fn extra_candidates_cover_pvm_and_skip_sregs_msrs() {
        let extra: Vec<u32> = extra_candidates().collect();
        assert!(extra.contains(&0x4b56_4df0), "PVM's MSR block is probed");
        assert!(extra.contains(&0x2ff), "MTRR default type is probed");
        assert!(SAVED_IN_SREGS.iter().all(|i| !extra.contains(i)));
    }
}
