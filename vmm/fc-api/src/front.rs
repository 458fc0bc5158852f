//! [`FcVmm`]: one Firecracker-style VMM, its pre-boot configuration, then the VM it started or
//! loaded. The VM itself is built by a [`Launcher`] (in `dormouse firecracker`, the process's
//! main thread: API threads run under the `api` seccomp filter, which does not allow building
//! a VM).

use std::sync::{Mutex, MutexGuard};

use devices::mmds::{DataStore, Mmds, SharedMmds};
use vmm::vm::{NetOverride, RunState, VsockOverride};
use vmm::{Console, RestoreOptions, SeccompLevel, VmConfig, VmController};

use vmm_metrics::VmMetrics;

use super::checks;
use super::error::FcError;
use super::metrics_file::MetricsFile;
use super::preboot::PreBoot;
use super::snapshot_files::{self, DeviceIds};
use super::types::{
    Balloon, BalloonStats, BalloonStatsUpdate, BalloonUpdate, BootSource, Drive,
    FirecrackerVersion, FullVmConfiguration, InstanceInfo, Logger, MachineConfig,
    MachineConfigUpdate, MemoryBackendType, Metrics, MmdsConfig, NetworkInterface, PartialDrive,
    PartialNetworkInterface, SnapshotCreateParams, SnapshotLoadParams, VmStateChange, Vsock,
};

/// The Firecracker release whose API (`firecracker.yaml`) this layer follows: what
/// `GET /version` and `--version` report, since clients compare it.
pub const FIRECRACKER_VERSION: &str = "1.16.0";

/// Builds VMs for an [`FcVmm`]; an error is the reason, answered as a `fault_message`.
pub trait Launcher: Send + Sync + 'static {
    fn start(&self, config: VmConfig) -> Result<VmController, String>;
    fn restore(&self, options: RestoreOptions) -> Result<VmController, String>;
}

/// Reconfigures the process's log (`PUT /logger`); an error is the reason, answered as a
/// `fault_message`. The CLI implements it over its `tracing` setup.
pub trait LogControl: Send + Sync + 'static {
    fn configure(&self, logger: &Logger) -> Result<(), String>;
}

/// Process-wide settings (`dormouse firecracker`'s flags).
#[derive(Clone, Debug)]
pub struct FcSettings {
    /// `--id`: the instance id `GET /` reports.
    pub id: String,
    /// `--no-seccomp` turns this off.
    pub seccomp: SeccompLevel,
    /// `--http-api-max-payload-size`.
    pub max_payload: usize,
    /// `--mmds-size-limit`: the MMDS document's largest serialised size, in bytes.
    pub mmds_size_limit: usize,
}

impl Default for FcSettings {
    fn default() -> Self {
        FcSettings {
            id: "anonymous-instance".into(),
            seccomp: SeccompLevel::default(),
            // Firecracker's default.
            max_payload: 51_200,
            mmds_size_limit: devices::mmds::DEFAULT_SIZE_LIMIT,
        }
    }
}

enum Phase {
    NotStarted(PreBoot),
    Started {
        controller: VmController,
        /// The configuration it booted with (empty for a loaded snapshot).
        config: PreBoot,
        ids: DeviceIds,
    },
}

pub struct FcVmm {
    settings: FcSettings,
    launcher: Box<dyn Launcher>,
    phase: Mutex<Phase>,
    /// The VM's counters, from before it exists (API requests count from the first).
    metrics: VmMetrics,
    metrics_file: MetricsFile,
    log: Option<Box<dyn LogControl>>,
    /// The MMDS: its document lives as long as this VMM, whether or not an interface serves it.
    mmds: SharedMmds,
}

impl FcVmm {
    pub fn new(settings: FcSettings, launcher: Box<dyn Launcher>) -> Result<Self, FcError> {
        let metrics =
            VmMetrics::new(&settings.id).map_err(|e| FcError::bad(format!("metrics: {e}")))?;
        Ok(FcVmm {
            launcher,
            phase: Mutex::new(Phase::NotStarted(PreBoot::default())),
            metrics,
            metrics_file: MetricsFile::default(),
            log: None,
            mmds: SharedMmds::new(Mmds {
                store: DataStore::with_limit(settings.mmds_size_limit),
                ..Mmds::default()
            }),
            settings,
        })
    }

