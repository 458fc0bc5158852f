//! The block device's saved state and its `Persist` implementation.
//!
//! The device keeps no guest-visible state of its own beyond its disk: the request queue is the
//! transport's (`MmioTransportState`), and every request completes before a snapshot (the event
//! loop is paused between requests). So the state is which image it serves, and how.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Block, BlockConfig, BlockError};
use crate::persist::Persist;

/// The disk a block device serves. Same fields as the `Block` entry of the VMM's snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub path: PathBuf,
    pub read_only: bool,
    /// Serial reported to the guest; derived from the file when None.
    #[serde(default)]
    pub id: Option<String>,
}

/// Host resources of a restored block device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockConstructorArgs {
    /// A different disk image to open (a clone's own copy); None opens the saved path.
    pub path: Option<PathBuf>,
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
        }
    }

    fn restore(args: BlockConstructorArgs, state: &BlockState) -> Result<Self, BlockError> {
        Block::new(BlockConfig {
            path: args.path.unwrap_or_else(|| state.path.clone()),
            read_only: state.read_only,
            id: state.id.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::VirtioDevice;

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
        })
        .unwrap();
        let state = block.save();
        assert_eq!(
            state,
            BlockState {
                path: path.clone(),
                read_only: true,
                id: Some("disk-a".into()),
            }
        );
        let restored = Block::restore(BlockConstructorArgs::default(), &state).unwrap();
        assert_eq!(restored.save(), state);
        assert_eq!(restored.device_features(), block.device_features());
        assert_eq!(restored.capacity_sectors(), 8);

        let other = image(dir.path(), "b.img", 16);
        let args = BlockConstructorArgs {
            path: Some(other.clone()),
        };
        let clone = Block::restore(args, &state).unwrap();
        assert_eq!(clone.save().path, other);
        assert_eq!(clone.capacity_sectors(), 16);
    }

    #[test]
    fn restore_of_a_bad_state_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = BlockState {
            path: dir.path().join("missing.img"),
            read_only: false,
            id: None,
        };
        assert!(matches!(
            Block::restore(BlockConstructorArgs::default(), &missing),
            Err(BlockError::Open { .. })
        ));
        let long_id = BlockState {
            path: image(dir.path(), "a.img", 1),
            read_only: false,
            id: Some("x".repeat(21)),
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
