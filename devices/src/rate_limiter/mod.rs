//! I/O rate limiting for virtio devices, with Firecracker's semantics: a bandwidth bucket
//! (bytes) and an operations bucket (requests, frames), each optional, each with an optional
//! one-time burst (see [`RateLimiterConfig`]).
//!
//! A device asks [`RateLimiter::consume`] (or [`RateLimiter::consume_request`]) before each
//! request. When a bucket runs dry the limiter is *blocked*: it arms its timerfd for the moment
//! the bucket will hold the request, and refuses everything until then. The device stops
//! processing its queue (the request goes back to the ring) and registers the timerfd
//! ([`RateLimiter`] is `AsRawFd`) with its event-loop subscription; when the timer fires, the
//! device calls [`RateLimiter::event_handler`] and processes the queue again. Nothing polls.
//!
//! One departure from Firecracker: it re-arms after a fixed 100 ms; this limiter computes when
//! the missing tokens will have accrued (at least [`MIN_WAIT`]), so a throttled queue resumes as
//! soon as it can go on, with the same long-run rate.
//!
//! The token arithmetic is in `bucket` and takes the time as an argument (tests pass made-up
//! instants); [`RateLimiter::consume`] uses the monotonic clock, the `*_at` variants any.

mod bucket;
mod config;

pub use bucket::{Reduction, TokenBucket};
pub use config::{BucketUpdate, RateLimiterConfig, RateLimiterUpdate, TokenBucketConfig};

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

/// The shortest wait the limiter arms its timer for: waking a thread costs microseconds, and
/// shorter waits would only trade tokens for wake-ups.
pub const MIN_WAIT: Duration = Duration::from_millis(1);

/// Which bucket a consumption draws from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenType {
    Bytes,
    Ops,
}

#[derive(Debug, thiserror::Error)]
pub enum RateLimiterError {
    #[error("creating the rate limiter's timerfd: {0}")]
    Timer(#[source] std::io::Error),
    #[error("arming the rate limiter's timer: {0}")]
    Arm(#[source] std::io::Error),
}

/// A bandwidth and an operations bucket sharing one timer (see the module docs).
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    /// The configuration the buckets were made from (updates change it).
    config: RateLimiterConfig,
    timer: TimerFd,
    /// Armed and not yet handled: everything is refused meanwhile.
    blocked: bool,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("bandwidth", &self.bandwidth)
            .field("ops", &self.ops)
            .field("blocked", &self.blocked)
            .finish()
    }
}

impl RateLimiter {
    /// A limiter with full buckets. The timerfd exists even when nothing is limited, so that a
    /// later update can limit without a new fd to register.
    pub fn new(config: &RateLimiterConfig) -> Result<Self, RateLimiterError> {
        Self::new_at(config, Instant::now())
    }

    pub fn new_at(config: &RateLimiterConfig, now: Instant) -> Result<Self, RateLimiterError> {
        let timer = TimerFd::new().map_err(|e| RateLimiterError::Timer(e.into()))?;
        set_nonblocking(&timer).map_err(RateLimiterError::Timer)?;
        let config = config.normalized();
        Ok(Self {
            bandwidth: config.bandwidth.and_then(|b| TokenBucket::new(&b, now)),
            ops: config.ops.and_then(|b| TokenBucket::new(&b, now)),
            config,
            timer,
            blocked: false,
        })
    }

    /// A limiter that limits nothing (until updated).
    pub fn unlimited() -> Result<Self, RateLimiterError> {
        Self::new(&RateLimiterConfig::default())
    }

    /// Whether any bucket is configured. Devices skip the limiter entirely when not.
    pub fn is_enabled(&self) -> bool {
        self.bandwidth.is_some() || self.ops.is_some()
    }

    /// Whether a bandwidth bucket is configured (so a request's size is worth computing).
    pub fn limits_bandwidth(&self) -> bool {
        self.bandwidth.is_some()
    }

