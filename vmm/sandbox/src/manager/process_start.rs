//! `Isolation::Process` creates: the same plan as in-process (disk copies, identities,
//! command line), turned into a `dormouse run|restore` command line and started as the
//! sandbox's own process.

use std::path::Path;

use vmm::vm::{RestoreOptions, VmConfig};

use crate::instance::Description;
use crate::process::{Launch, LaunchDisk, LaunchNic, RestoreLaunch, RunLaunch};
use crate::SandboxId;

/// What the in-process code would have started.
pub(super) enum Plan {
    Boot(Box<VmConfig>),
    Restore(Box<RestoreOptions>),
}

fn disks(description: &Description) -> Vec<LaunchDisk> {
    description
        .disks
        .iter()
        .map(|d| LaunchDisk {
            path: d.path.clone(),
            read_only: d.read_only,
        })
        .collect()
}

fn nics(description: &Description) -> Vec<LaunchNic> {
    description
        .network
        .iter()
        .map(|n| LaunchNic {
            tap: n.tap.clone(),
            mac: n.mac,
        })
        .collect()
}

/// The process's launch for `plan`. `mem_dir`: `--mem-dir` as the process sees it, used when
/// the plan keeps guest RAM in the work directory.
pub(super) fn launch(plan: Plan, description: &Description, mem_dir: &Path) -> Launch {
    match plan {
        Plan::Boot(config) => Launch::Run(RunLaunch {
            kernel: config.kernel.clone(),
            initrd: config.initrd.clone(),
            cmdline: config
                .cmdline
                .clone()
                .unwrap_or_else(|| vmm::vm::DEFAULT_CMDLINE.to_string()),
            vcpus: config.vcpus,
            mem_mib: config.mem_mib,
            mem_dir: config.mem_dir.as_ref().map(|_| mem_dir.to_path_buf()),
            disks: disks(description),
            root_on_first_disk: config.root_on_first_disk,
            nets: nics(description),
            cid: description.vsock_cid,
            balloon: config.balloon,
        }),
        Plan::Restore(options) => Launch::Restore(RestoreLaunch {
            dir: options.dir.clone(),
            disks: disks(description),
            nets: nics(description),
            cid: Some(description.vsock_cid),
        }),
    }
}

/// Logged when a sandbox process starts.
pub(super) fn describe(id: &SandboxId, launch: &Launch) -> String {
    match launch {
        Launch::Run(run) => format!(
            "sandbox {id}: booting {} in its own process",
            run.kernel.display()
        ),
        Launch::Restore(restore) => format!(
            "sandbox {id}: restoring {} in its own process",
            restore.dir.display()
        ),
    }
}
