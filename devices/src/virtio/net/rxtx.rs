//! Frame movement between a TAP-like backend and the virtio-net queues, free of event-loop
//! state so tests can drive it with a fake TAP. Frames carry their 12-byte virtio_net_hdr_v1
//! on both sides: the header passes through untouched.

use std::io;

use virtio_queue::{Queue, QueueOwnedT, QueueT};

use super::VNET_HDR_LEN;
use crate::rate_limiter::RateLimiter;
use crate::virtio::guest_buffers::{scatter, total_len, Segment};
use crate::virtio::queue_check::pop_checked;
use crate::GuestMemory;

/// Largest frame we move: the header, a 64 KiB GSO payload and its Ethernet/VLAN headers.
pub const MAX_FRAME_LEN: usize = VNET_HDR_LEN + 65536 + 14 + 4;

/// Frame-granular I/O: one call moves one whole frame (as a TAP fd does).
pub trait TapIo {
    /// Reads one frame; `WouldBlock` when none is queued.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize>;
}

/// RX state kept between runs: a frame read from the TAP but not yet delivered stays here
/// until the guest posts a buffer, so no frame is lost or reordered.
pub struct RxBuffer {
    buf: Vec<u8>,
    pending: Option<usize>,
}

impl Default for RxBuffer {
    fn default() -> Self {
        Self {
            buf: vec![0; MAX_FRAME_LEN],
            pending: None,
        }
    }
}

