//! The control API's view of a VM: `api::VmControl` implemented on `VmController`.

use crate::{
    AgentInfo, ApiError, BalloonInfo, BalloonUpdate, DeviceInfo, DriveUpdate, NetUpdate,
    SnapshotInfo, SnapshotRequest, VmControl, VmInfo, VmState, VsockAnswer,
};
use devices::rate_limiter::{RateLimiterConfig, RateLimiterUpdate};
use vmm::agent_ready::{AgentReady, AgentReadyError};
use vmm::device_manager::VirtioKind;
use vmm::vm::SnapshotVmError;
use vmm::vm::{ControlError, RunState, VmController};

fn agent_info(ready: &AgentReady) -> AgentInfo {
    AgentInfo {
        version: ready.version.clone(),
        ready_after_ms: u64::try_from(ready.after_start.as_millis()).unwrap_or(u64::MAX),
    }
}

/// The balloon's state as the API shows it.
pub fn balloon_info(status: &devices::virtio::balloon::BalloonStatus) -> BalloonInfo {
    let pages_per_mib = devices::virtio::balloon::PAGES_PER_MIB as u32;
    BalloonInfo {
        target_mib: status.config.target_mib,
        actual_mib: status.actual_pages / pages_per_mib,
        actual_pages: status.actual_pages,
        deflate_on_oom: status.config.deflate_on_oom,
        free_page_reporting: status.config.free_page_reporting,
        stats_interval_s: status.config.stats_interval_s,
        stats: status.stats.iter().map(|s| (s.name(), s.value)).collect(),
        stats_age_ms: status
            .stats_age
            .map(|age| u64::try_from(age.as_millis()).unwrap_or(u64::MAX)),
        inflated_pages: status.counters.inflated_pages,
        deflated_pages: status.counters.deflated_pages,
        reported_pages: status.counters.reported_pages,
        released_bytes: status.counters.released_bytes,
        rejected: status.counters.rejected,
    }
}

fn control_error(e: ControlError) -> ApiError {
    match e {
        ControlError::AlreadyPaused
        | ControlError::NotPaused
        | ControlError::Stopped
        | ControlError::NoBalloon
        | ControlError::Unsupported(_) => ApiError::wrong_state(e.to_string()),
        ControlError::NoSuchDevice { .. } | ControlError::Balloon(_) => {
            ApiError::invalid_request(e.to_string())
        }
        other => ApiError::internal(other.to_string()),
    }
}

impl VmControl for VmController {
    fn pause(&self) -> Result<(), ApiError> {
        VmController::pause(self).map_err(control_error)
    }

    fn resume(&self) -> Result<(), ApiError> {
        VmController::resume(self).map_err(control_error)
    }

    fn snapshot(&self, req: SnapshotRequest) -> Result<SnapshotInfo, ApiError> {
        let outcome = VmController::snapshot_with(
            self,
            &req.dir,
            vmm::vm::SnapshotOptions {
                diff: req.diff,
                target: snapshot::TargetPolicy {
                    replace: req.replace,
                    companions: None,
                },
                live: req.live,
            },
        )
        .map_err(|e| match e {
            SnapshotVmError::Control(c) => control_error(c),
            SnapshotVmError::NoParent | SnapshotVmError::NoDirtyLog => {
                ApiError::wrong_state(e.to_string())
            }
            SnapshotVmError::RelativeDir(_) => ApiError::invalid_request(e.to_string()),
            // The path exists and is not a place the request allows: the caller can change
            // it (or ask to replace a snapshot).
            SnapshotVmError::Snapshot(snapshot::SnapshotError::TargetRefused { .. }) => {
                ApiError::wrong_state(e.to_string())
            }
            other => ApiError::internal(other.to_string()),
        })?;
        Ok(SnapshotInfo {
            dir: outcome.dir,
            diff: outcome.diff,
            snapshot_id: outcome.snapshot_id,
            parent_id: outcome.parent_id,
            pages_written: outcome.pages_written,
            memory: outcome.memory.to_string(),
            duration_ms: outcome.duration.as_millis() as u64,
            paused_us: outcome.paused.as_micros() as u64,
            live: outcome.live,
            live_unavailable: outcome.live_unavailable,
        })
    }

    fn shutdown(&self) -> Result<(), ApiError> {
        VmController::shutdown(self);
        Ok(())
    }