    /// Lets `PUT /logger` reconfigure the log through `log`.
    pub fn with_log_control(mut self, log: Box<dyn LogControl>) -> Self {
        self.log = Some(log);
        self
    }

    /// `PUT /logger`: pre-boot only (as Firecracker).
    pub fn put_logger(&self, body: Logger) -> Result<(), FcError> {
        let phase = self.phase();
        if !matches!(*phase, Phase::NotStarted(_)) {
            return Err(FcError::PostBoot);
        }
        let Some(log) = &self.log else {
            return Err(FcError::unsupported(
                "/logger",
                "this VMM's log is set up by its embedder and cannot be reconfigured",
            ));
        };
        log.configure(&body).map_err(FcError::Bad)
    }

    /// The counters of this VMM's VM (labelled with `--id`).
    pub fn metrics(&self) -> &VmMetrics {
        &self.metrics
    }

    /// `PUT /metrics` and `--metrics-path`: pre-boot only, once (as Firecracker).
    pub fn put_metrics(&self, body: Metrics) -> Result<(), FcError> {
        let phase = self.phase();
        if !matches!(*phase, Phase::NotStarted(_)) {
            return Err(FcError::PostBoot);
        }
        self.metrics_file
            .open(std::path::Path::new(&body.metrics_path))
    }

    /// Appends a metrics line if a metrics file is configured (the periodic flush).
    pub fn flush_metrics_if_configured(&self) -> Result<(), FcError> {
        if !self.metrics_file.is_open() {
            return Ok(());
        }
        self.metrics_file.flush(&self.metrics)
    }

    pub fn settings(&self) -> &FcSettings {
        &self.settings
    }

    fn phase(&self) -> MutexGuard<'_, Phase> {
        // A panicking handler ends the VM (see `VmControl::report_failure`); the phase itself
        // is always whole, so a poisoned lock is still usable.
        self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The started VM, if any.
    pub fn controller(&self) -> Option<VmController> {
        match &*self.phase() {
            Phase::Started { controller, .. } => Some(controller.clone()),
            Phase::NotStarted(_) => None,
        }
    }

    fn configure(
        &self,
        f: impl FnOnce(&mut PreBoot) -> Result<(), FcError>,
    ) -> Result<(), FcError> {
        match &mut *self.phase() {
            Phase::NotStarted(preboot) => f(preboot),
            Phase::Started { .. } => Err(FcError::PostBoot),
        }
    }

    fn started<T>(
        &self,
        f: impl FnOnce(&VmController, &DeviceIds) -> Result<T, FcError>,
    ) -> Result<T, FcError> {
        let (controller, ids) = match &*self.phase() {
            Phase::Started {
                controller, ids, ..
            } => (controller.clone(), ids.clone()),
            Phase::NotStarted(_) => return Err(FcError::PreBoot),
        };
        // Not under the lock: a snapshot takes a while and GET / must keep answering.
        f(&controller, &ids)
    }

    pub fn instance_info(&self) -> InstanceInfo {
        let state = match &*self.phase() {
            Phase::NotStarted(_) => "Not started",
            Phase::Started { controller, .. } => match controller.run_state() {
                RunState::Running => "Running",
                RunState::Paused => "Paused",
            },
        };
        InstanceInfo {
            app_name: "dormouse".into(),
            id: self.settings.id.clone(),
            state: state.into(),
            vmm_version: FIRECRACKER_VERSION.into(),
        }
    }

    pub fn version(&self) -> FirecrackerVersion {
        FirecrackerVersion {
            firecracker_version: FIRECRACKER_VERSION.into(),
        }
    }

    pub fn vm_config(&self) -> FullVmConfiguration {
        match &*self.phase() {
            Phase::NotStarted(preboot)
            | Phase::Started {
                config: preboot, ..
            } => preboot.document(),
        }
    }

    pub fn machine_config(&self) -> MachineConfig {
        match &*self.phase() {
            Phase::NotStarted(preboot)
            | Phase::Started {
                config: preboot, ..
            } => preboot.machine.clone(),
        }
    }

    pub fn put_boot_source(&self, source: BootSource) -> Result<(), FcError> {
        self.configure(|p| p.set_boot_source(source))
    }

    pub fn put_machine_config(&self, config: MachineConfig) -> Result<(), FcError> {
        self.configure(|p| p.set_machine(config))
    }

    pub fn patch_machine_config(&self, update: MachineConfigUpdate) -> Result<(), FcError> {
        self.configure(|p| p.update_machine(update))
    }

