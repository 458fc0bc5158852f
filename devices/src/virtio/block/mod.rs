//! virtio-blk backed by a raw image file.
//!
//! `request` parses and executes one descriptor chain (pure: guest memory + chain + file),
//! `handler` drains a queue, `io` does the vectored file I/O, and this module is the glue with
//! the transport (`VirtioDevice`) and the event loop (`MutEventSubscriber`).
//!
//! An optional rate limiter (`crate::rate_limiter`) meters requests: while it is blocked the
//! queue is left alone (its notifications are consumed, not acted on) and the limiter's timerfd,
//! registered beside the queue eventfd, resumes processing.

mod config;
mod handler;
mod io;
mod persist;
mod request;
mod swap;

pub use handler::{process_queue, process_queue_limited, QueueRun};
pub use persist::{BlockConstructorArgs, BlockState};
pub use request::{
    data_len, process_request, process_request_counted, Completion, Disk, SECTOR_SIZE,
};
pub use swap::open_disk;

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueState};
use vmm_metrics::BlockMetrics;
use vmm_sys_util::epoll::EventSet;

use crate::rate_limiter::{RateLimiter, RateLimiterConfig, RateLimiterError, RateLimiterUpdate};
use crate::virtio::device_events::{DeviceEvents, ACTIVATE_TOKEN, DEVICE_TOKEN_BASE};
use crate::virtio::{ActivateError, ActivationContext, VirtioDevice, VirtioInterrupt};
use crate::GuestMemory;

/// Size of the single request queue.
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 1] = [QUEUE_SIZE];
/// `Events` data of the rate limiter's timerfd.
const LIMITER_TOKEN: u32 = DEVICE_TOKEN_BASE;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    pub path: PathBuf,
    pub read_only: bool,
    /// Serial reported to the guest (at most 20 bytes); derived from the file if None.
    pub id: Option<String>,
    /// I/O limits (the default limits nothing).
    pub rate_limiter: RateLimiterConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("opening disk image {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading metadata of disk image {path}: {source}")]
    Metadata {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk id {0:?} is longer than 20 bytes")]
    IdTooLong(String),
    #[error("creating virtio-blk eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("virtio-blk rate limiter: {0}")]
    RateLimiter(#[from] RateLimiterError),
}

struct Active {
    mem: GuestMemory,
    queue: Queue,
    interrupt: Arc<VirtioInterrupt>,
}

pub struct Block {
    /// What the device was built from (the saved state); a device built `from_disk` has no path.
    config: BlockConfig,
    disk: Disk,
    features: u64,
    config_space: Vec<u8>,
    events: DeviceEvents,
    active: Option<Active>,
    limiter: RateLimiter,
    metrics: Option<BlockMetrics>,
}

impl Block {
    pub fn new(config: BlockConfig) -> Result<Self, BlockError> {
        let disk = open_disk(&config.path, config.read_only, config.id.as_deref())?;
        Self::build(disk, config)
    }

    /// A device over an already-open disk (tests and benchmarks use temporary files). It has no
    /// path, so its saved state cannot be restored (restore opens the saved path).
    pub fn from_disk(disk: Disk) -> Result<Self, BlockError> {
        let config = BlockConfig {
            path: PathBuf::new(),
            read_only: disk.read_only,
            id: None,
            rate_limiter: RateLimiterConfig::default(),
        };
        Self::build(disk, config)
    }

    fn build(disk: Disk, config: BlockConfig) -> Result<Self, BlockError> {
        let mut features = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_FLUSH);
        if disk.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            features |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        let config_space = config::config_space(disk.capacity_sectors, QUEUE_SIZE);
        let limiter = RateLimiter::new(&config.rate_limiter)?;
        Ok(Self {
            config,
            disk,
            features,
            config_space,
            events: DeviceEvents::new().map_err(BlockError::EventFd)?,
            active: None,
            limiter,
            metrics: None,
        })
    }

    /// Counts this device's requests in `metrics` from now on (the device manager hands each
    /// device its handle right after building it).
    pub fn set_metrics(&mut self, metrics: BlockMetrics) {
        self.metrics = Some(metrics);
    }

    /// Changes the rate limiter (on the event-loop thread, or with the loop parked); returns
    /// the configuration now in force. A throttled queue is re-evaluated at once.
    pub fn update_rate_limiter(
        &mut self,
        update: &RateLimiterUpdate,
    ) -> Result<RateLimiterConfig, RateLimiterError> {
        self.limiter.update(update)?;
        self.config.rate_limiter = self.limiter.config();
        Ok(self.config.rate_limiter)
    }

    pub fn rate_limiter(&self) -> &RateLimiter {
        &self.limiter
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.disk.capacity_sectors
    }

    fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        // A broken ring stays unprocessed until the driver resets the device.
        if active.interrupt.needs_reset() {
            return;
        }
        // An unlimited device takes exactly the path it took before limiters existed.
        let limiter = self.limiter.is_enabled().then_some(&mut self.limiter);
        match process_queue_limited(
            &mut active.queue,
            &active.mem,
            &self.disk,
            limiter,
            self.metrics.as_ref(),
        ) {
            Ok(run) if run.notify => {
                if let Err(e) = active.interrupt.signal_used_queue() {
                    tracing::error!("virtio-blk: raising interrupt: {e}");
                }
            }
            Ok(_) => {}
            Err(e) => {
                // Chains completed before the fault are in the used ring: tell the driver.
                if let Err(e) = active.interrupt.signal_used_queue() {
                    tracing::error!("virtio-blk: raising interrupt: {e}");
                }
                active.interrupt.queue_fault("virtio-blk", 0, &e);
            }
        }
    }
}

