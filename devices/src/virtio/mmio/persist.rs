//! The transport's saved state for snapshots and its `Persist` implementation. The state is
//! plain data: everything in it is untrusted on restore and validated by
//! `MmioTransport::restore`.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_queue::{Queue, QueueState, QueueT};

use super::{init_prefix_len, MmioError, MmioTransport, INIT_MASK};
use crate::persist::Persist;
use crate::virtio::{VirtioDevice, VirtioInterrupt};
use crate::GuestMemory;

/// The transport's registers and the driver's queue configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    /// The virtio status register (ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK, ...).
    pub status: u32,
    /// Features the driver acknowledged.
    pub acked_features: u64,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub queue_sel: u32,
    pub queues: Vec<SavedQueue>,
    pub interrupt_status: u32,
    pub config_generation: u32,
}

/// Mirror of `virtio_queue::QueueState`, which has no serde support.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedQueue {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<QueueState> for SavedQueue {
    fn from(q: QueueState) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<SavedQueue> for QueueState {
    fn from(q: SavedQueue) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// What a restored transport is built over: a fresh (never activated) device, guest memory, and
/// the interrupt of the device's slot.
pub struct MmioTransportArgs {
    pub device: Arc<Mutex<dyn VirtioDevice>>,
    pub mem: GuestMemory,
    pub interrupt: Arc<VirtioInterrupt>,
}

impl Persist for MmioTransport {
    type State = MmioTransportState;
    type ConstructorArgs = MmioTransportArgs;
    type Error = MmioError;

    /// Saved state for snapshots; call with the vCPUs and the event loop paused.
    fn save(&self) -> MmioTransportState {
        MmioTransportState {
            status: self.status(),
            acked_features: self.acked_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            queues: self
                .live_queue_states()
                .into_iter()
                .map(Into::into)
                .collect(),
            interrupt_status: self.interrupt.status(),
            config_generation: self.config_generation,
        }
    }

    /// Rebuilds a transport from `state` for a fresh (never activated) `device`. Everything is
    /// validated before anything changes: on error the device and `interrupt` are untouched. If
    /// the driver had finished initialisation the device is activated with the restored queues.
    fn restore(args: MmioTransportArgs, state: &MmioTransportState) -> Result<Self, MmioError> {
        let mut transport = MmioTransport::new(args.device, args.mem, args.interrupt)?;
        if state.queues.len() != transport.queues.len() {
            return Err(MmioError::QueueCount {
                saved: state.queues.len(),
                device: transport.queues.len(),
            });
        }
        let mut queues = Vec::with_capacity(state.queues.len());
        for (index, (saved, current)) in state.queues.iter().zip(&transport.queues).enumerate() {
            if saved.max_size != current.max_size() {
                return Err(MmioError::SavedQueueMaxSize {
                    index,
                    saved: saved.max_size,
                    device: current.max_size(),
                });
            }
            let queue =
                Queue::try_from(QueueState::from(*saved)).map_err(|e| MmioError::SavedQueue {
                    index,
                    reason: e.to_string(),
                })?;
            queues.push(queue);
        }
        // Until FEATURES_OK the driver may have written bits the device does not offer (the live
        // transport refuses them only at FEATURES_OK), so such a state must restore too.
        let features_accepted = state.status & VIRTIO_CONFIG_S_FEATURES_OK != 0;
        if features_accepted && state.acked_features & !transport.device_features != 0 {
            return Err(MmioError::SavedFeatures {
                acked: state.acked_features,
                offered: transport.device_features,
            });
        }
        let progress = state.status & INIT_MASK;
        let valid_status_bits = INIT_MASK | VIRTIO_CONFIG_S_FAILED | VIRTIO_CONFIG_S_NEEDS_RESET;
        if state.status & !valid_status_bits != 0 || init_prefix_len(progress).is_none() {
            return Err(MmioError::SavedStatus(state.status));
        }
        let activate = progress & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && state.status & (VIRTIO_CONFIG_S_NEEDS_RESET | VIRTIO_CONFIG_S_FAILED) == 0;
        if activate {
            for (index, q) in queues.iter().enumerate() {
                if !q.is_valid(&transport.mem) {
                    return Err(MmioError::SavedQueue {
                        index,
                        reason: "not ready or outside guest memory".into(),
                    });
                }
            }
        }

        transport.queues = queues;
        transport.status = state.status;
        transport.acked_features = state.acked_features;
        transport.device_features_sel = state.device_features_sel;
        transport.driver_features_sel = state.driver_features_sel;
        transport.queue_sel = state.queue_sel;
        transport.config_generation = state.config_generation;
        if activate {
            transport.activate_device().map_err(MmioError::Activate)?;
        }
        transport.interrupt.set_status(state.interrupt_status);
        Ok(transport)
    }
}
