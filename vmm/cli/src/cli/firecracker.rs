//! `dormouse firecracker` (or this binary started through a link named `firecracker`):
//! Firecracker's command line and API (docs/firecracker.md). The VM is configured over the API
//! socket or by `--config-file`, then built on this (the main) thread when `InstanceStart` or
//! `PUT /snapshot/load` arrives: API threads run under the `api` seccomp filter, which cannot
//! build a VM.

mod launcher;
mod logging;
mod metrics;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Args, Parser};

use vmm::seccomp::ThreadKind;
use vmm::{SeccompLevel, Vm, VmExit};
use vmm_api::ApiSocket;
use vmm_fc_api::types::FullVmConfiguration;
use vmm_fc_api::{FcSettings, FcVmm, FIRECRACKER_VERSION};

use launcher::ChannelLauncher;

/// Firecracker's flags, same names and meanings.
#[derive(Args)]
#[command(disable_version_flag = true)]
pub struct FirecrackerArgs {
    /// Path of the API socket.
    #[arg(long, default_value = "/run/firecracker.socket")]
    pub api_sock: PathBuf,
    /// A JSON document of the VM's resources (Firecracker's `GET /vm/config` format): the VM
    /// starts at once.
    #[arg(long)]
    pub config_file: Option<PathBuf>,
    /// Serve no API (needs --config-file).
    #[arg(long, requires = "config_file")]
    pub no_api: bool,
    /// The instance id `GET /` reports.
    #[arg(long, default_value = "anonymous-instance")]
    pub id: String,
    /// Firecracker's boot timer device: not supported (refused with the reason).
    #[arg(long)]
    pub boot_timer: bool,
    /// Log level: Error, Warning, Info, Debug, Trace or Off (any case).
    #[arg(long)]
    pub level: Option<String>,
    /// Write the log to this file (or named pipe) instead of stderr.
    #[arg(long)]
    pub log_path: Option<PathBuf>,
    /// Prefix log lines with their level.
    #[arg(long)]
    pub show_level: bool,
    /// Prefix log lines with their source file and line.
    #[arg(long)]
    pub show_log_origin: bool,
    /// Append Firecracker-style metrics (one JSON line a minute and on `FlushMetrics`) to
    /// this file or named pipe.
    #[arg(long)]
    pub metrics_path: Option<PathBuf>,
    /// A custom seccomp filter: refused; dormouse installs its own per-thread filters.
    #[arg(long, conflicts_with = "no_seccomp")]
    pub seccomp_filter: Option<PathBuf>,
    /// Install no seccomp filters.
    #[arg(long)]
    pub no_seccomp: bool,
    /// Largest API request body, in bytes.
    #[arg(long, default_value_t = 51_200)]
    pub http_api_max_payload_size: usize,
    /// The MMDS document's largest size, in bytes (default: the API's payload limit, as
    /// Firecracker).
    #[arg(long)]
    pub mmds_size_limit: Option<usize>,
    /// A JSON file whose contents the MMDS starts with (as a `PUT /mmds`).
    #[arg(long)]
    pub metadata: Option<PathBuf>,
    /// Print the Firecracker version this API follows and exit.
    #[arg(long)]
    pub version: bool,
}

/// The command line of the binary started as `firecracker`.
#[derive(Parser)]
#[command(name = "firecracker", about = "dormouse, answering as Firecracker")]
pub struct FirecrackerCli {
    #[command(flatten)]
    pub args: FirecrackerArgs,
}

/// Whether this process was started through a link named `firecracker`.
pub fn invoked_as_firecracker() -> bool {
    std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n == "firecracker"))
        .unwrap_or(false)
}

/// Flags Firecracker has that dormouse refuses, with the reason.
pub(super) fn refuse_unsupported(args: &FirecrackerArgs) -> anyhow::Result<()> {
    if args.boot_timer {
        bail!("--boot-timer is not supported by dormouse: it has no boot-timer device (the guest's write to port 0x3f0 that Firecracker times)");
    }
    if args.seccomp_filter.is_some() {
        bail!("--seccomp-filter is not supported by dormouse: it installs its own filter on every thread (docs/security.md); --no-seccomp turns them off");
    }
    if args.http_api_max_payload_size > vmm_api::http::MAX_BODY_BYTES {
        bail!(
            "--http-api-max-payload-size {} is above dormouse's API limit of {} bytes",
            args.http_api_max_payload_size,
            vmm_api::http::MAX_BODY_BYTES
        );
    }
    Ok(())
}

