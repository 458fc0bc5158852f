//! Building a VM from a [`VmConfig`] (`Vm::start`), and starting the threads of a built or
//! restored VM (`launch`).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::boot::{self, BootSetup};
use crate::console::StdinInput;
use crate::device_manager::DeviceManager;
use crate::event_loop::{EventLoop, Subscriber};
use crate::exit::{ExitSink, VmExit};
use crate::host::{self, HostKind};
use crate::hypervisor::vcpu::{self, VcpuCommand, VcpuHandle};
use crate::hypervisor::{Hypervisor, VmSetup};
use crate::memory;
use crate::seccomp::SeccompLevel;
use devices::virtio::vsock::Vsock;
use devices::GuestMemory;

use super::config::{compose_cmdline, VmConfig, DEFAULT_CMDLINE, MAX_VCPUS};
use super::core::{Lineage, MemoryOrigin, MsrList, VmCore};
use super::error::{RunState, VmError};
use super::lifecycle::Vm;

/// The pieces `Vm::launch` starts, from a boot or a restore.
pub(super) struct Launch {
    pub(super) host: HostKind,
    pub(super) cmdline: String,
    pub(super) vcpu_count: u8,
    pub(super) mem_mib: u64,
    pub(super) memory: GuestMemory,
    pub(super) exit: Arc<ExitSink>,
    pub(super) devices: DeviceManager,
    pub(super) kvm_vm: crate::hypervisor::Vm,
    pub(super) fds: Vec<kvm_ioctls::VcpuFd>,
    pub(super) stdin_input: bool,
    pub(super) msr_indices: MsrList,
    pub(super) dirty_log: bool,
    pub(super) origin: MemoryOrigin,
    pub(super) lazy_memory: Option<snapshot::LazyMemory>,
    pub(super) kernel_id: String,
    pub(super) seccomp: SeccompLevel,
    /// vCPU threads started while the VM was built (`Vm::start`); `launch` starts the rest.
    pub(super) early_vcpus: Vec<vcpu::PendingVcpu>,
    pub(super) metrics: vmm_metrics::VmMetrics,
    /// A VM shell's RAM reservation (`Vm::restore_into`), which owns `memory`'s mappings.
    pub(super) reserved_ram: Option<crate::reserved_ram::ReservedRam>,
}

fn kernel_head(path: &PathBuf) -> Result<Vec<u8>, VmError> {
    use std::io::Read;
    let mut head = Vec::with_capacity(4096);
    std::fs::File::open(path)
        .and_then(|f| f.take(4096).read_to_end(&mut head))
        .map_err(|e| VmError::KernelFile(path.clone(), e))?;
    Ok(head)
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
        // The vsock device decides its datapath (vhost-kernel or userspace) when it is made,
        // and the vCPU threads' filter depends on it: made first, so those threads can start
        // now. vCPU 0's thread reads the supported CPUID (one of the slowest steps of a start
        // on a host that is itself a VM: every CPUID traps) and each installs its filter while
        // this thread builds the VM; the vCPUs are created once the CPUID is in.
        let vsock = config
            .vsock
            .map(Vsock::new)
            .transpose()
            .map_err(VmError::Vsock)?;
        let exit = Arc::new(ExitSink::default());
        let early_vcpus = prespawn_vcpus(
            config.vcpus,
            &exit,
            vcpu::VcpuFilter {
                level: config.seccomp,
                vhost_vsock: vsock
                    .as_ref()
                    .is_some_and(|v| v.datapath() == devices::virtio::vsock::Datapath::Vhost),
            },
            hv.prefetch_supported_cpuid(),
        );
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

        let (console_out, stdin_input) = config.console.into_parts();
        let metrics = metrics_or_new(config.metrics)?;
        let mut devices = DeviceManager::new(&kvm_vm, console_out, exit.clone(), metrics.clone())?;
        for disk in config.disks {
            devices.add_block(&kvm_vm, &memory, disk)?;
        }
        for net in config.nets {
            devices.add_net(&kvm_vm, &memory, net)?;
        }
        if let Some(device) = vsock {
            devices.add_vsock(&kvm_vm, &memory, device)?;
        }
        if let Some(balloon) = config.balloon {
            devices.add_balloon(&kvm_vm, &memory, balloon, config.mem_mib)?;
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
        let cmdline = compose_cmdline(&base, quirk_cmdline, devices.cmdline_additions());
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
        launch(Launch {
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
            lazy_memory: None,
            kernel_id: config.kernel.display().to_string(),
            seccomp: config.seccomp,
            early_vcpus,
            metrics,
            reserved_ram: None,
        })
    }
}

