//! `dormouse run`: boot a VM and stay attached to its console until it ends.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use devices::virtio::block::BlockConfig;
use devices::virtio::net::NetConfig;
use devices::virtio::vsock::VsockConfig;
use vmm::console::RawTerminalGuard;
use vmm::seccomp::ThreadKind;
use vmm::{Console, SeccompLevel, Vm, VmConfig, VmController, VmExit};
use vmm_api::ApiSocket;

#[derive(Args)]
pub struct RunArgs {
    /// Guest kernel: a vmlinux ELF or a bzImage (64-bit boot protocol).
    #[arg(long)]
    pub kernel: PathBuf,
    /// Initial ramdisk (uncompressed cpio is fastest).
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Guest kernel command line (replaces the default "console=ttyS0 reboot=k panic=-1";
    /// host quirks and device announcements are still appended).
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Number of vCPUs (1–32).
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    pub mem_mib: u64,
    /// Keep guest RAM in an unnamed file in DIR (shared mapping; ext4, xfs, btrfs or tmpfs)
    /// instead of anonymous memory: a full snapshot into a directory on the same file system
    /// then links that file instead of copying guest memory. Guest writes become page-cache
    /// writes the kernel flushes to DIR in the background.
    #[arg(long, value_name = "DIR")]
    pub mem_dir: Option<PathBuf>,
    /// Do not append the host kind's guest command-line quirks (e.g. clearcpuid= on an
    /// emulating PVM host).
    #[arg(long)]
    pub no_host_quirks: bool,
    /// Where guest console output goes: "stdio" (default; input from stdin), "null", or a file
    /// path.
    #[arg(long, default_value = "stdio")]
    pub console: String,
    /// Root filesystem image: the first virtio-blk disk, booted with `root=/dev/vda rw`.
    #[arg(long)]
    pub rootfs: Option<PathBuf>,
    /// A virtio-blk disk: `path=FILE[,ro][,id=NAME]` (repeatable; after --rootfs, in order).
    #[arg(long, value_parser = parse_disk)]
    pub disk: Vec<BlockConfig>,
    /// A virtio-net device on a TAP (created if missing): `tap=NAME[,mac=MAC]` (repeatable).
    #[arg(long, value_parser = parse_net)]
    pub net: Vec<NetConfig>,
    /// A vsock device: `cid=N[,uds=PATH][,backend=auto|vhost|userspace]`. With `uds=`, host
    /// programs connect Firecracker-style (`CONNECT <port>` on PATH) and guest connections to
    /// port P go to `PATH_P`.
    #[arg(long)]
    pub vsock: Option<VsockConfig>,
    /// A virtio-balloon device (docs/balloon.md): `[target_mib=N][,deflate_on_oom=BOOL]
    /// [,stats_s=N][,free_page_reporting=BOOL]` (`,` for the defaults: reporting and deflate on
    /// OOM on, no statistics). Free page reporting gives memory the guest frees back to the host.
    #[arg(long, value_parser = parse_balloon)]
    pub balloon: Option<devices::virtio::balloon::BalloonConfig>,
    /// Serve the control API (pause, resume, snapshot, shutdown, info) on this Unix socket.
    #[arg(long)]
    pub api_sock: Option<PathBuf>,
    /// The VM's id: the `vm_id` label of its counters (`GET /metrics`, docs/metrics.md).
    #[arg(long, default_value = "")]
    pub id: String,
    /// The in-kernel PIT (i8254 timer): "auto" gives it only to guests that need it (the host
    /// has no TSC-deadline timer); "on" for guests that rely on the PIT anyway.
    #[arg(long, value_enum, default_value = "auto")]
    pub pit: PitChoice,
    /// seccomp filters on every thread (docs/security.md): "enforce" ends the process with
    /// status 159 and names the thread kind and system call on a call outside a thread's
    /// allowlist; "log" lets it through and has the kernel log it; "off" installs none.
    #[arg(long, value_enum, default_value = "enforce")]
    pub seccomp: SeccompChoice,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompChoice {
    Enforce,
    Log,
    Off,
}

impl From<SeccompChoice> for SeccompLevel {
    fn from(choice: SeccompChoice) -> Self {
        match choice {
            SeccompChoice::Enforce => SeccompLevel::Enforce,
            SeccompChoice::Log => SeccompLevel::Log,
            SeccompChoice::Off => SeccompLevel::Off,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PitChoice {
    Auto,
    On,
    Off,
}

pub(crate) fn parse_balloon(s: &str) -> Result<devices::virtio::balloon::BalloonConfig, String> {
    vmm::options::parse_balloon(s).map_err(|e| e.to_string())
}

pub(crate) fn parse_disk(s: &str) -> Result<BlockConfig, String> {
    vmm::options::parse_disk(s).map_err(|e| e.to_string())
}

pub(crate) fn parse_net(s: &str) -> Result<NetConfig, String> {
    vmm::options::parse_net(s).map_err(|e| e.to_string())
}

pub(crate) fn console_from(arg: &str) -> anyhow::Result<Console> {
    Ok(match arg {
        "stdio" => Console::Stdio,
        "null" => Console::Null,
        path => Console::Writer(Box::new(
            std::fs::File::create(path).with_context(|| format!("console file {path}"))?,
        )),
    })
}

/// SIGINT, SIGTERM and SIGHUP stop the VM cleanly: they are blocked in every thread and
/// collected by one thread with sigwait.
pub(crate) fn block_termination_signals() -> libc::sigset_t {
    // SAFETY: plain libc signal-set manipulation on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// How long after start the signal thread trims the process's mapped code (see `resident`):
/// start-up code has run by then.
const TRIM_AFTER: std::time::Duration = std::time::Duration::from_millis(50);

fn spawn_signal_thread(set: libc::sigset_t, controller: VmController) {
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Err(e) = vmm::seccomp::install(ThreadKind::Signals, controller.seccomp_level()) {
                controller.fail(format!("signal thread: {e}"));
                return;
            }
            let timeout = libc::timespec {
                tv_sec: 0,
                tv_nsec: TRIM_AFTER.as_nanos() as libc::c_long,
            };
            // SAFETY: `set` is a valid signal set; a null siginfo pointer is allowed.
            let mut sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &timeout) };
            if sig < 0 {
                let trimmed = super::resident::trim_file_mappings();
                tracing::debug!("trimmed {} KiB of mapped code", trimmed >> 10);
                // SAFETY: as above; sigwait writes the signal number to `sig`.
                if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                    return;
                }
            }
            tracing::info!("signal {sig}: stopping the VM");
            controller.shutdown();
        });
}

pub fn run(args: RunArgs) -> anyhow::Result<i32> {
    let mut config = VmConfig::new(&args.kernel);
    config.metrics = Some(vmm::metrics::VmMetrics::new(&args.id)?);
    config.initrd = args.initrd;
    config.cmdline = args.cmdline;
    config.vcpus = args.vcpus;
    config.mem_mib = args.mem_mib;
    config.mem_dir = args.mem_dir;
    config.host_quirks = !args.no_host_quirks;
    config.pit = match args.pit {
        PitChoice::Auto => None,
        PitChoice::On => Some(true),
        PitChoice::Off => Some(false),
    };
    config.console = console_from(&args.console)?;
    if let Some(rootfs) = args.rootfs {
        config.disks.push(BlockConfig {
            path: rootfs,
            read_only: false,
            id: Some("rootfs".into()),
            rate_limiter: Default::default(),
        });
        config.root_on_first_disk = true;
    }
    config.disks.extend(args.disk);
    config.nets = args.net;
    config.vsock = args.vsock;
    config.balloon = args.balloon;
    config.seccomp = args.seccomp.into();
    let interactive = matches!(config.console, Console::Stdio);

    let signals = block_termination_signals();
    let api = bind_api(args.api_sock.as_deref())?;
    let vm = Vm::start(config).context("cannot start the VM")?;
    serve(vm, signals, api, interactive)
}

/// Binds the control socket before the VM is built: it exists by the time the guest runs, and
/// a path that cannot be bound fails the command before any VM starts.
pub(crate) fn bind_api(api_sock: Option<&std::path::Path>) -> anyhow::Result<Option<ApiSocket>> {
    api_sock
        .map(|path| {
            ApiSocket::bind(path).with_context(|| format!("control API on {}", path.display()))
        })
        .transpose()
}

/// Attaches to a started VM until it ends: signals, control API, raw terminal. Returns the exit
/// status.
pub(crate) fn serve(
    vm: Vm,
    signals: libc::sigset_t,
    api: Option<ApiSocket>,
    interactive: bool,
) -> anyhow::Result<i32> {
    spawn_signal_thread(signals, vm.controller());
    let api = match api {
        Some(socket) => {
            let path = socket.path().to_path_buf();
            Some(
                socket
                    .serve(std::sync::Arc::new(vm.controller()))
                    .with_context(|| format!("control API on {}", path.display()))?,
            )
        }
        None => None,
    };
    let raw_terminal = interactive.then(RawTerminalGuard::new);
    // Everything this thread opens is open: from here on it waits, tears down and exits.
    vmm::seccomp::install(ThreadKind::Main, vm.controller().seccomp_level())
        .context("seccomp filter of the main thread")?;
    let (exit, stopped) = vm.wait_stopped();
    drop(raw_terminal);
    drop(api);
    match &exit {
        VmExit::Failed(msg) => eprintln!("dormouse: VM failed: {msg}"),
        VmExit::GuestPanic => eprintln!("dormouse: the guest kernel panicked"),
        other => tracing::info!("VM ended: {other:?}"),
    }
    // KVM's teardown of the VM takes milliseconds to tens of milliseconds on some hosts: the
    // process ends without waiting for it.
    stopped.exit_process(exit.exit_code())
}
