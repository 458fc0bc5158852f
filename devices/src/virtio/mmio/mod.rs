//! virtio-mmio transport, modern interface (version 2) only.
//!
//! One `MmioTransport` per device, mapped on the MMIO bus over a `MMIO_WINDOW_SIZE` window. It
//! owns the register state (status, feature negotiation, queue configuration) and, on DRIVER_OK,
//! hands the device its queues through `VirtioDevice::activate`.
//!
//! VMM wiring for a device at `base` with interrupt `gsi`:
//! 1. `MmioTransport::new(device, mem, interrupt)` where `interrupt` wraps the GSI's irqfd;
//! 2. for each `(i, evt)` in `queue_events().iter().enumerate()`, register `evt` as a KVM
//!    ioeventfd on MMIO address `base + QUEUE_NOTIFY_OFFSET`, 4 bytes, datamatch `i as u32`;
//! 3. insert the transport in the MMIO bus at `base`, length `MMIO_WINDOW_SIZE`;
//! 4. add `kernel_cmdline_entry(base, gsi)` to the kernel command line;
//! 5. add the device (the same `Arc<Mutex<..>>`) to the event manager.

mod persist;
mod registers;

pub use persist::{MmioTransportArgs, MmioTransportState, SavedQueue};

use std::sync::{Arc, Mutex, MutexGuard};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::BusDevice;
use crate::virtio::{ActivateError, ActivationContext, VirtioDevice, VirtioInterrupt};
use crate::GuestMemory;
use registers as reg;

/// Size of the MMIO window of one virtio-mmio device.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of QueueNotify inside the window: where the VMM puts the queue ioeventfds.
pub const QUEUE_NOTIFY_OFFSET: u64 = reg::QUEUE_NOTIFY;

const MMIO_MAGIC: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
/// Reported VendorID; Linux ignores it. Arbitrary, but stable across snapshots.
const VENDOR_ID: u32 = 0x4d52_4f44; // "DORM"

/// Status bits the driver sets one after the other during initialisation.
const INIT_STEPS: [u32; 4] = [
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_DRIVER_OK,
];
const INIT_MASK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE
    | VIRTIO_CONFIG_S_DRIVER
    | VIRTIO_CONFIG_S_FEATURES_OK
    | VIRTIO_CONFIG_S_DRIVER_OK;

/// The `virtio_mmio.device=` kernel parameter announcing a device at `base` with `irq`.
pub fn kernel_cmdline_entry(base: u64, irq: u32) -> String {
    format!("virtio_mmio.device=4K@{base:#x}:{irq}")
}

#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error("device queue {index} has invalid max size {max_size}")]
    QueueMaxSize { index: usize, max_size: u16 },
    #[error("creating queue notification eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("saved state has {saved} queues, device has {device}")]
    QueueCount { saved: usize, device: usize },
    #[error("saved queue {index}: max size {saved} differs from the device's {device}")]
    SavedQueueMaxSize {
        index: usize,
        saved: u16,
        device: u16,
    },
    #[error("saved queue {index} is invalid: {reason}")]
    SavedQueue { index: usize, reason: String },
    #[error("saved status {0:#x} is not a status the driver can reach")]
    SavedStatus(u32),
    #[error(
        "saved acked features {acked:#x} include bits the device does not offer ({offered:#x})"
    )]
    SavedFeatures { acked: u64, offered: u64 },
    #[error("re-activating the restored device: {0}")]
    Activate(#[source] ActivateError),
}

pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemory,
    interrupt: Arc<VirtioInterrupt>,
    device_type: u32,
    device_features: u64,
    /// The driver's queue configuration. After activation the device owns working copies.
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    status: u32,
    acked_features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    queue_sel: u32,
    config_generation: u32,
}

