//! vCPUs: configuration for boot, and the per-vCPU thread that runs `KVM_RUN` and dispatches
//! exits to the port-I/O and MMIO buses.
//!
//! Kicking a vCPU out of `KVM_RUN` (to pause or stop it) uses a real-time signal whose handler sets
//! `kvm_run.immediate_exit`, so a kick that lands just before `KVM_RUN` is never lost.

use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use kvm_bindings::{
    kvm_run, Msrs, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};

use super::{ioctl, Hypervisor, HypervisorError, Vm};
use crate::boot::{cpuid, regs};
use devices::bus::Bus;

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

    /// Ends the VM because `thread` panicked (a no-op if it had already ended).
    pub fn report_panic(&self, thread: &str, payload: &(dyn std::any::Any + Send)) {
        let reason = crate::thread_guard::panic_reason(thread, payload);
        tracing::error!("{reason}: stopping the VM");
        self.report(VmExit::Failed(reason));
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

/// Signal used to kick vCPU threads out of KVM_RUN.
fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's own kvm_run mapping, set by the vCPU thread
            // before any kick can target it and valid for the thread's lifetime; a u8 store is
            // async-signal-safe.
            unsafe { (*run).immediate_exit = 1 };
        }
    });
}

/// Installs the kick handler once per process.
pub fn install_kick_handler() -> Result<(), HypervisorError> {
    static ONCE: std::sync::Once = std::sync::Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick).map_err(
            |e| HypervisorError::Ioctl {
                what: "sigaction for the vCPU kick signal",
                source: kvm_ioctls::Error::new(e.errno()),
            },
        );
    });
    result
}

/// Creates vCPU `index` of `count` with CPUID, MSRs, LAPIC LINTs and — for the boot CPU — the
/// long-mode registers that start the kernel at `entry`.
pub fn create_boot_vcpu(
    hv: &Hypervisor,
    vm: &Vm,
    index: u8,
    count: u8,
    entry: u64,
) -> Result<VcpuFd, HypervisorError> {
    let fd = vm
        .fd
        .create_vcpu(u64::from(index))
        .map_err(ioctl("KVM_CREATE_VCPU"))?;
    let mut cpuid = hv.supported_cpuid()?.clone();
    cpuid::normalize(
        cpuid.as_mut_slice(),
        index,
        count,
        hv.vendor,
        hv.tsc_deadline,
    );
    fd.set_cpuid2(&cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;
    let msrs = Msrs::from_entries(&regs::boot_msrs()).map_err(|_| HypervisorError::Ioctl {
        what: "building the boot MSR list",
        source: kvm_ioctls::Error::new(libc::EINVAL),
    })?;
    let written = fd.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))?;
    if written != msrs.as_slice().len() {
        tracing::debug!(
            "vCPU {index}: host accepted {written} of {} boot MSRs",
            msrs.as_slice().len()
        );
    }
    set_lint(&fd)?;
    if index == 0 {
        fd.set_fpu(&regs::boot_fpu())
            .map_err(ioctl("KVM_SET_FPU"))?;
        let sregs = fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
        fd.set_sregs(&regs::boot_sregs(sregs))
            .map_err(ioctl("KVM_SET_SREGS"))?;
        fd.set_regs(&regs::boot_regs(entry))
            .map_err(ioctl("KVM_SET_REGS"))?;
    }
    Ok(fd)
}

/// LAPIC LINT0 = ExtINT (the PIC), LINT1 = NMI, as a PC's BIOS leaves them.
fn set_lint(fd: &VcpuFd) -> Result<(), HypervisorError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const DELIVERY_EXTINT: u32 = 0x7;
    const DELIVERY_NMI: u32 = 0x4;
    let mut lapic = fd.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
    for (offset, mode) in [(APIC_LVT0, DELIVERY_EXTINT), (APIC_LVT1, DELIVERY_NMI)] {
        let reg = &mut lapic.regs[offset..offset + 4];
        let mut value =
            u32::from_le_bytes([reg[0] as u8, reg[1] as u8, reg[2] as u8, reg[3] as u8]);
        value = (value & !0x700) | (mode << 8);
        for (dst, src) in reg.iter_mut().zip(value.to_le_bytes()) {
            *dst = src as libc::c_char;
        }
    }
    fd.set_lapic(&lapic).map_err(ioctl("KVM_SET_LAPIC"))
}

/// Requests a running vCPU thread handles between exits.
pub enum VcpuCommand {
    /// Park after the current exit; the sender is answered once parked.
    Pause(Sender<()>),
    Resume,
    /// Run a closure on the vCPU's fd while parked (state save/restore).
    With(Box<dyn FnOnce(&mut VcpuFd) + Send>),
    Stop,
}

pub struct VcpuHandle {
    pub index: u8,
    commands: Sender<VcpuCommand>,
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    /// Sends a command and kicks the thread out of KVM_RUN so it sees it promptly.
    pub fn send(&self, command: VcpuCommand) {
        if self.commands.send(command).is_ok() {
            self.kick();
        }
    }

    pub fn kick(&self) {
        if let Some(t) = &self.thread {
            // SAFETY: pthread_kill on a thread we own and have not joined yet.
            unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
        }
    }

    pub fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("vCPU {} thread panicked", self.index);
            }
        }
    }
}

/// Starts the vCPU thread.
pub fn spawn(
    index: u8,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: Arc<ExitSink>,
) -> std::io::Result<VcpuHandle> {
    let (tx, rx) = channel();
    let thread = crate::thread_guard::spawn(format!("vcpu{index}"), exit.clone(), move || {
        let mut runner = VcpuRunner {
            index,
            fd,
            pio,
            mmio,
            exit,
            commands: rx,
        };
        runner.run();
    })?;
    Ok(VcpuHandle {
        index,
        commands: tx,
        thread: Some(thread),
    })
}

