//! Drains the request queue: every available chain is executed and returned, and the driver is
//! interrupted at most once per call (subject to EVENT_IDX / NO_INTERRUPT suppression). A broken
//! ring (`queue_check::pop_checked`) ends the run with an error; chains before it were completed.
//! With a rate limiter, a request the limiter refuses goes back to the ring and the run ends
//! (`throttled`): the device resumes when the limiter's timer fires.

use virtio_queue::{Queue, QueueOwnedT, QueueT};

use vmm_metrics::BlockMetrics;

use super::request::{data_len, process_request_counted, Disk};
use crate::rate_limiter::RateLimiter;
use crate::virtio::queue_check::pop_checked;
use crate::GuestMemory;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueRun {
    /// Chains returned to the driver.
    pub completed: u32,
    /// Whether the driver asked to be interrupted for them.
    pub notify: bool,
    /// The rate limiter refused a request: it is still in the ring, for after the timer.
    pub throttled: bool,
}

/// Drains the queue without a rate limiter.
pub fn process_queue(
    queue: &mut Queue,
    mem: &GuestMemory,
    disk: &Disk,
) -> Result<QueueRun, virtio_queue::Error> {
    process_queue_limited(queue, mem, disk, None, None)
}

/// Drains the queue, each request first taking one operation and its data bytes from
/// `limiter` (Firecracker's accounting: IN and OUT count their payload, other requests only
/// the operation). Requests are counted in `metrics`.
pub fn process_queue_limited(
    queue: &mut Queue,
    mem: &GuestMemory,
    disk: &Disk,
    mut limiter: Option<&mut RateLimiter>,
    metrics: Option<&BlockMetrics>,
) -> Result<QueueRun, virtio_queue::Error> {
    let mut completed = 0u32;
    let mut throttled = false;
    'run: loop {
        queue.disable_notification(mem)?;
        let mut progressed = false;
        while let Some(chain) = pop_checked(queue, mem)? {
            if let Some(limiter) = limiter.as_deref_mut() {
                let bytes = if limiter.limits_bandwidth() {
                    data_len(mem, &chain)
                } else {
                    0
                };
                if !limiter.consume_request(bytes) {
                    // Back into the ring; notifications stay off: the timer resumes us.
                    queue.go_to_previous_position();
                    throttled = true;
                    if let Some(m) = metrics {
                        m.rate_limiter_throttled_events.inc();
                    }
                    break 'run;
                }
            }
            progressed = true;
            let head = chain.head_index();
            let done = process_request_counted(mem, chain, disk, metrics);
            if let Err(e) = queue.add_used(mem, head, done.used_len) {
                // Only a bogus head index gets here; the driver cannot be told.
                tracing::debug!("virtio-blk: returning chain {head}: {e}");
                continue;
            }
            completed = completed.saturating_add(1);
        }
        // Re-enabling reports chains added meanwhile. Without progress, the available ring is
        // unreadable: stop rather than spin.
        if !queue.enable_notification(mem)? || !progressed {
            break;
        }
    }
    let notify = completed > 0 && queue.needs_notification(mem)?;
    Ok(QueueRun {
        completed,
        notify,
        throttled,
    })
}
