//! VM lifecycle: `VmConfig` → a running VM → `wait()` for how it ended.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use crate::boot::{self, BootSetup};
use crate::console::StdinInput;
use crate::device_manager::{DeviceError, DeviceManager, RestoreSlot, VirtioKind};
use crate::event_loop::{EventLoop, EventLoopError, Subscriber};
use crate::host::{self, HostKind};
use crate::hypervisor::vcpu::{self, ExitSink, VcpuCommand, VcpuHandle, VmExit};
use crate::hypervisor::{Hypervisor, HypervisorError, VmSetup};
use crate::memory::{self, MemoryError};
use crate::vm_snapshot::{host_info, Lineage, MemoryOrigin, VmSnapshotState};
use devices::persist::Persist;
use devices::virtio::block::BlockConfig;
use devices::virtio::net::NetConfig;
use devices::virtio::vsock::{Vsock, VsockConfig, VsockConstructorArgs, VsockHandle};
use devices::GuestMemory;

/// The guest command line used when none is given: console on COM1, reboot through the i8042
/// (the VMM's clean-exit path), and reboot at once on panic so a panicking guest never hangs.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";
pub const MAX_VCPUS: u8 = 32;

pub enum Console {
    /// Guest output to this process's stdout, input from its stdin (raw mode on a TTY).
    Stdio,
    /// Guest output to a writer (a log file, a buffer); no input.
    Writer(Box<dyn Write + Send>),
    /// Guest output discarded.
    Null,
}

impl Console {
    /// Guest output as lines on a channel (tests, benchmarks, embedders that watch the console).
    pub fn lines() -> (Self, std::sync::mpsc::Receiver<String>) {
        let (tx, rx) = std::sync::mpsc::channel();
        (
            Console::Writer(Box::new(crate::console::LineSender::new(tx))),
            rx,
        )
    }

    /// Where guest output goes, and whether host stdin feeds the guest.
    fn into_parts(self) -> (Box<dyn Write + Send>, bool) {
        match self {
            Console::Stdio => (Box::new(std::io::stdout()), true),
            Console::Writer(w) => (w, false),
            Console::Null => (Box::new(std::io::sink()), false),
        }
    }
}

pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Replaces `DEFAULT_CMDLINE`; host quirks and device announcements are still appended.
    pub cmdline: Option<String>,
    pub vcpus: u8,
    pub mem_mib: u64,
    /// Keep guest RAM in an unnamed file in this directory (shared mapping) instead of anonymous
    /// memory: a full snapshot on the same file system then links the file instead of copying
    /// it (see `memory::create_guest_memory_in`).
    pub mem_dir: Option<PathBuf>,
    /// Apply the host kind's guest command-line quirks (see `host::HostQuirks`).
    pub host_quirks: bool,
    /// Track guest writes with KVM's dirty log from boot. Off by default: the first snapshot
    /// turns it on, which is all diff snapshots need; registering logged memory at boot costs
    /// milliseconds of start time.
    pub dirty_log: bool,
    /// Give the guest the in-kernel PIT (i8254). `None`: only when it needs one, i.e. the host
    /// has no TSC-deadline timer (see `Hypervisor::guest_needs_pit`).
    pub pit: Option<bool>,
    pub console: Console,
    /// virtio-blk disks in order (the first is /dev/vda).
    pub disks: Vec<BlockConfig>,
    /// Boot from the first disk: adds `root=/dev/vda rw` to the command line.
    pub root_on_first_disk: bool,
    pub nets: Vec<NetConfig>,
    pub vsock: Option<VsockConfig>,
}

