//! Firecracker's jailer flags → a dormouse [`JailSpec`] and the jailed `firecracker` command
//! line. Everything dormouse cannot honour is an error here, before anything is made.

use std::path::Path;

use anyhow::{bail, Context};
use clap::Parser;

use vmm_jail::{parse_cgroup_setting, parse_rlimits, CgroupVersion, JailSpec, Rlimits};

use super::JailerArgs;
use crate::cli::firecracker::{refuse_unsupported, FirecrackerArgs, FirecrackerCli};

/// Firecracker's jailer bounds the VMM's descriptors to this when no `no-file` is given.
const DEFAULT_NO_FILE: u64 = 2048;

pub struct Plan {
    pub spec: JailSpec,
    pub firecracker: FirecrackerArgs,
}

/// Maps `args`; `this_exe` is the running binary, which `--exec-file` must resolve to.
pub fn plan(args: &JailerArgs, this_exe: &Path) -> anyhow::Result<Plan> {
    let (Some(id), Some(exec_file), Some(uid), Some(gid)) =
        (&args.id, &args.exec_file, args.uid, args.gid)
    else {
        bail!("--id, --exec-file, --uid and --gid are required");
    };
    let exec_name = exec_file_name(exec_file, this_exe)?;
    let mut spec = JailSpec::new(id, uid, gid);
    // Firecracker's layout, `<base>/<exec name>/<id>/root`: clients compute it to place the
    // kernel and drives and to find the API socket.
    spec.chroot_base = args.chroot_base_dir.join(&exec_name);
    spec.netns = args.netns.clone();
    spec.daemonize = args.daemonize;
    spec.new_pid_ns = args.new_pid_ns;
    spec.cgroup_version = match args.cgroup_version.as_str() {
        "1" => CgroupVersion::V1,
        "2" => CgroupVersion::V2,
        other => bail!("--cgroup-version {other:?}: 1 or 2"),
    };
    spec.cgroups = args
        .cgroup
        .iter()
        .map(|c| parse_cgroup_setting(c))
        .collect::<Result<_, _>>()?;
    if args.parent_cgroup.is_some() && spec.cgroups.is_empty() {
        // Firecracker then moves the VMM into the parent cgroup itself; dormouse makes a
        // cgroup only for settings.
        bail!("--parent-cgroup without --cgroup is not supported by dormouse: give at least one --cgroup setting (the jail's cgroup <parent>/<id> is made for them)");
    }
    spec.cgroup_parent = args.parent_cgroup.clone().unwrap_or(exec_name.clone());
    spec.rlimits = resource_limits(&args.resource_limit)?;
    spec.vmm_dirs = vec!["run".into()];
    spec.pid_file = Some(format!("{exec_name}.pid"));
    spec.validate()?;
    let firecracker = firecracker_args(id, &args.firecracker_args)?;
    Ok(Plan { spec, firecracker })
}

/// The name the jail is laid out under: the last component of `--exec-file` as given (a
/// `firecracker` link to dormouse lays out as Firecracker does). It must resolve to this
/// binary: the VMM runs in a fork of this process, not an exec of the file.
fn exec_file_name(exec_file: &Path, this_exe: &Path) -> anyhow::Result<String> {
    let resolved = std::fs::canonicalize(exec_file)
        .with_context(|| format!("--exec-file {}", exec_file.display()))?;
    let this = std::fs::canonicalize(this_exe)
        .with_context(|| format!("resolving this executable {}", this_exe.display()))?;
    if resolved != this {
        bail!(
            "--exec-file {} is not this dormouse binary ({}): dormouse's jailer runs only its own VMM (name this binary, or a link to it named firecracker)",
            exec_file.display(),
            this.display()
        );
    }
    let name = exec_file
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| !n.is_empty())
        .with_context(|| format!("--exec-file {} has no file name", exec_file.display()))?;
    Ok(name.to_string())
}

/// `fsize=N` and `no-file=N`, Firecracker's names, each once.
fn resource_limits(items: &[String]) -> anyhow::Result<Rlimits> {
    let mut limits = Rlimits::default();
    for item in items {
        let (name, value) = item
            .split_once('=')
            .with_context(|| format!("--resource-limit {item:?}: expected <resource>=<value>"))?;
        let ours = match name {
            "fsize" => "fsize",
            "no-file" => "nofile",
            other => bail!("--resource-limit {other:?} is not supported: fsize or no-file"),
        };
        parse_rlimits(&format!("{ours}={value}"), &mut limits)?;
    }
    limits.nofile.get_or_insert(DEFAULT_NO_FILE);
    Ok(limits)
}

/// The jailed VMM's command line: Firecracker's flags after `--`, with `--id` the jail's, as
/// Firecracker's jailer passes it.
fn firecracker_args(id: &str, extra: &[String]) -> anyhow::Result<FirecrackerArgs> {
    if extra.iter().any(|a| a == "--id" || a.starts_with("--id=")) {
        bail!("--id after `--`: the jailer passes the jail's --id to the VMM itself");
    }
    let argv = ["firecracker", "--id", id]
        .into_iter()
        .map(String::from)
        .chain(extra.iter().cloned());
    let args = match FirecrackerCli::try_parse_from(argv) {
        Ok(cli) => cli.args,
        Err(e) => bail!("the VMM's arguments after `--`: {}", e.render()),
    };
    // Refused here, before the jail is made, rather than by the jailed VMM.
    refuse_unsupported(&args)?;
    Ok(args)
}

#[cfg(test)]
mod tests;
