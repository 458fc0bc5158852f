//! virtio-balloon (virtio 1.2, 5.5): the host sets a target size, the driver gives that much
//! memory back (inflate) or takes it back (deflate), reports free pages on its own (free page
//! reporting), and sends memory statistics.
//!
//! `queues` parses chains (pure), `discard` releases host memory behind guest ranges, `config`
//! is the configuration space, `persist` the saved state; this module is the glue with the
//! transport and the event loop. Offered features: STATS_VQ (when a polling interval is set),
//! DEFLATE_ON_OOM (when asked), FREE_PAGE_REPORTING (when asked). Queues in order: inflateq,
//! deflateq, statsq (if STATS_VQ), reporting_vq (if FREE_PAGE_REPORTING); the driver must use
//! every queue offered (Linux does), as the transport activates only with all queues ready.

mod config;
mod discard;
mod persist;
pub mod queues;

pub use config::{ConfigSpace, CONFIG_SPACE_SIZE};
pub use discard::discard;
pub use persist::{BalloonConstructorArgs, BalloonState};
pub use queues::{pfn_ranges, reported_ranges, stats, ChainReport, PageRange, Stat, PAGE_SIZE};

use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::{DescriptorChain, Queue, QueueState, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use crate::virtio::device_events::{DeviceEvents, ACTIVATE_TOKEN, DEVICE_TOKEN_BASE};
use crate::virtio::queue_check::pop_checked;
use crate::virtio::{ActivateError, ActivationContext, VirtioDevice, VirtioInterrupt};
use crate::GuestMemory;

/// VIRTIO_ID_BALLOON.
pub const VIRTIO_ID_BALLOON: u32 = 5;
pub const VIRTIO_BALLOON_F_STATS_VQ: u32 = 1;
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u32 = 2;
pub const VIRTIO_BALLOON_F_FREE_PAGE_REPORTING: u32 = 5;
/// Size of every queue.
pub const QUEUE_SIZE: u16 = 256;
/// Pages of 4 KiB per MiB.
pub const PAGES_PER_MIB: u64 = 256;
/// `Events` data of the statistics timer.
const STATS_TIMER_TOKEN: u32 = DEVICE_TOKEN_BASE;

/// How the balloon is set up (`--balloon`, `VmConfig::balloon`, Firecracker's `PUT /balloon`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonConfig {
    /// Memory the guest should give back, in MiB.
    pub target_mib: u32,
    /// Let the guest deflate when it runs out of memory (VIRTIO_BALLOON_F_DEFLATE_ON_OOM).
    pub deflate_on_oom: bool,
    /// Seconds between statistics requests; 0 offers no statistics queue.
    pub stats_interval_s: u16,
    /// Offer free page reporting: pages the guest frees go back to the host.
    pub free_page_reporting: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    #[error("balloon target {0} MiB is too large (at most {max} MiB)", max = u32::MAX as u64 / PAGES_PER_MIB)]
    TargetTooLarge(u32),
    #[error("statistics were not enabled when the balloon was created (stats interval 0)")]
    StatsDisabled,
    #[error("statistics cannot be turned off on a device that offers them (use an interval > 0)")]
    StatsCannotStop,
    #[error("creating a balloon eventfd or timer: {0}")]
    Io(#[source] std::io::Error),
    #[error("saved balloon state is invalid: {0}")]
    BadState(String),
}

/// What the device did since it was created (for `info` and logs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonCounters {
    pub inflated_pages: u64,
    pub deflated_pages: u64,
    pub reported_pages: u64,
    /// Bytes given back to the host (inflate plus reporting).
    pub released_bytes: u64,
    /// PFNs or ranges outside guest memory, descriptors of the wrong direction or shape.
    pub rejected: u64,
    /// Ranges the host could not release (madvise failed).
    pub release_errors: u64,
}

/// The balloon as observers see it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BalloonStatus {
    pub config: BalloonConfig,
    pub target_pages: u32,
    pub actual_pages: u32,
    pub active: bool,
    /// The latest statistics and how old they are.
    pub stats: Vec<Stat>,
    pub stats_age: Option<Duration>,
    pub counters: BalloonCounters,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    Inflate,
    Deflate,
    Stats,
    Reporting,
}

struct Active {
    mem: GuestMemory,
    queues: Vec<Queue>,
    interrupt: Arc<VirtioInterrupt>,
}

pub struct Balloon {
    config: BalloonConfig,
    features: u64,
    roles: Vec<Role>,
    queue_sizes: Vec<u16>,
    space: ConfigSpace,
    events: DeviceEvents,
    stats_timer: TimerFd,
    active: Option<Active>,
    /// The statistics buffer the device holds until it wants fresh statistics.
    stats_head: Option<u16>,
    stats: Vec<Stat>,
    stats_at: Option<Instant>,
    counters: BalloonCounters,
}

fn target_pages(mib: u32) -> Result<u32, BalloonError> {
    u32::try_from(u64::from(mib) * PAGES_PER_MIB).map_err(|_| BalloonError::TargetTooLarge(mib))
}