impl VmConfig {
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: None,
            vcpus: 1,
            mem_mib: 256,
            mem_dir: None,
            host_quirks: true,
            dirty_log: false,
            pit: None,
            console: Console::Stdio,
            disks: Vec::new(),
            root_on_first_disk: false,
            nets: Vec::new(),
            vsock: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("--vcpus must be between 1 and {MAX_VCPUS}, got {0}")]
    VcpuCount(u8),
    #[error("kernel {0}: {1}")]
    KernelFile(PathBuf, std::io::Error),
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
    #[error("cannot start a vCPU thread: {0}")]
    VcpuThread(std::io::Error),
    #[error("snapshot: {0}")]
    Snapshot(#[from] snapshot::SnapshotError),
    #[error("restoring KVM state: {0}")]
    State(#[from] crate::hypervisor::state::StateError),
    #[error("restoring: {0}")]
    Restore(#[from] crate::vm_snapshot::SnapshotVmError),
    #[error("vsock: {0}")]
    Vsock(devices::virtio::vsock::VsockError),
    #[error("the snapshot is inconsistent: {0}")]
    BadSnapshot(String),
}

/// Whether the vCPUs and devices are running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the VM is already paused")]
    AlreadyPaused,
    #[error("the VM is not paused")]
    NotPaused,
    #[error("the VM has stopped")]
    Stopped,
    #[error("vCPU {0} did not answer (its thread has ended)")]
    VcpuGone(u8),
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
}

/// Everything a running VM is made of, shared by its owner and its controllers.
pub(crate) struct VmCore {
    pub host: HostKind,
    pub cmdline: String,
    pub vcpu_count: u8,
    pub mem_mib: u64,
    pub memory: GuestMemory,
    pub exit: Arc<ExitSink>,
    pub devices: DeviceManager,
    pub kvm_vm: crate::hypervisor::Vm,
    pub started: std::time::Instant,
    /// The guest agent's readiness announcements (vsock port 1023).
    pub agent: crate::agent_ready::AgentReadiness,
    /// MSRs this host lets us read back, saved in every snapshot.
    pub msr_indices: Mutex<MsrList>,
    /// Whether KVM logs guest writes (needed for diff snapshots). Switched on at the first
    /// snapshot when the VM started without it: registering a logged slot costs milliseconds.
    pub dirty_log: std::sync::atomic::AtomicBool,
    pub kernel_id: String,
    pub lineage: Mutex<Lineage>,
    vcpus: Mutex<Vec<VcpuHandle>>,
    event_loop: Mutex<EventLoop>,
    run_state: Mutex<RunState>,
}

impl VmCore {
    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn run_state(&self) -> RunState {
        *Self::lock(&self.run_state)
    }

    /// Kicks every vCPU out of KVM_RUN and parks it, then parks the device loop (devices finish
    /// the event they are in, so no request is in flight afterwards).
    pub fn pause(&self) -> Result<(), ControlError> {
        let mut state = Self::lock(&self.run_state);
        if self.exit.get().is_some() {
            return Err(ControlError::Stopped);
        }
        if *state == RunState::Paused {
            return Err(ControlError::AlreadyPaused);
        }
        let vcpus = Self::lock(&self.vcpus);
        let acks: Vec<_> = vcpus
            .iter()
            .map(|v| {
                let (tx, rx) = std::sync::mpsc::channel();
                v.send(VcpuCommand::Pause(tx));
                (v.index, rx)
            })
            .collect();
        for (index, rx) in acks {
            rx.recv().map_err(|_| ControlError::VcpuGone(index))?;
        }
        Self::lock(&self.event_loop).park()?;
        *state = RunState::Paused;
        Ok(())
    }

    pub fn resume(&self) -> Result<(), ControlError> {
        let mut state = Self::lock(&self.run_state);
        if *state != RunState::Paused {
            return Err(ControlError::NotPaused);
        }
        Self::lock(&self.event_loop).unpark();
        for v in Self::lock(&self.vcpus).iter() {
            v.send(VcpuCommand::Resume);
        }
        *state = RunState::Running;
        Ok(())
    }

    /// Runs `f` on vCPU `index`'s thread (it must be paused) and returns its result.
    pub fn with_vcpu<R: Send + 'static>(
        &self,
        index: u8,
        f: impl FnOnce(&mut kvm_ioctls::VcpuFd) -> R + Send + 'static,
    ) -> Result<R, ControlError> {
        let vcpus = Self::lock(&self.vcpus);
        let v = vcpus
            .iter()
            .find(|v| v.index == index)
            .ok_or(ControlError::VcpuGone(index))?;
        let (tx, rx) = std::sync::mpsc::channel();
        v.send(VcpuCommand::With(Box::new(move |fd| {
            let _ = tx.send(f(fd));
        })));
        rx.recv().map_err(|_| ControlError::VcpuGone(index))
    }

    fn teardown(&self) {
        self.exit.report(VmExit::HostShutdown);
        let mut vcpus = Self::lock(&self.vcpus);
        for v in vcpus.iter() {
            v.send(VcpuCommand::Stop);
        }
        for v in vcpus.iter_mut() {
            v.join();
        }
        vcpus.clear();
        Self::lock(&self.event_loop).stop();
    }
}

