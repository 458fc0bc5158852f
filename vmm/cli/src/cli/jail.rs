//! `dormouse jail … -- run|restore ARGS…`: one VMM in a jail (vmm-jail; docs/security.md).
//!
//! This process stays outside as the supervisor (root); the VMM runs in a forked child of the
//! same binary, inside the jail, as an unprivileged uid, with the usual `run`/`restore` code. The
//! input files named in ARGS (kernel, initrd, disks, snapshot directory, --mem-dir) are bind
//! mounted into the jail at `/inputs/<n>-<name>` and the arguments rewritten to those paths; every
//! path the VMM creates (API and vsock sockets, console file, snapshots requested over the API)
//! is a path inside the jail, found on the host under `<base>/<id>/root`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use std::os::fd::AsRawFd;

use devices::virtio::net::{NetConfig, Tap};
use devices::virtio::vsock::config::BackendChoice;
use vmm_jail::{
    parse_cgroup_setting, parse_rlimits, CgroupFs, CgroupSetting, CgroupVersion, DeviceNode,
    InputPlan, JailSpec, Rlimits, DEFAULT_CGROUP_PARENT, DEFAULT_CHROOT_BASE,
};

use super::restore::RestoreArgs;
use super::run::RunArgs;

#[derive(Args)]
pub struct JailArgs {
    /// The jail's id: 1 to 64 characters of A-Z, a-z, 0-9 and '-' (not first). It names
    /// `<chroot-base>/<id>` and the cgroup.
    #[arg(long)]
    pub id: String,
    /// The unprivileged uid the VMM runs as (not 0).
    #[arg(long)]
    pub uid: u32,
    /// The unprivileged gid the VMM runs as (not 0).
    #[arg(long)]
    pub gid: u32,
    /// Where jails are made: `<chroot-base>/<id>/root` is the VMM's `/`.
    #[arg(long, default_value = DEFAULT_CHROOT_BASE)]
    pub chroot_base: PathBuf,
    /// A network namespace to run the VMM in (e.g. /var/run/netns/NAME); TAPs are opened there.
    #[arg(long)]
    pub netns: Option<PathBuf>,
    /// The cgroup hierarchy: 1 (one per controller) or 2 (unified). Default: 2 when
    /// /sys/fs/cgroup is a cgroup2 mount, 1 otherwise.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub cgroup_version: Option<u8>,
    /// A cgroup setting `controller.name=value` written in the jail's cgroup (repeatable), e.g.
    /// `memory.limit_in_bytes=…` (v1) or `memory.max=…` (v2), `cpu.cfs_quota_us=…`, `pids.max=…`.
    #[arg(long, value_parser = parse_cgroup)]
    pub cgroup: Vec<CgroupSetting>,
    /// The cgroup the jail's cgroup `<id>` is created under.
    #[arg(long, default_value = DEFAULT_CGROUP_PARENT)]
    pub cgroup_parent: String,
    /// Resource limits of the VMM process: `nofile=N,fsize=BYTES` (repeatable).
    #[arg(long)]
    pub rlimit: Vec<String>,
    /// Run the VMM as PID 1 of a new PID namespace.
    #[arg(long)]
    pub new_pid_ns: bool,
    /// Detach (new session, stdio on /dev/null) and keep supervising in the background.
    #[arg(long)]
    pub daemonize: bool,
    /// `run ARGS…` or `restore ARGS…`, as for `dormouse run` / `dormouse restore`.
    #[arg(last = true, required = true, value_name = "run|restore ARGS")]
    pub command: Vec<String>,
}

fn parse_cgroup(s: &str) -> Result<CgroupSetting, String> {
    parse_cgroup_setting(s).map_err(|e| e.to_string())
}

/// The command after `--`.
#[derive(Parser)]
#[command(name = "dormouse jail … --", no_binary_name = true)]
struct Jailed {
    #[command(subcommand)]
    command: JailedCommand,
}

