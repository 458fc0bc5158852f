use super::*;

fn bw(size: u64, refill_ms: u64) -> TokenBucketConfig {
    TokenBucketConfig {
        size,
        one_time_burst: None,
        refill_time: refill_ms,
    }
}

fn limiter(config: RateLimiterConfig, now: Instant) -> RateLimiter {
    RateLimiter::new_at(&config, now).unwrap()
}

/// Waits (briefly) for the limiter's timerfd to become readable.
fn fires_within(l: &RateLimiter, ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd: l.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, ms) == 1 }
}

#[test]
fn an_unconfigured_limiter_allows_everything() {
    let t0 = Instant::now();
    let mut l = limiter(RateLimiterConfig::default(), t0);
    assert!(!l.is_enabled());
    for _ in 0..1000 {
        assert!(l.consume_request_at(u64::MAX, t0));
    }
    assert!(!l.is_blocked());
    assert!(!l.timer_armed());
}

#[test]
fn running_dry_blocks_and_arms_the_timer_until_it_fires() {
    let t0 = Instant::now();
    let mut l = limiter(
        RateLimiterConfig {
            bandwidth: Some(bw(1000, 100)),
            ops: None,
        },
        t0,
    );
    assert!(l.is_enabled() && l.limits_bandwidth());
    assert!(l.consume_at(600, TokenType::Bytes, t0));
    assert!(!l.consume_at(600, TokenType::Bytes, t0));
    assert!(l.is_blocked());
    assert!(l.timer_armed());
    // Blocked: refused whatever the buckets hold, ops too.
    assert!(!l.consume_at(1, TokenType::Bytes, t0 + Duration::from_secs(1)));
    assert!(!l.consume_at(1, TokenType::Ops, t0));
    // 200 missing tokens at 10 per ms: the timer fires after 20 ms.
    assert!(!fires_within(&l, 0));
    assert!(fires_within(&l, 2000));
    l.event_handler();
    assert!(!l.is_blocked());
    assert!(!fires_within(&l, 0), "the expiration was consumed");
    assert!(l.consume_at(600, TokenType::Bytes, t0 + Duration::from_millis(20)));
    // A spurious wake-up changes nothing.
    l.event_handler();
    assert!(!l.is_blocked());
}

#[test]
fn a_refused_request_gives_its_operation_back() {
    let t0 = Instant::now();
    let mut l = limiter(
        RateLimiterConfig {
            bandwidth: Some(bw(100, 1000)),
            ops: Some(bw(10, 1000)),
        },
        t0,
    );
    assert!(l.consume_request_at(100, t0));
    assert_eq!(l.bucket(TokenType::Ops).unwrap().budget(), 9);
    assert!(!l.consume_request_at(50, t0));
    assert_eq!(l.bucket(TokenType::Ops).unwrap().budget(), 9);
    // Zero-byte operations (a flush) only take an operation token.
    l.event_handler();
    assert!(l.consume_request_at(0, t0));
    assert_eq!(l.bucket(TokenType::Ops).unwrap().budget(), 8);
}

#[test]
fn an_oversized_request_passes_then_blocks() {
    let t0 = Instant::now();
    let mut l = limiter(
        RateLimiterConfig {
            bandwidth: Some(bw(100, 10)),
            ops: None,
        },
        t0,
    );
    assert!(l.consume_request_at(250, t0));
    assert!(l.is_blocked());
    assert!(!l.consume_request_at(1, t0));
    assert!(fires_within(&l, 2000));
}

#[test]
fn updates_replace_disable_or_keep_buckets_and_wake_a_blocked_limiter() {
    let t0 = Instant::now();
    let mut l = limiter(
        RateLimiterConfig {
            bandwidth: Some(bw(10, 60_000)),
            ops: Some(bw(5, 1000)),
        },
        t0,
    );
    assert!(l.consume_at(10, TokenType::Bytes, t0));
    assert!(!l.consume_at(10, TokenType::Bytes, t0));
    assert!(l.is_blocked());
    // The refill is a minute away; the update wakes the device at once.
    let update = RateLimiterUpdate {
        bandwidth: BucketUpdate::Disable,
        ops: BucketUpdate::Keep,
    };
    l.update_at(&update, t0).unwrap();
    assert!(fires_within(&l, 1000));
    l.event_handler();
    assert!(l.consume_at(1 << 40, TokenType::Bytes, t0));
    assert_eq!(
        l.config(),
        RateLimiterConfig {
            bandwidth: None,
            ops: Some(bw(5, 1000)),
        }
    );
    // A new bucket starts full, with its burst.
    let new = TokenBucketConfig {
        size: 7,
        one_time_burst: Some(3),
        refill_time: 1000,
    };
    l.update_at(
        &RateLimiterUpdate {
            bandwidth: BucketUpdate::Set(new),
            ops: BucketUpdate::Set(bw(0, 1000)),
        },
        t0,
    )
    .unwrap();
    assert_eq!(l.config().bandwidth, Some(new));
    assert_eq!(l.config().ops, None, "a zero-size bucket limits nothing");
    assert!(l.consume_at(10, TokenType::Bytes, t0));
    assert!(!l.consume_at(1, TokenType::Bytes, t0));
}

#[test]
fn configured_but_non_limiting_buckets_are_dropped() {
    let l = limiter(
        RateLimiterConfig {
            bandwidth: Some(bw(0, 100)),
            ops: Some(bw(100, 0)),
        },
        Instant::now(),
    );
    assert!(!l.is_enabled());
    assert_eq!(l.config(), RateLimiterConfig::default());
}