    /// Whether the limiter refuses everything until its timer fires.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    pub fn config(&self) -> RateLimiterConfig {
        self.config
    }

    pub fn bucket(&self, token_type: TokenType) -> Option<&TokenBucket> {
        match token_type {
            TokenType::Bytes => self.bandwidth.as_ref(),
            TokenType::Ops => self.ops.as_ref(),
        }
    }

    /// Takes `tokens` of `token_type`; false when the device must stop (the timer is then
    /// armed). A bucket that is not configured always allows.
    pub fn consume(&mut self, tokens: u64, token_type: TokenType) -> bool {
        self.consume_at(tokens, token_type, Instant::now())
    }

    pub fn consume_at(&mut self, tokens: u64, token_type: TokenType, now: Instant) -> bool {
        if self.blocked {
            return false;
        }
        let bucket = match token_type {
            TokenType::Bytes => self.bandwidth.as_mut(),
            TokenType::Ops => self.ops.as_mut(),
        };
        let Some(bucket) = bucket else {
            return true;
        };
        match bucket.reduce(tokens, now) {
            Reduction::Success => true,
            Reduction::Failure { wait } => {
                self.block_for(wait);
                false
            }
            Reduction::OverConsumption { wait } => {
                self.block_for(wait);
                true
            }
        }
    }

    /// One operation of `bytes` bytes: both buckets, or neither (an operation refused by the
    /// bandwidth bucket gives its operation token back).
    pub fn consume_request(&mut self, bytes: u64) -> bool {
        self.consume_request_at(bytes, Instant::now())
    }

    pub fn consume_request_at(&mut self, bytes: u64, now: Instant) -> bool {
        if !self.consume_at(1, TokenType::Ops, now) {
            return false;
        }
        if bytes > 0 && !self.consume_at(bytes, TokenType::Bytes, now) {
            self.manual_replenish(1, TokenType::Ops);
            return false;
        }
        true
    }

    /// Gives back tokens taken for something that did not happen.
    pub fn manual_replenish(&mut self, tokens: u64, token_type: TokenType) {
        let bucket = match token_type {
            TokenType::Bytes => self.bandwidth.as_mut(),
            TokenType::Ops => self.ops.as_mut(),
        };
        if let Some(bucket) = bucket {
            bucket.replenish(tokens);
        }
    }

    fn block_for(&mut self, wait: Duration) {
        self.blocked = true;
        if let Err(e) = self.timer.reset(wait.max(MIN_WAIT), None) {
            // Without a timer the device would never resume: stay unblocked instead (the next
            // request is then refused or allowed by the buckets alone).
            tracing::error!("rate limiter: arming the timer: {e}");
            self.blocked = false;
        }
    }

    /// Call when the timerfd is readable: the limiter allows again (the device should then
    /// process its queue). A spurious wake-up is harmless.
    pub fn event_handler(&mut self) {
        // Non-blocking: an empty timer (already read, or re-armed since) reads WouldBlock.
        let _ = self.timer.wait();
        self.blocked = false;
    }

    /// Changes the buckets. A blocked limiter is woken at once (its timer fires within
    /// [`MIN_WAIT`]), so the device re-evaluates its queue under the new limits.
    pub fn update(&mut self, update: &RateLimiterUpdate) -> Result<(), RateLimiterError> {
        self.update_at(update, Instant::now())
    }

    pub fn update_at(
        &mut self,
        update: &RateLimiterUpdate,
        now: Instant,
    ) -> Result<(), RateLimiterError> {
        apply(
            &mut self.bandwidth,
            &mut self.config.bandwidth,
            update.bandwidth,
            now,
        );
        apply(&mut self.ops, &mut self.config.ops, update.ops, now);
        if self.blocked {
            self.timer
                .reset(Duration::from_micros(1), None)
                .map_err(|e| RateLimiterError::Arm(e.into()))?;
        }
        Ok(())
    }

    #[cfg(test)]
    pub(crate) fn timer_armed(&self) -> bool {
        self.timer.is_armed().unwrap_or(false)
    }
}

fn apply(
    bucket: &mut Option<TokenBucket>,
    config: &mut Option<TokenBucketConfig>,
    update: BucketUpdate,
    now: Instant,
) {
    match update {
        BucketUpdate::Keep => {}
        BucketUpdate::Disable => {
            *bucket = None;
            *config = None;
        }
        BucketUpdate::Set(new) => {
            *bucket = TokenBucket::new(&new, now);
            *config = bucket.is_some().then_some(new);
        }
    }
}

impl AsRawFd for RateLimiter {
    fn as_raw_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

fn set_nonblocking(fd: &impl AsRawFd) -> std::io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: fcntl with F_GETFL/F_SETFL only reads and sets the status flags of an fd we own;
    // no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests;