#[derive(Subcommand)]
enum JailedCommand {
    Run(RunArgs),
    Restore(RestoreArgs),
}

pub fn jail(args: JailArgs) -> anyhow::Result<i32> {
    // Nothing the caller left open reaches the jail (the child closes all but the TAPs again).
    vmm_jail::sys::close_fds_except(&[]).context("closing inherited descriptors")?;
    let jailed = match Jailed::try_parse_from(&args.command) {
        Ok(j) => j,
        Err(e) if matches!(e.kind(), clap::error::ErrorKind::DisplayHelp) => {
            print!("{}", e.render());
            return Ok(0);
        }
        Err(e) => anyhow::bail!("the jailed command: {}", e.render()),
    };
    let mut spec = JailSpec::new(&args.id, args.uid, args.gid);
    spec.chroot_base = args.chroot_base;
    spec.netns = args.netns;
    spec.cgroup_version = match args.cgroup_version {
        Some(1) => CgroupVersion::V1,
        Some(_) => CgroupVersion::V2,
        None if std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists() => {
            CgroupVersion::V2
        }
        None => CgroupVersion::V1,
    };
    spec.cgroups = args.cgroup;
    spec.cgroup_parent = args.cgroup_parent;
    let mut rlimits = Rlimits::default();
    for r in &args.rlimit {
        parse_rlimits(r, &mut rlimits)?;
    }
    spec.rlimits = rlimits;
    spec.new_pid_ns = args.new_pid_ns;
    spec.daemonize = args.daemonize;
    spec.validate()?;

    let mut plan = InputPlan::new();
    let mut command = jailed.command;
    let devices = match &mut command {
        JailedCommand::Run(run) => {
            rewrite_run(run, &mut plan)?;
            let vhost = run.vsock.as_ref().is_some_and(|v| match v.backend {
                BackendChoice::Vhost => true,
                BackendChoice::Auto => v.uds_path.is_none(),
                BackendChoice::Userspace => false,
            });
            devices_for(vhost)
        }
        JailedCommand::Restore(restore) => {
            rewrite_restore(restore, &mut plan)?;
            // The snapshot says which vsock datapath the device had.
            devices_for(true)
        }
    };
    let taps = tap_names(match &command {
        JailedCommand::Run(run) => &run.net,
        JailedCommand::Restore(restore) => &restore.net,
    })?;
    log_outputs(&spec, &command);
    let cgroupfs = if spec.cgroups.is_empty() {
        None
    } else {
        Some(CgroupFs::host(spec.cgroup_version)?)
    };
    let prepared = vmm_jail::prepare(spec, plan, &devices, cgroupfs.as_ref())?;
    let code = prepared.run(
        // In the child, as root, in the jail's network namespace: the TAPs the VMM may not open.
        move || {
            let mut open = Vec::new();
            for name in &taps {
                let tap = Tap::open(name).map_err(|e| format!("TAP {name}: {e}"))?;
                open.push(tap);
            }
            let keep = open.iter().map(|t| t.as_raw_fd()).collect();
            Ok((open, keep))
        },
        move |taps: Vec<Tap>| {
            let mut command = command;
            let nets = match &mut command {
                JailedCommand::Run(run) => &mut run.net,
                JailedCommand::Restore(restore) => &mut restore.net,
            };
            for (net, tap) in nets.iter_mut().zip(&taps) {
                net.fd = Some(tap.as_raw_fd());
            }
            let result = match command {
                JailedCommand::Run(args) => super::run::run(args),
                JailedCommand::Restore(args) => super::restore::restore(args),
            };
            match result {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("dormouse: error: {e:#}");
                    1
                }
            }
        },
    )?;
    Ok(code)
}

/// The TAPs to open for the VMM. `fd=` cannot be jailed: the supervisor closes what it inherits.
fn tap_names(nets: &[NetConfig]) -> anyhow::Result<Vec<String>> {
    nets.iter()
        .map(|n| {
            if n.fd.is_some() || n.tap.is_empty() {
                anyhow::bail!(
                    "--net fd=N cannot be jailed: name the TAP (tap=NAME) and the jail opens it"
                );
            }
            Ok(n.tap.clone())
        })
        .collect()
}

