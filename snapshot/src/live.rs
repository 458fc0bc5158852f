//! Live snapshots: the guest is paused only while its vCPU and device state are read and its
//! memory is write-protected (`userfaultfd` write-protect); then it runs again while two
//! threads write memory to the snapshot in the background:
//!
//! - the **writer** copies the selected pages in file order, a chunk at a time, and lifts the
//!   protection of each chunk once it is saved;
//! - the **fault handler** serves the guest's (and the VMM's, and KVM's) writes to pages not
//!   saved yet: it saves that page first, then lifts its protection, which lets the write go on.
//!
//! Either way a page reaches the file with the contents it had at the pause, and no page is
//! saved twice (a page saved by the handler may change right after; the writer skips it). So
//! the files are exactly those of a paused snapshot taken at that instant, and restore is the
//! same.
//!
//! Only anonymous private memory can be write-protected this way (shared file mappings and
//! private file mappings cannot, without the kernel's asynchronous mode, which cannot copy
//! before the write); the caller picks the paused path for others.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{io_err, Result, SnapshotError};
use crate::fsutil;
use crate::layout::{MemoryRegion, PAGE_SIZE};
use crate::manifest::{Manifest, SnapshotMeta};
use crate::page_bitmap::PageBitmap;
use crate::source::MemorySource;
use crate::staging::StagingDir;
use crate::target::{Companions, TargetPolicy};
use crate::userfault::{PageFault, Userfaultfd};
use crate::writer::{finish_snapshot, memory_path, Finish, WriteOptions};

/// Pages the writer saves per step (2 MiB): large enough for few protection changes (each
/// may flush TLBs), small enough that a fault waits little for a chunk in progress.
const CHUNK_PAGES: u64 = 512;
/// How long the fault handler sleeps between checks that the writer is done.
const HANDLER_POLL_MS: i32 = 50;

/// Hooks and knobs for [`start_live_snapshot`].
pub struct LiveOptions {
    /// Run first on each thread this starts (seccomp filters).
    pub on_thread_start: Arc<dyn Fn() + Send + Sync>,
    /// Holds the guest memory mapped until the threads are done (e.g. a clone of the VM's
    /// `GuestMemoryMmap`): they read it after the caller has let the guest run again.
    pub keep_alive: Box<dyn Send + Sync>,
    pub replace: bool,
    pub companions: Companions,
    pub sync: bool,
}

/// What a live snapshot's background write did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LiveStats {
    /// Pages written to the memory file.
    pub pages_written: u64,
    /// Of those, pages saved early because something wrote to them first.
    pub pages_saved_on_fault: u64,
    /// From the start of the background write to the complete memory file.
    pub memory_write: Duration,
}

/// One region's host mapping and its place in the memory file.
#[derive(Clone, Copy, Debug)]
struct Region {
    host: u64,
    first_page: u64,
    pages: u64,
}

/// The pages saved so far, and the chunk the writer is saving (its pages are not marked yet;
/// a fault there waits for the writer's unprotect).
struct Progress {
    saved: PageBitmap,
    in_progress: Option<(u64, u64)>,
    /// The protection is gone (writer done or aborted): faults are stale.
    released: bool,
}

struct Shared {
    uffd: Userfaultfd,
    file: File,
    path: PathBuf,
    regions: Vec<Region>,
    /// Pages that held data at the pause (memory-file numbering); the others are holes.
    selected: PageBitmap,
    progress: Mutex<Progress>,
    abort: AtomicBool,
    done: OwnedFd,
    faults_saved: AtomicU64,
    first_error: Mutex<Option<String>>,
    _keep_alive: Box<dyn Send + Sync>,
}

/// A live snapshot in progress: the guest may run. [`LiveSnapshot::finish`] waits for memory
/// and puts the snapshot in place; dropping it instead aborts (protection lifted, nothing
/// installed).
pub struct LiveSnapshot<T: Serialize> {
    dir: PathBuf,
    staging: Option<StagingDir>,
    state: T,
    layout: Vec<MemoryRegion>,
    meta: SnapshotMeta,
    replace: bool,
    companions: Companions,
    sync: bool,
    shared: Arc<Shared>,
    writer: Option<JoinHandle<()>>,
    handler: Option<JoinHandle<()>>,
    started: Instant,
}