/// The counters a VM was given, or a new unnamed set.
pub(super) fn metrics_or_new(
    metrics: Option<vmm_metrics::VmMetrics>,
) -> Result<vmm_metrics::VmMetrics, VmError> {
    match metrics {
        Some(m) => Ok(m),
        None => Ok(
            vmm_metrics::VmMetrics::new("").map_err(crate::device_manager::DeviceError::from)?
        ),
    }
}

/// Starts `count` vCPU threads ahead of their vCPUs (see `vcpu::PendingVcpu`), vCPU 0's with
/// the CPUID read. Best effort: a thread that cannot be started now is started by `launch`
/// (which reports the error), and an unrun CPUID job leaves the read to its first user.
pub(super) fn prespawn_vcpus(
    count: u8,
    exit: &Arc<ExitSink>,
    filter: vcpu::VcpuFilter,
    mut cpuid: Option<crate::hypervisor::CpuidPrefetch>,
) -> Vec<vcpu::PendingVcpu> {
    let mut pending = Vec::with_capacity(usize::from(count));
    for index in 0..count {
        match vcpu::prespawn(index, exit.clone(), filter, cpuid.take()) {
            Ok(p) => pending.push(p),
            Err(e) => {
                tracing::debug!("starting vCPU {index}'s thread early: {e}");
                break;
            }
        }
    }
    pending
}

/// How long a start waits for its early vCPU threads to be on a CPU (see
/// [`wait_until_running`]); a thread that takes longer is simply not waited for.
const RUNNING_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

/// Waits until the vCPU threads started early have entered `KVM_RUN` before this thread starts
/// the device thread: what that thread and the caller's threads do next (spawning, installing
/// their seccomp filters, which the kernel JIT-compiles) then competes with a running guest
/// instead of with the wake-up of its vCPUs. On two busy cores that wake-up otherwise waited
/// for them, a fraction of a millisecond before the guest's first instruction.
fn wait_until_running(running: &std::sync::mpsc::Receiver<u8>, count: usize) {
    let deadline = std::time::Instant::now() + RUNNING_WAIT;
    for _ in 0..count {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        // Disconnected: every early thread has reported or ended (a failed filter).
        if running.recv_timeout(left).is_err() {
            break;
        }
    }
}

