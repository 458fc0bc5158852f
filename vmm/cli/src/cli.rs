//! Command-line interface. One vocabulary: `run`, `ctl`, `restore`, `exec`, `bench`.

mod cp;
mod ctl;
mod exec;
pub mod firecracker;
mod jail;
pub mod jailer;
mod resident;
mod restore;
mod restore_from;
mod run;
mod snapshot_cmd;
mod store_progress;
mod template;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "dormouse",
    version,
    about = "A microVM monitor for code sandboxes"
)]
pub struct Cli {
    /// Log filter (error, warn, info, debug, trace, or a tracing directive). Logs go to stderr.
    /// The DORMOUSE_LOG environment variable overrides it.
    #[arg(long, global = true)]
    pub log_level: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Boot a VM from a kernel (and initrd or rootfs) and attach its console.
    Run(run::RunArgs),
    /// Control a running VM through its API socket (`run --api-sock`).
    Ctl(ctl::CtlArgs),
    /// Run a command in a running VM through its guest agent (output streamed, its exit status
    /// is ours).
    Exec(exec::ExecArgs),
    /// Copy files between the host and a running VM (`vm:/path` names the guest side).
    Cp(cp::CpArgs),
    /// Restore a VM from a snapshot directory and attach its console.
    Restore(restore::RestoreArgs),
    /// Run `run …` or `restore …` jailed: chroot, namespaces, cgroups, rlimits, an
    /// unprivileged uid (docs/security.md). Needs root.
    Jail(jail::JailArgs),
    /// Work on snapshots offline: merge a diff chain; push to, pull from and collect garbage
    /// in a snapshot store (a directory or S3).
    Snapshot(snapshot_cmd::SnapshotArgs),
    /// Make templates: boot an image once and checkpoint it for sandboxes to start from.
    Template(template::TemplateArgs),
    /// Measure dormouse and print a table.
    Bench(vmm_bench::BenchArgs),
    /// Answer as Firecracker: its flags, its API on --api-sock (docs/firecracker.md). Also what
    /// this binary does when started through a link named `firecracker`.
    Firecracker(firecracker::FirecrackerArgs),
    /// Answer as Firecracker's jailer: its flags mapped onto `dormouse jail`, the VMM being
    /// `dormouse firecracker` (docs/firecracker.md). Also what this binary does when started
    /// through a link named `jailer`. Needs root.
    Jailer(jailer::JailerArgs),
}

pub fn init_logging(level: Option<&str>) {
    let filter = std::env::var("DORMOUSE_LOG")
        .ok()
        .or_else(|| level.map(str::to_string))
        .unwrap_or_else(|| "info".to_string());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

/// Returns the process exit status.
pub fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Restore(args) => restore::restore(args),
        Command::Jail(args) => jail::jail(args),
        Command::Snapshot(args) => snapshot_cmd::snapshot(args),
        Command::Ctl(args) => ctl::ctl(args),
        Command::Exec(args) => exec::exec(args),
        Command::Cp(args) => cp::cp(args),
        Command::Template(args) => template::template(args),
        Command::Bench(args) => vmm_bench::bench(args),
        Command::Firecracker(args) => firecracker::firecracker(args),
        Command::Jailer(args) => jailer::jailer(args),
    }
}