/// Starts a live snapshot of `memory` into `dir`. Call it with the guest paused: it
/// write-protects every page in `selection` (one bitmap per region, the pages holding data)
/// and starts the writer and fault handler; the caller may then resume the guest. Fails (with
/// nothing protected) where the kernel cannot write-protect this memory.
pub fn start_live_snapshot<T: Serialize>(
    dir: &Path,
    state: T,
    memory: &MemorySource<'_>,
    selection: &[PageBitmap],
    meta: &SnapshotMeta,
    options: LiveOptions,
) -> Result<LiveSnapshot<T>> {
    let layout = memory.layout().to_vec();
    if selection.len() != layout.len() {
        return Err(SnapshotError::InvalidRequest(format!(
            "{} page bitmaps for {} memory regions",
            selection.len(),
            layout.len()
        )));
    }
    let total_pages = layout.iter().map(MemoryRegion::page_count).sum::<u64>();
    let mut selected = PageBitmap::new(total_pages);
    let mut regions = Vec::with_capacity(layout.len());
    for (index, (region, pages)) in layout.iter().zip(selection).enumerate() {
        if pages.page_count() != region.page_count() {
            return Err(SnapshotError::InvalidRequest(format!(
                "page bitmap {index} covers {} pages, region has {}",
                pages.page_count(),
                region.page_count()
            )));
        }
        let bytes = memory
            .region_bytes(index)
            .ok_or_else(|| SnapshotError::InvalidMemory(format!("region {index} vanished")))?;
        regions.push(Region {
            host: bytes.as_ptr() as u64,
            first_page: region.first_page(),
            pages: region.page_count(),
        });
        for (start, count) in pages.runs() {
            selected.set_range(region.first_page() + start, count);
        }
    }

    let policy = TargetPolicy {
        replace: options.replace,
        companions: options.companions,
    };
    let staging = StagingDir::create(dir, policy)?;
    let path = memory_path(staging.path());
    let file = fsutil::create_private(&path)?;
    file.set_len(total_pages * PAGE_SIZE)
        .map_err(io_err("set length of", &path))?;

    let uffd = protect(&regions)?;
    // SAFETY: eventfd takes two integer arguments and returns a new fd or -1.
    let done = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if done < 0 {
        let e = std::io::Error::last_os_error();
        release(&uffd, &regions);
        return Err(io_err("create", Path::new("live snapshot eventfd"))(e));
    }
    // SAFETY: the kernel just returned this fd; nothing else owns it.
    let done = unsafe { OwnedFd::from_raw_fd(done) };

    let shared = Arc::new(Shared {
        uffd,
        file,
        path,
        regions,
        progress: Mutex::new(Progress {
            saved: PageBitmap::new(total_pages),
            in_progress: None,
            released: false,
        }),
        selected,
        abort: AtomicBool::new(false),
        done,
        faults_saved: AtomicU64::new(0),
        first_error: Mutex::new(None),
        _keep_alive: options.keep_alive,
    });
    let mut snapshot = LiveSnapshot {
        dir: dir.to_path_buf(),
        staging: Some(staging),
        state,
        layout,
        meta: meta.clone(),
        replace: options.replace,
        companions: options.companions,
        sync: options.sync,
        shared: Arc::clone(&shared),
        writer: None,
        handler: None,
        started: Instant::now(),
    };
    let spawn = |name: &str, body: fn(&Shared)| {
        let hook = Arc::clone(&options.on_thread_start);
        let shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                hook();
                body(&shared);
            })
            .map_err(io_err("spawn", Path::new(name)))
    };
    // The handler first: from the moment the guest may run, its writes need serving. On a
    // failure here `snapshot` drops, which lifts the protection.
    snapshot.handler = Some(spawn("snapshot-faults", serve_faults)?);
    snapshot.writer = Some(spawn("snapshot-writer", write_memory)?);
    Ok(snapshot)
}

/// Registers and write-protects every region; on a failure nothing stays protected.
fn protect(regions: &[Region]) -> Result<Userfaultfd> {
    let unsupported = |e: std::io::Error| SnapshotError::LiveUnsupported(e.to_string());
    let uffd = Userfaultfd::new_write_protect().map_err(unsupported)?;
    for region in regions {
        let len = region.pages * PAGE_SIZE;
        if let Err(e) = uffd
            .register_write_protect(region.host, len)
            .and_then(|()| uffd.write_protect(region.host, len))
        {
            release(&uffd, regions);
            return Err(unsupported(e));
        }
    }
    Ok(uffd)
}

/// Lifts all protection and stops reporting faults (waking every thread still waiting).
fn release(uffd: &Userfaultfd, regions: &[Region]) {
    for region in regions {
        let len = region.pages * PAGE_SIZE;
        // Errors are for ranges never registered (a failed start): nothing to lift there.
        let _ = uffd.unprotect(region.host, len);
        let _ = uffd.unregister(region.host, len);
    }
}

