//! vCPUs: configuration for boot, and the per-vCPU thread that runs `KVM_RUN` and dispatches
//! exits to the port-I/O and MMIO buses.
//!
//! Kicking a vCPU out of `KVM_RUN` (to pause or stop it) uses a real-time signal whose handler sets
//! `kvm_run.immediate_exit`, so a kick that lands just before `KVM_RUN` is never lost.

use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_bindings::{
    kvm_run, Msrs, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_metrics::VcpuMetrics;

use super::{ioctl, Hypervisor, HypervisorError, Vm};
use crate::boot::{cpuid, regs};
use crate::seccomp::{FilterOptions, SeccompLevel, ThreadKind};
use devices::bus::Bus;

pub use crate::exit::{ExitCallback, ExitSink, VmExit};

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

/// The seccomp filter a vCPU thread installs before its first `KVM_RUN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuFilter {
    pub level: SeccompLevel,
    /// The VM's vsock runs on vhost-kernel: activation (on a vCPU thread) opens its device.
    pub vhost_vsock: bool,
}

/// Starts the vCPU thread.
pub fn spawn(
    index: u8,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: Arc<ExitSink>,
    filter: VcpuFilter,
    metrics: VcpuMetrics,
) -> std::io::Result<VcpuHandle> {
    Ok(prespawn(index, exit, filter, None)?.start(fd, pio, mmio, None, metrics))
}

/// What a started-ahead vCPU thread waits for: its vCPU and the buses its exits go to.
struct VcpuStart {
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    /// Told just before the first `KVM_RUN` (see [`PendingVcpu::start`]).
    running: Option<Sender<u8>>,
    metrics: VcpuMetrics,
}

/// A vCPU thread started before its vCPU exists, so that what it must do before its first
/// `KVM_RUN` overlaps with building the VM: the supported-CPUID read the VM's builder needs
/// (vCPU 0 of a boot; an ioctl on its own /dev/kvm fd, before any guest data exists) and its
/// seccomp filter (which the kernel JIT-compiles: a fraction of a millisecond on some hosts).
/// Then it waits for [`PendingVcpu::start`]; dropped without starting, the thread ends.
pub struct PendingVcpu {
    index: u8,
    filter: VcpuFilter,
    start: Sender<VcpuStart>,
    commands: Sender<VcpuCommand>,
    thread: JoinHandle<()>,
}

/// Starts vCPU `index`'s thread ahead of its vCPU (see [`PendingVcpu`]); it runs `cpuid` first.
pub fn prespawn(
    index: u8,
    exit: Arc<ExitSink>,
    filter: VcpuFilter,
    cpuid: Option<super::CpuidPrefetch>,
) -> std::io::Result<PendingVcpu> {
    let (start_tx, start_rx) = channel::<VcpuStart>();
    let (tx, rx) = channel();
    let thread = crate::thread_guard::spawn(format!("vcpu{index}"), exit.clone(), move || {
        if let Some(job) = cpuid {
            job.run();
        }
        let options = FilterOptions {
            vhost_vsock: filter.vhost_vsock,
        };
        if let Err(e) = crate::seccomp::install_with(ThreadKind::Vcpu, filter.level, options) {
            exit.report(VmExit::Failed(format!("vCPU {index}: {e}")));
            return;
        }
        // The vCPU, and with it the guest, arrives only here, under the filter.
        let Ok(VcpuStart {
            fd,
            pio,
            mmio,
            running,
            metrics,
        }) = start_rx.recv()
        else {
            return;
        };
        if let Some(running) = running {
            let _ = running.send(index);
            // The starter waits for that message, often woken onto this very CPU: yielding
            // once lets it finish the start instead of waiting out the guest's time slice
            // (a warm-pool wake's wait went from ~0.1 ms to 1-5 ms in 5 of 12 wakes without).
            std::thread::yield_now();
        }
        let mut runner = VcpuRunner {
            index,
            fd,
            pio,
            mmio,
            exit,
            commands: rx,
            metrics,
        };
        runner.run();
    })?;
    Ok(PendingVcpu {
        index,
        filter,
        start: start_tx,
        commands: tx,
        thread,
    })
}

impl PendingVcpu {
    pub fn index(&self) -> u8 {
        self.index
    }

    /// Whether this thread's filter is the one `filter` asks for.
    pub fn has_filter(&self, filter: VcpuFilter) -> bool {
        self.filter == filter
    }

    /// Hands the thread its vCPU: it runs from here on, and says so on `running` (its index)
    /// just before its first `KVM_RUN`.
    pub fn start(
        self,
        fd: VcpuFd,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        running: Option<Sender<u8>>,
        metrics: VcpuMetrics,
    ) -> VcpuHandle {
        // A thread whose filter failed to install has reported the VM failed and ended; the
        // handle still joins it, and the fd goes with the refused message.
        let _ = self.start.send(VcpuStart {
            fd,
            pio,
            mmio,
            running,
            metrics,
        });
        VcpuHandle {
            index: self.index,
            commands: self.commands,
            thread: Some(self.thread),
        }
    }
}

struct VcpuRunner {
    index: u8,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: Arc<ExitSink>,
    commands: Receiver<VcpuCommand>,
    /// Exits by kind (one atomic add per exit).
    metrics: VcpuMetrics,
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
        self.metrics.failures.inc();
        self.exit.report(VmExit::Failed(msg));
        Flow::Stop
    }

    fn run_once(&mut self) -> Flow {
        let index = self.index;
        match self.fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    self.metrics.exit_io_in.inc();
                    if !self.pio.read(u64::from(port), data) {
                        data.fill(0xff);
                    }
                    Flow::Continue
                }
                VcpuExit::IoOut(port, data) => {
                    self.metrics.exit_io_out.inc();
                    self.pio.write(u64::from(port), data);
                    self.continue_unless_ended()
                }
                VcpuExit::MmioRead(addr, data) => {
                    self.metrics.exit_mmio_read.inc();
                    if !self.mmio.read(addr, data) {
                        data.fill(0);
                    }
                    Flow::Continue
                }
                VcpuExit::MmioWrite(addr, data) => {
                    self.metrics.exit_mmio_write.inc();
                    self.mmio.write(addr, data);
                    self.continue_unless_ended()
                }
                VcpuExit::Shutdown => {
                    self.metrics.exit_shutdown.inc();
                    tracing::info!("vCPU {index}: triple fault or guest reset (KVM_EXIT_SHUTDOWN)");
                    self.exit.report(VmExit::GuestReboot);
                    Flow::Stop
                }
                VcpuExit::Hlt => {
                    self.metrics.exit_hlt.inc();
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
                    self.metrics.failures.inc();
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