fn read_config_file(path: &std::path::Path) -> anyhow::Result<FullVmConfiguration> {
    let text =
        std::fs::read(path).with_context(|| format!("reading --config-file {}", path.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("--config-file {}", path.display()))
}

pub fn firecracker(args: FirecrackerArgs) -> anyhow::Result<i32> {
    if args.version {
        println!(
            "Firecracker v{FIRECRACKER_VERSION} (dormouse {})",
            env!("CARGO_PKG_VERSION")
        );
        return Ok(0);
    }
    refuse_unsupported(&args)?;
    let log = logging::init(&args)?;
    let settings = FcSettings {
        id: args.id.clone(),
        seccomp: if args.no_seccomp {
            SeccompLevel::Off
        } else {
            SeccompLevel::Enforce
        },
        max_payload: args.http_api_max_payload_size,
        mmds_size_limit: args
            .mmds_size_limit
            .unwrap_or(args.http_api_max_payload_size),
    };
    let level = settings.seccomp;
    let (launcher, jobs) = ChannelLauncher::new();
    let front = Arc::new(
        FcVmm::new(settings, Box::new(launcher.clone()))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .with_log_control(Box::new(log)),
    );
    if let Some(path) = &args.metrics_path {
        front
            .put_metrics(vmm_fc_api::types::Metrics {
                metrics_path: path.display().to_string(),
            })
            .map_err(|e| anyhow::anyhow!("--metrics-path: {e}"))?;
    }
    if let Some(path) = &args.metadata {
        let text = std::fs::read(path)
            .with_context(|| format!("reading --metadata {}", path.display()))?;
        let data = serde_json::from_slice(&text)
            .with_context(|| format!("--metadata {}", path.display()))?;
        front
            .put_mmds(data)
            .map_err(|e| anyhow::anyhow!("--metadata: {e}"))?;
    }
    metrics::spawn_flush_thread(Arc::clone(&front), level);
    let config = args
        .config_file
        .as_deref()
        .map(read_config_file)
        .transpose()?;
    if let Some(document) = config.clone() {
        front
            .apply(document)
            .map_err(|e| anyhow::anyhow!("--config-file: {e}"))?;
    }
    let signals = super::run::block_termination_signals();
    launcher::spawn_signal_thread(signals, Arc::clone(&front), launcher.clone(), level);
    let api = if args.no_api {
        None
    } else {
        let socket = ApiSocket::bind(&args.api_sock)
            .with_context(|| format!("API socket {}", args.api_sock.display()))?;
        Some(
            socket
                .serve(front.clone())
                .with_context(|| format!("API socket {}", args.api_sock.display()))?,
        )
    };
    if config.is_some() {
        launcher::start_in_background(Arc::clone(&front), launcher, level);
    }
    let vm = launcher::serve_jobs(&jobs)?;
    wait(vm, api, &front, level)
}

fn wait(
    vm: Vm,
    api: Option<vmm_api::ApiServer>,
    front: &FcVmm,
    level: SeccompLevel,
) -> anyhow::Result<i32> {
    // Everything this thread opens is open: from here on it waits, tears down and exits.
    vmm::seccomp::install(ThreadKind::Main, level).context("seccomp filter of the main thread")?;
    let (exit, stopped) = vm.wait_stopped();
    drop(api);
    // The last minute's counts, as Firecracker writes its metrics at exit.
    if let Err(e) = front.flush_metrics_if_configured() {
        tracing::warn!("metrics: {e}");
    }
    match &exit {
        VmExit::Failed(msg) => eprintln!("dormouse: VM failed: {msg}"),
        VmExit::GuestPanic => eprintln!("dormouse: the guest kernel panicked"),
        other => tracing::info!("VM ended: {other:?}"),
    }
    stopped.exit_process(exit.exit_code())
}