/// The MSRs a snapshot saves: known (from the snapshot a VM was restored from) or to be probed
/// on first use.
pub enum MsrList {
    Known(Vec<u32>),
    Probe(kvm_ioctls::Kvm),
}

impl MsrList {
    pub fn get(&mut self) -> Result<Vec<u32>, crate::hypervisor::state::StateError> {
        if let MsrList::Probe(kvm) = self {
            let list = crate::hypervisor::state::supported_msr_indices(kvm)?;
            *self = MsrList::Known(list);
        }
        match self {
            MsrList::Known(list) => Ok(list.clone()),
            MsrList::Probe(_) => Ok(Vec::new()),
        }
    }
}

/// The pieces `Vm::launch` starts, from a boot or a restore.
struct Launch {
    host: HostKind,
    cmdline: String,
    vcpu_count: u8,
    mem_mib: u64,
    memory: GuestMemory,
    exit: Arc<ExitSink>,
    devices: DeviceManager,
    kvm_vm: crate::hypervisor::Vm,
    fds: Vec<kvm_ioctls::VcpuFd>,
    stdin_input: bool,
    msr_indices: MsrList,
    dirty_log: bool,
    origin: MemoryOrigin,
    kernel_id: String,
}

/// How to restore a snapshot; host resources default to what the snapshot recorded.
pub struct RestoreOptions {
    pub dir: PathBuf,
    pub memory: snapshot::RestoreStrategy,
    pub console: Console,
    /// Per saved disk, in order: a replacement path (None keeps the saved one).
    pub disks: Vec<Option<PathBuf>>,
    /// Per saved network device, in order: a replacement TAP and/or MAC.
    pub nets: Vec<Option<NetOverride>>,
    /// A new vsock identity (CID and/or hybrid socket path) for a clone.
    pub vsock: Option<VsockOverride>,
    pub dirty_log: bool,
}

#[derive(Debug, Clone, Default)]
pub struct VsockOverride {
    pub cid: Option<u64>,
    pub uds: Option<PathBuf>,
}

impl RestoreOptions {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            memory: snapshot::RestoreStrategy::Private,
            console: Console::Stdio,
            disks: Vec::new(),
            nets: Vec::new(),
            vsock: None,
            dirty_log: true,
        }
    }
}

#[derive(Debug, Clone)]
pub struct NetOverride {
    pub tap: String,
    pub mac: Option<[u8; 6]>,
}

/// A running VM. Dropping it stops the VM.
pub struct Vm {
    core: Arc<VmCore>,
}

/// A VM's description and state at one moment ([`VmController::status`]).
#[derive(Debug, Clone)]
pub struct VmStatus {
    /// The VM has ended (or is ending); `run_state` is then meaningless.
    pub ended: bool,
    pub run_state: RunState,
    pub vcpus: u8,
    pub mem_mib: u64,
    /// The host kind, as snapshots record it (`kvm-intel`, `kvm-pvm`, …).
    pub host: String,
    pub cmdline: String,
    /// The virtio devices, in slot order (the serial port is always there too).
    pub devices: Vec<VirtioStatus>,
    pub uptime: std::time::Duration,
    pub agent: Option<crate::agent_ready::AgentReady>,
}

/// One virtio device of a [`VmStatus`].
#[derive(Debug, Clone)]
pub struct VirtioStatus {
    pub kind: crate::device_manager::VirtioKind,
    pub mmio_base: u64,
    pub irq: u32,
}

/// The log line `dormouse restore` prints once a restored VM's vCPUs run (with the time it
/// took); `dormouse bench snapshot` times restores up to it.
pub const RESTORED_MARKER: &str = "restored: vCPUs running";

/// Cloneable handle to control a VM from other threads (signal handlers, the API server).
#[derive(Clone)]
pub struct VmController {
    core: Arc<VmCore>,
}

impl VmController {
    /// Asks the VM to stop; the owner's `wait()` returns `HostShutdown`.
    pub fn shutdown(&self) {
        self.core.exit.report(VmExit::HostShutdown);
    }