    pub fn put_drive(&self, drive: Drive) -> Result<(), FcError> {
        self.configure(|p| p.set_drive(drive))
    }

    pub fn put_network_interface(&self, iface: NetworkInterface) -> Result<(), FcError> {
        self.configure(|p| p.set_net(iface))
    }

    pub fn put_vsock(&self, vsock: Vsock) -> Result<(), FcError> {
        self.configure(|p| p.set_vsock(vsock))
    }

    /// `PUT /balloon`: pre-boot only (as Firecracker).
    pub fn put_balloon(&self, balloon: Balloon) -> Result<(), FcError> {
        self.configure(|p| p.set_balloon(balloon))
    }

    /// `PATCH /balloon`: the running VM's target.
    pub fn patch_balloon(&self, update: BalloonUpdate) -> Result<(), FcError> {
        self.started(|controller, _| {
            controller
                .set_balloon_target(update.amount_mib)
                .map_err(|e| FcError::bad(e.to_string()))
        })
    }

    /// `GET /balloon`: the configuration, before or after the start.
    pub fn balloon(&self) -> Result<Balloon, FcError> {
        let none = || FcError::bad("No balloon device configured");
        match &*self.phase() {
            Phase::NotStarted(preboot) => preboot.balloon.clone().ok_or_else(none),
            Phase::Started { controller, .. } => controller
                .balloon()
                .map(|status| super::balloon::describe(&status))
                .ok_or_else(none),
        }
    }

    /// `GET /balloon/statistics`.
    pub fn balloon_statistics(&self) -> Result<BalloonStats, FcError> {
        self.started(|controller, _| {
            let status = controller
                .balloon()
                .ok_or_else(|| FcError::bad("No balloon device configured"))?;
            super::balloon::statistics(&status)
        })
    }

    /// `PATCH /balloon/statistics`: a new interval (not to or from 0, as Firecracker).
    pub fn patch_balloon_statistics(&self, update: BalloonStatsUpdate) -> Result<(), FcError> {
        let seconds = super::balloon::stats_interval(update.stats_polling_interval_s)?;
        self.started(|controller, _| {
            controller
                .set_balloon_stats_interval(seconds)
                .map_err(|e| FcError::bad(e.to_string()))
        })
    }

    /// `PUT /mmds`: replaces the document (a JSON object).
    pub fn put_mmds(&self, data: serde_json::Value) -> Result<(), FcError> {
        if !data.is_object() {
            return Err(FcError::bad("The MMDS contents must be a JSON object."));
        }
        self.mmds
            .lock()
            .store
            .put(data)
            .map_err(|e| FcError::bad(e.to_string()))
    }

    /// `PATCH /mmds`: a JSON merge patch (RFC 7396) of the document.
    pub fn patch_mmds(&self, patch: &serde_json::Value) -> Result<(), FcError> {
        self.mmds
            .lock()
            .store
            .patch(patch)
            .map_err(|e| FcError::bad(e.to_string()))
    }

    /// `GET /mmds`.
    pub fn mmds(&self) -> serde_json::Value {
        self.mmds.lock().store.value()
    }

    /// `PUT /mmds/config`: pre-boot only (as Firecracker).
    pub fn put_mmds_config(&self, config: MmdsConfig) -> Result<(), FcError> {
        let (version, imds_compat) = (config.version, config.imds_compat);
        self.configure(|p| p.set_mmds_config(config))?;
        self.mmds.lock().store.set_version(version, imds_compat);
        Ok(())
    }

    /// Applies a `--config-file` document (pre-boot only). Its `logger` and `metrics`
    /// sections are `PUT /logger` and `PUT /metrics`.
    pub fn apply(&self, mut document: FullVmConfiguration) -> Result<(), FcError> {
        if let Some(logger) = document.logger.take() {
            let logger: Logger =
                serde_json::from_value(logger).map_err(|e| FcError::bad(format!("logger: {e}")))?;
            self.put_logger(logger)?;
        }
        if let Some(metrics) = document.metrics.take() {
            let metrics: Metrics = serde_json::from_value(metrics)
                .map_err(|e| FcError::bad(format!("metrics: {e}")))?;
            self.put_metrics(metrics)?;
        }
        let mmds = document.mmds_config.take();
        self.configure(|p| p.apply(document))?;
        match mmds {
            Some(config) => self.put_mmds_config(config),
            None => Ok(()),
        }
    }

