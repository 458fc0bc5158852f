//! `dormouse-agent`: the guest agent binary.
//!
//! Usage: dormouse-agent [--listen vsock:PORT|unix:PATH|tcp:ADDR]
//!                       [--ready-port N] [--ready-cid N] [--no-ready]
//!                       [--hostname NAME] [--log FILTER] [--rc PATH] [--version]
//!
//! As PID 1 it first mounts the pseudo file systems and reads `dormouse.*`
//! options from /proc/cmdline (flags override them), then sets the hostname,
//! brings up lo and configures eth0 and the resolver; it never exits, it
//! powers the machine off instead.

// Guest memory, snapshot files and API requests are hostile input: outside tests, nothing may
// unwrap or expect (a panic would end the VM). Tests may.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::process::ExitCode;

use agent::init::{self, AgentOptions, DEFAULT_RC};
use agent::listen::{serve, Listener};
use agent::network;
use agent::proto::ShutdownAction;
use agent::ready::{notify_ready, ReadyTarget};
use agent::server::{
    power_off_now, run_boot_script, AgentConfig, AgentService, DEFAULT_PATH, VERSION,
};
use anyhow::{bail, Context};
use tokio::signal::unix::{signal, SignalKind};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

const USAGE: &str = "usage: dormouse-agent [--listen vsock:PORT|unix:PATH|tcp:ADDR] \
[--ready-port N] [--ready-cid N] [--no-ready] [--hostname NAME] [--log FILTER] [--rc PATH] [--version]";

enum Parsed {
    Run,
    Exit(ExitCode),
}

fn parse_args(options: &mut AgentOptions, is_init: bool) -> anyhow::Result<Parsed> {
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--listen" => options.listen = value("--listen")?.parse()?,
            "--ready-port" => {
                let port = value("--ready-port")?.parse().context("--ready-port")?;
                options.ready.get_or_insert_with(ReadyTarget::default).port = port;
            }
            "--ready-cid" => {
                let cid = value("--ready-cid")?.parse().context("--ready-cid")?;
                options.ready.get_or_insert_with(ReadyTarget::default).cid = cid;
            }
            "--no-ready" => options.ready = None,
            "--hostname" => options.hostname = value("--hostname")?,
            "--log" => options.log = value("--log")?,
            "--rc" => options.rc = Some(value("--rc")?.into()),
            "--version" => {
                println!("dormouse-agent {VERSION}");
                return Ok(Parsed::Exit(ExitCode::SUCCESS));
            }
            "--help" | "-h" => {
                println!("{USAGE}");
                return Ok(Parsed::Exit(ExitCode::SUCCESS));
            }
            // The kernel hands init the command-line words it does not know.
            _ if is_init => {}
            other => bail!("unknown argument `{other}`\n{USAGE}"),
        }
    }
    Ok(Parsed::Run)
}

fn init_logging(filter: &str) {
    // `Targets` (e.g. `info` or `agent=debug,h2=warn`) instead of EnvFilter:
    // no regex engine in the static binary.
    let filter: Targets = filter
        .parse()
        .unwrap_or_else(|_| Targets::new().with_default(tracing::Level::INFO));
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(std::io::stderr),
        )
        .with(filter)
        .init();
}

/// PID 1 set-up before anything else runs; returns warnings to log once
/// logging is up.
fn init_system(options: &mut AgentOptions) -> Vec<String> {
    let mut warnings = init::mount_pseudo_filesystems();
    init::ensure_stdio();
    options.rc = Some(DEFAULT_RC.into());
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    warnings.extend(
        options
            .apply_kernel_cmdline(&cmdline)
            .into_iter()
            .map(|word| format!("ignoring kernel command-line option `{word}`")),
    );
    if std::env::var_os("PATH").is_none() {
        // Still single-threaded: no other thread reads the environment.
        std::env::set_var("PATH", DEFAULT_PATH);
    }
    warnings
}

async fn run(options: AgentOptions) -> anyhow::Result<()> {
    let config = AgentConfig::detect();
    let is_init = config.is_init;
    let service = AgentService::new(config);
    let listener = Listener::bind(&options.listen).await?;
    tracing::info!(listen = %options.listen, version = VERSION, is_init, "agent listening");

    if let Some(target) = options.ready {
        tokio::spawn(notify_ready(target, VERSION));
    }
    if let Some(rc) = options.rc {
        tokio::spawn(run_boot_script(rc));
    }
    forward_signals(&service, is_init)?;
    serve(listener, service).await?;
    Ok(())
}