impl Shared {
    fn progress(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fail(&self, message: String) {
        let mut first = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
        if first.is_none() {
            tracing::error!("live snapshot: {message}");
            *first = Some(message);
        }
    }

    /// Host address of memory-file page `page`, if a region holds it.
    fn host_of_file_page(&self, page: u64) -> Option<u64> {
        let region = self
            .regions
            .iter()
            .find(|r| page >= r.first_page && page < r.first_page + r.pages)?;
        Some(region.host + (page - region.first_page) * PAGE_SIZE)
    }

    /// Memory-file page of host address `address`, if guest memory.
    fn file_page_of_host(&self, address: u64) -> Option<u64> {
        let region = self
            .regions
            .iter()
            .find(|r| address >= r.host && address < r.host + r.pages * PAGE_SIZE)?;
        Some(region.first_page + (address - region.host) / PAGE_SIZE)
    }

    /// Copies memory-file pages `[first, first + count)` from guest memory to the file.
    fn save_run(&self, first: u64, count: u64) -> std::io::Result<()> {
        let Some(host) = self.host_of_file_page(first) else {
            return Ok(());
        };
        // Runs never cross regions: the writer works within one region, the handler on one
        // page.
        let len = (count * PAGE_SIZE) as usize;
        // SAFETY: `host..host + len` lies within one guest memory region, kept mapped by
        // `_keep_alive`. Its pages are write-protected (or being saved under the progress
        // lock): nothing changes them while they are read.
        let bytes = unsafe { std::slice::from_raw_parts(host as *const u8, len) };
        self.file.write_all_at(bytes, first * PAGE_SIZE)
    }

    /// Lifts the protection of pages `[first, first + count)` (waking their writers).
    fn unprotect(&self, first: u64, count: u64) {
        if let Some(host) = self.host_of_file_page(first) {
            if let Err(e) = self.uffd.unprotect(host, count * PAGE_SIZE) {
                self.fail(format!("lifting write protection: {e}"));
            }
        }
    }
}

/// The writer thread: saves every selected page in file order, a chunk at a time, then lifts
/// the protection everywhere and tells the handler to stop.
fn write_memory(shared: &Shared) {
    'regions: for region in &shared.regions {
        let mut offset = 0;
        while offset < region.pages {
            if shared.abort.load(Ordering::Relaxed) {
                break 'regions;
            }
            let first = region.first_page + offset;
            let count = CHUNK_PAGES.min(region.pages - offset);
            offset += count;
            let runs: Vec<(u64, u64)> = {
                let mut progress = shared.progress();
                let runs = unsaved_runs(&shared.selected, &progress.saved, first, count);
                if runs.is_empty() {
                    continue;
                }
                progress.in_progress = Some((first, count));
                runs
            };
            for &(start, len) in &runs {
                if let Err(e) = shared.save_run(start, len) {
                    shared.fail(format!("writing {}: {e}", shared.path.display()));
                    shared.abort.store(true, Ordering::Relaxed);
                }
            }
            let mut progress = shared.progress();
            for &(start, len) in &runs {
                progress.saved.set_range(start, len);
            }
            progress.in_progress = None;
            shared.unprotect(first, count);
        }
    }
    let mut progress = shared.progress();
    progress.released = true;
    release(&shared.uffd, &shared.regions);
    drop(progress);
    signal_done(shared);
}

/// Tells the fault handler the protection is gone.
fn signal_done(shared: &Shared) {
    let one = 1u64;
    // SAFETY: writes 8 bytes from a live u64 to our own eventfd.
    unsafe { libc::write(shared.done.as_raw_fd(), std::ptr::from_ref(&one).cast(), 8) };
}

/// Runs of pages in `[first, first + count)` that are selected and not saved yet.
fn unsaved_runs(
    selected: &PageBitmap,
    saved: &PageBitmap,
    first: u64,
    count: u64,
) -> Vec<(u64, u64)> {
    let mut runs = Vec::new();
    let mut run: Option<u64> = None;
    for page in first..first + count {
        let wanted = selected.get(page) && !saved.get(page);
        match (wanted, run) {
            (true, None) => run = Some(page),
            (false, Some(start)) => {
                runs.push((start, page - start));
                run = None;
            }
            _ => {}
        }
    }
    if let Some(start) = run {
        runs.push((start, first + count - start));
    }
    runs
}

