//! Fault injection, for tests only: compiled into unit tests and into builds with the cargo
//! feature `fault-injection` (the workspace's test build turns it on for the end-to-end tests;
//! `cargo build --release -p vmm` never has it). It makes one chosen thread of a running VM
//! panic, so tests can prove that a panic on any thread ends that VM with `VmExit::Failed`
//! instead of hanging it or the process.

use std::sync::atomic::{AtomicBool, Ordering};

/// The message of every injected panic.
pub const INJECTED_PANIC: &str = "injected fault";

/// Which thread to break.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultThread {
    /// vCPU 0, between two guest exits.
    Vcpu,
    /// The device thread, inside its event loop.
    Devices,
    /// The API connection thread serving the injection request itself.
    Api,
    /// The helper process that holds the VM for KVM's teardown when the CLI exits
    /// (`hypervisor::teardown`): it crashes (SIGABRT) instead of waiting.
    Teardown,
}

static TEARDOWN_FAULT: AtomicBool = AtomicBool::new(false);

/// Makes the next teardown helper crash as soon as it starts.
pub fn arm_teardown_fault() {
    TEARDOWN_FAULT.store(true, Ordering::SeqCst);
}

pub(crate) fn teardown_fault_armed() -> bool {
    TEARDOWN_FAULT.load(Ordering::SeqCst)
}

/// Panics with [`INJECTED_PANIC`].
pub fn inject_panic() {
    panic!("{INJECTED_PANIC}");
}
