//! What a VM is built from: [`VmConfig`] for a boot, [`RestoreOptions`] for a restore, and where
//! its console goes.

use std::io::Write;
use std::path::PathBuf;

use devices::virtio::balloon::BalloonConfig;
use devices::virtio::block::BlockConfig;
use devices::virtio::net::NetConfig;
use devices::virtio::vsock::VsockConfig;

use crate::device_manager::{DeviceOverrides, NetOverride, VsockOverride};
use crate::seccomp::SeccompLevel;

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
    pub(super) fn into_parts(self) -> (Box<dyn Write + Send>, bool) {
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
    /// A virtio-balloon device (target, statistics, free page reporting: docs/balloon.md).
    pub balloon: Option<BalloonConfig>,
    /// seccomp filters on the threads this VM starts (vCPUs, devices, agent readiness, CPUID
    /// prefetch; and the API server serving it): enforcing by default. The caller's own
    /// threads are never filtered.
    pub seccomp: SeccompLevel,
    /// The counters this VM's devices and vCPUs count into (docs/metrics.md); None: a new set
    /// with an empty `vm_id`.
    pub metrics: Option<vmm_metrics::VmMetrics>,
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
            balloon: None,
            seccomp: SeccompLevel::default(),
            metrics: None,
        }
    }
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
    /// Per saved disk, in order: new I/O limits (None keeps the saved ones).
    pub disk_rate_limiters: Vec<Option<devices::rate_limiter::RateLimiterConfig>>,
    /// Per saved network device, in order: new RX/TX limits (None keeps the saved ones).
    pub net_rate_limiters: Vec<Option<crate::device_manager::NetRateLimits>>,
    pub dirty_log: bool,
    /// seccomp filters on the threads the restored VM starts (as `VmConfig::seccomp`).
    pub seccomp: SeccompLevel,
    /// Serve guest memory lazily from here instead of the directory's `memory.bin` (which
    /// then need not exist): a snapshot store.
    pub lazy: Option<LazyRestore>,
    /// The counters of the restored VM (as `VmConfig::metrics`); a restore starts from zero.
    pub metrics: Option<vmm_metrics::VmMetrics>,
    /// The MMDS that restored interfaces which served one answer from (its document is the
    /// caller's; None: each such interface gets a new, empty one).
    pub mmds: Option<devices::mmds::SharedMmds>,
    /// The snapshot's state as decoded before (a template restored many times): used instead
    /// of reading `state.bin` when it is `dir`'s current snapshot's, ignored otherwise.
    pub known_state: Option<std::sync::Arc<snapshot::DecodedState<super::VmSnapshotState>>>,
}

/// Guest memory of a restore fetched on demand (`RestoreOptions::lazy`).
pub struct LazyRestore {
    pub source: std::sync::Arc<dyn snapshot::ChunkSource>,
    /// Memory-file pages to fetch first (the snapshot's working set).
    pub working_set: Option<snapshot::PageBitmap>,
    /// Chunks fetched at once ([`LazyRestore::DEFAULT_FETCHERS`]).
    pub fetchers: usize,
}

impl LazyRestore {
    pub const DEFAULT_FETCHERS: usize = 4;
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
            disk_rate_limiters: Vec::new(),
            net_rate_limiters: Vec::new(),
            dirty_log: true,
            seccomp: SeccompLevel::default(),
            lazy: None,
            metrics: None,
            mmds: None,
            known_state: None,
        }
    }
}

impl RestoreOptions {
    /// The host resources that replace the saved ones.
    pub(super) fn device_overrides(&self) -> DeviceOverrides {
        DeviceOverrides {
            disks: self.disks.clone(),
            nets: self.nets.clone(),
            vsock: self.vsock.clone(),
            disk_rate_limiters: self.disk_rate_limiters.clone(),
            net_rate_limiters: self.net_rate_limiters.clone(),
            mmds: self.mmds.clone(),
        }
    }
}

/// What the i8042 is (`devices::legacy::i8042`): no mouse port, no multiplexer, no PnP entry,
/// a keyboard that needs no probe. Told to Linux's drivers as Firecracker recommends, because
/// their probe is slow where ring 0 is emulated (atkbd's took 1.9 s of a boot here, 0.27 s
/// with these; docs/firecracker.md). First, so that a base command line can override them.
pub const I8042_CMDLINE: &str = "i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// Assembles the guest command line: the i8042's description, base, host quirks, device
/// announcements.
pub fn compose_cmdline(base: &str, quirks: &str, devices: &[String]) -> String {
    let mut parts: Vec<&str> = vec![I8042_CMDLINE, base.trim()];
    if !quirks.is_empty() {
        parts.push(quirks);
    }
    parts.extend(devices.iter().map(String::as_str));
    parts.retain(|p| !p.is_empty());
    parts.join(" ")
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
            format!(
                "{I8042_CMDLINE} console=ttyS0 clearcpuid=x virtio_mmio.device=4K@0xd0000000:5"
            )
        );
        assert_eq!(compose_cmdline("a", "", &[]), format!("{I8042_CMDLINE} a"));
    }
}
