//! [`VmController`]: a cloneable handle that other threads (signal handlers, the control API,
//! the sandbox library) use to pause, resume, snapshot, stop and observe a VM.

use std::sync::Arc;

use devices::rate_limiter::{RateLimiterConfig, RateLimiterUpdate};
use devices::virtio::balloon::BalloonStatus;
use devices::virtio::vsock::VsockHandle;

use super::core::VmCore;
use super::error::{ControlError, RunState};
use crate::exit::{ExitSink, VmExit};
use crate::host::HostKind;

/// A VM's description and state at one moment ([`VmController::status`]).
#[derive(Debug, Clone)]
pub struct VmStatus {
    /// The VM has ended (or is ending); `run_state` is then meaningless.
    pub ended: bool,
    pub run_state: RunState,
    pub vcpus: u8,
    pub mem_mib: u64,
    /// The host kind, as snapshots record it (`kvm-intel`, `kvm-pvm`, …).
    pub host: String,
    pub cmdline: String,
    /// The virtio devices, in slot order (the serial port is always there too).
    pub devices: Vec<VirtioStatus>,
    pub uptime: std::time::Duration,
    pub agent: Option<crate::agent_ready::AgentReady>,
}

/// One virtio device of a [`VmStatus`].
#[derive(Debug, Clone)]
pub struct VirtioStatus {
    pub kind: crate::device_manager::VirtioKind,
    pub mmio_base: u64,
    pub irq: u32,
}

/// Cloneable handle to control a VM from other threads (signal handlers, the API server).
#[derive(Clone)]
pub struct VmController {
    pub(super) core: Arc<VmCore>,
}

impl VmController {
    /// Asks the VM to stop; the owner's `wait()` returns `HostShutdown`.
    pub fn shutdown(&self) {
        self.core.exit.report(VmExit::HostShutdown);
    }

    pub fn pause(&self) -> Result<(), ControlError> {
        self.core.pause()
    }

    pub fn resume(&self) -> Result<(), ControlError> {
        self.core.resume()
    }

    pub fn run_state(&self) -> RunState {
        self.core.run_state()
    }

    pub fn host(&self) -> HostKind {
        self.core.host
    }

    /// In-process vsock connections to the guest (no Unix-socket hop), if the VM has vsock on
    /// the userspace datapath.
    pub fn vsock(&self) -> Option<VsockHandle> {
        self.core.devices.vsock()
    }

    /// The guest agent's readiness: `Some` once it announced itself on vsock port 1023, back to
    /// `None` when its announcing connection ends (agent gone; after a restore it announces
    /// again). Always `None` without a userspace vsock device.
    #[cfg(feature = "async")]
    pub fn agent_ready(
        &self,
    ) -> tokio::sync::watch::Receiver<Option<crate::agent_ready::AgentReady>> {
        self.core.agent.subscribe()
    }

    /// Waits until the guest agent is ready (at once if it already is).
    #[cfg(feature = "async")]
    pub async fn wait_agent_ready(
        &self,
        timeout: std::time::Duration,
    ) -> Result<crate::agent_ready::AgentReady, crate::agent_ready::AgentReadyError> {
        self.core.agent.wait(timeout).await
    }

    /// Waits (blocking the thread) until the guest agent is ready.
    pub fn wait_agent_ready_blocking(
        &self,
        timeout: std::time::Duration,
    ) -> Result<crate::agent_ready::AgentReady, crate::agent_ready::AgentReadyError> {
        self.core.agent.wait_blocking(timeout)
    }

    /// Writes a snapshot to `dir` (absolute): see [`VmCore::snapshot`] in `vm_snapshot`.
    pub fn snapshot(
        &self,
        dir: &std::path::Path,
        diff: bool,
        target: snapshot::TargetPolicy,
    ) -> Result<super::snapshot::SnapshotOutcome, super::error::SnapshotVmError> {
        self.core.snapshot(dir, diff, target)
    }

    /// [`VmController::snapshot`] with every option, live snapshots included.
    pub fn snapshot_with(
        &self,
        dir: &std::path::Path,
        options: super::snapshot::SnapshotOptions,
    ) -> Result<super::snapshot::SnapshotOutcome, super::error::SnapshotVmError> {
        self.core.snapshot_with(dir, options)
    }

