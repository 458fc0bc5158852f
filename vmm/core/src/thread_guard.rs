//! The threads of a VM, guarded: a panic on one of them ends that VM with
//! [`VmExit::Failed`] naming the thread and the panic message. Without this a panicking vCPU or
//! device thread only showed up when it was joined, so `Vm::wait()` never returned and the VM's
//! other threads went on with half-updated device state.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::exit::{ExitSink, VmExit};

/// The text of a panic payload (`panic!("...")` gives a `&str` or a `String`).
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-text payload".to_string()
    }
}

/// What a panic on `thread` becomes in the VM's exit reason.
pub fn panic_reason(thread: &str, payload: &(dyn Any + Send)) -> String {
    format!("{thread} thread panicked: {}", panic_message(payload))
}

/// Ends the VM of `exit` because `thread` panicked (a no-op if it had already ended).
pub fn report_panic(exit: &ExitSink, thread: &str, payload: &(dyn Any + Send)) {
    let reason = panic_reason(thread, payload);
    tracing::error!("{reason}: stopping the VM");
    exit.report(VmExit::Failed(reason));
}

/// Runs `body`; a panic in it ends the VM that `exit` belongs to instead of unwinding further.
pub fn run_guarded(thread: &str, exit: &ExitSink, body: impl FnOnce()) {
    if let Err(payload) = catch_unwind(AssertUnwindSafe(body)) {
        report_panic(exit, thread, payload.as_ref());
    }
}

/// Starts a named thread of the VM that `exit` belongs to, with its body guarded.
pub fn spawn(
    name: String,
    exit: Arc<ExitSink>,
    body: impl FnOnce() + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || run_guarded(&name, &exit, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_thread_ends_its_vm_with_the_message() {
        let exit = Arc::new(ExitSink::default());
        let handle = spawn("worker7".into(), exit.clone(), || panic!("boom {}", 42)).unwrap();
        // The guard caught it: the thread itself ends normally.
        assert!(handle.join().is_ok());
        assert_eq!(
            exit.wait(),
            VmExit::Failed("worker7 thread panicked: boom 42".into())
        );
    }

    #[test]
    fn a_clean_thread_reports_nothing() {
        let exit = Arc::new(ExitSink::default());
        spawn("quiet".into(), exit.clone(), || {})
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(exit.get(), None);
    }

    #[test]
    fn the_first_reason_wins_over_a_later_panic() {
        let exit = ExitSink::default();
        exit.report(VmExit::GuestReboot);
        run_guarded("late", &exit, || panic!("after the end"));
        assert_eq!(exit.get(), Some(VmExit::GuestReboot));
    }

    #[test]
    fn payloads_of_every_kind_have_a_message() {
        assert_eq!(panic_message(&"static"), "static");
        assert_eq!(panic_message(&String::from("owned")), "owned");
        assert_eq!(panic_message(&7u32), "a panic with a non-text payload");
    }
}