fn encode_id(id: &str) -> Result<[u8; VIRTIO_BLK_ID_BYTES as usize], BlockError> {
    if id.len() > VIRTIO_BLK_ID_BYTES as usize {
        return Err(BlockError::IdTooLong(id.to_string()));
    }
    Ok(encode_id_truncated(id))
}

fn encode_id_truncated(id: &str) -> [u8; VIRTIO_BLK_ID_BYTES as usize] {
    let mut out = [0u8; VIRTIO_BLK_ID_BYTES as usize];
    for (dst, src) in out.iter_mut().zip(id.bytes()) {
        *dst = src;
    }
    out
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        config::read(&self.config_space, offset, data);
    }

    fn activate(&mut self, ctx: ActivationContext) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let got = ctx.queues.len();
        let Some(queue) = ctx.queues.into_iter().next().filter(|_| got == 1) else {
            return Err(ActivateError::QueueCount { expected: 1, got });
        };
        self.events.activate(ctx.queue_events)?;
        self.active = Some(Active {
            mem: ctx.mem,
            queue,
            interrupt: ctx.interrupt,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.events.reset();
    }

    fn is_active(&self) -> bool {
        self.active.is_some()
    }

    fn queue_states(&self) -> Vec<QueueState> {
        self.active
            .as_ref()
            .map(|a| vec![a.queue.state()])
            .unwrap_or_default()
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        self.events.init(ops);
        let timer = Events::with_data(&self.limiter, LIMITER_TOKEN, EventSet::IN);
        if let Err(e) = ops.add(timer) {
            tracing::error!("virtio-blk: registering the rate limiter's timer: {e}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let token = events.data();
        if token == ACTIVATE_TOKEN {
            // Newly registered queue: the driver may have queued requests before we listened.
            if self.events.sync(ops) {
                self.process_queue();
            }
        } else if DeviceEvents::is_queue_token(token) {
            // A throttled queue waits for the limiter's timer, however often the driver kicks.
            if self.events.take_queue_event(events.fd()).is_some() && !self.limiter.is_blocked() {
                self.process_queue();
            }
        } else if token == LIMITER_TOKEN {
            self.limiter.event_handler();
            self.process_queue();
        } else {
            tracing::warn!("virtio-blk: unexpected event token {token}");
        }
    }
}

#[cfg(test)]
mod tests;

/// Used by `Disk` users that do not go through `Block::new`.
pub fn disk_from_file(file: File, read_only: bool, id: &str) -> std::io::Result<Disk> {
    let len = file.metadata()?.len();
    Ok(Disk {
        file,
        capacity_sectors: len / SECTOR_SIZE,
        read_only,
        id: encode_id_truncated(id),
    })
}
