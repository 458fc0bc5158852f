//! One vCPU's KVM state: save, and restore into a fresh vCPU.
//!
//! Ordering follows Firecracker's and Cloud Hypervisor's, and the KVM API notes:
//! - save: MP state first (KVM_GET_MP_STATE accepts pending INIT/SIPI, which changes LAPIC
//!   state), vCPU events last (other GETs can change what is pending);
//! - restore: CPUID first (it decides which MSRs and XSAVE features exist); SREGS before REGS and
//!   before the LAPIC (SREGS carries the APIC base); MSRs after the LAPIC, TSC deadline last of
//!   them (KVM arms the timer from it against the restored TSC); MP state and vCPU events last
//!   (KVM_SET_REGS drops pending exceptions that the events put back).

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Xsave, KVM_MAX_CPUID_ENTRIES,
    KVM_VCPUEVENT_VALID_NMI_PENDING, KVM_VCPUEVENT_VALID_SIPI_VECTOR,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};

use super::caps::{host_caps, HostCaps};
use super::msrs::{self, MsrEntry, MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE};
use super::{vcpu_ioctl, StateError};

/// 32-bit words in the legacy (pre-XSAVE2) `kvm_xsave` buffer.
const XSAVE_LEGACY_WORDS: usize = std::mem::size_of::<kvm_xsave>() / 4;
/// A bound on the XSAVE buffer a snapshot may claim (today's largest, with AMX, is ~11 KiB).
const XSAVE_MAX_WORDS: usize = (1 << 20) / 4;

/// Tolerance between the saved and the host TSC frequency before scaling is needed: 250 ppm,
/// as QEMU and Firecracker use (frequencies differ that much between boots of one machine).
const TSC_KHZ_TOLERANCE_PPM: u64 = 250;

/// `kvm_fpu` with serde (kvm-bindings does not derive it for this struct).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        Self {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(f: &FpuState) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// Everything KVM holds for one vCPU. Nested-virtualization state is not saved: dormouse
/// guests do not run nested guests, and PVM has none (KVM_GET_NESTED_STATE must not be called
/// there).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// Always saved; on restore XSAVE (a superset) is applied after it when present.
    pub fpu: FpuState,
    /// The whole XSAVE buffer in 32-bit words (KVM_GET_XSAVE2's size, at least 1024 words);
    /// `None` when the host has no KVM_CAP_XSAVE.
    pub xsave: Option<Vec<u32>>,
    /// `None` when the host has no KVM_CAP_XCRS.
    pub xcrs: Option<kvm_xcrs>,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub vcpu_events: kvm_vcpu_events,
    /// The CPUID set on the vCPU (KVM_GET_CPUID2), as normalised at boot.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// `None` when the host cannot report it (no KVM_CAP_GET_TSC_KHZ).
    pub tsc_khz: Option<u32>,
    /// In save order; TSC deadline is restored last whatever its position.
    pub msrs: Vec<MsrEntry>,
}

/// Completes the I/O exit KVM last returned, so the saved state is past that instruction.
///
/// KVM finishes a PIO/MMIO exit (advancing RIP, storing an IN's data) only on the next
/// KVM_RUN; state read before that replays the access after a restore. This enters KVM_RUN with
/// `immediate_exit` set, which completes the exit and returns at once without running the guest.
/// Call it on the parked vCPU thread before [`save_vcpu`]; it is a no-op when nothing is pending.
pub fn complete_pending_io(fd: &mut VcpuFd, index: u8) -> Result<(), StateError> {
    fd.set_kvm_immediate_exit(1);
    let outcome = match fd.run() {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Err(e) => Err(StateError::VcpuIoctl {
            vcpu: index,
            ioctl: "KVM_RUN (immediate exit)",
            source: e,
        }),
        Ok(VcpuExit::Intr) => Ok(()),
        // A string instruction (`rep outsb`) can need more exits to finish, which only the
        // vCPU loop can serve: the caller should resume the vCPU and pause it again.
        Ok(exit) => Err(StateError::IoNotSettled {
            vcpu: index,
            exit: format!("{exit:?}"),
        }),
    };
    fd.set_kvm_immediate_exit(0);
    outcome
}

