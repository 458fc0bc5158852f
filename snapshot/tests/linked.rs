//! Snapshots of file-backed guest memory: linked on the same file system, copied elsewhere, and
//! read back by every reader (restore strategies, diff chains, merge) like any other snapshot.

mod common;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use common::*;
use snapshot::{
    merge_chain, remap_private, restore_memory, take_vmm_dirty_pages, write_snapshot,
    write_snapshot_from_file, GuestMemory, MemorySource, MemoryStorage, PageSelection,
    RestoreStrategy, SnapshotError, WriteOptions, MEMORY_FILE, PAGE_SIZE,
};
use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

const HIGH: u64 = 0x1_0000_0000;
const LOW_SIZE: usize = 64 << 20;
const HIGH_SIZE: usize = 16 << 20;

fn tmpfile_in(dir: &Path) -> Arc<File> {
    Arc::new(
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_TMPFILE)
            // Wider than a snapshot file may be: the link must still end up 0600.
            .mode(0o644)
            .open(dir)
            .unwrap(),
    )
}

/// 80 MiB of guest RAM in two regions, `MAP_SHARED` from one unnamed file in `dir`.
fn file_backed_memory(dir: &Path) -> (GuestMemory, Arc<File>) {
    let file = tmpfile_in(dir);
    file.set_len((LOW_SIZE + HIGH_SIZE) as u64).unwrap();
    let mut offset = 0u64;
    let regions = [(0u64, LOW_SIZE), (HIGH, HIGH_SIZE)]
        .iter()
        .map(|&(guest, size)| {
            let mapping = MmapRegionBuilder::new_with_bitmap(size, AtomicBitmap::with_len(size))
                .with_file_offset(FileOffset::from_arc(Arc::clone(&file), offset))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
                .build()
                .unwrap();
            offset += size as u64;
            GuestRegionMmap::new(mapping, GuestAddress(guest)).unwrap()
        })
        .collect();
    (GuestMemoryMmap::from_regions(regions).unwrap(), file)
}

fn page_of(memory: &GuestMemory, addr: u64) -> Vec<u8> {
    let mut page = vec![0u8; PAGE_SIZE as usize];
    memory.read_slice(&mut page, GuestAddress(addr)).unwrap();
    page
}

/// Writes 2 MiB at the start of each region, one page in the middle, and returns the guest
/// addresses of pages written with their fill byte.
fn touch(memory: &GuestMemory, value: u8) -> Vec<(u64, u8)> {
    let mut written = Vec::new();
    for base in [0, HIGH] {
        memory
            .write_slice(&vec![value; 2 << 20], GuestAddress(base))
            .unwrap();
        written.push((base, value));
        written.push((base + (2 << 20) - PAGE_SIZE, value));
    }
    memory
        .write_slice(&[value; PAGE_SIZE as usize], GuestAddress(40 << 20))
        .unwrap();
    written.push((40 << 20, value));
    written
}

fn assert_pages(memory: &GuestMemory, pages: &[(u64, u8)]) {
    for &(addr, value) in pages {
        assert!(
            page_of(memory, addr).iter().all(|&b| b == value),
            "page {addr:#x} should be all {value:#x}"
        );
    }
    // Never touched: zero.
    assert!(page_of(memory, 30 << 20).iter().all(|&b| b == 0));
}

