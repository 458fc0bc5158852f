//! Building a sandbox's VM: booted from a kernel, or restored from a template snapshot with its
//! own disk copies, TAPs, MACs and vsock CID. Runs on the blocking pool (`spawn_blocking`).

use std::path::{Path, PathBuf};

use devices::virtio::block::BlockConfig;
use devices::virtio::net::NetConfig;
use devices::virtio::vsock::{BackendChoice, VsockConfig};

use super::checkpoint_files::{self, copy_name};
use super::config::{BootSpec, DiskSpec, NetworkConfig};
use super::console_log::ConsoleLog;
use super::disk_copy::{clone_or_copy, CopyMethod};
use super::error::{Result, SandboxError};
use super::identity::{random_mac, Identities};
use super::instance::{Description, SandboxDisk, SandboxNic, SandboxOrigin, WakeAhead};
use super::template_cache::TemplateCache;
use super::warm_pool::WarmPool;
use super::SandboxId;
use vmm::vm::{Console, NetOverride, RestoreOptions, Vm, VmConfig, VsockOverride, DEFAULT_CMDLINE};
use vmm::SeccompLevel;

/// Guest console output for a sandbox: to its bounded log (through a pipe: the vCPU threads
/// that write it may not rotate files), or discarded. Needs a tokio runtime context.
pub fn open_console(log: Option<&ConsoleLog>) -> Result<Console> {
    match log {
        None => Ok(Console::Null),
        Some(log) => log
            .piped()
            .map(|writer| Console::Writer(Box::new(writer)))
            .map_err(|e| SandboxError::io("opening console log", &log.path, e)),
    }
}

/// Copies `from` into the sandbox's directory as disk `index`.
fn private_copy(from: &Path, work_dir: &Path, index: usize) -> Result<(PathBuf, CopyMethod)> {
    let to = work_dir.join(copy_name(index));
    let method = clone_or_copy(from, &to).map_err(|source| SandboxError::DiskCopy {
        from: from.to_path_buf(),
        to: to.clone(),
        source,
    })?;
    tracing::debug!("disk {} → {} ({method:?})", from.display(), to.display());
    Ok((to, method))
}

fn make_work_dir(work_dir: &Path) -> Result<()> {
    std::fs::create_dir_all(work_dir).map_err(|e| SandboxError::io("creating", work_dir, e))
}

fn nic(config: Option<&NetworkConfig>, ids: &Identities) -> SandboxNic {
    SandboxNic {
        tap: config
            .map(|c| c.tap.clone())
            .unwrap_or_else(|| ids.tap_name()),
        mac: config.and_then(|c| c.mac).unwrap_or_else(random_mac),
    }
}

/// Where and how a new sandbox VM is placed on this host: the manager's identity counters,
/// the sandbox's work directory, the seccomp level of its threads.
pub struct Placement<'a> {
    pub ids: &'a Identities,
    pub work_dir: &'a Path,
    pub seccomp: SeccompLevel,
    /// Templates decoded before (a store checkpoint, fetched for this sandbox alone, skips it).
    pub templates: &'a TemplateCache,
    /// The VM's counters under the sandbox's id, when made ahead (made here otherwise).
    pub metrics: Option<vmm::metrics::VmMetrics>,
}

