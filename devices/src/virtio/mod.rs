//! The contract between the virtio-mmio transport and each virtio device model.
//!
//! Threading: the transport runs on vCPU threads (MMIO exits); device queue processing runs on
//! the VMM event-loop thread (event-manager). Both hold the same `Arc<Mutex<Device>>`: the
//! transport to negotiate features, read config and activate/reset; the event loop to process
//! queue and backend events. Activation (on DRIVER_OK, vCPU thread) hands the device its queues
//! and queue eventfds and then writes the device's `activate_event`, so the device registers the
//! queue eventfds from the event-loop thread (in `process`), never from the vCPU thread.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use event_manager::MutEventSubscriber;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::interrupt::SharedInterruptLine;
use crate::GuestMemory;

pub mod balloon;
pub mod block;
pub mod device_events;
pub mod guest_buffers;
pub mod mmio;
pub mod net;
pub mod queue_check;
pub mod vsock;

/// Interrupt status bits of the virtio-mmio InterruptStatus register.
pub const VIRTIO_MMIO_INT_VRING: u32 = 0x01;
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 0x02;

/// The device side of the transport's interrupt: sets InterruptStatus bits, then raises the line.
/// The driver clears bits through InterruptACK. It also carries the device's DEVICE_NEEDS_RESET
/// flag to the transport (both hold it), which shows it in the Status register until a reset.
pub struct VirtioInterrupt {
    status: AtomicU32,
    needs_reset: AtomicBool,
    line: SharedInterruptLine,
}

impl VirtioInterrupt {
    pub fn new(line: SharedInterruptLine) -> Self {
        Self {
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            line,
        }
    }

    pub fn signal_used_queue(&self) -> std::io::Result<()> {
        self.signal(VIRTIO_MMIO_INT_VRING)
    }

    pub fn signal_config_change(&self) -> std::io::Result<()> {
        self.signal(VIRTIO_MMIO_INT_CONFIG)
    }

    /// The device found its rings broken (see `queue_check`): Status shows DEVICE_NEEDS_RESET
    /// from now until the driver resets the device, and the driver gets a configuration change
    /// notification (virtio 1.2, 2.1.2). The device must stop processing until reset.
    pub fn signal_needs_reset(&self) -> std::io::Result<()> {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.signal_config_change()
    }

    /// True from `signal_needs_reset` until the transport resets the device.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// The transport's reset: the device starts over with working rings.
    pub fn clear_needs_reset(&self) {
        self.needs_reset.store(false, Ordering::SeqCst);
    }

    /// Sets DEVICE_NEEDS_RESET after a queue fault the device cannot process past, and logs it
    /// (once: the device stops processing until the driver resets it).
    pub fn queue_fault(&self, device: &str, queue: usize, fault: &virtio_queue::Error) {
        if self.needs_reset() {
            return;
        }
        tracing::warn!("{device}: queue {queue} is broken ({fault}); device needs reset");
        if let Err(e) = self.signal_needs_reset() {
            tracing::error!("{device}: signalling needs-reset: {e}");
        }
    }

    fn signal(&self, bit: u32) -> std::io::Result<()> {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.line.trigger()
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Snapshot restore: the status register is part of the transport's saved state.
    pub fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }
}

/// Everything a device needs to start processing, handed over on DRIVER_OK.
pub struct ActivationContext {
    pub mem: GuestMemory,
    /// Features the driver acknowledged (a subset of `device_features`).
    pub acked_features: u64,
    /// One per queue, in queue-index order, already validated by the transport (`is_valid`).
    pub queues: Vec<Queue>,
    /// One per queue: clones of the eventfds the VMM registered as ioeventfds on QueueNotify.
    pub queue_events: Vec<EventFd>,
    pub interrupt: Arc<VirtioInterrupt>,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("device expects {expected} queues, driver configured {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("device is already active")]
    AlreadyActive,
    #[error("device backend failed to start: {0}")]
    Backend(String),
    #[error("activation event write failed: {0}")]
    Event(#[from] std::io::Error),
}

/// A virtio device model. All methods that take guest input must tolerate any value.
pub trait VirtioDevice: MutEventSubscriber + Send {
    /// VIRTIO_ID_* (2 = block, 1 = net, 19 = vsock).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers (VIRTIO_F_VERSION_1 included by the device).
    fn device_features(&self) -> u64;
    /// Reads from device config space; bytes past the end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes to device config space; most devices ignore them.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts the device (see the module docs for the threading contract).
    fn activate(&mut self, ctx: ActivationContext) -> Result<(), ActivateError>;
    /// Driver-initiated reset (status written as 0): stop processing, release queues and
    /// per-activation resources, and return to the pre-activation state.
    fn reset(&mut self);
    fn is_active(&self) -> bool;
    /// Live state of the queues while active, in queue-index order, for snapshots: the device
    /// owns the queues after activation. The default (empty) makes the transport derive ring
    /// positions from the used ring, which is right only for devices that complete every chain
    /// they pop before returning to the event loop.
    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        Vec::new()
    }
}
