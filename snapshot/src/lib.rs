//! dormouse's snapshot format and restore strategies.
//!
//! A snapshot is a directory:
//!
//! - `state.bin`: the VMM's own serde state (vCPUs, irqchip, devices) behind a versioned,
//!   checksummed header ([`write_state`], [`read_state`]);
//! - `memory.bin`: guest RAM, regions back to back at page-aligned offsets, sparse (only
//!   selected pages are written, the rest are holes);
//! - `pages.bitmap`: diff snapshots only, the pages `memory.bin` holds (the rest come from the
//!   parent);
//! - `working-set.bitmap`: optional, the pages used soon after the last wake (a lazy restore
//!   fetches them first);
//! - `manifest.json`: human-readable description, written last ([`Manifest`]).
//!
//! Files are created 0600 and directories 0700. A snapshot is only written where nothing would
//! be lost: a missing path, an empty directory, or (asked for with `replace`) a directory that
//! holds nothing but a snapshot ([`TargetPolicy`]).
//!
//! Nothing here knows about KVM or devices: the VMM passes its state as a generic `T`, its
//! guest memory as a [`MemorySource`], and host facts for [`check_compatible`].

// Guest memory, snapshot files and API requests are hostile input: outside tests, nothing may
// unwrap or expect (a panic would end the VM). Tests may.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod chain;
mod compat;
mod error;
mod fsutil;
mod layout;
mod lazy;
mod linked;
mod live;
mod manifest;
mod merge;
mod page_bitmap;
mod restore;
mod source;
mod staging;
mod state;
mod target;
mod userfault;
mod writer;

pub use chain::{resolve_chain, ChainLayer, MAX_CHAIN_LEN};
pub use compat::{check_compatible, HostFacts};
pub use error::{Result, SnapshotError};
pub use layout::{compute_layout, validate_layout, MemoryRegion, PAGE_SIZE};
pub use lazy::{load_snapshot_without_memory, ChunkSource, LazyMemory, LazyOptions, LazyStats};
pub use linked::{
    allocated_pages, link_open_file, remap_private, write_snapshot_from_file, FileSnapshot,
    MemoryStorage,
};
pub use live::{prepare_live_snapshot, LiveOptions, LiveSnapshot, LiveStats, PreparedLive};
pub use manifest::{
    HostInfo, Manifest, PageCounts, ParentRef, SnapshotId, SnapshotKind, SnapshotMeta,
    MANIFEST_FILE, MAX_MANIFEST_LEN, MAX_MEMORY_SIZE,
};
pub use merge::merge_chain;
pub use page_bitmap::{decode_working_set, read_bitmap, PageBitmap, BITMAP_FILE, WORKING_SET_FILE};
pub use restore::{
    empty_memory, load_snapshot, load_snapshot_reusing, open_snapshot, open_snapshot_reusing,
    restore_memory, DecodedState, GuestMemory, LoadedSnapshot, OpenedSnapshot, RestoreStrategy,
};
pub use source::{take_vmm_dirty_pages, MemorySource};
pub use state::{
    decode_postcard, decode_state, encode_state, read_state, write_state, SavedState,
    MAX_STATE_PAYLOAD, STATE_FILE,
};
pub use target::{
    check_snapshot_target, remove_snapshot_dir, Companions, TargetPolicy, SNAPSHOT_FILES,
};
pub use userfault::{Userfaultfd, IOCTLS as USERFAULTFD_IOCTLS};
pub use writer::{
    write_memory_file, write_snapshot, MemoryWriteOutcome, PageSelection, WriteOptions, MEMORY_FILE,
};

/// Version of the snapshot format this build writes; bump on any change to what a snapshot
/// holds (docs/snapshot-compat.md).
/// 2: optional PIT state, vsock `next_local_port`.
/// 3: `state.bin` payload in CBOR with named fields (evolvable), instead of postcard.
/// 4: block and net devices record their rate limiters (`#[serde(default)]`: none in 3).
/// 5: the balloon device (`SavedDevice::Balloon`; older snapshots have none).
/// 6: a network device's MMDS (`NetState::mmds`: address and version, `#[serde(default)]`).
pub const FORMAT_VERSION: u32 = 6;
/// The oldest format this build still reads. The promise: at least the previous release's
/// snapshots restore.
pub const OLDEST_READABLE_FORMAT: u32 = 2;