    fn info(&self) -> Result<VmInfo, ApiError> {
        let status = self.status();
        let state = if status.ended {
            VmState::ShuttingDown
        } else {
            match status.run_state {
                RunState::Running => VmState::Running,
                RunState::Paused => VmState::Paused,
            }
        };
        let mut devices = vec![DeviceInfo {
            kind: "serial".into(),
            id: Some("ttyS0".into()),
            mmio_base: None,
            irq: Some(vmm::boot::layout::SERIAL_IRQ),
        }];
        devices.extend(status.devices.iter().map(|slot| {
            let (kind, id) = match &slot.kind {
                VirtioKind::Block { path, id, .. } => (
                    "virtio-blk",
                    id.clone().or_else(|| Some(path.display().to_string())),
                ),
                VirtioKind::Net { tap, .. } => ("virtio-net", Some(tap.clone())),
                VirtioKind::Vsock { config } => {
                    ("virtio-vsock", Some(format!("cid={}", config.guest_cid)))
                }
                VirtioKind::Balloon { .. } => ("virtio-balloon", None),
            };
            DeviceInfo {
                kind: kind.into(),
                id,
                mmio_base: Some(slot.mmio_base),
                irq: Some(slot.irq),
            }
        }));
        Ok(VmInfo {
            state,
            vcpus: u32::from(status.vcpus),
            mem_mib: status.mem_mib,
            host: status.host,
            cmdline: status.cmdline,
            devices,
            uptime_ms: status.uptime.as_millis() as u64,
            agent: status.agent.as_ref().map(agent_info),
            balloon: self.balloon().as_ref().map(balloon_info),
        })
    }

    fn set_balloon(&self, update: BalloonUpdate) -> Result<BalloonInfo, ApiError> {
        if let Some(seconds) = update.stats_interval_s {
            self.set_balloon_stats_interval(seconds)
                .map_err(control_error)?;
        }
        if let Some(target) = update.target_mib {
            self.set_balloon_target(target).map_err(control_error)?;
        }
        let status = self
            .balloon()
            .ok_or_else(|| ApiError::wrong_state("this VM has no balloon device"))?;
        Ok(balloon_info(&status))
    }

    fn update_drive(&self, index: usize, update: DriveUpdate) -> Result<DriveUpdate, ApiError> {
        let config: RateLimiterConfig = update.rate_limiter.unwrap_or_default().into();
        let now = self
            .update_disk_rate_limiter(index, RateLimiterUpdate::from_patch(&config))
            .map_err(control_error)?;
        Ok(DriveUpdate {
            rate_limiter: Some(now.into()),
        })
    }

    fn update_net(&self, index: usize, update: NetUpdate) -> Result<NetUpdate, ApiError> {
        let patch = |r: Option<crate::RateLimiter>| {
            RateLimiterUpdate::from_patch(&RateLimiterConfig::from(r.unwrap_or_default()))
        };
        let (rx, tx) = self
            .update_net_rate_limiters(
                index,
                patch(update.rx_rate_limiter),
                patch(update.tx_rate_limiter),
            )
            .map_err(control_error)?;
        Ok(NetUpdate {
            rx_rate_limiter: Some(rx.into()),
            tx_rate_limiter: Some(tx.into()),
        })
    }

    fn metrics(&self) -> Option<vmm_metrics::VmMetrics> {
        Some(VmController::metrics(self).clone())
    }

    fn report_failure(&self, reason: String) {
        tracing::error!("{reason}: stopping the VM");
        self.fail(reason);
    }

    #[cfg(feature = "fault-injection")]
    fn inject_fault(
        &self,
        thread: vmm::fault::FaultThread,
        kind: vmm::fault::FaultKind,
    ) -> Result<(), ApiError> {
        VmController::inject(self, thread, kind).map_err(control_error)
    }

    fn seccomp_level(&self) -> vmm::seccomp::SeccompLevel {
        VmController::seccomp_level(self)
    }

    fn wait_agent(&self, timeout: std::time::Duration) -> Result<AgentInfo, ApiError> {
        match self.wait_agent_ready_blocking(timeout) {
            Ok(ready) => Ok(agent_info(&ready)),
            Err(e @ AgentReadyError::NoVsock) => Err(ApiError::wrong_state(e.to_string())),
            Err(e @ AgentReadyError::Timeout(_)) => Err(ApiError::Timeout(e.to_string())),
        }
    }

    fn vsock_connect(
        &self,
        stream: std::os::unix::net::UnixStream,
        port: u32,
        on_answer: VsockAnswer,
    ) -> Result<(), ApiError> {
        let handle = self.vsock().ok_or_else(|| {
            ApiError::wrong_state("this VM has no vsock device (run it with --vsock cid=N)")
        })?;
        handle
            .connect_stream(stream, port, on_answer)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::Unsupported => ApiError::wrong_state(format!(
                    "{e}: this VM's vsock runs on vhost-kernel (use --vsock ...,backend=userspace)"
                )),
                std::io::ErrorKind::WouldBlock => ApiError::Unavailable(e.to_string()),
                _ => ApiError::internal(format!("vsock: {e}")),
            })
    }
}
