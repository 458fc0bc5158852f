//! The token bucket's arithmetic, free of timers and clocks: every call takes the current time,
//! so tests drive it with made-up instants.
//!
//! Tokens accrue continuously at `size / refill_time` (computed in integer nanoseconds, the
//! time of a fraction of a token carried over to the next refill so nothing is lost to
//! rounding) up to `size`. The one-time burst is spent first and never refills.

use std::time::{Duration, Instant};

use super::config::TokenBucketConfig;

const NS_PER_MS: u128 = 1_000_000;

/// What [`TokenBucket::reduce`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduction {
    /// The tokens were taken.
    Success,
    /// Not enough tokens; nothing was taken. The bucket will hold them after `wait`.
    Failure { wait: Duration },
    /// The request is larger than the whole bucket: it was allowed, the bucket emptied, and
    /// the excess is a debt the limiter waits out (`wait`) before allowing anything else
    /// (Firecracker's `OverConsumption`).
    OverConsumption { wait: Duration },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBucket {
    size: u64,
    /// What is left of the one-time burst.
    one_time_burst: u64,
    refill_time_ms: u64,
    budget: u64,
    /// Time up to which tokens have been credited.
    last_update: Instant,
}

impl TokenBucket {
    /// A full bucket, or None for a configuration that limits nothing (zero size or refill time).
    pub fn new(config: &TokenBucketConfig, now: Instant) -> Option<Self> {
        config.is_limiting().then(|| Self {
            size: config.size,
            one_time_burst: config.one_time_burst.unwrap_or(0),
            refill_time_ms: config.refill_time,
            budget: config.size,
            last_update: now,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    pub fn one_time_burst(&self) -> u64 {
        self.one_time_burst
    }

    fn refill_ns(&self) -> u128 {
        u128::from(self.refill_time_ms) * NS_PER_MS
    }

    /// How long `tokens` take to accrue (rounded up).
    fn time_for(&self, tokens: u64) -> Duration {
        let ns = (u128::from(tokens) * self.refill_ns()).div_ceil(u128::from(self.size));
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    /// Credits the tokens accrued since the last update.
    fn replenish_to(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last_update).as_nanos();
        let tokens = elapsed * u128::from(self.size) / self.refill_ns();
        if tokens == 0 {
            return;
        }
        let room = u128::from(self.size - self.budget);
        if tokens >= room {
            // Full: time spent full earns nothing, so there is nothing to carry.
            self.budget = self.size;
            self.last_update = now;
            return;
        }
        // tokens < room <= size, so it fits in u64; advance by exactly their time so the
        // fraction of the next token is kept.
        let tokens = tokens as u64;
        self.budget += tokens;
        let used_ns = u128::from(tokens) * self.refill_ns() / u128::from(self.size);
        let used = Duration::from_nanos(u64::try_from(used_ns).unwrap_or(u64::MAX));
        self.last_update = self.last_update.checked_add(used).unwrap_or(now).min(now);
    }

    /// Takes `tokens` at time `now`, from the one-time burst first.
    pub fn reduce(&mut self, tokens: u64, now: Instant) -> Reduction {
        if tokens <= self.one_time_burst {
            self.one_time_burst -= tokens;
            return Reduction::Success;
        }
        let rest = tokens - self.one_time_burst;
        self.replenish_to(now);
        if rest <= self.budget {
            self.one_time_burst = 0;
            self.budget -= rest;
            return Reduction::Success;
        }
        if rest > self.size {
            // It could never fit: let it through and make the debt a wait.
            self.one_time_burst = 0;
            let debt = rest - self.budget;
            self.budget = 0;
            return Reduction::OverConsumption {
                wait: self.time_for(debt),
            };
        }
        Reduction::Failure {
            wait: self.time_for(rest - self.budget),
        }
    }

    /// Gives back `tokens` taken by a request that did not go ahead after all (Firecracker's
    /// rule: into the burst while it lasts, else into the budget, never above `size`).
    pub fn replenish(&mut self, tokens: u64) {
        if self.one_time_burst > 0 {
            self.one_time_burst = self.one_time_burst.saturating_add(tokens);
            return;
        }
        self.budget = self.budget.saturating_add(tokens).min(self.size);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(size: u64, burst: Option<u64>, refill_ms: u64, now: Instant) -> TokenBucket {
        TokenBucket::new(
            &TokenBucketConfig {
                size,
                one_time_burst: burst,
                refill_time: refill_ms,
            },
            now,
        )
        .unwrap()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn zero_size_or_refill_time_limits_nothing() {
        let now = Instant::now();
        for (size, refill) in [(0, 100), (100, 0), (0, 0)] {
            let config = TokenBucketConfig {
                size,
                one_time_burst: Some(5),
                refill_time: refill,
            };
            assert!(TokenBucket::new(&config, now).is_none());
        }
    }

    #[test]
    fn starts_full_then_refills_at_size_per_refill_time() {
        let t0 = Instant::now();
        let mut b = bucket(1000, None, 1000, t0);
        assert_eq!(b.reduce(1000, t0), Reduction::Success);
        assert_eq!(b.budget(), 0);
        // One token per millisecond.
        assert_eq!(b.reduce(10, t0 + ms(5)), Reduction::Failure { wait: ms(5) });
        assert_eq!(
            b.budget(),
            5,
            "a failure credits what accrued, takes nothing"
        );
        assert_eq!(b.reduce(10, t0 + ms(10)), Reduction::Success);
        assert_eq!(b.budget(), 0);
        // Never above size, however long it idles.
        assert_eq!(
            b.reduce(1, t0 + Duration::from_secs(3600)),
            Reduction::Success
        );
        assert_eq!(b.budget(), 999);
    }

    #[test]
    fn fractions_of_a_token_are_not_lost() {
        let t0 = Instant::now();
        // 3 tokens per 10 ms: one every 3.33 ms.
        let mut b = bucket(3, None, 10, t0);
        assert_eq!(b.reduce(3, t0), Reduction::Success);
        let mut taken = 0;
        let mut t = t0;
        for _ in 0..3000 {
            t += Duration::from_micros(100);
            if b.reduce(1, t) == Reduction::Success {
                taken += 1;
            }
        }
        // 300 ms at 300 tokens/s: 90 tokens, whatever the step.
        assert_eq!(taken, 90);
    }

    #[test]
    fn one_time_burst_is_spent_first_and_does_not_refill() {
        let t0 = Instant::now();
        let mut b = bucket(100, Some(500), 1000, t0);
        assert_eq!(b.reduce(400, t0), Reduction::Success);
        assert_eq!((b.one_time_burst(), b.budget()), (100, 100));
        // 100 from the burst, 50 from the budget.
        assert_eq!(b.reduce(150, t0), Reduction::Success);
        assert_eq!((b.one_time_burst(), b.budget()), (0, 50));
        assert_eq!(b.reduce(100, t0), Reduction::Failure { wait: ms(500) });
        assert_eq!(
            b.reduce(100, t0 + Duration::from_secs(10)),
            Reduction::Success
        );
        assert_eq!(b.one_time_burst(), 0);
    }

    #[test]
    fn a_failed_request_keeps_the_burst() {
        let t0 = Instant::now();
        let mut b = bucket(100, Some(10), 1000, t0);
        assert_eq!(b.reduce(100, t0), Reduction::Success);
        assert_eq!((b.one_time_burst(), b.budget()), (0, 10));
        let mut b = bucket(100, Some(10), 1000, t0);
        assert_eq!(b.reduce(90, t0), Reduction::Success); // 10 burst + 80 budget
        assert_eq!(b.reduce(30, t0), Reduction::Failure { wait: ms(100) });
        assert_eq!(b.budget(), 20);
    }

    #[test]
    fn requests_larger_than_the_bucket_pass_and_leave_a_debt() {
        let t0 = Instant::now();
        let mut b = bucket(100, None, 1000, t0);
        assert_eq!(b.reduce(40, t0), Reduction::Success);
        // 250 tokens from 60: 190 owed, 1.9 s at 100 tokens/s.
        assert_eq!(
            b.reduce(250, t0),
            Reduction::OverConsumption { wait: ms(1900) }
        );
        assert_eq!(b.budget(), 0);
    }

    #[test]
    fn replenish_gives_back_without_overfilling() {
        let t0 = Instant::now();
        let mut b = bucket(100, None, 1000, t0);
        assert_eq!(b.reduce(30, t0), Reduction::Success);
        b.replenish(50);
        assert_eq!(b.budget(), 100);
        let mut b = bucket(100, Some(5), 1000, t0);
        b.replenish(3);
        assert_eq!((b.one_time_burst(), b.budget()), (8, 100));
    }

    #[test]
    fn huge_values_do_not_overflow() {
        let t0 = Instant::now();
        let mut b = bucket(u64::MAX, Some(u64::MAX), u64::MAX, t0);
        assert_eq!(b.reduce(u64::MAX, t0), Reduction::Success);
        assert_eq!(b.reduce(u64::MAX, t0), Reduction::Success);
        assert!(matches!(b.reduce(2, t0 + ms(1)), Reduction::Failure { .. }));
        let mut b = bucket(1, None, 1, t0);
        assert!(matches!(
            b.reduce(u64::MAX, t0),
            Reduction::OverConsumption { .. }
        ));
        // A clock that goes backwards credits nothing.
        assert!(matches!(b.reduce(1, t0), Reduction::Failure { .. }));
    }
}