/// /dev/kvm, and /dev/vhost-vsock when the vsock device may use it. No /dev/net/tun: the jail
/// opens the TAPs itself and hands them over (`--net fd=N`).
fn devices_for(vhost_vsock: bool) -> Vec<DeviceNode> {
    let mut devices = vec![DeviceNode::KVM];
    if vhost_vsock && DeviceNode::VHOST_VSOCK.exists() {
        devices.push(DeviceNode::VHOST_VSOCK);
    }
    devices
}

/// Brings `run`'s input files in (kernel, initrd: read-only; rootfs, disks without `ro`,
/// --mem-dir: writable) and points the arguments at their paths inside the jail.
fn rewrite_run(run: &mut RunArgs, plan: &mut InputPlan) -> anyhow::Result<()> {
    run.kernel = plan.add(&run.kernel, true)?;
    if let Some(initrd) = &run.initrd {
        run.initrd = Some(plan.add(initrd, true)?);
    }
    if let Some(rootfs) = &run.rootfs {
        run.rootfs = Some(plan.add(rootfs, false)?);
    }
    for disk in &mut run.disk {
        disk.path = plan.add(&disk.path, disk.read_only)?;
    }
    if let Some(dir) = &run.mem_dir {
        run.mem_dir = Some(plan.add(dir, false)?);
    }
    Ok(())
}

/// As [`rewrite_run`] for `restore`: the snapshot directory read-only, replacement disks.
/// A snapshot's own disk paths are host paths the jail does not show: a restore in a jail names
/// its disks (--rootfs, --disk).
fn rewrite_restore(restore: &mut RestoreArgs, plan: &mut InputPlan) -> anyhow::Result<()> {
    // The jail shows only its inputs and has no credentials: pull first, then restore the
    // directory.
    let Some(dir) = &restore.dir else {
        anyhow::bail!(
            "a jailed restore needs --dir: pull the snapshot first (dormouse snapshot pull URL DIR)"
        );
    };
    restore.dir = Some(plan.add(dir, true)?);
    if let Some(rootfs) = &restore.rootfs {
        restore.rootfs = Some(plan.add(rootfs, false)?);
    }
    for disk in &mut restore.disk {
        disk.path = plan.add(&disk.path, disk.read_only)?;
    }
    Ok(())
}