    /// Disk `index` (0 is the first, `--rootfs` if given), or the error naming it.
    fn disk(
        &self,
        index: usize,
    ) -> Result<std::sync::Arc<std::sync::Mutex<devices::virtio::block::Block>>, ControlError> {
        self.core
            .devices
            .disk(index)
            .ok_or(ControlError::NoSuchDevice {
                kind: "disk",
                index,
            })
    }

    /// Changes the I/O limits of disk `index` (0 is the first, `--rootfs` if given) and returns
    /// the limits now in force. The change is made on the device thread (or at once while the
    /// VM is paused); a throttled queue is re-evaluated under the new limits right away.
    pub fn update_disk_rate_limiter(
        &self,
        index: usize,
        update: RateLimiterUpdate,
    ) -> Result<RateLimiterConfig, ControlError> {
        let disk = self.disk(index)?;
        self.core
            .on_device_thread(move || VmCore::lock(&disk).update_rate_limiter(&update))?
            .map_err(ControlError::RateLimiter)
    }

    /// Replaces the file behind disk `index` with `path` on a running (or paused) VM, opened
    /// as the disk was (read-only or not). The file is opened here, on the caller's thread; the
    /// swap happens on the device thread between two requests, and the guest is told the new
    /// capacity through a configuration-change interrupt. Snapshots record the new path.
    pub fn update_disk_path(
        &self,
        index: usize,
        path: &std::path::Path,
    ) -> Result<(), ControlError> {
        let disk = self.disk(index)?;
        let (read_only, id) = {
            let block = VmCore::lock(&disk);
            (block.read_only(), block.configured_id().map(str::to_owned))
        };
        let new = devices::virtio::block::open_disk(path, read_only, id.as_deref())?;
        let path = path.to_path_buf();
        let old = self
            .core
            .on_device_thread(move || VmCore::lock(&disk).replace_disk(path, new))?;
        // The old file is closed here, not on the device thread.
        drop(old);
        Ok(())
    }

    /// Presses Ctrl+Alt+Del on the guest's i8042 keyboard (Firecracker's `SendCtrlAltDel`).
    /// What follows is the guest's choice: Linux reboots, which ends the VM (`GuestReboot`).
    pub fn send_ctrl_alt_del(&self) -> Result<(), ControlError> {
        if self.core.exit.get().is_some() {
            return Err(ControlError::Stopped);
        }
        self.core.devices.send_ctrl_alt_del()?;
        Ok(())
    }

    /// Changes the RX and TX limits of network device `index`; returns the limits now in force
    /// (RX, TX). As [`Self::update_disk_rate_limiter`].
    pub fn update_net_rate_limiters(
        &self,
        index: usize,
        rx: RateLimiterUpdate,
        tx: RateLimiterUpdate,
    ) -> Result<(RateLimiterConfig, RateLimiterConfig), ControlError> {
        let net = self
            .core
            .devices
            .net(index)
            .ok_or(ControlError::NoSuchDevice {
                kind: "network device",
                index,
            })?;
        self.core
            .on_device_thread(move || VmCore::lock(&net).update_rate_limiters(&rx, &tx))?
            .map_err(ControlError::RateLimiter)
    }

    /// Sets the balloon's target (MiB the guest should give back); the driver inflates or
    /// deflates towards it. At most the VM's memory.
    pub fn set_balloon_target(&self, target_mib: u32) -> Result<(), ControlError> {
        crate::device_manager::check_balloon_target(target_mib, self.core.mem_mib)
            .map_err(ControlError::Balloon)?;
        let balloon = self.core.devices.balloon().ok_or(ControlError::NoBalloon)?;
        let result = VmCore::lock(&balloon).set_target_mib(target_mib);
        result.map_err(|e| ControlError::Balloon(e.to_string()))
    }

    /// Changes how often the balloon asks the guest for statistics (a device created with
    /// statistics only).
    pub fn set_balloon_stats_interval(&self, seconds: u16) -> Result<(), ControlError> {
        let balloon = self.core.devices.balloon().ok_or(ControlError::NoBalloon)?;
        let result = VmCore::lock(&balloon).set_stats_interval(seconds);
        result.map_err(|e| ControlError::Balloon(e.to_string()))
    }

