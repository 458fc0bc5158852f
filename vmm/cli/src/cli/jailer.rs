//! `dormouse jailer` (or this binary started through a link named `jailer`): Firecracker's
//! jailer command line mapped onto dormouse's jail (docs/firecracker.md, "The jailer"). The
//! jailed VMM is `dormouse firecracker` with the arguments after `--`; it runs in a forked
//! child of this process (no exec), so `--exec-file` must name this very binary.

mod plan;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser};

use vmm_fc_api::FIRECRACKER_VERSION;
use vmm_jail::{CgroupFs, DeviceNode, InputPlan};

/// Firecracker's jailer flags, same names, defaults and meanings.
#[derive(Args, Debug)]
#[command(disable_version_flag = true)]
pub struct JailerArgs {
    /// Jail ID: 1 to 64 characters of A-Z, a-z, 0-9 and '-'.
    #[arg(long, required_unless_present = "version")]
    pub id: Option<String>,
    /// The VMM: this dormouse binary, or a link to it (typically one named `firecracker`).
    #[arg(long, required_unless_present = "version")]
    pub exec_file: Option<PathBuf>,
    /// The user the VMM runs as (not 0).
    #[arg(long, required_unless_present = "version")]
    pub uid: Option<u32>,
    /// The group the VMM runs as (not 0).
    #[arg(long, required_unless_present = "version")]
    pub gid: Option<u32>,
    /// The jail is `<chroot-base-dir>/<exec-file name>/<id>/root`.
    #[arg(long, default_value = "/srv/jailer")]
    pub chroot_base_dir: PathBuf,
    /// A network namespace (e.g. /var/run/netns/NAME) the VMM joins.
    #[arg(long)]
    pub netns: Option<PathBuf>,
    /// Detach: new session, standard I/O on /dev/null.
    #[arg(long)]
    pub daemonize: bool,
    /// Run the VMM as PID 1 of a new PID namespace.
    #[arg(long)]
    pub new_pid_ns: bool,
    /// `<cgroup file>=<value>`, e.g. `cpu.shares=10` (repeatable).
    #[arg(long)]
    pub cgroup: Vec<String>,
    /// The cgroup hierarchy: 1 or 2.
    #[arg(long, default_value = "1")]
    pub cgroup_version: String,
    /// The cgroup the jail's cgroup `<id>` is made in (default: the exec file's name).
    #[arg(long)]
    pub parent_cgroup: Option<String>,
    /// `fsize=<bytes>` or `no-file=<n>` (repeatable; no-file defaults to 2048).
    #[arg(long)]
    pub resource_limit: Vec<String>,
    /// Print the version and exit.
    #[arg(long)]
    pub version: bool,
    /// Arguments of the jailed VMM (`firecracker` flags).
    #[arg(last = true, value_name = "FIRECRACKER ARGS")]
    pub firecracker_args: Vec<String>,
}

/// The command line of the binary started as `jailer`.
#[derive(Parser)]
#[command(
    name = "jailer",
    about = "dormouse's jail, answering as Firecracker's jailer"
)]
pub struct JailerCli {
    #[command(flatten)]
    pub args: JailerArgs,
}

/// Whether this process was started through a link named `jailer`.
pub fn invoked_as_jailer() -> bool {
    std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n == "jailer"))
        .unwrap_or(false)
}

pub fn jailer(args: JailerArgs) -> anyhow::Result<i32> {
    if args.version {
        println!(
            "Jailer v{FIRECRACKER_VERSION} (dormouse {})",
            env!("CARGO_PKG_VERSION")
        );
        return Ok(0);
    }
    // Nothing the caller left open reaches the jail, as Firecracker's jailer.
    vmm_jail::sys::close_fds_except(&[]).context("closing inherited descriptors")?;
    let this_exe = std::env::current_exe().context("finding this executable")?;
    let plan::Plan { spec, firecracker } = plan::plan(&args, &this_exe)?;
    let cgroupfs = if spec.cgroups.is_empty() {
        None
    } else {
        Some(CgroupFs::host(spec.cgroup_version)?)
    };
    let prepared = vmm_jail::prepare(spec, InputPlan::new(), &devices(), cgroupfs.as_ref())?;
    let code = prepared.run(
        || Ok(((), Vec::new())),
        move |()| match super::firecracker::firecracker(firecracker) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("dormouse: error: {e:#}");
                1
            }
        },
    )?;
    Ok(code)
}

/// /dev/kvm, and /dev/net/tun as Firecracker's jailer makes it: the Firecracker API opens
/// TAPs by name from inside the jail (a TAP made for the jail's uid).
fn devices() -> Vec<DeviceNode> {
    let mut devices = vec![DeviceNode::KVM];
    if DeviceNode::TUN.exists() {
        devices.push(DeviceNode::TUN);
    }
    devices
}