    /// `InstanceStart`. The phase stays locked while the VM is built, so two starts (or a
    /// start and a load) cannot race.
    pub fn start(&self) -> Result<(), FcError> {
        let mut phase = self.phase();
        let Phase::NotStarted(preboot) = &*phase else {
            return Err(FcError::PostBoot);
        };
        let mut config = preboot.vm_config(Console::Stdio, self.settings.seccomp, &self.mmds)?;
        config.metrics = Some(self.metrics.clone());
        let ids = DeviceIds {
            drives: preboot
                .disk_order()
                .iter()
                .map(|d| d.drive_id.clone())
                .collect(),
            nets: preboot.nets.iter().map(|n| n.iface_id.clone()).collect(),
        };
        let controller = self
            .launcher
            .start(config)
            .map_err(|e| FcError::bad(format!("Start microvm error: {e}")))?;
        let config = preboot.clone();
        *phase = Phase::Started {
            controller,
            config,
            ids,
        };
        Ok(())
    }

    /// `PUT /snapshot/load`.
    pub fn load(&self, params: SnapshotLoadParams) -> Result<(), FcError> {
        checks::snapshot_load(&params)?;
        let mut phase = self.phase();
        let Phase::NotStarted(preboot) = &*phase else {
            return Err(FcError::PostBoot);
        };
        if preboot.touched {
            return Err(FcError::bad(
                "Loading a microVM snapshot not allowed after configuring boot-specific resources.",
            ));
        }
        let mem_path = match (&params.mem_backend, &params.mem_file_path) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(FcError::bad(
                    "Either mem_backend or mem_file_path must be present, not both.",
                ))
            }
            (Some(backend), None) => {
                if backend.backend_type == MemoryBackendType::Uffd {
                    return Err(FcError::unsupported(
                        "mem_backend Uffd",
                        "dormouse maps the memory file itself (lazily, copy-on-write); \
                         use backend_type File",
                    ));
                }
                backend.backend_path.clone()
            }
            (None, Some(path)) => path.clone(),
        };
        let loadable = snapshot_files::loadable(&params.snapshot_path, &mem_path)?;
        let mut options = RestoreOptions::new(&loadable.dir);
        options.console = Console::Stdio;
        options.seccomp = self.settings.seccomp;
        options.metrics = Some(self.metrics.clone());
        // The snapshot says which interfaces serve the MMDS and how; the document is this
        // process's (empty until a PUT /mmds), as Firecracker.
        options.mmds = Some(self.mmds.clone());
        options.dirty_log = params.track_dirty_pages.unwrap_or(false)
            || params.enable_diff_snapshots.unwrap_or(false);
        for net in params.network_overrides.iter().flatten() {
            let index = loadable
                .ids
                .nets
                .iter()
                .position(|id| *id == net.iface_id)
                .ok_or_else(|| {
                    FcError::bad(format!(
                        "Invalid network override: the snapshot has no interface {:?}",
                        net.iface_id
                    ))
                })?;
            if options.nets.len() <= index {
                options.nets.resize(index + 1, None);
            }
            if let Some(slot) = options.nets.get_mut(index) {
                *slot = Some(NetOverride {
                    tap: net.host_dev_name.clone(),
                    fd: None,
                    mac: None,
                });
            }
        }
        if let Some(vsock) = &params.vsock_override {
            options.vsock = Some(VsockOverride {
                cid: None,
                uds: Some(vsock.uds_path.clone().into()),
            });
        }
        let options_dirty_log = options.dirty_log;
        let controller = self
            .launcher
            .restore(options)
            .map_err(|e| FcError::bad(format!("Load snapshot error: {e}")))?;
        // dormouse's restore lets the vCPUs run at once: without resume_vm they are paused
        // right away (the guest may run for that moment; docs/firecracker.md).
        if !params.resume_vm.unwrap_or(false) {
            controller
                .pause()
                .map_err(|e| FcError::bad(format!("Load snapshot error: {e}")))?;
        }
        // What `GET /machine-config` and `/vm/config` report: the snapshot's size, not defaults.
        let status = controller.status();
        let mut config = PreBoot::default();
        config.machine.vcpu_count = status.vcpus;
        config.machine.mem_size_mib = status.mem_mib;
        config.machine.track_dirty_pages = options_dirty_log;
        *phase = Phase::Started {
            controller,
            config,
            ids: loadable.ids,
        };
        Ok(())
    }

    /// `PATCH /vm`. Firecracker answers 204 also when the VM already is in that state.
    pub fn set_state(&self, state: VmStateChange) -> Result<(), FcError> {
        self.started(|controller, _| {
            let result = match state {
                VmStateChange::Paused if controller.run_state() == RunState::Paused => Ok(()),
                VmStateChange::Resumed if controller.run_state() == RunState::Running => Ok(()),
                VmStateChange::Paused => controller.pause(),
                VmStateChange::Resumed => controller.resume(),
            };
            result.map_err(|e| FcError::bad(e.to_string()))
        })
    }

    /// `PUT /snapshot/create`: the VM must be paused, as in Firecracker.
    pub fn create_snapshot(&self, params: SnapshotCreateParams) -> Result<(), FcError> {
        self.started(|controller, ids| {
            if controller.run_state() != RunState::Paused {
                return Err(FcError::bad(
                    "Cannot create a snapshot of a running microVM: pause it first (PATCH /vm).",
                ));
            }
            snapshot_files::create(controller, &params, ids)
        })
    }

    /// `PATCH /drives/{id}` on a started VM: a new `path_on_host` swaps the disk's file (the
    /// guest sees the new capacity), a `rate_limiter` changes its limits; as Firecracker, the
    /// path first, and an absent field changes nothing.
    pub fn patch_drive(&self, update: PartialDrive) -> Result<(), FcError> {
        // Firecracker's wording for a failed update.
        let failed = |detail: String| {
            FcError::bad(format!(
                "Unable to patch the block device: {detail} Please verify the request arguments."
            ))
        };
        self.started(|controller, ids| {
            let index = ids
                .drives
                .iter()
                .position(|id| *id == update.drive_id)
                .ok_or_else(|| {
                    failed("Failed perform action on device: Device not found".into())
                })?;
            if let Some(path) = &update.path_on_host {
                controller
                    .update_disk_path(index, std::path::Path::new(path))
                    .map_err(|e| failed(e.to_string()))?;
            }
            if let Some(limiter) = update.rate_limiter {
                controller
                    .update_disk_rate_limiter(
                        index,
                        devices::rate_limiter::RateLimiterUpdate::from_patch(&limiter.into()),
                    )
                    .map_err(|e| failed(e.to_string()))?;
            }
            Ok(())
        })?;
        // `GET /vm/config` shows the file the drive serves now.
        if let Some(path) = update.path_on_host {
            if let Phase::Started { config, .. } = &mut *self.phase() {
                if let Some(drive) = config
                    .drives
                    .iter_mut()
                    .find(|d| d.drive_id == update.drive_id)
                {
                    drive.path_on_host = Some(path);
                }
            }
        }
        Ok(())
    }

    pub fn patch_network_interface(&self, update: PartialNetworkInterface) -> Result<(), FcError> {
        self.started(|controller, ids| {
            let index = ids
                .nets
                .iter()
                .position(|id| *id == update.iface_id)
                .ok_or_else(|| {
                    FcError::bad(format!("Invalid network interface ID: {}", update.iface_id))
                })?;
            let patch = |r: Option<vmm_api::RateLimiter>| {
                devices::rate_limiter::RateLimiterUpdate::from_patch(&r.unwrap_or_default().into())
            };
            controller
                .update_net_rate_limiters(
                    index,
                    patch(update.rx_rate_limiter),
                    patch(update.tx_rate_limiter),
                )
                .map(|_| ())
                .map_err(|e| FcError::bad(e.to_string()))
        })
    }

    /// `SendCtrlAltDel`: Ctrl+Alt+Del on the guest's i8042 keyboard. A Linux guest with the
    /// i8042 and atkbd drivers reboots, which ends the VM and this process (as Firecracker).
    pub fn send_ctrl_alt_del(&self) -> Result<(), FcError> {
        self.started(|controller, _| {
            controller
                .send_ctrl_alt_del()
                .map_err(|e| FcError::bad(e.to_string()))
        })
    }

    /// `FlushMetrics`: post-boot only (as Firecracker); without a metrics file a 400 (where
    /// Firecracker answers 204 and writes nothing: dormouse does not accept and ignore).
    pub fn flush_metrics(&self) -> Result<(), FcError> {
        self.started(|_, _| self.metrics_file.flush(&self.metrics))
    }
}