/// Logs where the files the VMM will create appear on the host.
fn log_outputs(spec: &JailSpec, command: &JailedCommand) {
    let root = spec.root_dir();
    let mut outputs: Vec<(&str, PathBuf)> = Vec::new();
    let console = match command {
        JailedCommand::Run(run) => {
            if let Some(p) = &run.api_sock {
                outputs.push(("API socket", p.clone()));
            }
            if let Some(p) = run.vsock.as_ref().and_then(|v| v.uds_path.clone()) {
                outputs.push(("vsock socket", p));
            }
            &run.console
        }
        JailedCommand::Restore(restore) => {
            if let Some(p) = &restore.api_sock {
                outputs.push(("API socket", p.clone()));
            }
            if let Some(p) = &restore.vsock_uds {
                outputs.push(("vsock socket", p.clone()));
            }
            &restore.console
        }
    };
    if console != "stdio" && console != "null" {
        outputs.push(("console file", PathBuf::from(console)));
    }
    for (what, path) in outputs {
        tracing::info!(
            "jail {}: {what} {} is {} on the host",
            spec.id,
            path.display(),
            vmm_jail::spec::host_path_of(&root, &path).display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse(args: &[&str]) -> JailedCommand {
        Jailed::try_parse_from(args)
            .map(|j| j.command)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn run_inputs_are_brought_in_and_outputs_stay_in_jail_paths() {
        let dir = tempfile::tempdir().unwrap();
        let p = |name: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, name).unwrap();
            path.to_str().unwrap().to_string()
        };
        let (kernel, initrd, rootfs, ro, rw) = (
            p("vmlinux"),
            p("initrd"),
            p("root.ext4"),
            p("ro.img"),
            p("rw.img"),
        );
        let mem = dir.path().join("mem");
        std::fs::create_dir(&mem).unwrap();
        let disk_ro = format!("path={ro},ro");
        let disk_rw = format!("path={rw},id=data");
        let JailedCommand::Run(mut run) = parse(&[
            "run",
            "--kernel",
            &kernel,
            "--initrd",
            &initrd,
            "--rootfs",
            &rootfs,
            "--disk",
            &disk_ro,
            "--disk",
            &disk_rw,
            "--mem-dir",
            mem.to_str().unwrap(),
            "--api-sock",
            "/api.sock",
            "--vsock",
            "cid=3,uds=/v.sock",
            "--console",
            "/console.log",
        ]) else {
            panic!("not run")
        };
        let mut plan = InputPlan::new();
        rewrite_run(&mut run, &mut plan).unwrap();
        assert_eq!(run.kernel, Path::new("/inputs/0-vmlinux"));
        assert_eq!(run.initrd.as_deref(), Some(Path::new("/inputs/1-initrd")));
        assert_eq!(
            run.rootfs.as_deref(),
            Some(Path::new("/inputs/2-root.ext4"))
        );
        assert_eq!(run.disk[0].path, Path::new("/inputs/3-ro.img"));
        assert_eq!(run.disk[1].path, Path::new("/inputs/4-rw.img"));
        assert_eq!(run.disk[1].id.as_deref(), Some("data"));
        assert_eq!(run.mem_dir.as_deref(), Some(Path::new("/inputs/5-mem")));
        assert_eq!(run.api_sock.as_deref(), Some(Path::new("/api.sock")));
        let access: Vec<bool> = plan.inputs().iter().map(|i| i.read_only).collect();
        assert_eq!(access, [true, true, false, true, false, false]);
        assert_eq!(
            plan.inputs()[0].host,
            dir.path().canonicalize().unwrap().join("vmlinux")
        );
        assert!(plan.inputs()[5].is_dir);
    }

    #[test]
    fn restore_brings_the_snapshot_in_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let snap = dir.path().join("snap");
        std::fs::create_dir(&snap).unwrap();
        let disk = dir.path().join("d.img");
        std::fs::write(&disk, "d").unwrap();
        let JailedCommand::Restore(mut restore) = parse(&[
            "restore",
            "--dir",
            snap.to_str().unwrap(),
            "--rootfs",
            disk.to_str().unwrap(),
            "--vsock-uds",
            "/v2.sock",
            "--seccomp",
            "off",
        ]) else {
            panic!("not restore")
        };
        let mut plan = InputPlan::new();
        rewrite_restore(&mut restore, &mut plan).unwrap();
        assert_eq!(restore.dir.as_deref(), Some(Path::new("/inputs/0-snap")));
        assert_eq!(
            restore.rootfs.as_deref(),
            Some(Path::new("/inputs/1-d.img"))
        );
        assert_eq!(restore.vsock_uds.as_deref(), Some(Path::new("/v2.sock")));
        assert!(plan.inputs()[0].read_only && plan.inputs()[0].is_dir);
        assert!(!plan.inputs()[1].read_only);
        // A missing input fails before anything is made.
        let JailedCommand::Restore(mut restore) = parse(&["restore", "--dir", "/nonexistent/snap"])
        else {
            panic!()
        };
        assert!(rewrite_restore(&mut restore, &mut InputPlan::new()).is_err());
    }

    #[test]
    fn only_run_and_restore_can_be_jailed() {
        assert!(Jailed::try_parse_from(["exec", "--sock", "x", "--", "ls"]).is_err());
        assert!(
            Jailed::try_parse_from(["run"]).is_err(),
            "--kernel is required"
        );
    }
}