/// Reads vCPU `index`'s state. The vCPU must be outside KVM_RUN (parked), with its last I/O exit
/// completed ([`complete_pending_io`]). `msr_indices` normally comes from
/// [`super::supported_msr_indices`]; MSRs this vCPU refuses to read are skipped (logged once).
pub fn save_vcpu(fd: &VcpuFd, index: u8, msr_indices: &[u32]) -> Result<VcpuState, StateError> {
    let caps = host_caps()?;
    let err = |ioctl| vcpu_ioctl(index, ioctl);
    let mp_state = fd.get_mp_state().map_err(err("KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(err("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(err("KVM_GET_SREGS"))?;
    let fpu = FpuState::from(&fd.get_fpu().map_err(err("KVM_GET_FPU"))?);
    let xsave = match caps.xsave_size {
        Some(size) => Some(read_xsave(fd, size).map_err(err("KVM_GET_XSAVE2"))?),
        None => None,
    };
    let xcrs = if caps.xcrs {
        Some(fd.get_xcrs().map_err(err("KVM_GET_XCRS"))?)
    } else {
        None
    };
    let debug_regs = fd.get_debug_regs().map_err(err("KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(err("KVM_GET_LAPIC"))?;
    let cpuid = read_cpuid(fd).map_err(err("KVM_GET_CPUID2"))?;
    let tsc_khz = if caps.get_tsc_khz {
        Some(fd.get_tsc_khz().map_err(err("KVM_GET_TSC_KHZ"))?)
    } else {
        None
    };
    let read = msrs::read_msrs(fd, msr_indices).map_err(err("KVM_GET_MSRS"))?;
    msrs::log_unreadable_once(index, &read.rejected);
    let vcpu_events = fd.get_vcpu_events().map_err(err("KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState {
        regs,
        sregs,
        fpu,
        xsave,
        xcrs,
        debug_regs,
        lapic,
        mp_state,
        vcpu_events,
        cpuid,
        tsc_khz,
        msrs: read.values,
    })
}

fn read_xsave(fd: &VcpuFd, size: usize) -> Result<Vec<u32>, kvm_ioctls::Error> {
    if size <= std::mem::size_of::<kvm_xsave>() {
        return Ok(fd.get_xsave()?.region.to_vec());
    }
    let extra_words = (size - std::mem::size_of::<kvm_xsave>()).div_ceil(4);
    let mut xsave = Xsave::new(extra_words).map_err(|_| kvm_ioctls::Error::new(libc::ENOMEM))?;
    // SAFETY: `xsave` holds the 4 KiB header plus `extra_words` words, at least the `size` bytes
    // KVM_CAP_XSAVE2 said KVM_GET_XSAVE2 writes.
    unsafe { fd.get_xsave2(&mut xsave) }?;
    let region = &xsave.as_fam_struct_ref().xsave.region;
    Ok(region.iter().chain(xsave.as_slice()).copied().collect())
}

fn read_cpuid(fd: &VcpuFd) -> Result<Vec<kvm_cpuid_entry2>, kvm_ioctls::Error> {
    let cpuid = fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES)?;
    // KVM sets the count to the entries it holds; older kernels left zeroed slots after them.
    let empty = kvm_cpuid_entry2::default();
    Ok(cpuid
        .as_slice()
        .iter()
        .filter(|e| **e != empty)
        .copied()
        .collect())
}

/// Puts `state` into vCPU `index`, a fresh vCPU of a VM being restored (made with
/// `create_vcpu`, nothing else set). The state is checked before the first ioctl; on an error
/// the vCPU is half-restored and the VM must be dropped.
pub fn restore_vcpu(fd: &VcpuFd, index: u8, state: &VcpuState) -> Result<(), StateError> {
    let caps = host_caps()?;
    let plan = RestorePlan::new(index, state, caps)?;
    let err = |ioctl| vcpu_ioctl(index, ioctl);

    fd.set_cpuid2(&plan.cpuid).map_err(err("KVM_SET_CPUID2"))?;
    restore_tsc_khz(fd, index, state.tsc_khz, caps)?;
    fd.set_sregs(&state.sregs).map_err(err("KVM_SET_SREGS"))?;
    fd.set_regs(&state.regs).map_err(err("KVM_SET_REGS"))?;
    fd.set_fpu(&kvm_fpu::from(&state.fpu))
        .map_err(err("KVM_SET_FPU"))?;
    if let Some(xsave) = &plan.xsave {
        // SAFETY: `RestorePlan` sized the buffer to at least the bytes KVM_SET_XSAVE reads
        // (KVM_CAP_XSAVE2's size).
        unsafe { fd.set_xsave2(xsave) }.map_err(err("KVM_SET_XSAVE"))?;
    }
    if let Some(xcrs) = &state.xcrs {
        fd.set_xcrs(xcrs).map_err(err("KVM_SET_XCRS"))?;
    }
    fd.set_debug_regs(&state.debug_regs)
        .map_err(err("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&state.lapic).map_err(err("KVM_SET_LAPIC"))?;
    for batch in [&plan.msrs, &plan.deferred_msrs] {
        let written = msrs::write_msrs(fd, batch).map_err(err("KVM_SET_MSRS"))?;
        if let Some(m) = written.rejected.first() {
            return Err(StateError::MsrRejected {
                vcpu: index,
                index: m.index,
                value: m.value,
            });
        }
    }
    fd.set_mp_state(state.mp_state)
        .map_err(err("KVM_SET_MP_STATE"))?;
    fd.set_vcpu_events(&plan.vcpu_events)
        .map_err(err("KVM_SET_VCPU_EVENTS"))?;
    if caps.kvmclock_ctrl {
        // Tells the guest it was stopped, so its soft-lockup watchdog does not fire on the time
        // jump. EINVAL means the guest never enabled kvmclock: nothing to tell.
        if let Err(e) = fd.kvmclock_ctrl() {
            tracing::debug!("vCPU {index}: KVM_KVMCLOCK_CTRL: {e} (guest without kvmclock?)");
        }
    }
    Ok(())
}

/// What `restore_vcpu` hands to KVM, built and checked from the state before any ioctl.
struct RestorePlan {
    cpuid: CpuId,
    xsave: Option<Xsave>,
    msrs: Vec<MsrEntry>,
    deferred_msrs: Vec<MsrEntry>,
    vcpu_events: kvm_vcpu_events,
}

impl RestorePlan {
    fn new(vcpu: u8, state: &VcpuState, caps: &HostCaps) -> Result<Self, StateError> {
        let invalid = |reason: String| StateError::InvalidVcpuState { vcpu, reason };
        let count = state.cpuid.len();
        if count == 0 || count > KVM_MAX_CPUID_ENTRIES {
            return Err(invalid(format!(
                "{count} CPUID entries (KVM takes 1 to {KVM_MAX_CPUID_ENTRIES})"
            )));
        }
        let cpuid = CpuId::from_entries(&state.cpuid)
            .map_err(|e| invalid(format!("CPUID entries: {e:?}")))?;
        let xsave = match (&state.xsave, caps.xsave_size) {
            (None, _) => None,
            (Some(_), None) => {
                return Err(StateError::Unsupported {
                    vcpu,
                    what: "XSAVE state",
                })
            }
            (Some(words), Some(host_size)) => {
                Some(xsave_buffer(words, host_size).map_err(invalid)?)
            }
        };
        if state.xcrs.is_some() && !caps.xcrs {
            return Err(StateError::Unsupported {
                vcpu,
                what: "extended control registers (XCRs)",
            });
        }
        let (mut deferred_msrs, msrs): (Vec<MsrEntry>, Vec<MsrEntry>) = state
            .msrs
            .iter()
            .partition(|m| m.index == MSR_IA32_TSC_DEADLINE);
        fix_disarmed_tsc_deadline(&msrs, &mut deferred_msrs, &state.lapic);

        let mut vcpu_events = state.vcpu_events;
        // KVM_GET_VCPU_EVENTS fills the pending NMI and the SIPI vector but does not flag them;
        // without these flags KVM_SET_VCPU_EVENTS would drop them.
        vcpu_events.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR;
        Ok(Self {
            cpuid,
            xsave,
            msrs,
            deferred_msrs,
            vcpu_events,
        })
    }
}

/// The saved XSAVE words in a buffer at least as large as KVM reads on this host (zero-padded:
/// the XSAVE header says which components hold data).
fn xsave_buffer(words: &[u32], host_size: usize) -> Result<Xsave, String> {
    if words.len() < XSAVE_LEGACY_WORDS || words.len() > XSAVE_MAX_WORDS {
        return Err(format!(
            "XSAVE area of {} words (expected {XSAVE_LEGACY_WORDS} to {XSAVE_MAX_WORDS})",
            words.len()
        ));
    }
    let host_words = host_size.div_ceil(4);
    let extra_words = words
        .len()
        .max(host_words)
        .saturating_sub(XSAVE_LEGACY_WORDS);
    let mut xsave = Xsave::new(extra_words).map_err(|e| format!("XSAVE buffer: {e:?}"))?;
    let (head, tail) = words.split_at(XSAVE_LEGACY_WORDS);
    // SAFETY: only the fixed-size `region` is written; the FAM length is left as allocated.
    let region = unsafe { &mut xsave.as_mut_fam_struct().xsave.region };
    region.copy_from_slice(head);
    for (dst, src) in xsave.as_mut_slice().iter_mut().zip(tail) {
        *dst = *src;
    }
    Ok(xsave)
}

/// A saved TSC deadline of 0 while the LAPIC timer is in TSC-deadline mode can mean the timer
/// fired but KVM had not yet injected the interrupt when the state was read (the pending count
/// is not part of the LAPIC state): that interrupt would be lost and the guest would wait for it
/// forever. Rearming the deadline at the saved TSC makes it fire at once; a guest that had
/// already taken it sees one spurious timer interrupt, which Linux tolerates. (Firecracker does
/// the same.)
fn fix_disarmed_tsc_deadline(
    msrs: &[MsrEntry],
    deferred: &mut [MsrEntry],
    lapic: &kvm_lapic_state,
) {
    if !lapic_timer_in_tsc_deadline_mode(lapic) {
        return;
    }
    let Some(tsc) = msrs
        .iter()
        .find(|m| m.index == MSR_IA32_TSC)
        .map(|m| m.value)
    else {
        return;
    };
    for m in deferred.iter_mut().filter(|m| m.value == 0) {
        m.value = tsc;
    }
}

/// LVT timer register, mode bits 17-18: 0b10 is TSC-deadline.
fn lapic_timer_in_tsc_deadline_mode(lapic: &kvm_lapic_state) -> bool {
    const APIC_LVTT: usize = 0x320;
    const MODE_SHIFT: u32 = 17;
    const MODE_TSC_DEADLINE: u32 = 0b10;
    lapic_reg(lapic, APIC_LVTT).is_some_and(|v| (v >> MODE_SHIFT) & 0b11 == MODE_TSC_DEADLINE)
}

pub(super) fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> Option<u32> {
    let bytes = lapic.regs.get(offset..offset.checked_add(4)?)?;
    let mut word = [0u8; 4];
    for (dst, src) in word.iter_mut().zip(bytes) {
        *dst = *src as u8;
    }
    Some(u32::from_le_bytes(word))
}

/// Sets the saved TSC frequency when this host's differs beyond the tolerance; fails when KVM
/// cannot scale the TSC, rather than let guest time run fast or slow.
fn restore_tsc_khz(
    fd: &VcpuFd,
    vcpu: u8,
    saved: Option<u32>,
    caps: &HostCaps,
) -> Result<(), StateError> {
    let Some(saved_khz) = saved else {
        return Ok(());
    };
    if !caps.get_tsc_khz {
        tracing::debug!("vCPU {vcpu}: cannot read this host's TSC frequency; assuming it matches");
        return Ok(());
    }
    let host_khz = fd
        .get_tsc_khz()
        .map_err(vcpu_ioctl(vcpu, "KVM_GET_TSC_KHZ"))?;
    if !tsc_scaling_needed(saved_khz, host_khz) {
        return Ok(());
    }
    if !caps.tsc_control {
        return Err(StateError::TscFrequency {
            vcpu,
            saved_khz,
            host_khz,
        });
    }
    fd.set_tsc_khz(saved_khz)
        .map_err(vcpu_ioctl(vcpu, "KVM_SET_TSC_KHZ"))
}

fn tsc_scaling_needed(saved_khz: u32, host_khz: u32) -> bool {
    let diff = u64::from(saved_khz.abs_diff(host_khz));
    diff * 1_000_000 > u64::from(saved_khz) * TSC_KHZ_TOLERANCE_PPM
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lapic_with_lvtt(value: u32) -> kvm_lapic_state {
        let mut lapic = kvm_lapic_state::default();
        for (dst, src) in lapic.regs[0x320..0x324].iter_mut().zip(value.to_le_bytes()) {
            *dst = src as libc::c_char;
        }
        lapic
    }

    #[test]
    fn tsc_tolerance_is_250_ppm() {
        assert!(!tsc_scaling_needed(2_445_432, 2_445_432));
        assert!(!tsc_scaling_needed(2_000_000, 2_000_500)); // exactly 250 ppm
        assert!(tsc_scaling_needed(2_000_000, 2_000_501));
        assert!(tsc_scaling_needed(u32::MAX, 0));
    }

    #[test]
    fn disarmed_deadline_is_rearmed_only_in_deadline_mode() {
        let tsc = MsrEntry {
            index: MSR_IA32_TSC,
            value: 1234,
        };
        let zero_deadline = MsrEntry {
            index: MSR_IA32_TSC_DEADLINE,
            value: 0,
        };
        let mut deferred = [zero_deadline];
        fix_disarmed_tsc_deadline(&[tsc], &mut deferred, &lapic_with_lvtt(0x1_00ef));
        assert_eq!(deferred[0].value, 0, "one-shot mode: left alone");
        fix_disarmed_tsc_deadline(&[tsc], &mut deferred, &lapic_with_lvtt(0x4_00ef));
        assert_eq!(
            deferred[0].value, 1234,
            "deadline mode: rearmed at the saved TSC"
        );
        let mut armed = [MsrEntry {
            index: MSR_IA32_TSC_DEADLINE,
            value: 99,
        }];
        fix_disarmed_tsc_deadline(&[tsc], &mut armed, &lapic_with_lvtt(0x4_00ef));
        assert_eq!(armed[0].value, 99, "an armed deadline is kept");
    }

    #[test]
    fn xsave_buffer_pads_to_the_host_size_and_rejects_bad_lengths() {
        let mut words = vec![0u32; XSAVE_LEGACY_WORDS + 2];
        words[0] = 0x37f;
        words[XSAVE_LEGACY_WORDS + 1] = 7;
        let buf = xsave_buffer(&words, 4096 + 16).unwrap();
        assert_eq!(buf.as_fam_struct_ref().xsave.region[0], 0x37f);
        assert_eq!(buf.as_slice(), &[0, 7, 0, 0]);
        assert!(xsave_buffer(&[0; 10], 4096).is_err());
        assert!(xsave_buffer(&vec![0; XSAVE_MAX_WORDS + 1], 4096).is_err());
    }

    #[test]
    fn fpu_converts_both_ways() {
        let mut raw = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            last_ip: 0xdead,
            ..Default::default()
        };
        raw.xmm[3][7] = 0x5a;
        raw.fpr[7][15] = 0xa5;
        assert_eq!(kvm_fpu::from(&FpuState::from(&raw)), raw);
    }
}