impl Balloon {
    pub fn new(config: BalloonConfig) -> Result<Self, BalloonError> {
        let num_pages = target_pages(config.target_mib)?;
        let mut features = 1u64 << VIRTIO_F_VERSION_1;
        let mut roles = vec![Role::Inflate, Role::Deflate];
        if config.stats_interval_s > 0 {
            features |= 1 << VIRTIO_BALLOON_F_STATS_VQ;
            roles.push(Role::Stats);
        }
        if config.deflate_on_oom {
            features |= 1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM;
        }
        if config.free_page_reporting {
            features |= 1 << VIRTIO_BALLOON_F_FREE_PAGE_REPORTING;
            roles.push(Role::Reporting);
        }
        Ok(Self {
            config,
            features,
            queue_sizes: vec![QUEUE_SIZE; roles.len()],
            roles,
            space: ConfigSpace {
                num_pages,
                actual_pages: 0,
            },
            events: DeviceEvents::new().map_err(BalloonError::Io)?,
            stats_timer: TimerFd::new()
                .map_err(|e| BalloonError::Io(std::io::Error::from_raw_os_error(e.errno())))?,
            active: None,
            stats_head: None,
            stats: Vec::new(),
            stats_at: None,
            counters: BalloonCounters::default(),
        })
    }

    /// Whether `mib` can be a target (its page count fits the 32-bit `num_pages`).
    pub fn target_fits(mib: u32) -> bool {
        target_pages(mib).is_ok()
    }

    pub fn config(&self) -> BalloonConfig {
        self.config
    }

    /// Sets the target; the driver hears of it through a configuration change interrupt.
    pub fn set_target_mib(&mut self, mib: u32) -> Result<(), BalloonError> {
        self.space.num_pages = target_pages(mib)?;
        self.config.target_mib = mib;
        if let Some(active) = &self.active {
            if let Err(e) = active.interrupt.signal_config_change() {
                tracing::error!("virtio-balloon: config change interrupt: {e}");
            }
        }
        Ok(())
    }

    /// Changes the statistics interval of a device that offers statistics.
    pub fn set_stats_interval(&mut self, seconds: u16) -> Result<(), BalloonError> {
        if self.config.stats_interval_s == 0 {
            return Err(BalloonError::StatsDisabled);
        }
        if seconds == 0 {
            return Err(BalloonError::StatsCannotStop);
        }
        self.config.stats_interval_s = seconds;
        if self.active.is_some() {
            self.arm_stats_timer();
        }
        Ok(())
    }

    pub fn status(&self) -> BalloonStatus {
        BalloonStatus {
            config: self.config,
            target_pages: self.space.num_pages,
            actual_pages: self.space.actual_pages,
            active: self.active.is_some(),
            stats: self.stats.clone(),
            stats_age: self.stats_at.map(|at| at.elapsed()),
            counters: self.counters,
        }
    }

    fn arm_stats_timer(&mut self) {
        let interval = Duration::from_secs(u64::from(self.config.stats_interval_s));
        if self.roles.contains(&Role::Stats) && !interval.is_zero() {
            if let Err(e) = self.stats_timer.reset(interval, Some(interval)) {
                tracing::error!("virtio-balloon: arming the statistics timer: {e}");
            }
        }
    }

    /// The statistics timer fired: hand the held buffer back so the driver refills it.
    fn request_stats(&mut self) {
        let _ = self.stats_timer.wait();
        let (Some(active), Some(head)) = (self.active.as_mut(), self.stats_head) else {
            return;
        };
        if active.interrupt.needs_reset() {
            return;
        }
        let Some(index) = self.roles.iter().position(|r| *r == Role::Stats) else {
            return;
        };
        let Some(queue) = active.queues.get_mut(index) else {
            return;
        };
        self.stats_head = None;
        match queue.add_used(&active.mem, head, 0) {
            Ok(()) => {
                if queue.needs_notification(&active.mem).unwrap_or(true) {
                    if let Err(e) = active.interrupt.signal_used_queue() {
                        tracing::error!("virtio-balloon: raising interrupt: {e}");
                    }
                }
            }
            Err(e) => tracing::debug!("virtio-balloon: returning the stats buffer: {e}"),
        }
    }

