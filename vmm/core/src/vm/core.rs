//! The shared heart of a running VM ([`VmCore`]): its vCPU threads, device loop and devices, and
//! the pause/resume protocol every controller goes through. Its snapshot half is in `snapshot`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::device_manager::Devices;
use crate::event_loop::EventLoop;
use crate::exit::{ExitSink, VmExit};
use crate::host::HostKind;
use crate::hypervisor::vcpu::{VcpuCommand, VcpuHandle};
use devices::GuestMemory;

use super::error::{ControlError, RunState};

/// Everything a running VM is made of, shared by its owner and its controllers.
pub(crate) struct VmCore {
    pub(super) host: HostKind,
    pub(super) cmdline: String,
    pub(super) vcpu_count: u8,
    pub(super) mem_mib: u64,
    /// A lazy restore's memory server; declared before `memory` so it stops first.
    pub(super) lazy_memory: Option<snapshot::LazyMemory>,
    pub(super) memory: GuestMemory,
    pub(super) exit: Arc<ExitSink>,
    pub(super) devices: Devices,
    pub(super) kvm_vm: crate::hypervisor::Vm,
    pub(super) started: std::time::Instant,
    /// The guest agent's readiness announcements (vsock port 1023).
    pub(super) agent: crate::agent_ready::AgentReadiness,
    /// MSRs this host lets us read back, saved in every snapshot.
    pub(super) msr_indices: Mutex<MsrList>,
    /// Whether KVM logs guest writes (needed for diff snapshots). Switched on at the first
    /// snapshot when the VM started without it: registering a logged slot costs milliseconds.
    pub(super) dirty_log: std::sync::atomic::AtomicBool,
    pub(super) kernel_id: String,
    pub(super) lineage: Mutex<Lineage>,
    pub(super) vcpus: Mutex<Vec<VcpuHandle>>,
    pub(super) event_loop: Mutex<EventLoop>,
    pub(super) run_state: Mutex<RunState>,
    /// The seccomp level of this VM's threads (and of the API server that serves it).
    pub(super) seccomp: crate::seccomp::SeccompLevel,
    /// The VM's counters (docs/metrics.md).
    pub(super) metrics: vmm_metrics::VmMetrics,
    /// A VM shell's RAM reservation, which owns `memory`'s mappings. Declared last, so it drops
    /// after every field that holds a copy of the memory (it unmaps once none is left). Only
    /// held for its drop.
    #[allow(dead_code)]
    pub(super) reserved_ram: Option<crate::reserved_ram::ReservedRam>,
}

impl VmCore {
    pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn run_state(&self) -> RunState {
        *Self::lock(&self.run_state)
    }

    /// Kicks every vCPU out of KVM_RUN and parks it, then parks the device loop (devices finish
    /// the event they are in, so no request is in flight afterwards).
    pub fn pause(&self) -> Result<(), ControlError> {
        let mut state = Self::lock(&self.run_state);
        if self.exit.get().is_some() {
            return Err(ControlError::Stopped);
        }
        if *state == RunState::Paused {
            return Err(ControlError::AlreadyPaused);
        }
        let vcpus = Self::lock(&self.vcpus);
        let acks: Vec<_> = vcpus
            .iter()
            .map(|v| {
                let (tx, rx) = std::sync::mpsc::channel();
                v.send(VcpuCommand::Pause(tx));
                (v.index, rx)
            })
            .collect();
        for (index, rx) in acks {
            rx.recv().map_err(|_| ControlError::VcpuGone(index))?;
        }
        Self::lock(&self.event_loop).park()?;
        *state = RunState::Paused;
        Ok(())
    }

    pub fn resume(&self) -> Result<(), ControlError> {
        let mut state = Self::lock(&self.run_state);
        if *state != RunState::Paused {
            return Err(ControlError::NotPaused);
        }
        Self::lock(&self.event_loop).unpark();
        for v in Self::lock(&self.vcpus).iter() {
            v.send(VcpuCommand::Resume);
        }
        *state = RunState::Running;
        Ok(())
    }

    /// Runs `f` where device state may be changed: on the device thread while the VM runs
    /// (through the event loop's remote endpoint), or here while it is paused (the loop is
    /// parked between events then, so no device is in use and none can be until resume).
    pub fn on_device_thread<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, ControlError> {
        let state = Self::lock(&self.run_state);
        if self.exit.get().is_some() {
            return Err(ControlError::Stopped);
        }
        if *state == RunState::Paused {
            return Ok(f());
        }
        Ok(Self::lock(&self.event_loop).call(move |_| f())?)
    }

    /// Runs `f` on vCPU `index`'s thread (it must be paused) and returns its result.
    pub fn with_vcpu<R: Send + 'static>(
        &self,
        index: u8,
        f: impl FnOnce(&mut kvm_ioctls::VcpuFd) -> R + Send + 'static,
    ) -> Result<R, ControlError> {
        let vcpus = Self::lock(&self.vcpus);
        let v = vcpus
            .iter()
            .find(|v| v.index == index)
            .ok_or(ControlError::VcpuGone(index))?;
        let (tx, rx) = std::sync::mpsc::channel();
        v.send(VcpuCommand::With(Box::new(move |fd| {
            let _ = tx.send(f(fd));
        })));
        rx.recv().map_err(|_| ControlError::VcpuGone(index))
    }

    pub(super) fn teardown(&self) {
        self.exit.report(VmExit::HostShutdown);
        let mut vcpus = Self::lock(&self.vcpus);
        for v in vcpus.iter() {
            v.send(VcpuCommand::Stop);
        }
        for v in vcpus.iter_mut() {
            v.join();
        }
        vcpus.clear();
        Self::lock(&self.event_loop).stop();
    }
}

/// The MSRs a snapshot saves: known (from the snapshot a VM was restored from) or to be probed
/// on first use.
pub enum MsrList {
    Known(Vec<u32>),
    Probe(kvm_ioctls::Kvm),
}

impl MsrList {
    pub fn get(&mut self) -> Result<Vec<u32>, crate::hypervisor::state::StateError> {
        if let MsrList::Probe(kvm) = self {
            let list = crate::hypervisor::state::supported_msr_indices(kvm)?;
            *self = MsrList::Known(list);
        }
        match self {
            MsrList::Known(list) => Ok(list.clone()),
            MsrList::Probe(_) => Ok(Vec::new()),
        }
    }
}

/// Where a VM's memory came from: it decides how a full snapshot picks pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryOrigin {
    Booted,
    Restored(PathBuf),
    /// Restored lazily from a snapshot store: no local memory file, no parent for diffs.
    Fetched,
}

/// Snapshot bookkeeping of one VM.
#[derive(Debug)]
pub(crate) struct Lineage {
    pub origin: MemoryOrigin,
    pub last_snapshot: Option<PathBuf>,
}