/// A new booted sandbox's VM configuration and description: its disk copies made, its
/// identities handed out. The caller removes `work_dir` on failure.
pub fn plan_boot(
    id: &SandboxId,
    spec: BootSpec,
    network: &[NetworkConfig],
    console: Console,
    placement: Placement<'_>,
) -> Result<(VmConfig, Description)> {
    let Placement {
        ids,
        work_dir,
        seccomp,
        metrics,
        ..
    } = placement;
    if network.iter().skip(1).any(|n| n.guest_ip.is_some()) {
        return Err(SandboxError::InvalidConfig(
            "guest_ip can only be set on the first NIC (eth0)".into(),
        ));
    }
    make_work_dir(work_dir)?;
    let root_on_first_disk = spec.rootfs.is_some();
    let specs: Vec<DiskSpec> = spec.rootfs.into_iter().chain(spec.disks).collect();
    let mut disks = Vec::with_capacity(specs.len());
    for (index, d) in specs.into_iter().enumerate() {
        let (path, copy) = if d.private_copy {
            let (path, method) = private_copy(&d.path, work_dir, index)?;
            (path, Some(method))
        } else {
            (d.path, None)
        };
        disks.push(SandboxDisk {
            path,
            read_only: d.read_only,
            copy,
        });
    }
    let nics: Vec<SandboxNic> = network.iter().map(|n| nic(Some(n), ids)).collect();
    let vsock_cid = ids.vsock_cid();

    let mut cmdline = spec.cmdline.unwrap_or_else(|| DEFAULT_CMDLINE.to_string());
    cmdline.push_str(&format!(" dormouse.hostname={id}"));
    if let Some(ip) = network.first().and_then(|n| n.guest_ip.as_ref()) {
        cmdline.push(' ');
        cmdline.push_str(&ip.cmdline_word());
    }

    let mut config = VmConfig::new(&spec.kernel);
    config.initrd = spec.initrd;
    config.cmdline = Some(cmdline);
    config.vcpus = spec.vcpus;
    config.mem_mib = spec.mem_mib;
    if spec.ram_in_work_dir {
        config.mem_dir = Some(work_dir.to_path_buf());
    }
    config.balloon = spec.balloon;
    config.metrics = Some(made_ahead_or_new(id, metrics)?);
    config.console = console;
    config.seccomp = seccomp;
    config.root_on_first_disk = root_on_first_disk;
    config.disks = disks
        .iter()
        .map(|d| BlockConfig {
            path: d.path.clone(),
            read_only: d.read_only,
            id: None,
            rate_limiter: Default::default(),
        })
        .collect();
    config.nets = nics
        .iter()
        .map(|n| NetConfig {
            tap: n.tap.clone(),
            fd: None,
            mac: Some(n.mac),
            rx_rate_limiter: Default::default(),
            tx_rate_limiter: Default::default(),
            mmds: None,
        })
        .collect();
    // The in-process vsock handle (how the library reaches the agent) needs the userspace
    // datapath.
    config.vsock = Some(VsockConfig {
        guest_cid: vsock_cid,
        uds_path: None,
        backend: BackendChoice::Userspace,
    });
    Ok((
        config,
        Description {
            origin: SandboxOrigin::Boot {
                kernel: spec.kernel,
            },
            vcpus: spec.vcpus,
            mem_mib: spec.mem_mib,
            vsock_cid,
            disks,
            network: nics,
        },
    ))
}

