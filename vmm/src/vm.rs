//! VM lifecycle: `VmConfig` → a running VM → `wait()` for how it ended.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use crate::boot::{self, BootSetup};
use crate::console::StdinInput;
use crate::device_manager::{DeviceError, DeviceManager};
use crate::event_loop::{EventLoop, EventLoopError, Subscriber};
use crate::host::{self, HostKind};
use crate::hypervisor::vcpu::{self, ExitSink, VcpuCommand, VcpuHandle, VmExit};
use crate::hypervisor::{Hypervisor, HypervisorError};
use crate::memory::{self, MemoryError};
use devices::virtio::block::BlockConfig;
use devices::virtio::net::NetConfig;
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

pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Replaces `DEFAULT_CMDLINE`; host quirks and device announcements are still appended.
    pub cmdline: Option<String>,
    pub vcpus: u8,
    pub mem_mib: u64,
    /// Apply the host kind's guest command-line quirks (see `host::HostQuirks`).
    pub host_quirks: bool,
    /// Track guest writes with KVM's dirty log from boot (cheap diff snapshots).
    pub dirty_log: bool,
    pub console: Console,
    /// virtio-blk disks in order (the first is /dev/vda).
    pub disks: Vec<BlockConfig>,
    /// Boot from the first disk: adds `root=/dev/vda rw` to the command line.
    pub root_on_first_disk: bool,
    pub nets: Vec<NetConfig>,
}

impl VmConfig {
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: None,
            vcpus: 1,
            mem_mib: 256,
            host_quirks: true,
            dirty_log: false,
            console: Console::Stdio,
            disks: Vec::new(),
            root_on_first_disk: false,
            nets: Vec::new(),
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
}

/// A running VM. Dropping it stops the VM.
pub struct Vm {
    pub host: HostKind,
    pub cmdline: String,
    memory: GuestMemory,
    exit: Arc<ExitSink>,
    vcpus: Vec<VcpuHandle>,
    event_loop: EventLoop,
    devices: DeviceManager,
    _vm: crate::hypervisor::Vm,
}

/// Cloneable way to stop a VM from another thread (signal handlers, API servers).
#[derive(Clone)]
pub struct VmController {
    exit: Arc<ExitSink>,
}

impl VmController {
    pub fn shutdown(&self) {
        self.exit.report(VmExit::HostShutdown);
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
        let guest_kind = host::guest_kernel_kind(boot::loader::elf_first_load_vaddr(&head));
        let host = host::detect(std::path::Path::new("/sys"), hv.vendor, guest_kind);
        let quirks = host.quirks();
        tracing::info!("host: {host}");

        let mut kvm_vm = hv.create_vm()?;
        let memory = memory::create_guest_memory(config.mem_mib)?;
        kvm_vm.set_memory(&memory, config.dirty_log)?;

        let exit = Arc::new(ExitSink::default());
        let (console_out, stdin_input): (Box<dyn Write + Send>, bool) = match config.console {
            Console::Stdio => (Box::new(std::io::stdout()), true),
            Console::Writer(w) => (w, false),
            Console::Null => (Box::new(std::io::sink()), false),
        };
        let mut devices = DeviceManager::new(&kvm_vm, console_out, exit.clone())?;
        for disk in config.disks {
            devices.add_block(&kvm_vm, &memory, disk)?;
        }
        for net in config.nets {
            devices.add_net(&kvm_vm, &memory, net)?;
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

        let mut subscribers: Vec<Subscriber> = std::mem::take(&mut devices.subscribers);
        if stdin_input {
            subscribers.push(Arc::new(Mutex::new(StdinInput::new(
                devices.serial.clone(),
                exit.clone(),
            ))));
        }
        let event_loop = EventLoop::start(subscribers)?;

        vcpu::install_kick_handler()?;
        let pio = Arc::new(std::mem::take(&mut devices.pio));
        let mmio = Arc::new(std::mem::take(&mut devices.mmio));
        let mut vcpus = Vec::with_capacity(fds.len());
        for (index, fd) in fds.into_iter().enumerate() {
            let handle = vcpu::spawn(index as u8, fd, pio.clone(), mmio.clone(), exit.clone())
                .map_err(VmError::VcpuThread)?;
            vcpus.push(handle);
        }
        Ok(Self {
            host,
            cmdline,
            memory,
            exit,
            vcpus,
            event_loop,
            devices,
            _vm: kvm_vm,
        })
    }

    pub fn controller(&self) -> VmController {
        VmController {
            exit: self.exit.clone(),
        }
    }

    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// Blocks until the VM ends, then tears it down and says why it ended.
    pub fn wait(mut self) -> VmExit {
        let reason = self.exit.wait();
        self.teardown();
        if reason == VmExit::GuestReboot && self.devices.console_panicked.load(Ordering::SeqCst) {
            return VmExit::GuestPanic;
        }
        reason
    }

    fn teardown(&mut self) {
        self.exit.report(VmExit::HostShutdown);
        for v in &self.vcpus {
            v.send(VcpuCommand::Stop);
        }
        for v in &mut self.vcpus {
            v.join();
        }
        self.vcpus.clear();
        self.event_loop.stop();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.teardown();
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