/// SIGTERM/SIGINT go to every process group the agent started; a non-init agent then stops as
/// well. As PID 1, the busybox power signals (`reboot`, `halt`, `poweroff` from a shell) also
/// end the machine, after the children had a moment to exit.
fn forward_signals(service: &AgentService, is_init: bool) -> anyhow::Result<()> {
    let mut kinds = vec![SignalKind::terminate(), SignalKind::interrupt()];
    if is_init {
        kinds.extend([SignalKind::user_defined1(), SignalKind::user_defined2()]);
    }
    for kind in kinds {
        let mut stream = signal(kind).context("cannot install signal handler")?;
        let service = service.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                let number = kind.as_raw_value();
                let power = if is_init {
                    init::power_action_for_signal(number)
                } else {
                    None
                };
                // A machine going down tells its processes so with SIGTERM.
                let forwarded = if power.is_some() {
                    libc::SIGTERM
                } else {
                    number
                };
                tracing::info!(signal = number, forwarded, "forwarding signal to children");
                service.processes().signal_all(forwarded);
                if !is_init {
                    service.request_stop();
                } else if let Some(action) = power {
                    tracing::info!(?action, "init: shutting the machine down");
                    tokio::time::sleep(INIT_SHUTDOWN_GRACE).await;
                    power_off_now(action);
                }
            }
        });
    }
    Ok(())
}

/// eth0 and /etc/resolv.conf from `dormouse.ip=` and `dormouse.dns=`; failures are logged (a
/// sandbox without a network still runs commands).
fn configure_network(options: &AgentOptions) {
    if let Some(setup) = &options.ip {
        match network::configure(network::INTERFACE, setup) {
            Ok(()) => tracing::info!(
                interface = network::INTERFACE,
                address = %setup.address,
                prefix = setup.prefix,
                gateway = ?setup.gateway,
                "network configured"
            ),
            Err(err) => tracing::warn!(interface = network::INTERFACE, %err, "cannot configure"),
        }
    }
    if !options.dns.is_empty() {
        let path = std::path::Path::new(network::RESOLV_CONF);
        if let Err(err) = network::write_resolv_conf(path, &options.dns) {
            tracing::warn!(%err, "cannot write {}", network::RESOLV_CONF);
        }
    }
}

/// How long an idle blocking-pool thread waits for work before it exits (tokio's default: 10 s).
const BLOCKING_THREAD_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(600);

/// How long PID 1 lets its children react to the forwarded signal before rebooting.
const INIT_SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// Allocations up to this size come from the heap, not from a fresh mmap each: a 512 KiB file
/// chunk or its gRPC frame would otherwise be mapped, faulted in page by page (each fault runs
/// the emulator on an emulating host) and unmapped again for every chunk.
const MALLOC_MMAP_THRESHOLD: libc::c_int = 4 << 20;
/// Free memory the heap keeps instead of returning it to the kernel (which the next call would
/// fault in again): the agent's idle footprint grows by at most this.
const MALLOC_TRIM_THRESHOLD: libc::c_int = 8 << 20;

/// Keeps the agent's buffers between calls (glibc's defaults return them to the kernel). One
/// arena: a file chunk is allocated on a blocking thread and freed on the runtime's, and with an
/// arena per thread ReadFile still faulted in a chunk's worth of pages on every call.
fn tune_malloc() {
    #[cfg(target_env = "gnu")]
    for (param, value) in [
        (libc::M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD),
        (libc::M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD),
        (libc::M_ARENA_MAX, 1),
    ] {
        // SAFETY: mallopt only sets allocator parameters; glibc serialises it with allocations.
        if unsafe { libc::mallopt(param, value) } != 1 {
            tracing::warn!(param, value, "mallopt failed");
        }
    }
}

fn main() -> ExitCode {
    let is_init = std::process::id() == 1;
    let mut options = AgentOptions::default();
    let mut warnings = if is_init {
        init_system(&mut options)
    } else {
        Vec::new()
    };
    // Before any thread exists: returns only if no re-exec happened.
    warnings.extend(agent::cpu_quirk::reexec_without_avx_if_needed());
    let parsed = parse_args(&mut options, is_init);
    init_logging(&options.log);
    for warning in warnings {
        tracing::warn!("{warning}");
    }

    let outcome = match parsed {
        Ok(Parsed::Exit(code)) if !is_init => return code,
        Ok(_) => {
            if is_init {
                if let Err(err) = init::set_hostname(&options.hostname) {
                    tracing::warn!(%err, "cannot set hostname");
                }
                if let Err(err) = init::bring_up_loopback() {
                    tracing::warn!(%err, "cannot bring up lo");
                }
                configure_network(&options);
            }
            tune_malloc();
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                // Spawns and file calls run on the blocking pool: keep its threads between
                // calls a sandbox makes minutes apart, instead of creating one per call (a
                // thread's start is a dozen system calls and page faults in the guest).
                .thread_keep_alive(BLOCKING_THREAD_KEEP_ALIVE)
                .build()
                .context("cannot build the runtime")
                .and_then(|runtime| runtime.block_on(run(options)))
        }
        Err(err) => Err(err),
    };

    if let Err(err) = &outcome {
        tracing::error!("{err:#}");
    }
    if is_init {
        // Exiting as PID 1 panics the kernel: power off instead.
        loop {
            power_off_now(ShutdownAction::PowerOff);
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}
