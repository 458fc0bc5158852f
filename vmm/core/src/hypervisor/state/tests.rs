//! Save and restore against this machine's real /dev/kvm: a tiny guest stopped half-way through
//! its message is saved, restored into a new VM from serialized bytes, and must finish the
//! message there. Skipped without /dev/kvm, unless CI is set (then a missing KVM fails).
//!
//! Fields KVM legitimately changes between a save, a restore and a second save, and which the
//! comparison therefore allows to move: the TSC MSR (it keeps counting), the LAPIC timer's
//! current count (derived from time), the PIT channels' load times (host timestamps KVM resets
//! on restore) and kvmclock (it keeps running, and catches up on restore).

use std::path::Path;

use kvm_bindings::{kvm_pit_state2, KVM_IRQCHIP_IOAPIC};
use kvm_ioctls::{VcpuExit, VcpuFd};

use super::caps::host_caps;
use super::vcpu::lapic_reg;
use super::*;
use crate::boot::{self, BootSetup};
use crate::hypervisor::vcpu::create_boot_vcpu;
use crate::hypervisor::{Hypervisor, Vm, VmSetup};
use crate::memory::create_guest_memory;
use crate::tiny_guest::{elf_image, TinyGuestEnd, TINY_GUEST_MESSAGE};
use devices::GuestMemory;

const MEM_MIB: u64 = 16;
const SERIAL_PORT: u16 = 0x3f8;
const I8042_PORT: u16 = 0x64;
/// Bytes of the tiny guest's message printed before the snapshot.
const PRINTED_BEFORE_SAVE: usize = 8;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const APIC_TMCCT: usize = 0x390;

/// The host's KVM, or `None` (the test is skipped) when there is none.
fn kvm_or_skip(test: &str) -> Option<Hypervisor> {
    if !Path::new("/dev/kvm").exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: CI is set but /dev/kvm is missing"
        );
        eprintln!("{test}: skipped, no /dev/kvm on this machine");
        return None;
    }
    Some(Hypervisor::open().expect("/dev/kvm exists but cannot be used"))
}

/// A VM with the tiny guest loaded as the boot path loads a kernel. Fields drop in order: the
/// VM before the memory it maps.
struct TestVm {
    vm: Vm,
    _mem: GuestMemory,
    entry: u64,
}

fn tiny_guest_vm(hv: &Hypervisor) -> TestVm {
    tiny_guest_vm_with(hv, true)
}