/// Starts the device loop and the vCPU threads of a built VM.
pub(super) fn launch(parts: Launch) -> Result<Vm, VmError> {
    let Launch {
        host,
        cmdline,
        vcpu_count,
        mem_mib,
        memory,
        exit,
        devices,
        kvm_vm,
        fds,
        stdin_input,
        msr_indices,
        dirty_log,
        origin,
        lazy_memory,
        kernel_id,
        seccomp,
        early_vcpus,
        metrics,
        reserved_ram,
    } = parts;
    if seccomp != SeccompLevel::Off {
        // What a filtered thread would otherwise do lazily: the SIGSYS handler, and the KVM
        // capabilities a snapshot's state reads need (a vCPU thread may not open /dev/kvm).
        crate::seccomp::prepare(seccomp)?;
        crate::hypervisor::state::probe_host_caps().map_err(VmError::HostCaps)?;
    }
    let (devices, wiring) = devices.finish();
    let vhost_vsock = devices.vhost_vsock();
    let mut subscribers: Vec<Subscriber> = wiring.subscribers;
    if stdin_input {
        subscribers.push(Arc::new(Mutex::new(StdinInput::new(
            devices.serial(),
            exit.clone(),
        ))));
    }
    let started = std::time::Instant::now();
    // Listening before the vCPUs run, so no announcement can find the port closed.
    let vsock_handle = devices.vsock();
    let agent = crate::agent_ready::AgentReadiness::start(
        vsock_handle.as_ref(),
        started,
        exit.clone(),
        seccomp,
    );
    vcpu::install_kick_handler()?;
    let pio = Arc::new(wiring.pio);
    let mmio = Arc::new(wiring.mmio);
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
    let filter = vcpu::VcpuFilter {
        level: seccomp,
        vhost_vsock,
    };
    let mut early_vcpus = early_vcpus.into_iter();
    let (running_tx, running_rx) = std::sync::mpsc::channel();
    let mut started_early = 0;
    for (index, fd) in fds.into_iter().enumerate() {
        // A thread started early with the filter this VM needs takes its vCPU; otherwise (a
        // restore, or a filter that no longer matches) the thread starts now.
        if let Some(pending) = early_vcpus.next() {
            if usize::from(pending.index()) == index && pending.has_filter(filter) {
                vcpus.push(pending.start(
                    fd,
                    pio.clone(),
                    mmio.clone(),
                    Some(running_tx.clone()),
                    metrics.vcpu().clone(),
                ));
                started_early += 1;
                continue;
            }
        }
        match vcpu::spawn(
            index as u8,
            fd,
            pio.clone(),
            mmio.clone(),
            exit.clone(),
            filter,
            metrics.vcpu().clone(),
        ) {
            Ok(handle) => vcpus.push(handle),
            Err(e) => {
                exit.report(VmExit::Failed(format!("vCPU {index} thread: {e}")));
                stop_all(&mut vcpus);
                return Err(VmError::VcpuThread(e));
            }
        }
    }
    drop(running_tx);
    wait_until_running(&running_rx, started_early);
    let event_loop = match EventLoop::start(subscribers, exit.clone(), seccomp) {
        Ok(event_loop) => event_loop,
        Err(e) => {
            exit.report(VmExit::Failed(format!("device event loop: {e}")));
            stop_all(&mut vcpus);
            return Err(e.into());
        }
    };
    Ok(Vm {
        core: Arc::new(VmCore {
            host,
            cmdline,
            vcpu_count,
            mem_mib,
            lazy_memory,
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
                    MemoryOrigin::Booted | MemoryOrigin::Fetched => None,
                },
                origin,
            }),
            vcpus: Mutex::new(vcpus),
            event_loop: Mutex::new(event_loop),
            run_state: Mutex::new(RunState::Running),
            seccomp,
            metrics,
            reserved_ram,
        }),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::channel;
    use std::time::{Duration, Instant};

    use super::{wait_until_running, RUNNING_WAIT};

    #[test]
    fn waits_for_every_early_vcpu_then_returns() {
        let (tx, rx) = channel();
        let senders: Vec<_> = (0..2u8).map(|_| tx.clone()).collect();
        drop(tx);
        let threads: Vec<_> = senders
            .into_iter()
            .enumerate()
            .map(|(i, tx)| {
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(2));
                    tx.send(i as u8).unwrap();
                    // Still alive after reporting, as a running vCPU thread is.
                    std::thread::sleep(Duration::from_millis(200));
                })
            })
            .collect();
        let start = Instant::now();
        wait_until_running(&rx, 2);
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(2), "{waited:?}");
        assert!(waited < Duration::from_millis(150), "{waited:?}");
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn a_thread_that_never_reports_is_not_waited_for_long() {
        let (tx, rx) = channel::<u8>();
        let start = Instant::now();
        wait_until_running(&rx, 1);
        assert!(start.elapsed() >= RUNNING_WAIT);
        assert!(start.elapsed() < RUNNING_WAIT * 20);
        // A thread that ended without reporting (its filter failed): no wait at all.
        drop(tx);
        let start = Instant::now();
        wait_until_running(&rx, 1);
        assert!(start.elapsed() < RUNNING_WAIT);
    }
}