    fn process_queue(&mut self, index: usize) {
        let Some(role) = self.roles.get(index).copied() else {
            return;
        };
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if active.interrupt.needs_reset() {
            return;
        }
        let Some(queue) = active.queues.get_mut(index) else {
            return;
        };
        let mem = &active.mem;
        let counters = &mut self.counters;
        let result = match role {
            Role::Inflate | Role::Reporting => drain(queue, mem, &mut |chain| {
                let head = chain.head_index();
                let mut sink = |range: PageRange| match discard(mem, range) {
                    Ok(bytes) => counters.released_bytes += bytes,
                    Err(e) => {
                        counters.release_errors += 1;
                        tracing::debug!("virtio-balloon: releasing {range:?}: {e}");
                    }
                };
                let report = if role == Role::Inflate {
                    pfn_ranges(mem, chain, &mut sink)
                } else {
                    reported_ranges(mem, chain, &mut sink)
                };
                if role == Role::Inflate {
                    counters.inflated_pages += report.pages;
                } else {
                    counters.reported_pages += report.pages;
                }
                counters.rejected += report.invalid + report.bad_descriptors;
                Some(head)
            }),
            Role::Deflate => drain(queue, mem, &mut |chain| {
                let head = chain.head_index();
                // The pages are the guest's again; nothing to do on the host.
                let report = pfn_ranges(mem, chain, &mut |_| {});
                counters.deflated_pages += report.pages;
                counters.rejected += report.invalid + report.bad_descriptors;
                Some(head)
            }),
            Role::Stats => {
                let (stats_now, stats_at, stats_head) =
                    (&mut self.stats, &mut self.stats_at, &mut self.stats_head);
                drain(queue, mem, &mut |chain| {
                    let head = chain.head_index();
                    let (stats, report) = stats(mem, chain);
                    counters.rejected += report.bad_descriptors;
                    *stats_now = stats;
                    *stats_at = Some(Instant::now());
                    // Held until the timer asks for fresh statistics; a buffer held before is
                    // returned (the driver keeps only one in flight, but must not starve).
                    stats_head.replace(head)
                })
            }
        };
        match result {
            Ok(true) => {
                if let Err(e) = active.interrupt.signal_used_queue() {
                    tracing::error!("virtio-balloon: raising interrupt: {e}");
                }
            }
            Ok(false) => {}
            Err(e) => {
                if let Err(e) = active.interrupt.signal_used_queue() {
                    tracing::error!("virtio-balloon: raising interrupt: {e}");
                }
                active.interrupt.queue_fault("virtio-balloon", index, &e);
            }
        }
    }
}

/// Drains a queue. `handle` processes one chain and names the chain to return now: usually the
/// same one; for the statistics queue the one held before it (the newest stays with the device),
/// or none. Returns whether the driver wants an interrupt.
fn drain(
    queue: &mut Queue,
    mem: &GuestMemory,
    handle: &mut dyn FnMut(DescriptorChain<&GuestMemory>) -> Option<u16>,
) -> Result<bool, virtio_queue::Error> {
    let mut completed = 0u32;
    loop {
        queue.disable_notification(mem)?;
        let mut progressed = false;
        while let Some(chain) = pop_checked(queue, mem)? {
            progressed = true;
            let Some(head) = handle(chain) else {
                continue;
            };
            if let Err(e) = queue.add_used(mem, head, 0) {
                tracing::debug!("virtio-balloon: returning chain {head}: {e}");
                continue;
            }
            completed = completed.saturating_add(1);
        }
        if !queue.enable_notification(mem)? || !progressed {
            break;
        }
    }
    Ok(completed > 0 && queue.needs_notification(mem)?)
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.space.read(offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if self.space.write(offset, data) {
            tracing::debug!(
                "virtio-balloon: actual {} pages (target {})",
                self.space.actual_pages,
                self.space.num_pages
            );
        }
    }

    fn activate(&mut self, ctx: ActivationContext) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        if ctx.queues.len() != self.roles.len() {
            return Err(ActivateError::QueueCount {
                expected: self.roles.len(),
                got: ctx.queues.len(),
            });
        }
        self.events.activate(ctx.queue_events)?;
        self.active = Some(Active {
            mem: ctx.mem,
            queues: ctx.queues,
            interrupt: ctx.interrupt,
        });
        self.arm_stats_timer();
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.stats_head = None;
        if let Err(e) = self.stats_timer.reset(Duration::ZERO, None) {
            tracing::warn!("virtio-balloon: disarming the statistics timer: {e}");
        }
        self.events.reset();
    }

    fn is_active(&self) -> bool {
        self.active.is_some()
    }

    fn queue_states(&self) -> Vec<QueueState> {
        self.active
            .as_ref()
            .map(|a| a.queues.iter().map(|q| q.state()).collect())
            .unwrap_or_default()
    }
}

impl MutEventSubscriber for Balloon {
    fn init(&mut self, ops: &mut EventOps) {
        self.events.init(ops);
        let timer = Events::with_data(&self.stats_timer, STATS_TIMER_TOKEN, EventSet::IN);
        if let Err(e) = ops.add(timer) {
            tracing::error!("virtio-balloon: registering the statistics timer: {e}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let token = events.data();
        if token == ACTIVATE_TOKEN {
            if self.events.sync(ops) {
                for index in 0..self.roles.len() {
                    self.process_queue(index);
                }
            }
        } else if DeviceEvents::is_queue_token(token) {
            if let Some(index) = self.events.take_queue_event(events.fd()) {
                self.process_queue(index);
            }
        } else if token == STATS_TIMER_TOKEN {
            self.request_stats();
        } else {
            tracing::warn!("virtio-balloon: unexpected event token {token}");
        }
    }
}

#[cfg(test)]
mod tests;
