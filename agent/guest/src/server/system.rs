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

/// Syncs, then powers off / reboots via reboot(2). As PID 1 the agent must
/// never just exit (the kernel would panic), so this is also its last resort.
pub fn power_off_now(action: ShutdownAction) {
    let command = match action {
        ShutdownAction::PowerOff => libc::RB_POWER_OFF,
        ShutdownAction::Reboot => libc::RB_AUTOBOOT,
    };
    // SAFETY: sync and reboot take no pointers; reboot returns only on error.
    let rc = unsafe {
        libc::sync();
        libc::reboot(command)
    };
    if rc == -1 {
        tracing::error!(err = %io::Error::last_os_error(), "reboot(2) failed");
    }
}
