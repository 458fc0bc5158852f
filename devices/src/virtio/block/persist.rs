//! The block device's saved state and its `Persist` implementation.
//!
//! The device keeps no guest-visible state of its own beyond its disk: the request queue is the
//! transport's (`MmioTransportState`), and every request completes before a snapshot (the event
//! loop is paused between requests). So the state is which image it serves, and how.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Block, BlockConfig, BlockError};
use crate::persist::Persist;
use crate::rate_limiter::RateLimiterConfig;

/// The disk a block device serves. Same fields as the `Block` entry of the VMM's snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub path: PathBuf,
    pub read_only: bool,
    /// Serial reported to the guest; derived from the file when None.
    #[serde(default)]
    pub id: Option<String>,
    /// The rate limiter's configuration (snapshot format 4; older snapshots: none). The
    /// buckets' fill level is not saved: a restored device starts with full buckets.
    #[serde(default)]
    pub rate_limiter: RateLimiterConfig,
}

/// Host resources of a restored block device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockConstructorArgs {
    /// A different disk image to open (a clone's own copy); None opens the saved path.
    pub path: Option<PathBuf>,
    /// Different I/O limits; None keeps the saved ones.
    pub rate_limiter: Option<RateLimiterConfig>,
}

impl Persist for Block {
    type State = BlockState;
    type ConstructorArgs = BlockConstructorArgs;
    type Error = BlockError;

    fn save(&self) -> BlockState {
        BlockState {
            path: self.config.path.clone(),
            read_only: self.config.read_only,
            id: self.config.id.clone(),
            rate_limiter: self.config.rate_limiter,
        }
    }

    fn restore(args: BlockConstructorArgs, state: &BlockState) -> Result<Self, BlockError> {
        Block::new(BlockConfig {
            path: args.path.unwrap_or_else(|| state.path.clone()),
            read_only: state.read_only,
            id: state.id.clone(),
            rate_limiter: args.rate_limiter.unwrap_or(state.rate_limiter),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::VirtioDevice;

    fn limits() -> RateLimiterConfig {
        RateLimiterConfig {
            bandwidth: Some(crate::rate_limiter::TokenBucketConfig {
                size: 1 << 20,
                one_time_burst: Some(4 << 20),
                refill_time: 100,
            }),
            ops: None,
        }
    }

    #[test]
    fn states_without_a_rate_limiter_decode_as_unlimited() {
        let old = r#"{"path": "/a.img", "read_only": false, "id": null}"#;
        let state: BlockState = serde_json::from_str(old).unwrap();
        assert_eq!(state.rate_limiter, RateLimiterConfig::default());
    }

    fn image(dir: &std::path::Path, name: &str, sectors: u64) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(
            &path,
            vec![0u8; (sectors * super::super::SECTOR_SIZE) as usize],
        )
        .unwrap();
        path
    }

    #[test]
    fn restore_of_save_round_trips_and_takes_a_replacement_image() {
        let dir = tempfile::tempdir().unwrap();
        let path = image(dir.path(), "a.img", 8);
        let block = Block::new(BlockConfig {
            path: path.clone(),
            read_only: true,
            id: Some("disk-a".into()),
            rate_limiter: limits(),
        })
        .unwrap();
        let state = block.save();
        assert_eq!(
            state,
            BlockState {
                path: path.clone(),
                read_only: true,
                id: Some("disk-a".into()),
                rate_limiter: limits(),
            }
        );
        let restored = Block::restore(BlockConstructorArgs::default(), &state).unwrap();
        assert_eq!(restored.save(), state);
        assert_eq!(restored.device_features(), block.device_features());
        assert_eq!(restored.capacity_sectors(), 8);

        let other = image(dir.path(), "b.img", 16);
        let args = BlockConstructorArgs {
            path: Some(other.clone()),
            rate_limiter: Some(RateLimiterConfig::default()),
        };
        let clone = Block::restore(args, &state).unwrap();
        assert_eq!(clone.save().path, other);
        assert_eq!(clone.capacity_sectors(), 16);
        assert_eq!(clone.save().rate_limiter, RateLimiterConfig::default());
        assert!(!clone.rate_limiter().is_enabled());
    }

    #[test]
    fn restore_of_a_bad_state_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = BlockState {
            path: dir.path().join("missing.img"),
            read_only: false,
            id: None,
            rate_limiter: RateLimiterConfig::default(),
        };
        assert!(matches!(
            Block::restore(BlockConstructorArgs::default(), &missing),
            Err(BlockError::Open { .. })
        ));
        let long_id = BlockState {
            path: image(dir.path(), "a.img", 1),
            read_only: false,
            id: Some("x".repeat(21)),
            rate_limiter: RateLimiterConfig::default(),
        };
        assert!(matches!(
            Block::restore(BlockConstructorArgs::default(), &long_id),
            Err(BlockError::IdTooLong(_))
        ));
    }

    #[test]
    fn a_device_built_from_an_open_disk_saves_no_path() {
        let file = tempfile::tempfile().unwrap();
        let disk = crate::virtio::block::disk_from_file(file, false, "t").unwrap();
        let state = Block::from_disk(disk).unwrap().save();
        assert_eq!(state.path, PathBuf::new());
        assert!(Block::restore(BlockConstructorArgs::default(), &state).is_err());
    }
}