    pub fn pause(&self) -> Result<(), ControlError> {
        self.core.pause()
    }

    pub fn resume(&self) -> Result<(), ControlError> {
        self.core.resume()
    }

    pub fn run_state(&self) -> RunState {
        self.core.run_state()
    }

    pub fn host(&self) -> HostKind {
        self.core.host
    }

    /// In-process vsock connections to the guest (no Unix-socket hop), if the VM has vsock on
    /// the userspace datapath.
    pub fn vsock(&self) -> Option<VsockHandle> {
        self.core
            .devices
            .vsock
            .as_ref()
            .map(|v| v.lock().unwrap_or_else(|e| e.into_inner()).handle())
    }

    /// The guest agent's readiness: `Some` once it announced itself on vsock port 1023, back to
    /// `None` when its announcing connection ends (agent gone; after a restore it announces
    /// again). Always `None` without a userspace vsock device.
    #[cfg(feature = "async")]
    pub fn agent_ready(
        &self,
    ) -> tokio::sync::watch::Receiver<Option<crate::agent_ready::AgentReady>> {
        self.core.agent.subscribe()
    }

    /// Waits until the guest agent is ready (at once if it already is).
    #[cfg(feature = "async")]
    pub async fn wait_agent_ready(
        &self,
        timeout: std::time::Duration,
    ) -> Result<crate::agent_ready::AgentReady, crate::agent_ready::AgentReadyError> {
        self.core.agent.wait(timeout).await
    }

    /// Waits (blocking the thread) until the guest agent is ready.
    pub fn wait_agent_ready_blocking(
        &self,
        timeout: std::time::Duration,
    ) -> Result<crate::agent_ready::AgentReady, crate::agent_ready::AgentReadyError> {
        self.core.agent.wait_blocking(timeout)
    }

    /// Writes a snapshot to `dir` (absolute): see [`VmCore::snapshot`] in `vm_snapshot`.
    pub fn snapshot(
        &self,
        dir: &std::path::Path,
        diff: bool,
        target: snapshot::TargetPolicy,
    ) -> Result<crate::vm_snapshot::SnapshotOutcome, crate::vm_snapshot::SnapshotVmError> {
        self.core.snapshot(dir, diff, target)
    }

    /// Why the VM ended, once it has.
    pub fn exit_reason(&self) -> Option<VmExit> {
        self.core.exit.get()
    }

    /// Where this VM reports its end (`ExitSink::on_exit` for a callback).
    pub fn exit_sink(&self) -> Arc<ExitSink> {
        self.core.exit.clone()
    }

    /// Ends the VM as failed (e.g. a thread serving it outside the core panicked).
    pub fn fail(&self, reason: String) {
        self.core.exit.report(VmExit::Failed(reason));
    }

    /// What the VM is and how it is doing, for the control API and embedders.
    pub fn status(&self) -> VmStatus {
        let core = &self.core;
        VmStatus {
            ended: core.exit.get().is_some(),
            run_state: core.run_state(),
            vcpus: core.vcpu_count,
            mem_mib: core.mem_mib,
            host: crate::vm_snapshot::host_info(core.host).kind,
            cmdline: core.cmdline.clone(),
            devices: core
                .devices
                .virtio
                .iter()
                .map(|slot| VirtioStatus {
                    kind: slot.kind.clone(),
                    mmio_base: slot.mmio_base,
                    irq: slot.irq,
                })
                .collect(),
            uptime: core.started.elapsed(),
            agent: core.agent.current(),
        }
    }

    /// Test builds only: makes `thread` of this VM panic (see `crate::fault`); returns once the
    /// fault is on its way. The VM then ends with `VmExit::Failed`.
    #[cfg(any(test, feature = "fault-injection"))]
    pub fn inject_fault(&self, thread: crate::fault::FaultThread) -> Result<(), ControlError> {
        use crate::fault::{inject_panic, FaultThread};
        let core = &self.core;
        match thread {
            FaultThread::Vcpu => {
                let vcpus = VmCore::lock(&core.vcpus);
                let first = vcpus.first().ok_or(ControlError::VcpuGone(0))?;
                first.send(VcpuCommand::With(Box::new(|_| inject_panic())));
            }
            FaultThread::Devices => VmCore::lock(&core.event_loop).fire(inject_panic)?,
            FaultThread::Api => inject_panic(),
            FaultThread::Teardown => crate::fault::arm_teardown_fault(),
        }
        Ok(())
    }
}