/// The fault handler thread: until the writer is done, saves each page written before the
/// writer reached it and lets the write go on.
fn serve_faults(shared: &Shared) {
    let mut faults: Vec<PageFault> = Vec::new();
    loop {
        let finished = match shared.uffd.wait(shared.done.as_raw_fd(), HANDLER_POLL_MS) {
            Ok(finished) => finished,
            Err(e) => {
                shared.fail(format!("waiting for write faults: {e}"));
                // The writer still lifts all protection when it ends; nothing blocks forever.
                return;
            }
        };
        if let Err(e) = shared.uffd.read_faults(&mut faults) {
            shared.fail(format!("reading write faults: {e}"));
            return;
        }
        for fault in &faults {
            save_before_write(shared, fault.address);
        }
        if finished {
            return;
        }
    }
}

fn save_before_write(shared: &Shared, address: u64) {
    let mut progress = shared.progress();
    if progress.released {
        return;
    }
    let Some(page) = shared.file_page_of_host(address) else {
        // Not guest memory: cannot be registered here, but never leave a thread waiting.
        let _ = shared.uffd.unprotect(address & !(PAGE_SIZE - 1), PAGE_SIZE);
        return;
    };
    if progress.saved.get(page) {
        // Saved and unprotected already: the waiting write was woken then.
        return;
    }
    if let Some((first, count)) = progress.in_progress {
        if page >= first && page < first + count {
            // The writer is saving it; its unprotect wakes this write.
            return;
        }
    }
    if shared.selected.get(page) {
        if let Err(e) = shared.save_run(page, 1) {
            shared.fail(format!("writing {}: {e}", shared.path.display()));
            shared.abort.store(true, Ordering::Relaxed);
        }
        shared.faults_saved.fetch_add(1, Ordering::Relaxed);
    }
    // An unselected page held no data at the pause: it stays a hole (zero) in the file.
    progress.saved.set_range(page, 1);
    shared.unprotect(page, 1);
    drop(progress);
}

impl<T: Serialize> LiveSnapshot<T> {
    /// Waits for the memory file, then writes state and manifest and moves the snapshot into
    /// place (as a paused snapshot would).
    pub fn finish(mut self) -> Result<(Manifest, LiveStats)> {
        self.join();
        let memory_write = self.started.elapsed();
        if let Some(message) = self
            .shared
            .first_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            return Err(SnapshotError::LiveFailed(message));
        }
        let staging = self
            .staging
            .take()
            .ok_or_else(|| SnapshotError::LiveFailed("the snapshot was already finished".into()))?;
        if self.sync {
            self.shared
                .file
                .sync_all()
                .map_err(io_err("fsync", &self.shared.path))?;
        }
        let written = self.shared.selected.clone();
        let options = WriteOptions {
            parent: None,
            sync: self.sync,
            replace: self.replace,
            companions: self.companions,
            working_set: None,
        };
        let manifest = finish_snapshot(
            staging,
            &self.dir,
            &self.state,
            &Finish {
                layout: &self.layout,
                written: &written,
                dirty_info: true,
                parent: None,
                meta: &self.meta,
                options: &options,
            },
        )?;
        let stats = LiveStats {
            pages_written: written.count_ones(),
            pages_saved_on_fault: self.shared.faults_saved.load(Ordering::Relaxed),
            memory_write,
        };
        tracing::debug!(dir = %self.dir.display(), ?stats, "live snapshot written");
        Ok((manifest, stats))
    }

    fn join(&mut self) {
        let panicked = |thread: JoinHandle<()>| thread.join().is_err();
        if self.writer.take().is_some_and(panicked) {
            self.shared.fail("the live snapshot writer panicked".into());
        }
        // Whatever happened to the writer, nothing stays protected, and the handler stops.
        let mut progress = self.shared.progress();
        if !progress.released {
            progress.released = true;
            release(&self.shared.uffd, &self.shared.regions);
        }
        drop(progress);
        signal_done(&self.shared);
        if self.handler.take().is_some_and(panicked) {
            self.shared
                .fail("the live snapshot fault handler panicked".into());
        }
    }
}

impl<T: Serialize> Drop for LiveSnapshot<T> {
    fn drop(&mut self) {
        if self.writer.is_some() || self.handler.is_some() {
            self.shared.abort.store(true, Ordering::Relaxed);
            self.join();
        }
        // An unfinished staging directory removes itself when dropped.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsaved_runs_skip_saved_and_unselected_pages() {
        let mut selected = PageBitmap::new(16);
        selected.set_range(0, 10);
        let mut saved = PageBitmap::new(16);
        saved.set_range(3, 2);
        assert_eq!(unsaved_runs(&selected, &saved, 0, 16), vec![(0, 3), (5, 5)]);
        assert_eq!(unsaved_runs(&selected, &saved, 4, 4), vec![(5, 3)]);
        assert!(unsaved_runs(&selected, &saved, 10, 6).is_empty());
    }
}