/// A template or fork sandbox's restore options and description: its disk copies made, its
/// identities handed out. The caller removes `work_dir` on failure.
pub fn plan_template(
    id: &SandboxId,
    template: &Path,
    network: &[NetworkConfig],
    console: Console,
    placement: Placement<'_>,
    origin: SandboxOrigin,
) -> Result<(RestoreOptions, Description)> {
    let Placement {
        ids,
        work_dir,
        seccomp,
        templates,
        metrics,
    } = placement;
    if network.iter().any(|n| n.guest_ip.is_some()) {
        return Err(SandboxError::InvalidConfig(
            "guest_ip cannot be set on a sandbox restored from a snapshot (the guest keeps its \
             saved configuration)"
                .into(),
        ));
    }
    let (layout, known_state) = match origin {
        SandboxOrigin::Store { .. } => (checkpoint_files::read_layout(template)?, None),
        _ => {
            let cached = templates.get(template)?;
            (cached.layout, Some(cached.state))
        }
    };
    if network.len() > layout.nets {
        return Err(SandboxError::InvalidConfig(format!(
            "{} NICs given, the template has {}",
            network.len(),
            layout.nets
        )));
    }
    if !layout.has_vsock {
        return Err(SandboxError::NoVsock { id: id.clone() });
    }
    make_work_dir(work_dir)?;
    let mut disks = Vec::with_capacity(layout.disks.len());
    for (index, d) in layout.disks.iter().enumerate() {
        // Read-only disks are shared; each writable one becomes this sandbox's own copy.
        let (path, copy) = if d.read_only {
            (d.source.clone(), None)
        } else {
            let (path, method) = private_copy(&d.source, work_dir, index)?;
            (path, Some(method))
        };
        disks.push(SandboxDisk {
            path,
            read_only: d.read_only,
            copy,
        });
    }
    let nics: Vec<SandboxNic> = (0..layout.nets).map(|i| nic(network.get(i), ids)).collect();
    let vsock_cid = ids.vsock_cid();

    let mut options = RestoreOptions::new(template);
    options.known_state = known_state;
    options.metrics = Some(made_ahead_or_new(id, metrics)?);
    options.console = console;
    options.seccomp = seccomp;
    options.disks = disks.iter().map(|d| Some(d.path.clone())).collect();
    options.nets = nics
        .iter()
        .map(|n| {
            Some(NetOverride {
                tap: n.tap.clone(),
                fd: None,
                mac: Some(n.mac),
            })
        })
        .collect();
    options.vsock = Some(VsockOverride {
        cid: Some(vsock_cid),
        uds: None,
    });
    // Diff snapshots are not part of the sandbox API; the first snapshot turns logging on.
    options.dirty_log = false;
    Ok((
        options,
        Description {
            origin,
            vcpus: layout.vcpus,
            mem_mib: layout.mem_mib,
            vsock_cid,
            disks,
            network: nics,
        },
    ))
}

/// The VM's counters, labelled with the sandbox's id (`vm_id`, docs/metrics.md), as the
/// process mode passes it with `--id`.
pub(crate) fn metrics_for(id: &SandboxId) -> Result<vmm::metrics::VmMetrics> {
    vmm::metrics::VmMetrics::new(id.as_str())
        .map_err(|e| SandboxError::InvalidConfig(format!("the counters of sandbox {id}: {e}")))
}

/// The counters made ahead for `id` (`next_start`, a hibernate), or new ones.
fn made_ahead_or_new(
    id: &SandboxId,
    made_ahead: Option<vmm::metrics::VmMetrics>,
) -> Result<vmm::metrics::VmMetrics> {
    match made_ahead {
        Some(metrics) => Ok(metrics),
        None => metrics_for(id),
    }
}

/// Restores a hibernated sandbox with the devices it was saved with (into a warm shell when
/// `pool` has one of its shape), with the counters and state made at its hibernate if any.
pub fn wake(
    id: &SandboxId,
    dir: &Path,
    console: Console,
    seccomp: SeccompLevel,
    ahead: WakeAhead,
    pool: &WarmPool,
) -> Result<Vm> {
    let mut options = RestoreOptions::new(dir);
    options.metrics = Some(made_ahead_or_new(id, ahead.metrics)?);
    options.known_state = ahead.state;
    options.console = console;
    options.seccomp = seccomp;
    options.dirty_log = false;
    pool.restore(options)
        .map_err(|source| SandboxError::VmStart {
            id: id.clone(),
            source: Box::new(source),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The in-process VM counts under the sandbox's id, as `--id` labels the process mode's.
    #[test]
    fn a_booted_sandbox_counts_under_its_id() {
        let work = tempfile::tempdir().expect("tempdir");
        let ids = Identities::new(100);
        let id = SandboxId::new("sb-42");
        let (config, _) = plan_boot(
            &id,
            BootSpec::new("/k"),
            &[],
            Console::Null,
            Placement {
                ids: &ids,
                work_dir: work.path(),
                seccomp: SeccompLevel::Enforce,
                templates: &TemplateCache::default(),
                metrics: None,
            },
        )
        .expect("plan");
        let metrics = config.metrics.expect("the sandbox's counters");
        assert_eq!(metrics.vm_id(), "sb-42");
    }
}