fn kernel_head(path: &PathBuf) -> Result<Vec<u8>, VmError> {
    use std::io::Read;
    let mut head = Vec::with_capacity(4096);
    std::fs::File::open(path)
        .and_then(|f| f.take(4096).read_to_end(&mut head))
        .map_err(|e| VmError::KernelFile(path.clone(), e))?;
    Ok(head)
}

/// Assembles the guest command line: base, host quirks, device announcements.
pub fn compose_cmdline(base: &str, quirks: &str, devices: &[String]) -> String {
    let mut parts: Vec<&str> = vec![base.trim()];
    if !quirks.is_empty() {
        parts.push(quirks);
    }
    parts.extend(devices.iter().map(String::as_str));
    parts.retain(|p| !p.is_empty());
    parts.join(" ")
}

impl Vm {
    pub fn start(config: VmConfig) -> Result<Self, VmError> {
        if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
            return Err(VmError::VcpuCount(config.vcpus));
        }
        let head = kernel_head(&config.kernel)?;
        if boot::loader::detect_format(&head).is_none() {
            return Err(boot::BootError::UnknownKernelFormat(config.kernel.clone()).into());
        }
        let hv = Hypervisor::open()?;
        // KVM_GET_SUPPORTED_CPUID is one of the slowest steps of a start on a host that is
        // itself a VM (every CPUID traps): it runs on a second thread while this one builds the
        // VM; the vCPUs wait for its result.
        hv.prefetch_supported_cpuid();
        let guest_kind = host::guest_kernel_kind(boot::loader::elf_first_load_vaddr(&head));
        let host = host::detect(std::path::Path::new("/sys"), hv.vendor, guest_kind);
        let quirks = host.quirks();
        tracing::info!("host: {host}");

        let memory = memory::create_guest_memory_in(config.mem_mib, config.mem_dir.as_deref())?;
        let kvm_vm = hv.create_vm(
            &memory,
            VmSetup {
                pit: config.pit.unwrap_or_else(|| hv.guest_needs_pit()),
                dirty_log: config.dirty_log,
            },
        )?;

        let exit = Arc::new(ExitSink::default());
        let (console_out, stdin_input) = config.console.into_parts();
        let mut devices = DeviceManager::new(&kvm_vm, console_out, exit.clone())?;
        for disk in config.disks {
            devices.add_block(&kvm_vm, &memory, disk)?;
        }
        for net in config.nets {
            devices.add_net(&kvm_vm, &memory, net)?;
        }
        if let Some(vsock) = config.vsock {
            let device = Vsock::new(vsock).map_err(VmError::Vsock)?;
            devices.add_vsock_at(&kvm_vm, &memory, device, None)?;
        }

        let quirk_cmdline = if config.host_quirks {
            quirks.guest_cmdline.as_str()
        } else {
            ""
        };
        if !quirk_cmdline.is_empty() {
            tracing::info!("appending host quirks to the guest command line: {quirk_cmdline}");
        }
        let mut base = config
            .cmdline
            .as_deref()
            .unwrap_or(DEFAULT_CMDLINE)
            .to_string();
        if config.root_on_first_disk && !base.split_whitespace().any(|o| o.starts_with("root=")) {
            base.push_str(" root=/dev/vda rw");
        }
        let cmdline = compose_cmdline(&base, quirk_cmdline, &devices.cmdline_additions);
        tracing::debug!("guest command line: {cmdline}");
        let kernel = boot::setup_memory(
            &memory,
            &BootSetup {
                kernel: &config.kernel,
                initrd: config.initrd.as_deref(),
                cmdline: &cmdline,
                vcpus: config.vcpus,
                mem_size: config.mem_mib << 20,
            },
        )?;
        tracing::debug!("kernel {:?} entry {:#x}", kernel.format, kernel.entry);

        let mut fds = Vec::with_capacity(usize::from(config.vcpus));
        for index in 0..config.vcpus {
            fds.push(vcpu::create_boot_vcpu(
                &hv,
                &kvm_vm,
                index,
                config.vcpus,
                kernel.entry,
            )?);
        }