impl MmioTransport {
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemory,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<Self, MmioError> {
        let (device_type, device_features, max_sizes) = {
            let dev = lock(&device);
            (
                dev.device_type(),
                dev.device_features(),
                dev.queue_max_sizes().to_vec(),
            )
        };
        let queues = max_sizes
            .iter()
            .enumerate()
            .map(|(index, &max_size)| {
                Queue::new(max_size).map_err(|_| MmioError::QueueMaxSize { index, max_size })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let queue_events = new_queue_events(queues.len())?;
        Ok(Self {
            device,
            mem,
            interrupt,
            device_type,
            device_features,
            queues,
            queue_events,
            status: 0,
            acked_features: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            config_generation: 0,
        })
    }

    /// One eventfd per queue, in queue-index order. Register each with KVM as an ioeventfd on
    /// `base + QUEUE_NOTIFY_OFFSET` with datamatch = its index.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// The virtio status register (for diagnostics and tests), with DEVICE_NEEDS_RESET when the
    /// device found its rings broken.
    pub fn status(&self) -> u32 {
        if self.interrupt.needs_reset() {
            self.status | VIRTIO_CONFIG_S_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// The driver configured a queue the device cannot use (virtio 1.2, 2.1.2: an error state
    /// that needs a reset). Before DRIVER_OK no notification is owed; the bit refuses DRIVER_OK.
    fn enter_needs_reset(&mut self, why: &str) {
        if self.status & VIRTIO_CONFIG_S_NEEDS_RESET != 0 {
            // Once per reset: a guest repeating the mistake must not flood the log.
            tracing::debug!("virtio-mmio: {why}");
            return;
        }
        tracing::warn!(
            "virtio-mmio: device type {} needs reset: {why}",
            self.device_type
        );
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        if self.driver_ok() {
            if let Err(e) = self.interrupt.signal_config_change() {
                tracing::error!("virtio-mmio: signalling needs-reset: {e}");
            }
        }
    }

    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Signals a device configuration change to the driver (bumps ConfigGeneration).
    pub fn notify_config_change(&mut self) -> std::io::Result<()> {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt.signal_config_change()
    }

    fn live_queue_states(&self) -> Vec<QueueState> {
        let configured: Vec<QueueState> = self.queues.iter().map(Queue::state).collect();
        if !self.driver_ok() {
            return configured;
        }
        let from_device = {
            let dev = lock(&self.device);
            if dev.is_active() {
                dev.queue_states()
            } else {
                Vec::new()
            }
        };
        if from_device.len() == configured.len() {
            return from_device;
        }
        // A device that needs a reset (or failed) processes nothing more, and a restored one is
        // not even activated: the indices it was configured or restored with stand. Guessing
        // from the guest's used ring would make save → restore → save disagree (the guest can
        // write anything there), and the driver must reset the device anyway.
        if self.status & (VIRTIO_CONFIG_S_NEEDS_RESET | VIRTIO_CONFIG_S_FAILED) != 0 {
            return configured;
        }
        // The device completes every chain it pops, so the used index is also how far it read.
        configured
            .into_iter()
            .map(|mut q| {
                if let Some(used_idx) = q
                    .used_ring
                    .checked_add(2)
                    .and_then(|a| self.mem.read_obj::<u16>(GuestAddress(a)).ok())
                {
                    q.next_used = u16::from_le(used_idx);
                    q.next_avail = q.next_used;
                }
                q
            })
            .collect()
    }

    fn driver_ok(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
    }

    fn selected_queue(&self) -> Option<&Queue> {
        usize::try_from(self.queue_sel)
            .ok()
            .and_then(|i| self.queues.get(i))
    }

    /// The selected queue, if the driver may configure queues now: after FEATURES_OK, before
    /// DRIVER_OK, and while the queue is not live.
    fn configurable_queue(&mut self) -> Option<&mut Queue> {
        let phase_ok = self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.status & (VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FAILED) == 0;
        if !phase_ok {
            tracing::debug!("virtio-mmio: queue configured in status {:#x}", self.status);
            return None;
        }
        let index = usize::try_from(self.queue_sel).ok()?;
        self.queues.get_mut(index)
    }

    fn read_register(&self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC_VALUE => MMIO_MAGIC,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device_type,
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status(),
            reg::CONFIG_GENERATION => self.config_generation,
            // No shared memory regions: their length (and base) read as all ones.
            reg::SHM_LEN_LOW..=reg::SHM_BASE_HIGH => u32::MAX,
            _ => {
                tracing::debug!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES => self.write_driver_features(value),
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM => {
                let Some(q) = self.configurable_queue() else {
                    return;
                };
                // 0, not a power of two, or above QueueNumMax: the driver broke the rules
                // (virtio 1.2, 4.2.2.2) and the queue cannot be used as it believes.
                let max = q.max_size();
                match u16::try_from(value).map(|size| q.try_set_size(size)) {
                    Ok(Ok(())) => {}
                    _ => self.enter_needs_reset(&format!(
                        "queue {} size {value} (max {max}, a power of two)",
                        self.queue_sel
                    )),
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.configurable_queue() {
                    q.set_ready(value == 1);
                }
            }
            reg::QUEUE_NOTIFY => self.notify_queue(value),
            reg::INTERRUPT_ACK => self.interrupt.ack(value),
            reg::STATUS => self.write_status(value),
            reg::QUEUE_DESC_LOW => {
                self.set_queue_addr(|q| q.set_desc_table_address(Some(value), None))
            }
            reg::QUEUE_DESC_HIGH => {
                self.set_queue_addr(|q| q.set_desc_table_address(None, Some(value)))
            }
            reg::QUEUE_DRIVER_LOW => {
                self.set_queue_addr(|q| q.set_avail_ring_address(Some(value), None))
            }
            reg::QUEUE_DRIVER_HIGH => {
                self.set_queue_addr(|q| q.set_avail_ring_address(None, Some(value)))
            }
            reg::QUEUE_DEVICE_LOW => {
                self.set_queue_addr(|q| q.set_used_ring_address(Some(value), None))
            }
            reg::QUEUE_DEVICE_HIGH => {
                self.set_queue_addr(|q| q.set_used_ring_address(None, Some(value)))
            }
            _ => tracing::debug!("virtio-mmio: write of unknown register {offset:#x}"),
        }
    }

    fn set_queue_addr(&mut self, set: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.configurable_queue() {
            // The spec forbids moving a queue the driver marked ready.
            if !q.ready() {
                set(q);
            }
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        // Features may only change between DRIVER and FEATURES_OK.
        let progress = self.status & INIT_MASK;
        if progress != VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER {
            tracing::debug!("virtio-mmio: feature write in status {:#x}", self.status);
            return;
        }
        let (shift, keep) = match self.driver_features_sel {
            0 => (0, 0xffff_ffff_0000_0000u64),
            1 => (32, 0x0000_0000_ffff_ffffu64),
            _ => return,
        };
        self.acked_features = (self.acked_features & keep) | (u64::from(value) << shift);
    }

    /// A notification that did not go through an ioeventfd (none registered, or a size the
    /// ioeventfd did not match): forward it to the queue's eventfd so the device sees it.
    fn notify_queue(&self, value: u32) {
        // With VIRTIO_F_NOTIFICATION_DATA (never offered) the high bits carry extra data.
        let index = (value & 0xffff) as usize;
        match self.queue_events.get(index) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    tracing::error!("virtio-mmio: forwarding queue {index} notification: {e}");
                }
            }
            None => tracing::debug!("virtio-mmio: notify of unknown queue {index}"),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if value & VIRTIO_CONFIG_S_FAILED != 0 {
            // The driver gave up on the device; it will reset it if it wants to retry.
            self.status |= VIRTIO_CONFIG_S_FAILED;
            return;
        }
        let current = self.status & INIT_MASK;
        let requested = value & INIT_MASK;
        // Bits are only ever added (reset is the only way back), one initialisation step at a
        // time, in order; anything else is ignored and the driver sees the status unchanged.
        let (Some(done), Some(wanted)) = (init_prefix_len(current), init_prefix_len(requested))
        else {
            tracing::debug!("virtio-mmio: invalid status {value:#x}");
            return;
        };
        if requested & current != current || wanted <= done {
            tracing::debug!("virtio-mmio: status {value:#x} after {:#x}", self.status);
            return;
        }
        for &step in INIT_STEPS.iter().take(wanted).skip(done) {
            if !self.apply_init_step(step) {
                return;
            }
        }
    }

    /// Performs the side effects of setting status bit `step`. Returns false if refused.
    fn apply_init_step(&mut self, step: u32) -> bool {
        if self.status() & VIRTIO_CONFIG_S_NEEDS_RESET != 0 {
            return false;
        }
        match step {
            VIRTIO_CONFIG_S_FEATURES_OK => {
                let unoffered = self.acked_features & !self.device_features;
                let modern = self.acked_features & (1 << VIRTIO_F_VERSION_1) != 0;
                if unoffered != 0 || !modern {
                    tracing::warn!(
                        "virtio-mmio: refusing FEATURES_OK for features {:#x} (offered {:#x})",
                        self.acked_features,
                        self.device_features
                    );
                    return false;
                }
            }
            VIRTIO_CONFIG_S_DRIVER_OK => {
                if let Err(e) = self.activate_device() {
                    tracing::error!(
                        "virtio-mmio: activating device type {}: {e}",
                        self.device_type
                    );
                    self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
                    if let Err(e) = self.interrupt.signal_config_change() {
                        tracing::error!("virtio-mmio: signalling needs-reset: {e}");
                    }
                    return false;
                }
            }
            _ => {}
        }
        self.status |= step;
        true
    }

    fn activate_device(&mut self) -> Result<(), ActivateError> {
        let event_idx = self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (index, q) in self.queues.iter_mut().enumerate() {
            if !q.is_valid(&self.mem) {
                return Err(ActivateError::Backend(format!(
                    "queue {index} is not ready or not inside guest memory"
                )));
            }
            q.set_event_idx(event_idx);
            let copy = Queue::try_from(q.state())
                .map_err(|e| ActivateError::Backend(format!("queue {index}: {e}")))?;
            queues.push(copy);
        }
        let queue_events = self
            .queue_events
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()?;
        let ctx = ActivationContext {
            mem: self.mem.clone(),
            acked_features: self.acked_features,
            queues,
            queue_events,
            interrupt: self.interrupt.clone(),
        };
        lock(&self.device).activate(ctx)
    }

    fn reset(&mut self) {
        {
            let mut dev = lock(&self.device);
            if dev.is_active() {
                dev.reset();
            }
        }
        for q in &mut self.queues {
            q.reset();
        }
        // Drop notifications meant for the old rings; an empty counter reads as WouldBlock.
        for evt in &self.queue_events {
            let _ = evt.read();
        }
        self.interrupt.set_status(0);
        // After the device's reset: it no longer processes, so it cannot set the flag again.
        self.interrupt.clear_needs_reset();
        self.status = 0;
        self.acked_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG_SPACE {
            lock(&self.device).read_config(offset - reg::CONFIG_SPACE, data);
            return;
        }
        match <&mut [u8; 4]>::try_from(&mut *data) {
            Ok(word) => *word = self.read_register(offset).to_le_bytes(),
            Err(_) => {
                tracing::debug!("virtio-mmio: {}-byte read at {offset:#x}", data.len());
                data.fill(0);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG_SPACE {
            lock(&self.device).write_config(offset - reg::CONFIG_SPACE, data);
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(word) => self.write_register(offset, u32::from_le_bytes(word)),
            Err(_) => tracing::debug!("virtio-mmio: {}-byte write at {offset:#x}", data.len()),
        }
    }
}

/// How many initialisation steps `bits` represents, if it is a prefix of `INIT_STEPS`.
fn init_prefix_len(bits: u32) -> Option<usize> {
    let mut acc = 0;
    if bits == 0 {
        return Some(0);
    }
    for (i, step) in INIT_STEPS.iter().enumerate() {
        acc |= step;
        if acc == bits {
            return Some(i + 1);
        }
    }
    None
}

fn new_queue_events(count: usize) -> Result<Vec<EventFd>, MmioError> {
    (0..count)
        .map(|_| EventFd::new(EFD_NONBLOCK).map_err(MmioError::EventFd))
        .collect()
}

/// A poisoned lock means a device thread panicked; keep serving the guest rather than cascade.
fn lock(device: &Arc<Mutex<dyn VirtioDevice>>) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests;
