//! What a rate limiter is configured with, in Firecracker's shape (`TokenBucket` and
//! `RateLimiter` of its API): the same JSON works for both VMMs. These types are also what
//! snapshots record for a device (CBOR with named fields).

use serde::{Deserialize, Serialize};

/// One token bucket: `size` tokens (bytes or operations) refilled from empty to full in
/// `refill_time` milliseconds, plus `one_time_burst` extra tokens available once at the start
/// (they do not refill). `size == 0` or `refill_time == 0` means "no limit" (Firecracker's
/// rule, used by updates to switch a bucket off).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenBucketConfig {
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// Milliseconds to refill the bucket from empty to `size`.
    pub refill_time: u64,
}

impl TokenBucketConfig {
    /// Whether the bucket limits anything (see the type's docs).
    pub fn is_limiting(&self) -> bool {
        self.size > 0 && self.refill_time > 0
    }
}

/// A device's limiter: a bandwidth bucket (bytes) and an operations bucket (requests or
/// frames), each optional. The default limits nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimiterConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucketConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucketConfig>,
}

impl RateLimiterConfig {
    /// Whether any bucket limits anything.
    pub fn is_limiting(&self) -> bool {
        self.bandwidth.is_some_and(|b| b.is_limiting()) || self.ops.is_some_and(|b| b.is_limiting())
    }

    /// The same configuration with non-limiting buckets dropped (what a device reports).
    pub fn normalized(self) -> Self {
        Self {
            bandwidth: self.bandwidth.filter(TokenBucketConfig::is_limiting),
            ops: self.ops.filter(TokenBucketConfig::is_limiting),
        }
    }
}

/// A runtime change to one bucket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BucketUpdate {
    /// Leave the bucket as it is (its tokens too).
    #[default]
    Keep,
    /// Stop limiting with this bucket.
    Disable,
    /// A new bucket, starting full (with its one-time burst).
    Set(TokenBucketConfig),
}

impl BucketUpdate {
    /// Firecracker's PATCH semantics: an absent bucket is kept, one with a zero size or refill
    /// time is switched off, any other replaces the bucket.
    pub fn from_patch(bucket: Option<TokenBucketConfig>) -> Self {
        match bucket {
            None => BucketUpdate::Keep,
            Some(b) if !b.is_limiting() => BucketUpdate::Disable,
            Some(b) => BucketUpdate::Set(b),
        }
    }
}

/// A runtime change to a limiter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimiterUpdate {
    pub bandwidth: BucketUpdate,
    pub ops: BucketUpdate,
}

impl RateLimiterUpdate {
    /// Firecracker's PATCH semantics for both buckets (see [`BucketUpdate::from_patch`]).
    pub fn from_patch(config: &RateLimiterConfig) -> Self {
        Self {
            bandwidth: BucketUpdate::from_patch(config.bandwidth),
            ops: BucketUpdate::from_patch(config.ops),
        }
    }

    /// Replaces the whole configuration with `config` (absent buckets are switched off).
    pub fn replace_with(config: &RateLimiterConfig) -> Self {
        let set = |b: Option<TokenBucketConfig>| match b.filter(TokenBucketConfig::is_limiting) {
            Some(b) => BucketUpdate::Set(b),
            None => BucketUpdate::Disable,
        };
        Self {
            bandwidth: set(config.bandwidth),
            ops: set(config.ops),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_firecrackers_shape() {
        let json = r#"{"bandwidth": {"size": 1048576, "one_time_burst": 2097152, "refill_time": 1000},
                       "ops": {"size": 100, "refill_time": 1000}}"#;
        let config: RateLimiterConfig = serde_json::from_str(json).unwrap();
        assert_eq!(
            config.bandwidth,
            Some(TokenBucketConfig {
                size: 1 << 20,
                one_time_burst: Some(2 << 20),
                refill_time: 1000
            })
        );
        assert_eq!(config.ops.unwrap().one_time_burst, None);
        let empty: RateLimiterConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(empty, RateLimiterConfig::default());
        assert!(!empty.is_limiting());
    }

    #[test]
    fn patch_semantics() {
        let off = TokenBucketConfig {
            size: 0,
            one_time_burst: None,
            refill_time: 100,
        };
        let on = TokenBucketConfig {
            size: 10,
            one_time_burst: None,
            refill_time: 100,
        };
        let update = RateLimiterUpdate::from_patch(&RateLimiterConfig {
            bandwidth: Some(off),
            ops: None,
        });
        assert_eq!(update.bandwidth, BucketUpdate::Disable);
        assert_eq!(update.ops, BucketUpdate::Keep);
        assert_eq!(BucketUpdate::from_patch(Some(on)), BucketUpdate::Set(on));
        let replace = RateLimiterUpdate::replace_with(&RateLimiterConfig {
            bandwidth: Some(on),
            ops: Some(off),
        });
        assert_eq!(replace.bandwidth, BucketUpdate::Set(on));
        assert_eq!(replace.ops, BucketUpdate::Disable);
    }
}
