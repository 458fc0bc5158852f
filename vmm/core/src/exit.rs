//! How a VM ends: the reason ([`VmExit`]) and the one place every thread reports it to
//! ([`ExitSink`]), which the VM's owner waits on. A leaf module: vCPUs, devices, the event loop
//! and the panic guard all report here.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};

/// Why the VM stopped. The first reason reported wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest asked for a reset (i8042 0xfe, triple fault, or KVM's reset event).
    GuestReboot,
    /// The guest powered off (KVM shutdown system event, or a halt without an irqchip).
    GuestPowerOff,
    /// The guest kernel panicked (seen on the console, or KVM's crash event).
    GuestPanic,
    /// The host asked the VM to stop (signal, API, library call).
    HostShutdown,
    /// The VMM or KVM failed; the message says how.
    Failed(String),
}

impl VmExit {
    /// Process exit status for the CLI: 0 for clean ends, 1 for failures.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmExit::GuestReboot | VmExit::GuestPowerOff | VmExit::HostShutdown => 0,
            VmExit::GuestPanic | VmExit::Failed(_) => 1,
        }
    }
}

/// Called once with the reason the VM ended (see [`ExitSink::on_exit`]).
pub type ExitCallback = Box<dyn FnOnce(&VmExit) + Send>;

/// Where vCPUs and devices report the end of the VM; the owner waits on it.
#[derive(Default)]
pub struct ExitSink {
    reason: Mutex<Option<VmExit>>,
    cv: Condvar,
    /// Set with `reason`: the vCPU loop checks it after each I/O exit without taking the lock.
    ended: AtomicBool,
    /// Run (outside the lock) by the report that ends the VM.
    callbacks: Mutex<Vec<ExitCallback>>,
}

impl ExitSink {
    /// Records `reason` unless another one came first; returns whether it was recorded.
    pub fn report(&self, reason: VmExit) -> bool {
        let mut slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() {
            return false;
        }
        tracing::info!("VM exit: {reason:?}");
        *slot = Some(reason.clone());
        self.ended.store(true, Ordering::Release);
        self.cv.notify_all();
        drop(slot);
        let callbacks =
            std::mem::take(&mut *self.callbacks.lock().unwrap_or_else(|e| e.into_inner()));
        for callback in callbacks {
            callback(&reason);
        }
        true
    }

    /// Calls `callback` with the reason once the VM has ended: at once if it already has,
    /// otherwise on the thread that ends it (so it must be quick and must not block). Lets an
    /// async owner learn of the end without a thread per VM.
    pub fn on_exit(&self, callback: ExitCallback) {
        let mut callbacks = self.callbacks.lock().unwrap_or_else(|e| e.into_inner());
        // Checked under the callbacks lock: a report either finds this callback or ran before.
        match self.get() {
            Some(reason) => {
                drop(callbacks);
                callback(&reason);
            }
            None => callbacks.push(callback),
        }
    }

    /// Whether an end has been reported (cheap enough for every vCPU exit).
    pub fn has_ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    pub fn wait(&self) -> VmExit {
        let mut slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(r) = slot.as_ref() {
                return r.clone();
            }
            slot = self.cv.wait(slot).unwrap_or_else(|e| e.into_inner());
        }
    }

    pub fn get(&self) -> Option<VmExit> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl devices::legacy::i8042::ResetLine for ExitSink {
    fn reset_requested(&self) {
        self.report(VmExit::GuestReboot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn exit_callbacks_run_once_before_or_after_the_end() {
        use std::sync::atomic::AtomicUsize;
        let sink = ExitSink::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let before = calls.clone();
        sink.on_exit(Box::new(move |r| {
            assert_eq!(*r, VmExit::Failed("x".into()));
            before.fetch_add(1, Ordering::SeqCst);
        }));
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        sink.report(VmExit::Failed("x".into()));
        sink.report(VmExit::GuestReboot);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let after = calls.clone();
        sink.on_exit(Box::new(move |_| {
            after.fetch_add(10, Ordering::SeqCst);
        }));
        assert_eq!(calls.load(Ordering::SeqCst), 11);
    }

    #[test]
    fn first_exit_reason_wins_and_codes_map() {
        let sink = ExitSink::default();
        assert!(sink.report(VmExit::GuestReboot));
        assert!(!sink.report(VmExit::Failed("late".into())));
        assert_eq!(sink.wait(), VmExit::GuestReboot);
        assert_eq!(VmExit::GuestReboot.exit_code(), 0);
        assert_eq!(VmExit::GuestPanic.exit_code(), 1);
        assert_eq!(VmExit::Failed(String::new()).exit_code(), 1);
    }
}
