//! `dormouse template create`: boot a root filesystem image once with the sandbox library,
//! wait for its agent, warm it with one command, and checkpoint it into a directory that
//! `SandboxConfig::template` (and `dormouse restore --dir`) start sandboxes from in
//! milliseconds. `deploy/build-template.sh base` drives it for the Debian `base` template.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

use vmm_sandbox::{
    BootSpec, DiskSpec, ExecCommand, GuestIp, Isolation, ManagerConfig, NetworkConfig,
    SandboxConfig, SandboxManager, SandboxSource, SnapshotOptions,
};

#[derive(Args)]
pub struct TemplateArgs {
    #[command(subcommand)]
    pub command: TemplateCommand,
}

#[derive(Subcommand)]
pub enum TemplateCommand {
    /// Boot --rootfs (an image whose init is dormouse-agent, from deploy/build-rootfs.sh),
    /// wait for the agent, run --warm, and checkpoint into --out (snapshot, a copy of the
    /// disk, sandbox.json). Prints a JSON line with the template's figures.
    Create(CreateArgs),
}

#[derive(Args)]
pub struct CreateArgs {
    /// Guest kernel (vmlinux or bzImage).
    #[arg(long)]
    pub kernel: PathBuf,
    /// Root filesystem image; the template gets its own copy, the image is never written.
    #[arg(long)]
    pub rootfs: PathBuf,
    /// Where the template goes: missing or empty, or a template with --replace.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace a template already at --out.
    #[arg(long)]
    pub replace: bool,
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    pub mem: u64,
    /// Host TAP for eth0 (sandboxes from the template get their own TAP).
    #[arg(long)]
    pub tap: Option<String>,
    /// eth0's address, ADDR/PREFIX[,GATEWAY] (with --tap).
    #[arg(long, requires = "tap")]
    pub guest_ip: Option<String>,
    /// Name servers for the guest's /etc/resolv.conf, comma-separated (with --guest-ip).
    #[arg(long, requires = "guest_ip", value_delimiter = ',')]
    pub dns: Vec<String>,
    /// A shell command run once before the checkpoint, so what it touches (the shell, the C
    /// library) is already in the template's page cache; "" runs nothing.
    #[arg(long, default_value = "true")]
    pub warm: String,
    /// Seconds to wait for the agent after the boot (a boot under an emulating host takes up
    /// to a minute).
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
}

pub fn template(args: TemplateArgs) -> anyhow::Result<i32> {
    match args.command {
        TemplateCommand::Create(args) => create(args),
    }
}

fn create(args: CreateArgs) -> anyhow::Result<i32> {
    for (what, path) in [("--kernel", &args.kernel), ("--rootfs", &args.rootfs)] {
        if !path.is_file() {
            bail!("{what} {}: no such file", path.display());
        }
    }
    let network = network(&args)?;
    let work = tempfile_dir(&args.out)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    let result = runtime.block_on(boot_and_checkpoint(&args, network, &work));
    drop(runtime);
    let _ = std::fs::remove_dir_all(&work);
    let summary = result?;
    println!("{summary}");
    Ok(0)
}

fn network(args: &CreateArgs) -> anyhow::Result<Vec<NetworkConfig>> {
    let Some(tap) = &args.tap else {
        return Ok(Vec::new());
    };
    let guest_ip = match &args.guest_ip {
        Some(spec) => {
            let (address, gateway) = match spec.split_once(',') {
                Some((address, gateway)) => (address, Some(gateway.to_owned())),
                None => (spec.as_str(), None),
            };
            if !address.contains('/') {
                bail!("--guest-ip {spec}: expected ADDR/PREFIX[,GATEWAY]");
            }
            Some(GuestIp {
                address: address.to_owned(),
                gateway,
                nameservers: args.dns.clone(),
            })
        }
        None => None,
    };
    Ok(vec![NetworkConfig {
        tap: tap.clone(),
        mac: None,
        guest_ip,
    }])
}

/// The sandbox's work directory (its disk copy while it runs), beside --out so the checkpoint's
/// disk copy can be a reflink on the same file system.
fn tempfile_dir(out: &std::path::Path) -> anyhow::Result<PathBuf> {
    let parent = match out.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let work = parent.join(format!(".dormouse-template-work-{}", std::process::id()));
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    Ok(work)
}

/// The console's last few KiB, for a boot that never reached the agent.
fn console_tail(path: &std::path::Path) -> String {
    const TAIL_BYTES: usize = 4096;
    let bytes = std::fs::read(path).unwrap_or_default();
    let start = bytes.len().saturating_sub(TAIL_BYTES);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

async fn boot_and_checkpoint(
    args: &CreateArgs,
    network: Vec<NetworkConfig>,
    work: &std::path::Path,
) -> anyhow::Result<serde_json::Value> {
    let manager = SandboxManager::new(
        ManagerConfig::new(work.join("sandboxes")).with_isolation(Isolation::InProcess),
    )
    .context("starting the sandbox manager")?;
    let mut spec = BootSpec::new(&args.kernel);
    spec.rootfs = Some(DiskSpec::copy_of(&args.rootfs));
    spec.vcpus = args.vcpus;
    spec.mem_mib = args.mem;
    let mut config = SandboxConfig::from_source(SandboxSource::Boot(spec));
    config.network = network;
    config.agent_timeout = Duration::from_secs(args.timeout);
    let console = work.join("console.log");
    config.console_log = Some(console.clone());

    let started = Instant::now();
    let id = match manager.create(config).await {
        Ok(id) => id,
        Err(err) => {
            let tail = console_tail(&console);
            bail!(
                "booting {}: {err}\nconsole (last lines):\n{tail}",
                args.rootfs.display()
            );
        }
    };
    let boot = started.elapsed();
    let outcome = async {
        let warm_started = Instant::now();
        if !args.warm.is_empty() {
            let out = manager
                .exec(&id, &ExecCommand::shell(args.warm.clone()))
                .await
                .context("running --warm")?;
            if !out.success() {
                bail!(
                    "--warm `{}` failed: {:?}\n{}",
                    args.warm,
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        let warm = warm_started.elapsed();
        let checkpoint_started = Instant::now();
        manager
            .checkpoint_with(
                &id,
                &args.out,
                SnapshotOptions {
                    replace: args.replace,
                },
            )
            .await
            .with_context(|| format!("checkpointing into {}", args.out.display()))?;
        Ok::<_, anyhow::Error>((warm, checkpoint_started.elapsed()))
    }
    .await;
    let _ = manager.kill(&id).await;
    let (warm, checkpoint) = outcome?;
    Ok(serde_json::json!({
        "template": args.out.canonicalize().unwrap_or_else(|_| args.out.clone()),
        "sandbox_id": id.to_string(),
        "boot_to_agent_ready_ms": ms(boot),
        "warm_ms": ms(warm),
        "checkpoint_ms": ms(checkpoint),
    }))
}
