//! `dormouse restore`: a new VM from a snapshot directory, in this process.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};

use devices::virtio::block::BlockConfig;
use devices::virtio::net::NetConfig;
use vmm::device_manager::NetRateLimits;
use vmm::vm::{NetOverride, VsockOverride, RESTORED_MARKER};
use vmm::{Console, RestoreOptions, Vm};

use super::restore_from::{FetchMode, FromStoreArgs};
use super::run::{
    bind_api, block_termination_signals, console_from, parse_disk, parse_net, serve, SeccompChoice,
};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MemoryMode {
    /// Map the memory file privately: lazy, copy-on-write, O(1) in guest size; VMs restored from
    /// one snapshot share its page cache.
    Private,
    /// Read the memory into anonymous memory: independent of the file afterwards.
    Copy,
}

#[derive(Args)]
pub struct RestoreArgs {
    /// Snapshot directory (written by `dormouse ctl snapshot`).
    #[arg(long, required_unless_present = "from", conflicts_with = "from")]
    pub dir: Option<PathBuf>,
    /// A snapshot in a store (file:///abs/store/NAME, s3://bucket/prefix/NAME). Its memory is
    /// fetched lazily (see --fetch); the rest goes into a private temporary directory, removed
    /// when the VM ends.
    #[arg(long)]
    pub from: Option<String>,
    /// With --from: `lazy` starts the VM at once and fetches memory on first touch (falls back
    /// to `full` without userfaultfd, saying so); `full` downloads everything first.
    #[arg(long, value_enum, default_value = "lazy", requires = "from")]
    pub fetch: FetchMode,
    /// With --from: the host-wide chunk cache (default $DORMOUSE_CHUNK_CACHE, else
    /// /var/cache/dormouse/chunks for root, else ~/.cache/dormouse/chunks).
    #[arg(long, requires = "from")]
    pub chunk_cache: Option<PathBuf>,
    /// With --from: the chunk cache's bound in MiB (least recently used chunks go first).
    #[arg(long, default_value_t = snapshot_store::DEFAULT_CACHE_BYTES >> 20)]
    pub chunk_cache_mib: u64,
    /// How guest memory is brought back.
    #[arg(long, value_enum, default_value = "private")]
    pub memory: MemoryMode,
    /// Serve the control API on this Unix socket.
    #[arg(long)]
    pub api_sock: Option<PathBuf>,
    /// The VM's id: the `vm_id` label of its counters (`GET /metrics`, docs/metrics.md).
    #[arg(long, default_value = "")]
    pub id: String,
    /// Where guest console output goes: "stdio" (default), "null", or a file path.
    #[arg(long, default_value = "stdio")]
    pub console: String,
    /// Replace the first saved disk's file (as `run --rootfs`).
    #[arg(long)]
    pub rootfs: Option<PathBuf>,
    /// Replace saved disks' files, in order after --rootfs: `path=FILE` (flags must match the
    /// snapshot's; the device model keeps its saved read-only setting). `bw=`/`ops=` replace
    /// the saved rate limits (docs/rate-limits.md); without them the saved limits stay.
    #[arg(long, value_parser = parse_disk)]
    pub disk: Vec<BlockConfig>,
    /// Replace saved network devices' TAP (and MAC), in order: `tap=NAME[,mac=MAC]`;
    /// `rx_bw=`/`rx_ops=`/`tx_bw=`/`tx_ops=` replace the saved rate limits.
    #[arg(long, value_parser = parse_net)]
    pub net: Vec<NetConfig>,
    /// A new guest CID for the vsock device (a clone needs its own).
    #[arg(long)]
    pub vsock_cid: Option<u64>,
    /// A new hybrid vsock socket path.
    #[arg(long)]
    pub vsock_uds: Option<PathBuf>,
    /// seccomp filters on every thread: enforce, log or off (as `run --seccomp`).
    #[arg(long, value_enum, default_value = "enforce")]
    pub seccomp: SeccompChoice,
}

pub fn restore(args: RestoreArgs) -> anyhow::Result<i32> {
    // A snapshot from a store lives as long as this process: private memory mappings keep
    // reading it, a lazy restore keeps fetching.
    let (dir, mut from_store) = match (&args.dir, &args.from) {
        (Some(dir), _) => (dir.clone(), None),
        (None, Some(url)) => {
            let from = super::restore_from::prepare(FromStoreArgs {
                url,
                fetch: args.fetch,
                chunk_cache: args.chunk_cache.as_deref(),
                chunk_cache_mib: args.chunk_cache_mib,
                seccomp: args.seccomp.into(),
            })?;
            (from.dir.clone(), Some(from))
        }
        (None, None) => anyhow::bail!("name a snapshot: --dir DIR or --from URL"),
    };
    let mut options = RestoreOptions::new(&dir);
    options.metrics = Some(vmm::metrics::VmMetrics::new(&args.id)?);
    options.lazy = from_store.as_mut().and_then(|f| f.lazy.take());
    options.memory = match args.memory {
        MemoryMode::Private => snapshot::RestoreStrategy::Private,
        MemoryMode::Copy => snapshot::RestoreStrategy::Copy,
    };
    options.console = console_from(&args.console)?;
    options.seccomp = args.seccomp.into();
    let interactive = matches!(options.console, Console::Stdio);
    let first = usize::from(args.rootfs.is_some());
    options.disk_rate_limiters = std::iter::repeat_n(None, first)
        .chain(args.disk.iter().map(|d| {
            d.rate_limiter
                .is_limiting()
                .then_some(d.rate_limiter.normalized())
        }))
        .collect();
    options.net_rate_limiters = args
        .net
        .iter()
        .map(|n| {
            (n.rx_rate_limiter.is_limiting() || n.tx_rate_limiter.is_limiting()).then_some(
                NetRateLimits {
                    rx: n.rx_rate_limiter.normalized(),
                    tx: n.tx_rate_limiter.normalized(),
                },
            )
        })
        .collect();
    options.disks = args
        .rootfs
        .into_iter()
        .chain(args.disk.into_iter().map(|d| d.path))
        .map(Some)
        .collect();
    options.nets = args
        .net
        .into_iter()
        .map(|n| {
            Some(NetOverride {
                tap: n.tap,
                fd: n.fd,
                mac: n.mac,
            })
        })
        .collect();
    if args.vsock_cid.is_some() || args.vsock_uds.is_some() {
        options.vsock = Some(VsockOverride {
            cid: args.vsock_cid,
            uds: args.vsock_uds,
        });
    }
    let signals = block_termination_signals();
    let api = bind_api(args.api_sock.as_deref())?;
    let started = std::time::Instant::now();
    let vm =
        Vm::restore(options).with_context(|| format!("cannot restore from {}", dir.display()))?;
    // `dormouse bench snapshot` times restores up to this line (RESTORED_MARKER).
    tracing::info!(
        "{RESTORED_MARKER} in {:.3} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    let status = serve(vm, signals, api, interactive);
    if let Some(from) = from_store {
        from.finish();
    }
    status
}