struct VcpuRunner {
    index: u8,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: Arc<ExitSink>,
    commands: Receiver<VcpuCommand>,
}

enum Flow {
    Continue,
    Stop,
}

impl VcpuRunner {
    fn run(&mut self) {
        /// Clears the kick handler's pointer when `run` ends, also by a panic: the `kvm_run`
        /// mapping goes with the fd, and a late kick must not write into it.
        struct ClearKvmRun;
        impl Drop for ClearKvmRun {
            fn drop(&mut self) {
                KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
            }
        }
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN.with(|p| p.set(run_ptr));
        let _clear = ClearKvmRun;
        loop {
            if let Flow::Stop = self.drain_commands() {
                break;
            }
            if let Flow::Stop = self.run_once() {
                // Tell the others, then wait for the owner's Stop so commands stay answered.
                self.wait_for_stop();
                break;
            }
        }
    }

    fn drain_commands(&mut self) -> Flow {
        while let Ok(cmd) = self.commands.try_recv() {
            if let Flow::Stop = self.handle_command(cmd) {
                return Flow::Stop;
            }
        }
        Flow::Continue
    }

    fn handle_command(&mut self, cmd: VcpuCommand) -> Flow {
        match cmd {
            VcpuCommand::Stop => Flow::Stop,
            VcpuCommand::Resume => Flow::Continue,
            VcpuCommand::With(f) => {
                f(&mut self.fd);
                Flow::Continue
            }
            VcpuCommand::Pause(ack) => {
                let _ = ack.send(());
                // Parked: serve state requests until resumed or stopped.
                loop {
                    match self.commands.recv() {
                        Ok(VcpuCommand::Resume) => return Flow::Continue,
                        Ok(VcpuCommand::Stop) | Err(_) => return Flow::Stop,
                        Ok(VcpuCommand::With(f)) => f(&mut self.fd),
                        Ok(VcpuCommand::Pause(ack)) => {
                            let _ = ack.send(());
                        }
                    }
                }
            }
        }
    }

    fn wait_for_stop(&mut self) {
        loop {
            match self.commands.recv() {
                Ok(VcpuCommand::Stop) | Err(_) => return,
                Ok(VcpuCommand::Pause(ack)) => {
                    let _ = ack.send(());
                }
                Ok(VcpuCommand::With(f)) => f(&mut self.fd),
                Ok(VcpuCommand::Resume) => {}
            }
        }
    }

    /// A device write can end the VM (the i8042 reset line): this vCPU then stops at once
    /// instead of re-entering the guest only to be kicked out again.
    fn continue_unless_ended(&self) -> Flow {
        if self.exit.has_ended() {
            Flow::Stop
        } else {
            Flow::Continue
        }
    }

    fn fail(&self, msg: String) -> Flow {
        self.exit.report(VmExit::Failed(msg));
        Flow::Stop
    }

    fn run_once(&mut self) -> Flow {
        let index = self.index;
        match self.fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    if !self.pio.read(u64::from(port), data) {
                        data.fill(0xff);
                    }
                    Flow::Continue
                }
                VcpuExit::IoOut(port, data) => {
                    self.pio.write(u64::from(port), data);
                    self.continue_unless_ended()
                }
                VcpuExit::MmioRead(addr, data) => {
                    if !self.mmio.read(addr, data) {
                        data.fill(0);
                    }
                    Flow::Continue
                }
                VcpuExit::MmioWrite(addr, data) => {
                    self.mmio.write(addr, data);
                    self.continue_unless_ended()
                }
                VcpuExit::Shutdown => {
                    tracing::info!("vCPU {index}: triple fault or guest reset (KVM_EXIT_SHUTDOWN)");
                    self.exit.report(VmExit::GuestReboot);
                    Flow::Stop
                }
                VcpuExit::Hlt => {
                    self.exit.report(VmExit::GuestPowerOff);
                    Flow::Stop
                }
                VcpuExit::SystemEvent(kind, _) => {
                    let reason = match kind {
                        KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::GuestPowerOff,
                        KVM_SYSTEM_EVENT_RESET => VmExit::GuestReboot,
                        KVM_SYSTEM_EVENT_CRASH => VmExit::GuestPanic,
                        other => VmExit::Failed(format!("unknown KVM system event {other}")),
                    };
                    self.exit.report(reason);
                    Flow::Stop
                }
                VcpuExit::FailEntry(reason, cpu) => self.fail(format!(
                    "vCPU {index}: KVM entry failed (hardware reason {reason:#x}, cpu {cpu})"
                )),
                VcpuExit::InternalError => {
                    // SAFETY: KVM_EXIT_INTERNAL_ERROR fills the `internal` member of the union.
                    let sub = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                    self.fail(format!(
                        "vCPU {index}: KVM internal error (suberror {sub}); the guest executed \
                         something the hypervisor cannot handle"
                    ))
                }
                VcpuExit::Intr | VcpuExit::IrqWindowOpen => Flow::Continue,
                other => {
                    let msg = format!("vCPU {index}: unexpected KVM exit {other:?}");
                    self.exit.report(VmExit::Failed(msg));
                    Flow::Stop
                }
            },
            Err(e) => match e.errno() {
                libc::EINTR => {
                    self.fd.set_kvm_immediate_exit(0);
                    Flow::Continue
                }
                // An AP's first KVM_RUN can return EAGAIN while KVM processes INIT/SIPI.
                libc::EAGAIN => Flow::Continue,
                _ => self.fail(format!("vCPU {index}: KVM_RUN failed: {e}")),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
