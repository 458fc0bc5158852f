//! VM-wide KVM state: the in-kernel PICs and IOAPIC, the PIT, and the kvmclock.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use super::{vm_ioctl, StateError};

#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    /// The PIT, when the VM has one (see `Hypervisor::guest_needs_pit`): a restore creates it
    /// exactly when the snapshot carries its state.
    pub pit: Option<kvm_pit_state2>,
    /// kvmclock as KVM_GET_CLOCK returned it.
    pub clock: kvm_clock_data,
    /// Host wall-clock time (ns since the Unix epoch) matching `clock.clock`: KVM's own reading
    /// when it gives one (KVM_CLOCK_REALTIME), else ours right after KVM_GET_CLOCK.
    pub clock_taken_at_unix_ns: u64,
}

impl fmt::Debug for VmState {
    // kvm_irqchip is a union and has no Debug; the chip ids say which is which.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VmState")
            .field("pic_master.chip_id", &self.pic_master.chip_id)
            .field("pic_slave.chip_id", &self.pic_slave.chip_id)
            .field("ioapic.chip_id", &self.ioapic.chip_id)
            .field("pit", &self.pit)
            .field("clock", &self.clock)
            .field("clock_taken_at_unix_ns", &self.clock_taken_at_unix_ns)
            .finish()
    }
}

/// How guest time continues after a restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestClock {
    /// kvmclock moves on by the wall-clock time between save and restore, so the guest's
    /// wall clock stays right (timers that expired meanwhile fire at once). The default.
    CatchUp,
    /// kvmclock resumes at the saved value: the guest sees no time pass while it was saved
    /// (its wall clock lags by the snapshot's age until something sets it).
    Resume,
}

/// Reads the VM-wide state (the PIT's when `pit`: the VM has one). The vCPUs must be parked
/// (outside KVM_RUN).
pub fn save_vm(vm: &VmFd, pit: bool) -> Result<VmState, StateError> {
    let pic_master = read_irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?;
    let pic_slave = read_irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?;
    let ioapic = read_irqchip(vm, KVM_IRQCHIP_IOAPIC)?;
    let pit = if pit {
        Some(vm.get_pit2().map_err(vm_ioctl("KVM_GET_PIT2"))?)
    } else {
        None
    };
    let clock = vm.get_clock().map_err(vm_ioctl("KVM_GET_CLOCK"))?;
    let clock_taken_at_unix_ns = if clock.flags & KVM_CLOCK_REALTIME != 0 {
        clock.realtime
    } else {
        unix_now_ns()
    };
    Ok(VmState {
        pic_master,
        pic_slave,
        ioapic,
        pit,
        clock,
        clock_taken_at_unix_ns,
    })
}

fn read_irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, StateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(vm_ioctl("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

/// Restores into a fresh VM (irqchip created, and the PIT when the state has one; vCPUs not yet
/// running), with guest time
/// catching up ([`GuestClock::CatchUp`]). Checks the state before the first ioctl; on an error
/// the VM must be dropped.
pub fn restore_vm(vm: &VmFd, state: &VmState) -> Result<(), StateError> {
    restore_vm_with_clock(vm, state, GuestClock::CatchUp)
}

pub fn restore_vm_with_clock(
    vm: &VmFd,
    state: &VmState,
    guest_clock: GuestClock,
) -> Result<(), StateError> {
    for (chip, expected, name) in [
        (&state.pic_master, KVM_IRQCHIP_PIC_MASTER, "PIC master"),
        (&state.pic_slave, KVM_IRQCHIP_PIC_SLAVE, "PIC slave"),
        (&state.ioapic, KVM_IRQCHIP_IOAPIC, "IOAPIC"),
    ] {
        // The chip id picks which chip KVM_SET_IRQCHIP overwrites: a wrong one would load, say,
        // PIC bytes into the IOAPIC.
        if chip.chip_id != expected {
            return Err(StateError::InvalidVmState(format!(
                "the {name} state has chip id {} (expected {expected})",
                chip.chip_id
            )));
        }
    }
    for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
        vm.set_irqchip(chip).map_err(vm_ioctl("KVM_SET_IRQCHIP"))?;
    }
    if let Some(pit) = &state.pit {
        vm.set_pit2(pit).map_err(vm_ioctl("KVM_SET_PIT2"))?;
    }
    let clock = clock_for_restore(state, guest_clock, unix_now_ns());
    vm.set_clock(&clock).map_err(vm_ioctl("KVM_SET_CLOCK"))
}

/// The kvm_clock_data to hand KVM_SET_CLOCK. Only the clock value is passed, with no flags:
/// KVM_CLOCK_TSC_STABLE and HOST_TSC are outputs that older kernels reject on input, and the
/// catch-up KVM_CLOCK_REALTIME would do is done here so that it works on every host, including
/// those (like PVM hosts) whose KVM_GET_CLOCK gives no realtime reading.
fn clock_for_restore(state: &VmState, guest_clock: GuestClock, now_unix_ns: u64) -> kvm_clock_data {
    let elapsed = match guest_clock {
        GuestClock::CatchUp => now_unix_ns.saturating_sub(state.clock_taken_at_unix_ns),
        GuestClock::Resume => 0,
    };
    kvm_clock_data {
        clock: state.clock.clock.saturating_add(elapsed),
        ..Default::default()
    }
}

fn unix_now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{KVM_CLOCK_HOST_TSC, KVM_CLOCK_TSC_STABLE};

    fn state_with_clock(clock: u64, flags: u32, taken_at: u64) -> VmState {
        VmState {
            pic_master: kvm_irqchip::default(),
            pic_slave: kvm_irqchip::default(),
            ioapic: kvm_irqchip::default(),
            pit: Some(kvm_pit_state2::default()),
            clock: kvm_clock_data {
                clock,
                flags,
                realtime: taken_at,
                ..Default::default()
            },
            clock_taken_at_unix_ns: taken_at,
        }
    }

    #[test]
    fn clock_catches_up_by_wall_time_and_drops_output_flags() {
        let flags = KVM_CLOCK_TSC_STABLE | KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC;
        let state = state_with_clock(5_000, flags, 1_000_000);
        let c = clock_for_restore(&state, GuestClock::CatchUp, 1_000_700);
        assert_eq!((c.clock, c.flags, c.realtime), (5_700, 0, 0));
        let c = clock_for_restore(&state, GuestClock::Resume, 1_000_700);
        assert_eq!(c.clock, 5_000);
    }

    #[test]
    fn clock_never_goes_back_or_overflows() {
        // The host clock stepped back since the save: no negative catch-up.
        let state = state_with_clock(5_000, 0, 1_000_000);
        assert_eq!(
            clock_for_restore(&state, GuestClock::CatchUp, 10).clock,
            5_000
        );
        // A corrupted snapshot cannot overflow the clock.
        let state = state_with_clock(u64::MAX - 1, 0, 0);
        assert_eq!(
            clock_for_restore(&state, GuestClock::CatchUp, 50).clock,
            u64::MAX
        );
    }
}
