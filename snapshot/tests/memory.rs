//! Sparse memory files and the two restore strategies.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;

use common::*;
use snapshot::{
    load_snapshot, restore_memory, write_memory_file, write_snapshot, Manifest, MemorySource,
    PageBitmap, PageSelection, RestoreStrategy, SnapshotError, WriteOptions, MEMORY_FILE,
    PAGE_SIZE,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const HIGH: u64 = 0x1_0000_0000;

#[test]
fn dirty_snapshot_of_a_large_guest_is_sparse() {
    // 2 GiB of guest RAM of which 40 MiB was touched, in scattered runs.
    let memory = guest_memory(1 << 30, 1 << 30);
    let source = MemorySource::from_guest_memory(&memory).unwrap();
    let mut dirty = empty_dirty(source.layout());
    for chunk in 0..40u64 {
        let (region, base) = if chunk % 2 == 0 { (0, 0) } else { (1, HIGH) };
        let first = chunk * 6000; // runs of 256 pages, 6000 pages apart
        for page in first..first + 256 {
            touch_page(&memory, &mut dirty, region, base, page, 1);
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    let manifest = write_snapshot(
        &snap,
        &sample_state(),
        &source,
        PageSelection::Dirty(&dirty),
        &meta(),
        &WriteOptions::default(),
    )
    .unwrap();
    let touched = 40 * 256 * PAGE_SIZE;
    assert_eq!(manifest.pages.written * PAGE_SIZE, touched);
    let mem_path = snap.join(MEMORY_FILE);
    assert_eq!(fs::metadata(&mem_path).unwrap().len(), 2 << 30);
    let allocated = allocated_bytes(&mem_path);
    assert!(allocated >= touched, "allocated {allocated}");
    assert!(
        allocated < touched + (4 << 20),
        "allocated {allocated} for {touched} touched"
    );

    // Private restore gives back exactly the touched pages, zero elsewhere.
    let restored = restore_memory(&snap, RestoreStrategy::Private).unwrap();
    for chunk in [0u64, 1, 39] {
        let (base, first) = (if chunk % 2 == 0 { 0 } else { HIGH }, chunk * 6000);
        let mut page = vec![0u8; PAGE_SIZE as usize];
        restored
            .read_slice(&mut page, GuestAddress(base + first * PAGE_SIZE))
            .unwrap();
        assert_eq!(page, page_pattern(first, 1));
        restored
            .read_slice(&mut page, GuestAddress(base + (first + 256) * PAGE_SIZE))
            .unwrap();
        assert!(
            page.iter().all(|&b| b == 0),
            "page after run {chunk} must be zero"
        );
    }
}

#[test]
fn nonzero_mode_skips_zero_pages_and_all_mode_writes_everything() {
    let memory = guest_memory(16 << 20, 4 << 20);
    let source = MemorySource::from_guest_memory(&memory).unwrap();
    let mut dirty = empty_dirty(source.layout());
    for page in [0u64, 1, 2, 100, 4095] {
        touch_page(&memory, &mut dirty, 0, 0, page, 3);
    }
    touch_page(&memory, &mut dirty, 1, HIGH, 1023, 3);
    // A dirty page that is all zero again is skipped by NonZero.
    zero_page(&memory, &mut dirty, 0, 0, 2);

    let dir = tempfile::tempdir().unwrap();
    let nonzero = write_memory_file(
        &dir.path().join("nonzero.bin"),
        &source,
        PageSelection::NonZero,
        false,
    )
    .unwrap();
    assert_eq!(nonzero.written.count_ones(), 5);
    assert_eq!(nonzero.write_calls, 4, "pages 0-1 merge into one write");
    assert!(!nonzero.written.get(2));
    assert!(nonzero.written.get(4096 + 1023));
    assert!(allocated_bytes(&dir.path().join("nonzero.bin")) <= 5 * PAGE_SIZE + 64 * 1024);

    let all = write_memory_file(
        &dir.path().join("all.bin"),
        &source,
        PageSelection::All,
        false,
    )
    .unwrap();
    assert_eq!(all.written.count_ones(), (20 << 20) / PAGE_SIZE);
    // One run per region, written in 8 MiB pieces: 16 MiB in two, 4 MiB in one.
    assert_eq!(all.write_calls, 3);
    assert!(allocated_bytes(&dir.path().join("all.bin")) >= 20 << 20);

    // All three files hold the same guest contents.
    let expected = dump(&memory, source.layout());
    for name in ["nonzero.bin", "all.bin"] {
        let bytes = fs::read(dir.path().join(name)).unwrap();
        assert_eq!(bytes, expected, "{name}");
    }

    // Refuses to overwrite an existing file (a live VM may map it).
    assert!(write_memory_file(
        &dir.path().join("all.bin"),
        &source,
        PageSelection::All,
        false
    )
    .is_err());
}

#[test]
fn mismatched_dirty_bitmaps_are_refused() {
    let memory = guest_memory(1 << 20, 1 << 20);
    let source = MemorySource::from_guest_memory(&memory).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let one = [PageBitmap::new(256)];
    assert!(matches!(
        write_memory_file(
            &dir.path().join("a"),
            &source,
            PageSelection::Dirty(&one),
            false
        ),
        Err(SnapshotError::InvalidRequest(_))
    ));
    let wrong_size = [PageBitmap::new(256), PageBitmap::new(255)];
    assert!(write_memory_file(
        &dir.path().join("b"),
        &source,
        PageSelection::Dirty(&wrong_size),
        false
    )
    .is_err());
}

#[test]
fn both_strategies_restore_state_and_memory() {
    let memory = guest_memory(8 << 20, 2 << 20);
    let source = MemorySource::from_guest_memory(&memory).unwrap();
    let mut dirty = empty_dirty(source.layout());
    for page in (0..2048).step_by(7) {
        touch_page(&memory, &mut dirty, 0, 0, page, 5);
    }
    for page in 0..512 {
        touch_page(&memory, &mut dirty, 1, HIGH, page, 6);
    }
    let expected = dump(&memory, source.layout());
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    let state = sample_state();
    for (i, selection) in [
        PageSelection::Dirty(&dirty),
        PageSelection::NonZero,
        PageSelection::All,
    ]
    .into_iter()
    .enumerate()
    {
        let options = WriteOptions {
            parent: None,
            sync: i == 0,
            // The same directory each round: the previous round's snapshot is replaced.
            replace: true,
            ..WriteOptions::default()
        };
        write_snapshot(&snap, &state, &source, selection, &meta(), &options).unwrap();
        for strategy in [RestoreStrategy::Private, RestoreStrategy::Copy] {
            let loaded = load_snapshot::<TestState>(&snap, strategy).unwrap();
            assert_eq!(loaded.state, state);
            assert_eq!(loaded.manifest.regions, source.layout());
            assert_eq!(
                dump_restored(&loaded.memory, source.layout()),
                expected,
                "{i} {strategy:?}"
            );
            // Dirty tracking starts clean and records later VMM writes.
            let region = loaded.memory.iter().next().unwrap();
            assert!(!region.get_mmap().bitmap().is_addr_set(0));
            loaded.memory.write_obj(1u8, GuestAddress(0)).unwrap();
            assert!(region.get_mmap().bitmap().is_addr_set(0));
        }
    }
    // The staging directories were cleaned up.
    let leftovers: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from("snap")]);
}

#[test]
fn short_memory_file_is_refused() {
    let memory = guest_memory(1 << 20, 1 << 20);
    let source = MemorySource::from_guest_memory(&memory).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    write_snapshot(
        &snap,
        &sample_state(),
        &source,
        PageSelection::All,
        &meta(),
        &WriteOptions::default(),
    )
    .unwrap();
    let file = fs::OpenOptions::new()
        .write(true)
        .open(snap.join(MEMORY_FILE))
        .unwrap();
    file.set_len((2 << 20) - 4096).unwrap();
    for strategy in [RestoreStrategy::Private, RestoreStrategy::Copy] {
        assert!(matches!(
            restore_memory(&snap, strategy),
            Err(SnapshotError::MemoryFileTooSmall { expected, .. }) if expected == 2 << 20
        ));
    }
    fs::remove_file(snap.join(MEMORY_FILE)).unwrap();
    assert!(matches!(
        restore_memory(&snap, RestoreStrategy::Private),
        Err(SnapshotError::Io { .. })
    ));
}

/// Page frame number backing `addr` in this process, if /proc/self/pagemap reveals it.
fn pfn(addr: *const u8) -> Option<u64> {
    let pagemap = fs::File::open("/proc/self/pagemap").ok()?;
    let mut entry = [0u8; 8];
    pagemap
        .read_exact_at(&mut entry, (addr as u64 / PAGE_SIZE) * 8)
        .ok()?;
    let entry = u64::from_le_bytes(entry);
    let present = entry & (1 << 63) != 0;
    let frame = entry & ((1 << 55) - 1);
    (present && frame != 0).then_some(frame)
}

fn resident(addr: *const u8) -> bool {
    let mut vec = [0u8; 1];
    // SAFETY: `addr` is page aligned and inside a live mapping; mincore only reports.
    let rc = unsafe {
        libc::mincore(
            addr as *mut libc::c_void,
            PAGE_SIZE as usize,
            vec.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0);
    vec[0] & 1 != 0
}

#[test]
fn private_restores_share_the_page_cache_and_never_write_the_file() {
    let memory = guest_memory(4 << 20, 1 << 20);
    let source = MemorySource::from_guest_memory(&memory).unwrap();
    let mut dirty = empty_dirty(source.layout());
    for page in 0..1024 {
        touch_page(&memory, &mut dirty, 0, 0, page, 9);
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    write_snapshot(
        &snap,
        &sample_state(),
        &source,
        PageSelection::Dirty(&dirty),
        &meta(),
        &WriteOptions {
            sync: true,
            ..WriteOptions::default()
        },
    )
    .unwrap();
    let file = fs::File::open(snap.join(MEMORY_FILE)).unwrap();
    // Evict the file's pages so residency can only come from our accesses.
    // SAFETY: plain advisory call on an open descriptor.
    unsafe {
        libc::posix_fadvise(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            0,
            0,
            libc::POSIX_FADV_DONTNEED,
        )
    };

    let a = restore_memory(&snap, RestoreStrategy::Private).unwrap();
    let b = restore_memory(&snap, RestoreStrategy::Private).unwrap();
    let page = 17u64;
    let addr_a = a.get_host_address(GuestAddress(page * PAGE_SIZE)).unwrap() as *const u8;
    let addr_b = b.get_host_address(GuestAddress(page * PAGE_SIZE)).unwrap() as *const u8;
    assert_ne!(addr_a, addr_b);
    let untouched = b.get_host_address(GuestAddress(900 * PAGE_SIZE)).unwrap() as *const u8;
    assert!(
        !resident(untouched),
        "restore must be lazy: nothing read yet"
    );

    // Reading through A brings the page into the page cache, which B's mapping sees.
    let mut from_a = vec![0u8; PAGE_SIZE as usize];
    a.read_slice(&mut from_a, GuestAddress(page * PAGE_SIZE))
        .unwrap();
    assert_eq!(from_a, page_pattern(page, 9));
    assert!(
        resident(addr_b),
        "B should see the page A faulted into the page cache"
    );
    let mut from_b = vec![0u8; PAGE_SIZE as usize];
    b.read_slice(&mut from_b, GuestAddress(page * PAGE_SIZE))
        .unwrap();
    if let (Some(frame_a), Some(frame_b)) = (pfn(addr_a), pfn(addr_b)) {
        eprintln!("page frames: A {frame_a:#x}, B {frame_b:#x}");
        assert_eq!(frame_a, frame_b, "both VMs must map the same physical page");
    }

    // A guest write through A is private: B and the file keep the snapshot contents.
    a.write_slice(&[0xAB; 64], GuestAddress(page * PAGE_SIZE))
        .unwrap();
    let mut after = vec![0u8; 64];
    a.read_slice(&mut after, GuestAddress(page * PAGE_SIZE))
        .unwrap();
    assert_eq!(after, vec![0xAB; 64]);
    b.read_slice(&mut after, GuestAddress(page * PAGE_SIZE))
        .unwrap();
    assert_eq!(after, page_pattern(page, 9)[..64]);
    let mut on_disk = vec![0u8; 64];
    file.read_exact_at(&mut on_disk, page * PAGE_SIZE).unwrap();
    assert_eq!(on_disk, page_pattern(page, 9)[..64]);
    if let (Some(frame_a), Some(frame_b)) = (pfn(addr_a), pfn(addr_b)) {
        assert_ne!(frame_a, frame_b, "the written page must have been copied");
    }
}

#[test]
fn replacing_a_snapshot_leaves_live_private_mappings_intact() {
    let memory = guest_memory(1 << 20, 1 << 20);
    let source = MemorySource::from_guest_memory(&memory).unwrap();
    let mut dirty = empty_dirty(source.layout());
    touch_page(&memory, &mut dirty, 0, 0, 3, 1);
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    let first = write_snapshot(
        &snap,
        &sample_state(),
        &source,
        PageSelection::Dirty(&dirty),
        &meta(),
        &WriteOptions::default(),
    )
    .unwrap();
    let live = restore_memory(&snap, RestoreStrategy::Private).unwrap();

    touch_page(&memory, &mut dirty, 0, 0, 3, 2);
    let second = write_snapshot(
        &snap,
        &sample_state(),
        &source,
        PageSelection::Dirty(&dirty),
        &meta(),
        &WriteOptions {
            replace: true,
            ..WriteOptions::default()
        },
    )
    .unwrap();
    assert_ne!(first.snapshot_id, second.snapshot_id);
    assert_eq!(
        Manifest::read(&snap).unwrap().snapshot_id,
        second.snapshot_id
    );

    let mut page = vec![0u8; PAGE_SIZE as usize];
    live.read_slice(&mut page, GuestAddress(3 * PAGE_SIZE))
        .unwrap();
    assert_eq!(
        page,
        page_pattern(3, 1),
        "the live VM still sees the snapshot it was restored from"
    );
    let fresh = restore_memory(&snap, RestoreStrategy::Private).unwrap();
    fresh
        .read_slice(&mut page, GuestAddress(3 * PAGE_SIZE))
        .unwrap();
    assert_eq!(page, page_pattern(3, 2));
}

#[test]
fn slices_work_as_a_memory_source() {
    let low = vec![0u8; 64 << 10];
    let mut high = vec![0u8; 16 << 10];
    high[5000] = 42;
    let regions: [(u64, &[u8]); 2] = [(0, &low), (HIGH, &high)];
    let source = MemorySource::from_slices(&regions).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    let manifest = write_snapshot(
        &snap,
        &1u32,
        &source,
        PageSelection::NonZero,
        &meta(),
        &WriteOptions::default(),
    )
    .unwrap();
    assert_eq!(manifest.pages.written, 1);
    let restored = restore_memory(&snap, RestoreStrategy::Copy).unwrap();
    assert_eq!(
        restored.read_obj::<u8>(GuestAddress(HIGH + 5000)).unwrap(),
        42
    );

    let unaligned: [(u64, &[u8]); 1] = [(0, &low[..1000])];
    assert!(matches!(
        MemorySource::from_slices(&unaligned),
        Err(SnapshotError::InvalidMemory(_))
    ));
}