    /// The balloon's target, the guest's `actual`, its latest statistics and counters; None
    /// without a balloon device.
    pub fn balloon(&self) -> Option<BalloonStatus> {
        let balloon = self.core.devices.balloon()?;
        let status = VmCore::lock(&balloon).status();
        Some(status)
    }

    /// The seccomp level the VM's threads run at (`VmConfig::seccomp`); threads started to
    /// serve it (the control API's) use the same.
    pub fn seccomp_level(&self) -> crate::seccomp::SeccompLevel {
        self.core.seccomp
    }

    /// The VM's counters (docs/metrics.md): the control API serves them, a Firecracker
    /// metrics file flushes them.
    pub fn metrics(&self) -> &vmm_metrics::VmMetrics {
        &self.core.metrics
    }

    /// Why the VM ended, once it has: a reset after the guest printed a kernel panic is
    /// `GuestPanic` (the guest runs with `panic=-1`), as `Vm::wait` reports it.
    pub fn exit_reason(&self) -> Option<VmExit> {
        match self.core.exit.get()? {
            VmExit::GuestReboot if self.core.devices.console_panicked() => Some(VmExit::GuestPanic),
            reason => Some(reason),
        }
    }

    /// Where this VM reports its end (`ExitSink::on_exit` for a callback).
    pub fn exit_sink(&self) -> Arc<ExitSink> {
        self.core.exit.clone()
    }

    /// Ends the VM as failed (e.g. a thread serving it outside the core panicked).
    pub fn fail(&self, reason: String) {
        self.core.exit.report(VmExit::Failed(reason));
    }

    /// What the VM is and how it is doing, for the control API and embedders.
    pub fn status(&self) -> VmStatus {
        let core = &self.core;
        VmStatus {
            ended: core.exit.get().is_some(),
            run_state: core.run_state(),
            vcpus: core.vcpu_count,
            mem_mib: core.mem_mib,
            host: super::snapshot::host_info(core.host).kind,
            cmdline: core.cmdline.clone(),
            devices: core
                .devices
                .virtio()
                .into_iter()
                .map(|slot| VirtioStatus {
                    kind: slot.kind,
                    mmio_base: slot.mmio_base,
                    irq: slot.irq,
                })
                .collect(),
            uptime: core.started.elapsed(),
            agent: core.agent.current(),
        }
    }

    /// Test builds only: makes `thread` of this VM panic (see `crate::fault`); returns once the
    /// fault is on its way. The VM then ends with `VmExit::Failed`.
    #[cfg(any(test, feature = "fault-injection"))]
    pub fn inject_fault(&self, thread: crate::fault::FaultThread) -> Result<(), ControlError> {
        self.inject(thread, crate::fault::FaultKind::Panic)
    }

    /// Test builds only: makes `thread` of this VM panic or make a system call no seccomp
    /// allowlist has (see `crate::fault`). A panic is not offered for `Main`.
    #[cfg(any(test, feature = "fault-injection"))]
    pub fn inject(
        &self,
        thread: crate::fault::FaultThread,
        kind: crate::fault::FaultKind,
    ) -> Result<(), ControlError> {
        use crate::fault::{forbidden_syscall, inject_panic, FaultKind, FaultThread};
        use crate::hypervisor::vcpu::VcpuCommand;
        let fault: fn() = match kind {
            FaultKind::Panic => inject_panic,
            FaultKind::Syscall => forbidden_syscall,
        };
        let core = &self.core;
        match (thread, kind) {
            (FaultThread::Vcpu, _) => {
                let vcpus = VmCore::lock(&core.vcpus);
                let first = vcpus.first().ok_or(ControlError::VcpuGone(0))?;
                first.send(VcpuCommand::With(Box::new(move |_| fault())));
            }
            (FaultThread::Devices, _) => VmCore::lock(&core.event_loop).fire(fault)?,
            (FaultThread::Api, _) => fault(),
            (FaultThread::Teardown, FaultKind::Panic) => crate::fault::arm_teardown_fault(),
            (FaultThread::Teardown, FaultKind::Syscall) => crate::fault::arm_teardown_syscall(),
            (FaultThread::Main, FaultKind::Syscall) => crate::fault::arm_main_syscall(),
            (FaultThread::Main, FaultKind::Panic) => {
                return Err(ControlError::Unsupported(
                    "a panic cannot be injected on the main thread",
                ))
            }
        }
        Ok(())
    }
}
