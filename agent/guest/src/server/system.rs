//! Whole-system operations (clock, sync, power), behind a trait so tests on
//! the host do not change the host's clock or power it off.

use std::io;

use crate::proto::ShutdownAction;

pub trait SystemControl: Send + Sync + 'static {
    /// Sets CLOCK_REALTIME.
    fn set_time(&self, unix_nanos: i64) -> io::Result<()>;
    /// Flushes all file systems.
    fn sync(&self);
    /// Powers off or reboots the machine. Returns only if that is not
    /// possible (then the agent just stops serving).
    fn power(&self, action: ShutdownAction);
}

/// The real thing: syscalls. Power actions only when running as PID 1.
#[derive(Debug, Clone, Copy)]
pub struct LinuxSystem {
    pub is_init: bool,
}

impl SystemControl for LinuxSystem {
    fn set_time(&self, unix_nanos: i64) -> io::Result<()> {
        let seconds = unix_nanos.div_euclid(1_000_000_000);
        let nanos = unix_nanos.rem_euclid(1_000_000_000);
        let time = libc::timespec {
            tv_sec: seconds,
            tv_nsec: nanos,
        };
        // SAFETY: clock_settime reads the timespec we pass.
        if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &time) } == -1 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn sync(&self) {
        // SAFETY: sync takes no arguments and cannot fail.
        unsafe { libc::sync() };
    }

    fn power(&self, action: ShutdownAction) {
        if !self.is_init {
            return;
        }
        power_off_now(action);
    }
}

/// The reboot(2) command for `action`. Without ACPI (`acpi`: `/sys/firmware/acpi` exists) a
/// kernel cannot power the machine off: `RB_POWER_OFF` halts the CPUs and the VM stays up,
/// doing nothing, until its host kills it. A microVM monitor (dormouse, like Firecracker) ends
/// the VM when its guest reboots, so there a power-off is a reboot.
pub fn reboot_command(action: ShutdownAction, acpi: bool) -> libc::c_int {
    match action {
        ShutdownAction::PowerOff if acpi => libc::RB_POWER_OFF,
        ShutdownAction::PowerOff | ShutdownAction::Reboot => libc::RB_AUTOBOOT,
    }
}

/// Syncs, then powers off / reboots via reboot(2). As PID 1 the agent must
/// never just exit (the kernel would panic), so this is also its last resort.
pub fn power_off_now(action: ShutdownAction) {
    let acpi = std::path::Path::new("/sys/firmware/acpi").exists();
    let command = reboot_command(action, acpi);
    // SAFETY: sync and reboot take no pointers; reboot returns only on error.
    let rc = unsafe {
        libc::sync();
        libc::reboot(command)
    };
    if rc == -1 {
        tracing::error!(err = %io::Error::last_os_error(), "reboot(2) failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_power_off_without_acpi_is_a_reboot() {
        assert_eq!(
            reboot_command(ShutdownAction::PowerOff, true),
            libc::RB_POWER_OFF
        );
        assert_eq!(
            reboot_command(ShutdownAction::PowerOff, false),
            libc::RB_AUTOBOOT
        );
        assert_eq!(
            reboot_command(ShutdownAction::Reboot, true),
            libc::RB_AUTOBOOT
        );
        assert_eq!(
            reboot_command(ShutdownAction::Reboot, false),
            libc::RB_AUTOBOOT
        );
    }
}
