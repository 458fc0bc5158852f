//! Fault injection, for tests only: compiled into unit tests and into builds with the cargo
//! feature `fault-injection` (the workspace's test build turns it on for the end-to-end tests;
//! `cargo build --release -p vmm` never has it). It makes one chosen thread of a running VM
//! panic, so tests can prove that a panic on any thread ends that VM with `VmExit::Failed`
//! instead of hanging it or the process; or make a system call no seccomp allowlist has, so
//! tests can prove that each thread kind's filter is in place.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

/// The message of every injected panic.
pub const INJECTED_PANIC: &str = "injected fault";

/// The call [`forbidden_syscall`] makes: `socket(AF_INET, SOCK_STREAM, 0)`, in no allowlist.
pub const FORBIDDEN_SYSCALL: i64 = libc::SYS_socket;

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
    /// (`hypervisor::teardown`): it crashes (SIGABRT) instead of waiting, or makes the
    /// forbidden call.
    Teardown,
    /// The thread waiting for the VM's end (`Vm::wait`; the CLI's main thread), once the VM
    /// has ended (forbidden call only).
    Main,
}

/// What to do to the thread.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// Panic with [`INJECTED_PANIC`].
    #[default]
    Panic,
    /// Make [`FORBIDDEN_SYSCALL`] (closing the socket if the call was let through).
    Syscall,
}

const TEARDOWN_NONE: u8 = 0;
const TEARDOWN_CRASH: u8 = 1;
const TEARDOWN_SYSCALL: u8 = 2;

static TEARDOWN_FAULT: AtomicU8 = AtomicU8::new(TEARDOWN_NONE);
static MAIN_FAULT: AtomicBool = AtomicBool::new(false);

/// Makes the next teardown helper crash as soon as it starts.
pub fn arm_teardown_fault() {
    TEARDOWN_FAULT.store(TEARDOWN_CRASH, Ordering::SeqCst);
}

/// Makes the next teardown helper make the forbidden call once its filter is in place.
pub fn arm_teardown_syscall() {
    TEARDOWN_FAULT.store(TEARDOWN_SYSCALL, Ordering::SeqCst);
}

pub(crate) fn teardown_fault_armed() -> bool {
    TEARDOWN_FAULT.load(Ordering::SeqCst) == TEARDOWN_CRASH
}

pub(crate) fn teardown_syscall_armed() -> bool {
    TEARDOWN_FAULT.load(Ordering::SeqCst) == TEARDOWN_SYSCALL
}

/// Makes the thread that waits for a VM's end make the forbidden call once it has ended.
pub fn arm_main_syscall() {
    MAIN_FAULT.store(true, Ordering::SeqCst);
}

/// Called where the waiting thread learns the VM has ended.
pub(crate) fn main_fault_point() {
    if MAIN_FAULT.swap(false, Ordering::SeqCst) {
        forbidden_syscall();
    }
}

/// Panics with [`INJECTED_PANIC`].
pub fn inject_panic() {
    panic!("{INJECTED_PANIC}");
}

/// Makes [`FORBIDDEN_SYSCALL`] with raw system calls only (the teardown helper calls it too).
/// Under an enforcing filter the process ends here; otherwise the socket is closed again.
pub fn forbidden_syscall() {
    // SAFETY: plain system calls; the fd, if any, is ours and closed at once.
    unsafe {
        let fd = libc::syscall(FORBIDDEN_SYSCALL, libc::AF_INET, libc::SOCK_STREAM, 0);
        if fd >= 0 {
            libc::syscall(libc::SYS_close, fd);
        }
    }
}