impl RxBuffer {
    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }

    pub fn clear(&mut self) {
        self.pending = None;
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RxRun {
    /// Frames written into guest buffers.
    pub delivered: u32,
    /// Bytes of those frames (virtio-net header included).
    pub bytes: u64,
    /// TAP reads that failed (other than "nothing to read").
    pub tap_errors: u32,
    /// Frames discarded because the guest's buffer was too small for them.
    pub dropped: u32,
    /// Unusable chains returned empty.
    pub bad_chains: u32,
    /// A frame is waiting for the guest to post RX buffers.
    pub blocked: bool,
    /// A frame is waiting for the rate limiter's timer.
    pub throttled: bool,
    /// The driver wants an interrupt for what was returned.
    pub notify: bool,
}

/// Moves frames from `tap` into the RX queue until the TAP is drained or the guest runs out
/// of buffers (then the frame stays pending and the guest's next RX kick resumes us).
pub fn process_rx<T: TapIo + ?Sized>(
    queue: &mut Queue,
    mem: &GuestMemory,
    tap: &mut T,
    rx: &mut RxBuffer,
) -> Result<RxRun, virtio_queue::Error> {
    process_rx_limited(queue, mem, tap, rx, None)
}

/// `process_rx`, each delivered frame first taking one operation and its length (virtio-net
/// header included, as Firecracker counts) from `limiter`. A refused frame stays pending and
/// its buffer goes back to the ring until the limiter's timer fires.
pub fn process_rx_limited<T: TapIo + ?Sized>(
    queue: &mut Queue,
    mem: &GuestMemory,
    tap: &mut T,
    rx: &mut RxBuffer,
    mut limiter: Option<&mut RateLimiter>,
) -> Result<RxRun, virtio_queue::Error> {
    let mut run = RxRun::default();
    // Re-arming the guest's kick and finding buffers anyway happens at most once in a row;
    // a second time means the ring is unreadable and we would spin.
    let mut rearmed = false;
    loop {
        let len = match rx.pending {
            Some(len) => len,
            None => match tap.read_frame(&mut rx.buf) {
                Ok(0) => break,
                Ok(len) => {
                    rx.pending = Some(len);
                    len
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        tracing::warn!("virtio-net: reading from TAP: {e}");
                        run.tap_errors = run.tap_errors.saturating_add(1);
                    }
                    break;
                }
            },
        };
        let Some(chain) = pop_checked(queue, mem)? else {
            if !rearmed && queue.enable_notification(mem)? {
                rearmed = true;
                continue;
            }
            run.blocked = true;
            break;
        };
        rearmed = false;
        let head = chain.head_index();
        let buffers: Vec<Segment> = chain
            .filter(|d| d.is_write_only())
            .map(|d| Segment {
                addr: d.addr(),
                len: d.len(),
            })
            .collect();
        let capacity = total_len(&buffers);
        let frame = rx.buf.get(..len).unwrap_or_default();
        if capacity < VNET_HDR_LEN as u64 {
            // Cannot even hold a header: give it back empty and keep the frame.
            queue.add_used(mem, head, 0)?;
            run.bad_chains = run.bad_chains.saturating_add(1);
            continue;
        }
        if capacity < len as u64 {
            // This guest's buffers are smaller than the frame (e.g. no GUEST_TSO but a large
            // frame): drop the frame, keep the buffer for the next one.
            tracing::debug!("virtio-net: dropping {len}-byte frame, RX buffer is {capacity}");
            queue.go_to_previous_position();
            rx.pending = None;
            run.dropped = run.dropped.saturating_add(1);
            continue;
        }
        if let Some(limiter) = limiter.as_deref_mut() {
            if !limiter.consume_request(len as u64) {
                queue.go_to_previous_position();
                run.throttled = true;
                break;
            }
        }
        match scatter(mem, &buffers, frame) {
            Ok(written) if written == len => {
                // len <= MAX_FRAME_LEN, far below u32::MAX.
                queue.add_used(mem, head, u32::try_from(len).unwrap_or(u32::MAX))?;
                rx.pending = None;
                run.delivered = run.delivered.saturating_add(1);
                run.bytes = run.bytes.saturating_add(len as u64);
            }
            _ => {
                queue.add_used(mem, head, 0)?;
                run.bad_chains = run.bad_chains.saturating_add(1);
            }
        }
    }
    if run.delivered > 0 || run.bad_chains > 0 {
        run.notify = queue.needs_notification(mem)?;
    }
    Ok(run)
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxRun {
    /// Frames handed to the TAP.
    pub sent: u32,
    /// Bytes of those frames (virtio-net header included).
    pub bytes: u64,
    /// Frames dropped: malformed, oversized, or refused by the TAP.
    pub dropped: u32,
    /// Of `dropped`, those the TAP refused.
    pub tap_errors: u32,
    /// The rate limiter refused a frame: it is still in the ring, for after the timer.
    pub throttled: bool,
    pub notify: bool,
}

/// Sends every available TX chain to `tap`; `scratch` is reused between calls.
pub fn process_tx<T: TapIo + ?Sized>(
    queue: &mut Queue,
    mem: &GuestMemory,
    tap: &mut T,
    scratch: &mut Vec<u8>,
) -> Result<TxRun, virtio_queue::Error> {
    process_tx_limited(queue, mem, tap, scratch, None)
}

/// `process_tx`, each chain first taking one operation and its length (the bytes the guest
/// offered, virtio-net header included) from `limiter`; a refused chain goes back to the ring
/// until the limiter's timer fires.
pub fn process_tx_limited<T: TapIo + ?Sized>(
    queue: &mut Queue,
    mem: &GuestMemory,
    tap: &mut T,
    scratch: &mut Vec<u8>,
    mut limiter: Option<&mut RateLimiter>,
) -> Result<TxRun, virtio_queue::Error> {
    let mut run = TxRun::default();
    'run: loop {
        queue.disable_notification(mem)?;
        let mut progressed = false;
        while let Some(chain) = pop_checked(queue, mem)? {
            if let Some(limiter) = limiter.as_deref_mut() {
                let bytes = if limiter.limits_bandwidth() {
                    chain.clone().map(|d| u64::from(d.len())).sum()
                } else {
                    0
                };
                if !limiter.consume_request(bytes) {
                    queue.go_to_previous_position();
                    run.throttled = true;
                    break 'run;
                }
            }
            progressed = true;
            let head = chain.head_index();
            match gather_frame(chain, mem, scratch) {
                Some(frame) => match tap.write_frame(frame) {
                    Ok(_) => {
                        run.sent = run.sent.saturating_add(1);
                        run.bytes = run.bytes.saturating_add(frame.len() as u64);
                    }
                    Err(e) => {
                        tracing::debug!("virtio-net: TAP refused a frame: {e}");
                        run.dropped = run.dropped.saturating_add(1);
                        run.tap_errors = run.tap_errors.saturating_add(1);
                    }
                },
                None => run.dropped = run.dropped.saturating_add(1),
            }
            queue.add_used(mem, head, 0)?;
        }
        if !queue.enable_notification(mem)? || !progressed {
            break;
        }
    }
    if run.sent > 0 || run.dropped > 0 {
        run.notify = queue.needs_notification(mem)?;
    }
    Ok(run)
}

/// Copies a TX chain's device-readable bytes into `scratch`. None if the chain is malformed
/// (device-writable parts, unreadable memory), too short for a header, or too long.
fn gather_frame<'a>(
    chain: virtio_queue::DescriptorChain<&GuestMemory>,
    mem: &GuestMemory,
    scratch: &'a mut Vec<u8>,
) -> Option<&'a [u8]> {
    scratch.clear();
    for desc in chain {
        if desc.is_write_only() {
            return None;
        }
        let len = usize::try_from(desc.len()).ok()?;
        let start = scratch.len();
        let end = start.checked_add(len).filter(|&e| e <= MAX_FRAME_LEN)?;
        scratch.resize(end, 0);
        vm_memory::Bytes::read_slice(mem, scratch.get_mut(start..end)?, desc.addr()).ok()?;
    }
    (scratch.len() >= VNET_HDR_LEN).then_some(scratch.as_slice())
}
