//! Snapshot write and restore timings for idle and fully touched guests.
//!
//! `cargo bench -p snapshot` (release build). Prints one table row per (size, workload):
//! snapshot write time with dirty bitmaps and with a non-zero scan, memory file apparent and
//! allocated size, private (map) restore time and copy restore time. Times are the best of
//! a few runs; no fsync (the hot path does not sync).

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use snapshot::{
    restore_memory, write_snapshot, HostInfo, MemorySource, PageBitmap, PageSelection,
    RestoreStrategy, SnapshotMeta, WriteOptions, MEMORY_FILE, PAGE_SIZE,
};
use vm_memory::{GuestAddress, GuestMemoryMmap};

const MIB: u64 = 1 << 20;
const RUNS: usize = 3;

#[derive(Clone, Copy)]
enum Workload {
    /// A handful of scattered pages touched (a booted, idle guest restored from scratch).
    Idle,
    /// Every page non-zero.
    Full,
}

struct Row {
    size: u64,
    workload: &'static str,
    write_dirty: Duration,
    write_nonzero: Duration,
    apparent: u64,
    allocated: u64,
    restore_private: Duration,
    restore_copy: Duration,
}

fn best_of<F: FnMut() -> Duration>(mut run: F) -> Duration {
    (0..RUNS).map(|_| run()).min().unwrap_or_default()
}

fn meta() -> SnapshotMeta {
    SnapshotMeta {
        vcpus: 1,
        kernel_id: "bench".into(),
        rootfs_id: "bench".into(),
        host: HostInfo {
            kind: "bench".into(),
            paging_levels: 4,
            cpu_features: Vec::new(),
        },
    }
}

fn measure(size: u64, workload: Workload, scratch: &Path) -> Row {
    let memory: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)])
            .expect("allocate guest memory");
    let pages = size / PAGE_SIZE;
    let mut dirty = PageBitmap::new(pages);
    // SAFETY: the mapping is `size` bytes and lives as long as `memory`; nothing else uses it.
    let bytes = unsafe { std::slice::from_raw_parts_mut(memory_ptr(&memory), size as usize) };
    match workload {
        Workload::Idle => {
            for page in (0..pages).step_by(4099).take(64) {
                bytes[(page * PAGE_SIZE) as usize] = 1;
                dirty.set(page);
            }
        }
        Workload::Full => {
            for (i, chunk) in bytes.chunks_mut(8).enumerate() {
                chunk.copy_from_slice(&(i as u64 | 1).to_le_bytes());
            }
            dirty = PageBitmap::full(pages);
        }
    }
    let source = MemorySource::from_guest_memory(&memory).expect("memory source");
    let dirty = [dirty];
    let dir = scratch.join(format!("snap-{}", size / MIB));
    let state = vec![0u8; 64 << 10];

    let write_with = |selection: PageSelection<'_>| {
        best_of(|| {
            let _ = std::fs::remove_dir_all(&dir);
            let start = Instant::now();
            write_snapshot(
                &dir,
                &state,
                &source,
                selection,
                &meta(),
                &WriteOptions::default(),
            )
            .expect("write");
            start.elapsed()
        })
    };
    let write_nonzero = write_with(PageSelection::NonZero);
    let write_dirty = write_with(PageSelection::Dirty(&dirty));

    let metadata = std::fs::metadata(dir.join(MEMORY_FILE)).expect("stat memory file");
    let restore = |strategy| {
        best_of(|| {
            let start = Instant::now();
            let restored = restore_memory(&dir, strategy).expect("restore");
            let elapsed = start.elapsed();
            drop(restored);
            elapsed
        })
    };
    let row = Row {
        size,
        workload: match workload {
            Workload::Idle => "idle",
            Workload::Full => "full",
        },
        write_dirty,
        write_nonzero,
        apparent: metadata.len(),
        allocated: metadata.blocks() * 512,
        restore_private: restore(RestoreStrategy::Private),
        restore_copy: restore(RestoreStrategy::Copy),
    };
    let _ = std::fs::remove_dir_all(&dir);
    row
}

fn memory_ptr(memory: &GuestMemoryMmap<()>) -> *mut u8 {
    use vm_memory::GuestMemoryBackend;
    memory
        .get_host_address(GuestAddress(0))
        .expect("guest memory has a region at 0")
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    // cargo passes `--bench`; any other argument filters by size in MiB (e.g. `256`).
    let filter: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let scratch = tempfile_dir();
    println!(
        "{:>8} {:>5} | {:>12} {:>14} | {:>10} {:>10} | {:>12} {:>12}",
        "memory",
        "load",
        "write dirty",
        "write nonzero",
        "apparent",
        "allocated",
        "restore map",
        "restore copy"
    );
    for size in [256 * MIB, 2048 * MIB] {
        if !filter.is_empty() && !filter.contains(&(size / MIB)) {
            continue;
        }
        for workload in [Workload::Idle, Workload::Full] {
            let row = measure(size, workload, &scratch);
            println!(
                "{:>5} MiB {:>5} | {:>12} {:>14} | {:>6} MiB {:>6.2} MiB | {:>12} {:>12}",
                row.size / MIB,
                row.workload,
                ms(row.write_dirty),
                ms(row.write_nonzero),
                row.apparent / MIB,
                row.allocated as f64 / MIB as f64,
                ms(row.restore_private),
                ms(row.restore_copy),
            );
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
}

/// Scratch space on the same file system as the build (not tmpfs), like real snapshot dirs.
fn tempfile_dir() -> std::path::PathBuf {
    let base = std::env::var_os("SNAPSHOT_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("dormouse-snapshot-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create scratch directory");
    dir
}