        // Probing which MSRs round-trip takes a throwaway VM (~20 ms): done at the first
        // snapshot, not at every start.
        let msr_indices = MsrList::Probe(hv.kvm);
        Self::launch(Launch {
            host,
            cmdline,
            vcpu_count: config.vcpus,
            mem_mib: config.mem_mib,
            memory,
            exit,
            devices,
            kvm_vm,
            fds,
            stdin_input,
            msr_indices,
            dirty_log: config.dirty_log,
            origin: MemoryOrigin::Booted,
            kernel_id: config.kernel.display().to_string(),
        })
    }

    /// Starts the device loop and the vCPU threads of a built VM.
    fn launch(parts: Launch) -> Result<Self, VmError> {
        let Launch {
            host,
            cmdline,
            vcpu_count,
            mem_mib,
            memory,
            exit,
            mut devices,
            kvm_vm,
            fds,
            stdin_input,
            msr_indices,
            dirty_log,
            origin,
            kernel_id,
        } = parts;
        let mut subscribers: Vec<Subscriber> = std::mem::take(&mut devices.subscribers);
        if stdin_input {
            subscribers.push(Arc::new(Mutex::new(StdinInput::new(
                devices.serial.clone(),
                exit.clone(),
            ))));
        }
        let started = std::time::Instant::now();
        // Listening before the vCPUs run, so no announcement can find the port closed.
        let vsock_handle = devices
            .vsock
            .as_ref()
            .map(|v| v.lock().unwrap_or_else(|e| e.into_inner()).handle());
        let agent =
            crate::agent_ready::AgentReadiness::start(vsock_handle.as_ref(), started, exit.clone());
        vcpu::install_kick_handler()?;
        let pio = Arc::new(std::mem::take(&mut devices.pio));
        let mmio = Arc::new(std::mem::take(&mut devices.mmio));
        // vCPUs first: they are what a start waits for. Device notifications they raise before
        // the event loop runs wait in their eventfds.
        let mut vcpus = Vec::with_capacity(fds.len());
        let stop_all = |vcpus: &mut Vec<VcpuHandle>| {
            for v in vcpus.iter() {
                v.send(VcpuCommand::Stop);
            }
            for v in vcpus.iter_mut() {
                v.join();
            }
        };
        for (index, fd) in fds.into_iter().enumerate() {
            match vcpu::spawn(index as u8, fd, pio.clone(), mmio.clone(), exit.clone()) {
                Ok(handle) => vcpus.push(handle),
                Err(e) => {
                    exit.report(VmExit::Failed(format!("vCPU {index} thread: {e}")));
                    stop_all(&mut vcpus);
                    return Err(VmError::VcpuThread(e));
                }
            }
        }
        let event_loop = match EventLoop::start(subscribers, exit.clone()) {
            Ok(event_loop) => event_loop,
            Err(e) => {
                exit.report(VmExit::Failed(format!("device event loop: {e}")));
                stop_all(&mut vcpus);
                return Err(e.into());
            }
        };
        Ok(Self {
            core: Arc::new(VmCore {
                host,
                cmdline,
                vcpu_count,
                mem_mib,
                memory,
                exit,
                devices,
                kvm_vm,
                started,
                agent,
                msr_indices: Mutex::new(msr_indices),
                dirty_log: std::sync::atomic::AtomicBool::new(dirty_log),
                kernel_id,
                lineage: Mutex::new(Lineage {
                    // A restored VM's memory is its snapshot plus what it dirtied since: that
                    // snapshot is the natural parent of its first diff.
                    last_snapshot: match &origin {
                        MemoryOrigin::Restored(dir) => Some(dir.clone()),
                        MemoryOrigin::Booted => None,
                    },
                    origin,
                }),
                vcpus: Mutex::new(vcpus),
                event_loop: Mutex::new(event_loop),
                run_state: Mutex::new(RunState::Running),
            }),
        })
    }

    /// Restores a VM from a snapshot directory, in this process, and lets it run.
    pub fn restore(options: RestoreOptions) -> Result<Self, VmError> {
        let dir = std::path::absolute(&options.dir)
            .map_err(|e| VmError::BadSnapshot(format!("{}: {e}", options.dir.display())))?;
        let loaded = snapshot::load_snapshot::<VmSnapshotState>(&dir, options.memory)?;
        let state = loaded.state;
        let hv = Hypervisor::open()?;
        // The snapshot says whether the guest kernel was PVM-aware through its host kind.
        let guest_kind = if loaded.manifest.host.kind == "kvm-pvm" {
            host::GuestKernelKind::PvmAware
        } else {
            host::GuestKernelKind::Unmodified
        };
        let host = host::detect(std::path::Path::new("/sys"), hv.vendor, guest_kind);
        tracing::info!("host: {host}");
        snapshot::check_compatible(&loaded.manifest, &host_info(host))?;
        state
            .check_consistent(&loaded.manifest)
            .map_err(|reason| VmError::BadSnapshot(format!("{}: {reason}", dir.display())))?;

        let kvm_vm = hv.create_vm(
            &loaded.memory,
            VmSetup {
                // The guest keeps the devices it was saved with.
                pit: state.vm.pit.is_some(),
                dirty_log: options.dirty_log,
            },
        )?;
        crate::vm_snapshot::restore_vm_state(&kvm_vm, &state.vm)?;

        let exit = Arc::new(ExitSink::default());
        let (console_out, stdin_input) = options.console.into_parts();
        let mut devices = DeviceManager::with_serial_state(
            &kvm_vm,
            console_out,
            exit.clone(),
            Some(&state.serial),
        )?;
        let (mut disk_index, mut net_index) = (0usize, 0usize);
        for saved in &state.virtio {
            let slot = RestoreSlot {
                irq: saved.irq,
                base: saved.mmio_base,
                state: &saved.transport,
            };
            match &saved.kind {
                VirtioKind::Block {
                    path,
                    read_only,
                    id,
                } => {
                    let path = options
                        .disks
                        .get(disk_index)
                        .cloned()
                        .flatten()
                        .unwrap_or_else(|| path.clone());
                    disk_index += 1;
                    let config = BlockConfig {
                        path,
                        read_only: *read_only,
                        id: id.clone(),
                    };
                    devices.add_block_at(&kvm_vm, &loaded.memory, config, Some(slot))?;
                }
                VirtioKind::Net { tap, mac } => {
                    let over = options.nets.get(net_index).cloned().flatten();
                    net_index += 1;
                    let config = NetConfig {
                        tap: over
                            .as_ref()
                            .map(|o| o.tap.clone())
                            .unwrap_or_else(|| tap.clone()),
                        mac: Some(over.and_then(|o| o.mac).unwrap_or(*mac)),
                    };
                    devices.add_net_at(&kvm_vm, &loaded.memory, config, Some(slot))?;
                }
                VirtioKind::Vsock { .. } => {
                    let saved_state = saved.vsock.as_ref().ok_or_else(|| {
                        VmError::BadSnapshot("vsock slot without vsock state".into())
                    })?;
                    let args = VsockConstructorArgs {
                        guest_cid: options.vsock.as_ref().and_then(|o| o.cid),
                        uds_path: options.vsock.as_ref().and_then(|o| o.uds.clone()),
                    };
                    let device = Vsock::restore(args, saved_state).map_err(VmError::Vsock)?;
                    devices.add_vsock_at(&kvm_vm, &loaded.memory, device, Some(slot))?;
                }
            }
        }
        let fds = crate::vm_snapshot::restore_vcpus(&kvm_vm, &state.vcpus)?;
        // The MSRs this snapshot carries are the ones the next snapshot saves.
        let msr_indices = MsrList::Known(
            state
                .vcpus
                .first()
                .map(|v| v.msrs.iter().map(|m| m.index).collect())
                .unwrap_or_default(),
        );
        Self::launch(Launch {
            host,
            cmdline: state.cmdline.clone(),
            vcpu_count: state.vcpu_count,
            mem_mib: state.mem_mib,
            memory: loaded.memory,
            exit,
            devices,
            kvm_vm,
            fds,
            stdin_input,
            msr_indices,
            dirty_log: options.dirty_log,
            origin: MemoryOrigin::Restored(dir),
            kernel_id: loaded.manifest.kernel_id.clone(),
        })
    }

    /// Where this VM reports its end (for owners that want a callback: `ExitSink::on_exit`).
    pub fn exit_sink(&self) -> Arc<ExitSink> {
        self.core.exit.clone()
    }

    pub fn controller(&self) -> VmController {
        VmController {
            core: self.core.clone(),
        }
    }

    pub fn host(&self) -> HostKind {
        self.core.host
    }

    pub fn cmdline(&self) -> &str {
        &self.core.cmdline
    }

    pub fn memory(&self) -> &GuestMemory {
        &self.core.memory
    }

    /// Writes a snapshot of the running VM to `dir` (absolute); the VM keeps running. A snapshot
    /// already in `dir` is replaced only with `replace`.
    pub fn checkpoint(
        &self,
        dir: &std::path::Path,
        replace: bool,
    ) -> Result<crate::vm_snapshot::SnapshotOutcome, crate::vm_snapshot::SnapshotVmError> {
        self.core.snapshot(
            dir,
            false,
            snapshot::TargetPolicy {
                replace,
                companions: None,
            },
        )
    }

    /// Hibernates the VM to `dir`: pauses it, flushes its disk files to stable storage, writes a
    /// full snapshot, then stops the VM and frees its memory. `Vm::wake(dir)` brings it back.
    /// A snapshot already in `dir` is replaced only with `replace`.
    pub fn hibernate(
        self,
        dir: &std::path::Path,
        replace: bool,
    ) -> Result<crate::vm_snapshot::SnapshotOutcome, crate::vm_snapshot::SnapshotVmError> {
        self.core.pause()?;
        for slot in &self.core.devices.virtio {
            if let VirtioKind::Block {
                path,
                read_only: false,
                ..
            } = &slot.kind
            {
                // The device writes through the page cache; fsync on any fd of the file flushes it.
                if let Err(e) = std::fs::File::open(path).and_then(|f| f.sync_all()) {
                    tracing::warn!("hibernate: flushing {} failed: {e}", path.display());
                }
            }
        }
        let outcome = self.core.snapshot(
            dir,
            false,
            snapshot::TargetPolicy {
                replace,
                companions: None,
            },
        )?;
        drop(self);
        Ok(outcome)
    }

    /// Restores a hibernated VM from `dir` with its saved devices, console output to `console`.
    pub fn wake(dir: &std::path::Path, console: Console) -> Result<Self, VmError> {
        let mut options = RestoreOptions::new(dir);
        options.console = console;
        Self::restore(options)
    }

    /// Blocks until the VM ends, then tears it down and says why it ended.
    pub fn wait(self) -> VmExit {
        self.wait_stopped().0
    }

    /// Like `wait`, but hands back the stopped VM (vCPU and device threads ended, KVM VM and
    /// memory still held) instead of releasing it here: a process about to exit can then leave
    /// KVM's slow teardown out of its exit path (`StoppedVm::exit_process`).
    pub fn wait_stopped(self) -> (VmExit, StoppedVm) {
        let reason = self.core.exit.wait();
        self.core.teardown();
        let panicked = self.core.devices.console_panicked.load(Ordering::SeqCst);
        let reason = if reason == VmExit::GuestReboot && panicked {
            VmExit::GuestPanic
        } else {
            reason
        };
        let stopped = StoppedVm {
            core: self.core.clone(),
        };
        (reason, stopped)
    }
}

/// A VM whose vCPUs and devices have stopped; dropping it releases the KVM VM and the guest
/// memory (once no controller holds them either).
pub struct StoppedVm {
    core: Arc<VmCore>,
}

impl StoppedVm {
    /// Ends the process with `code` without waiting for KVM to destroy the VM: a helper process
    /// holds the VM fd and the guest memory until this process is gone, then releases them
    /// (see `hypervisor::teardown`). For CLIs; a library user that goes on running drops the
    /// `StoppedVm` instead.
    pub fn exit_process(self, code: i32) -> ! {
        use std::os::fd::AsRawFd;
        crate::hypervisor::teardown::exit_leaving_teardown(&[self.core.kvm_vm.fd.as_raw_fd()], code)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.core.teardown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_composition() {
        assert_eq!(
            compose_cmdline(
                " console=ttyS0 ",
                "clearcpuid=x",
                &["virtio_mmio.device=4K@0xd0000000:5".into()]
            ),
            "console=ttyS0 clearcpuid=x virtio_mmio.device=4K@0xd0000000:5"
        );
        assert_eq!(compose_cmdline("a", "", &[]), "a");
    }
}