#[test]
fn same_file_system_links_and_the_snapshot_stays_frozen() {
    let dir = tempfile::tempdir().unwrap();
    let (memory, file) = file_backed_memory(dir.path());
    let before = touch(&memory, 0xaa);
    let source = MemorySource::from_guest_memory(&memory).unwrap();
    let snap = dir.path().join("snap");
    let taken = write_snapshot_from_file(
        &snap,
        &sample_state(),
        &source,
        &file,
        &meta(),
        &WriteOptions::default(),
    )
    .unwrap();
    assert_eq!(taken.memory, MemoryStorage::Linked);
    // The same inode, not a copy.
    let linked = fs::metadata(snap.join(MEMORY_FILE)).unwrap();
    assert_eq!(linked.ino(), file.metadata().unwrap().ino());
    assert_eq!(linked.mode() & 0o7777, 0o600);
    assert_eq!(linked.len(), (LOW_SIZE + HIGH_SIZE) as u64);
    // 2 × 2 MiB + one page written, allocation granularity aside.
    let touched = 2 * (2 << 20) / PAGE_SIZE + 1;
    let counted = taken.manifest.pages.written;
    assert!(
        (touched..touched + 64).contains(&counted),
        "{counted} pages counted for {touched} touched"
    );
    assert_eq!(taken.manifest.pages.dirty, 0);
    let frozen = fs::read(snap.join(MEMORY_FILE)).unwrap();

    // The VM continues: copy-on-write over the file, later writes stay private.
    drop(source);
    remap_private(&memory, &file).unwrap();
    assert_pages(&memory, &before);
    let _ = take_vmm_dirty_pages(&memory);
    let after = touch(&memory, 0x55);
    assert_pages(&memory, &after);
    assert_eq!(fs::read(snap.join(MEMORY_FILE)).unwrap(), frozen);

    // Every reader takes the linked snapshot like a written one.
    for strategy in [RestoreStrategy::Private, RestoreStrategy::Copy] {
        assert_pages(&restore_memory(&snap, strategy).unwrap(), &before);
    }

    // A diff on top of it (the VMM's writes since are its dirty pages) restores through the
    // chain, and merges into a full snapshot.
    let dirty = take_vmm_dirty_pages(&memory);
    let source = MemorySource::from_guest_memory(&memory).unwrap();
    let diff = dir.path().join("diff");
    write_snapshot(
        &diff,
        &sample_state(),
        &source,
        PageSelection::Dirty(&dirty),
        &meta(),
        &WriteOptions {
            parent: Some(&snap),
            sync: false,
            ..WriteOptions::default()
        },
    )
    .unwrap();
    assert_pages(
        &restore_memory(&diff, RestoreStrategy::Private).unwrap(),
        &after,
    );
    let merged = dir.path().join("merged");
    merge_chain(&diff, &merged, false).unwrap();
    assert_pages(
        &restore_memory(&merged, RestoreStrategy::Copy).unwrap(),
        &after,
    );
    assert_eq!(fs::read(snap.join(MEMORY_FILE)).unwrap(), frozen);
}

#[test]
fn another_file_system_copies_the_data_pages() {
    let dir = tempfile::tempdir().unwrap();
    // /dev/shm is tmpfs on most hosts; skip where it shares the temp dir's file system.
    let Ok(other) = tempfile::tempdir_in("/dev/shm") else {
        eprintln!("no /dev/shm: cross-file-system case not run");
        return;
    };
    let dev = |p: &Path| fs::metadata(p).unwrap().dev();
    if dev(dir.path()) == dev(other.path()) {
        eprintln!("/dev/shm is on the temp dir's file system: cross-file-system case not run");
        return;
    }
    let (memory, file) = file_backed_memory(dir.path());
    let before = touch(&memory, 0x3c);
    let source = MemorySource::from_guest_memory(&memory).unwrap();
    let snap = other.path().join("snap");
    let taken = write_snapshot_from_file(
        &snap,
        &sample_state(),
        &source,
        &file,
        &meta(),
        &WriteOptions::default(),
    )
    .unwrap();
    assert_eq!(taken.memory, MemoryStorage::Written);
    assert_ne!(
        fs::metadata(snap.join(MEMORY_FILE)).unwrap().ino(),
        file.metadata().unwrap().ino()
    );
    // Only the file's data pages were copied: the copy is as sparse as the source.
    let allocated = fs::metadata(snap.join(MEMORY_FILE)).unwrap().blocks() * 512;
    assert!(allocated < 8 << 20, "{allocated} bytes allocated");
    assert_pages(
        &restore_memory(&snap, RestoreStrategy::Private).unwrap(),
        &before,
    );
    // The guest may keep writing its shared file: the copy is independent.
    touch(&memory, 0x77);
    assert_pages(
        &restore_memory(&snap, RestoreStrategy::Copy).unwrap(),
        &before,
    );
}

#[test]
fn diffs_and_mismatched_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (memory, file) = file_backed_memory(dir.path());
    let source = MemorySource::from_guest_memory(&memory).unwrap();
    let parent = dir.path().join("parent");
    let diff = write_snapshot_from_file(
        &dir.path().join("child"),
        &sample_state(),
        &source,
        &file,
        &meta(),
        &WriteOptions {
            parent: Some(&parent),
            sync: false,
            ..WriteOptions::default()
        },
    );
    assert!(matches!(diff, Err(SnapshotError::InvalidRequest(_))));
    let short = tmpfile_in(dir.path());
    short.set_len(PAGE_SIZE).unwrap();
    let wrong = write_snapshot_from_file(
        &dir.path().join("wrong"),
        &sample_state(),
        &source,
        &short,
        &meta(),
        &WriteOptions::default(),
    );
    assert!(matches!(wrong, Err(SnapshotError::InvalidRequest(_))));
    assert!(!dir.path().join("wrong").exists());
    // Nothing else was left behind (no staging directories).
    let entries: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
    assert!(entries.is_empty(), "{entries:?}");
    file.write_all_at(b"x", 0).unwrap();
}