fn tiny_guest_vm_with(hv: &Hypervisor, pit: bool) -> TestVm {
    let mem = create_guest_memory(MEM_MIB).unwrap();
    let vm = hv
        .create_vm(
            &mem,
            VmSetup {
                pit,
                dirty_log: false,
            },
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("tiny-guest.elf");
    std::fs::write(&kernel, elf_image(TinyGuestEnd::Reset)).unwrap();
    let setup = BootSetup {
        kernel: &kernel,
        initrd: None,
        cmdline: "",
        vcpus: 1,
        mem_size: MEM_MIB << 20,
    };
    let loaded = boot::setup_memory(&mem, &setup).unwrap();
    TestVm {
        vm,
        _mem: mem,
        entry: loaded.entry,
    }
}

/// Runs the guest until it has printed `serial_limit` bytes or written the i8042 reset;
/// returns what it printed and whether it reset.
fn run_guest(fd: &mut VcpuFd, serial_limit: usize) -> (Vec<u8>, bool) {
    let mut serial = Vec::new();
    for _ in 0..10_000 {
        match fd.run() {
            Ok(VcpuExit::IoOut(SERIAL_PORT, data)) => {
                serial.extend_from_slice(data);
                if serial.len() >= serial_limit {
                    return (serial, false);
                }
            }
            Ok(VcpuExit::IoOut(I8042_PORT, _)) => return (serial, true),
            Ok(other) => panic!("unexpected exit from the tiny guest: {other:?}"),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => panic!("KVM_RUN failed: {e}"),
        }
    }
    panic!("the tiny guest did not finish in 10000 exits");
}

fn msr_value(state: &VcpuState, index: u32) -> Option<u64> {
    state
        .msrs
        .iter()
        .find(|m| m.index == index)
        .map(|m| m.value)
}

fn assert_vcpu_states_match(saved: &VcpuState, resaved: &VcpuState) {
    assert_eq!(saved.regs, resaved.regs);
    assert_eq!(saved.sregs, resaved.sregs);
    assert_eq!(saved.fpu, resaved.fpu);
    assert_eq!(saved.xsave, resaved.xsave);
    assert_eq!(saved.xcrs, resaved.xcrs);
    assert_eq!(saved.debug_regs, resaved.debug_regs);
    assert_eq!(saved.mp_state, resaved.mp_state);
    assert_eq!(saved.vcpu_events, resaved.vcpu_events);
    assert_eq!(saved.cpuid, resaved.cpuid);
    assert_eq!(saved.tsc_khz, resaved.tsc_khz);
    for offset in (0..saved.lapic.regs.len()).step_by(16) {
        if offset != APIC_TMCCT {
            assert_eq!(
                lapic_reg(&saved.lapic, offset),
                lapic_reg(&resaved.lapic, offset),
                "LAPIC register {offset:#x}"
            );
        }
    }
    let indices = |s: &VcpuState| s.msrs.iter().map(|m| m.index).collect::<Vec<_>>();
    assert_eq!(indices(saved), indices(resaved));
    for (a, b) in saved.msrs.iter().zip(&resaved.msrs) {
        if a.index != MSR_IA32_TSC {
            assert_eq!(a, b, "MSR {:#x}", a.index);
        }
    }
    // The TSC moved on from the restored value, by less than a minute of ticks.
    let (tsc, tsc_again) = (
        msr_value(saved, MSR_IA32_TSC).unwrap(),
        msr_value(resaved, MSR_IA32_TSC).unwrap(),
    );
    let minute = u64::from(saved.tsc_khz.unwrap_or(5_000_000)) * 1000 * 60;
    assert!(
        tsc <= tsc_again && tsc_again - tsc < minute,
        "TSC {tsc} then {tsc_again}"
    );
}

fn without_load_times(mut pit: kvm_pit_state2) -> kvm_pit_state2 {
    for channel in &mut pit.channels {
        channel.count_load_time = 0;
    }
    pit
}

fn assert_vm_states_match(saved: &VmState, resaved: &VmState) {
    let bytes = |c: &kvm_bindings::kvm_irqchip| serde_json::to_vec(c).unwrap();
    assert_eq!(bytes(&saved.pic_master), bytes(&resaved.pic_master));
    assert_eq!(bytes(&saved.pic_slave), bytes(&resaved.pic_slave));
    assert_eq!(bytes(&saved.ioapic), bytes(&resaved.ioapic));
    assert_eq!(
        saved.pit.map(without_load_times),
        resaved.pit.map(without_load_times)
    );
    assert!(
        resaved.clock.clock >= saved.clock.clock,
        "kvmclock went back"
    );
}

#[test]
fn restored_vm_finishes_the_guest_where_it_stopped() {
    let Some(hv) = kvm_or_skip("restored_vm_finishes_the_guest_where_it_stopped") else {
        return;
    };
    let msr_indices = supported_msr_indices(&hv.kvm).unwrap();
    let source = tiny_guest_vm(&hv);
    let mut fd = create_boot_vcpu(&hv, &source.vm, 0, 1, source.entry).unwrap();
    let (printed, reset) = run_guest(&mut fd, PRINTED_BEFORE_SAVE);
    assert_eq!(printed, TINY_GUEST_MESSAGE[..PRINTED_BEFORE_SAVE]);
    assert!(!reset);

    complete_pending_io(&mut fd, 0).unwrap();
    let vcpu_state = save_vcpu(&fd, 0, &msr_indices).unwrap();
    let vm_state = save_vm(&source.vm.fd, source.vm.pit).unwrap();
    // `mov dx, 0x3f8` (4 bytes), then `mov al, c; out dx, al` (3 bytes) per character: RIP is
    // just past the last OUT, which KVM completed.
    let past_last_out = 4 + 3 * PRINTED_BEFORE_SAVE as u64;
    assert_eq!(vcpu_state.regs.rip, source.entry + past_last_out);
    assert_eq!(vcpu_state.regs.rdx & 0xffff, u64::from(SERIAL_PORT));
    assert!(
        vcpu_state.msrs.len() >= 10,
        "{} MSRs saved",
        vcpu_state.msrs.len()
    );
    eprintln!(
        "saved {} of {} supported MSRs; XSAVE {} words; TSC {:?} kHz; clock flags {:#x}",
        vcpu_state.msrs.len(),
        msr_indices.len(),
        vcpu_state.xsave.as_ref().map_or(0, Vec::len),
        vcpu_state.tsc_khz,
        vm_state.clock.flags
    );

    // Through bytes, as a snapshot file would carry them.
    let vcpu_bytes = serde_json::to_vec(&vcpu_state).unwrap();
    let vm_bytes = serde_json::to_vec(&vm_state).unwrap();
    let vcpu_back: VcpuState = serde_json::from_slice(&vcpu_bytes).unwrap();
    let vm_back: VmState = serde_json::from_slice(&vm_bytes).unwrap();
    assert_eq!(vcpu_back, vcpu_state);
    assert_eq!(serde_json::to_vec(&vm_back).unwrap(), vm_bytes);

    // A new VM with the same memory image and a bare vCPU: restore is construction.
    let target = tiny_guest_vm(&hv);
    let mut fd2 = target.vm.fd.create_vcpu(0).unwrap();
    restore_vm(&target.vm.fd, &vm_back).unwrap();
    restore_vcpu(&fd2, 0, &vcpu_back).unwrap();

    let resaved = save_vcpu(&fd2, 0, &msr_indices).unwrap();
    let vm_resaved = save_vm(&target.vm.fd, target.vm.pit).unwrap();
    assert_vcpu_states_match(&vcpu_state, &resaved);
    assert_vm_states_match(&vm_state, &vm_resaved);

    let (rest, reset) = run_guest(&mut fd2, usize::MAX);
    assert_eq!(rest, TINY_GUEST_MESSAGE[PRINTED_BEFORE_SAVE..]);
    assert!(reset, "the restored guest ran to its reset");
}

/// A fresh VM and bare vCPU to restore into.
fn restore_target(hv: &Hypervisor) -> (TestVm, VcpuFd) {
    let target = tiny_guest_vm(hv);
    let fd = target.vm.fd.create_vcpu(0).unwrap();
    (target, fd)
}

#[test]
fn corrupted_state_gives_clean_errors() {
    let Some(hv) = kvm_or_skip("corrupted_state_gives_clean_errors") else {
        return;
    };
    let msr_indices = supported_msr_indices(&hv.kvm).unwrap();
    let source = tiny_guest_vm(&hv);
    let fd = create_boot_vcpu(&hv, &source.vm, 0, 1, source.entry).unwrap();
    let good = save_vcpu(&fd, 0, &msr_indices).unwrap();
    let good_vm = save_vm(&source.vm.fd, source.vm.pit).unwrap();

    // Too many CPUID entries: refused before any ioctl, the vCPU untouched (still at reset).
    let (_t, target) = restore_target(&hv);
    let reset_regs = target.get_regs().unwrap();
    let mut bad = good.clone();
    let first = bad.cpuid[0];
    bad.cpuid.resize(300, first);
    let err = restore_vcpu(&target, 0, &bad).unwrap_err();
    assert!(
        matches!(err, StateError::InvalidVcpuState { vcpu: 0, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("300 CPUID entries"), "{err}");
    assert_eq!(target.get_regs().unwrap(), reset_regs);

    let mut bad = good.clone();
    bad.cpuid.clear();
    let err = restore_vcpu(&target, 0, &bad).unwrap_err();
    assert!(matches!(err, StateError::InvalidVcpuState { .. }), "{err}");

    if good.xsave.is_some() {
        let mut bad = good.clone();
        bad.xsave = Some(vec![0; 10]);
        let err = restore_vcpu(&target, 0, &bad).unwrap_err();
        assert!(err.to_string().contains("XSAVE area of 10 words"), "{err}");
    }

    // Long mode active (EFER.LMA) with paging off: KVM refuses the special registers.
    let (_t, target) = restore_target(&hv);
    let mut bad = good.clone();
    bad.sregs.cr0 &= !(1 << 31);
    let err = restore_vcpu(&target, 3, &bad).unwrap_err();
    assert!(
        matches!(
            err,
            StateError::VcpuIoctl {
                vcpu: 3,
                ioctl: "KVM_SET_SREGS",
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().starts_with("vCPU 3: KVM_SET_SREGS failed"),
        "{err}"
    );

    // An MSR no KVM knows.
    let (_t, target) = restore_target(&hv);
    let mut bad = good.clone();
    bad.msrs.push(MsrEntry {
        index: 0x1234_5678,
        value: 1,
    });
    let err = restore_vcpu(&target, 0, &bad).unwrap_err();
    assert!(
        matches!(
            err,
            StateError::MsrRejected {
                vcpu: 0,
                index: 0x1234_5678,
                value: 1
            }
        ),
        "{err}"
    );

    // A TSC at half this host's rate: scaled where KVM can, refused where it cannot.
    let (_t, target) = restore_target(&hv);
    let mut bad = good.clone();
    if let Some(khz) = bad.tsc_khz {
        bad.tsc_khz = Some(khz / 2);
        let result = restore_vcpu(&target, 0, &bad);
        if host_caps().unwrap().tsc_control {
            result.unwrap();
        } else {
            let err = result.unwrap_err();
            assert!(matches!(err, StateError::TscFrequency { .. }), "{err}");
        }
    }

    // PIC bytes labelled as the IOAPIC's: refused before KVM_SET_IRQCHIP could misload them.
    let (t, _fd) = restore_target(&hv);
    let mut bad_vm = good_vm.clone();
    bad_vm.pic_master.chip_id = KVM_IRQCHIP_IOAPIC;
    let err = restore_vm(&t.vm.fd, &bad_vm).unwrap_err();
    assert!(matches!(err, StateError::InvalidVmState(_)), "{err}");

    // The uncorrupted state still restores into a fresh VM.
    let (t, target) = restore_target(&hv);
    restore_vm(&t.vm.fd, &good_vm).unwrap();
    restore_vcpu(&target, 0, &good).unwrap();
}

#[test]
fn supported_msrs_are_saved_and_restored_on_this_host() {
    let Some(hv) = kvm_or_skip("supported_msrs_are_saved_and_restored_on_this_host") else {
        return;
    };
    // The probe logs what it leaves out at debug level; --nocapture shows it.
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_test_writer()
        .try_init();
    let started = std::time::Instant::now();
    let supported = supported_msr_indices(&hv.kvm).unwrap();
    let probe_time = started.elapsed();
    let listed = hv.kvm.get_msr_index_list().unwrap();
    let left_out: Vec<String> = listed
        .as_slice()
        .iter()
        .filter(|i| !supported.contains(i))
        .map(|i| format!("{i:#x}"))
        .collect();
    let beyond_list: Vec<String> = supported
        .iter()
        .filter(|i| !listed.as_slice().contains(i))
        .map(|i| format!("{i:#x}"))
        .collect();
    eprintln!(
        "KVM lists {} MSRs; dormouse saves {} (answered in {probe_time:?}, cached after the first probe); left out of KVM's \
         list: [{}]; added beyond it: [{}]",
        listed.as_slice().len(),
        supported.len(),
        left_out.join(" "),
        beyond_list.join(" ")
    );
    for must in [MSR_IA32_TSC, MSR_STAR, MSR_LSTAR] {
        assert!(supported.contains(&must), "{must:#x} missing");
    }
    // Saved in sregs, not as MSRs: APIC base, EFER.
    assert!(!supported.contains(&0x1b) && !supported.contains(&0xc000_0080));
    let mut unique = supported.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), supported.len(), "no MSR twice");
}

#[test]
fn guest_clock_catches_up_across_the_snapshot_gap() {
    let Some(hv) = kvm_or_skip("guest_clock_catches_up_across_the_snapshot_gap") else {
        return;
    };
    const HOUR_NS: u64 = 3600 * 1_000_000_000;
    const MINUTE_NS: u64 = 60 * 1_000_000_000;
    let source = tiny_guest_vm(&hv);
    let mut state = save_vm(&source.vm.fd, source.vm.pit).unwrap();
    // As if the snapshot had been taken an hour ago.
    state.clock_taken_at_unix_ns -= HOUR_NS;
    let saved = state.clock.clock;

    let (target, _fd) = restore_target(&hv);
    restore_vm(&target.vm.fd, &state).unwrap();
    let now = target.vm.fd.get_clock().unwrap().clock;
    assert!(
        now >= saved + HOUR_NS && now < saved + HOUR_NS + MINUTE_NS,
        "kvmclock {saved} restored as {now}: should be an hour on"
    );

    let (target, _fd) = restore_target(&hv);
    restore_vm_with_clock(&target.vm.fd, &state, GuestClock::Resume).unwrap();
    let now = target.vm.fd.get_clock().unwrap().clock;
    assert!(
        now >= saved && now < saved + MINUTE_NS,
        "kvmclock {saved} resumed as {now}"
    );
}

#[test]
fn a_vm_without_pit_saves_and_restores_without_one() {
    let Some(hv) = kvm_or_skip("a_vm_without_pit_saves_and_restores_without_one") else {
        return;
    };
    let source = tiny_guest_vm_with(&hv, false);
    assert!(!source.vm.pit);
    // KVM has no PIT to read: asking for it fails, so save_vm must not.
    assert!(source.vm.fd.get_pit2().is_err());
    let state = save_vm(&source.vm.fd, source.vm.pit).unwrap();
    assert!(state.pit.is_none());

    let target = tiny_guest_vm_with(&hv, false);
    restore_vm(&target.vm.fd, &state).unwrap();
    let resaved = save_vm(&target.vm.fd, target.vm.pit).unwrap();
    assert_vm_states_match(&state, &resaved);

    // A state with a PIT needs a VM with one: a clean error, not a silently dropped PIT.
    let with_pit = save_vm(&tiny_guest_vm(&hv).vm.fd, true).unwrap();
    assert!(with_pit.pit.is_some());
    let err = restore_vm(&target.vm.fd, &with_pit).unwrap_err();
    assert!(err.to_string().contains("KVM_SET_PIT2"), "{err}");
}
