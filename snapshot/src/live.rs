//! Live snapshots: the guest is paused only while its vCPU and device state are read and the
//! last few pages are write-protected (`userfaultfd` write-protect); then it runs again while
//! two threads write memory to the snapshot in the background.
//!
//! 1. **Prepare** ([`prepare_live_snapshot`], guest running): every region is registered and
//!    write-protected. Until the pause the fault handler only *tracks*: a write to a protected
//!    page lifts that page's protection and records it; a page discarded with `madvise` is
//!    recorded too (it comes back unprotected). Protecting gigabytes takes tens of
//!    milliseconds (page tables, and KVM's shadow pages through its MMU notifier): the guest
//!    runs meanwhile.
//! 2. **Start** ([`PreparedLive::start`], guest paused): the pages that lost their protection
//!    since (recorded, or present now but not when protection began) are protected again, and
//!    the handler switches to *saving*. The snapshot's instant is this pause.
//! 3. **Write** (guest running): the writer copies the selected pages in file order, a chunk
//!    at a time, lifting each chunk's protection once saved; the fault handler serves writes
//!    to pages not saved yet by saving that page first, then lifting its protection.
//!
//! Either way a page reaches the file with the contents it had at the pause, and no page is
//! saved twice (a page saved by the handler may change right after; the writer skips it). So
//! the files are exactly those of a paused snapshot taken at that instant, and restore is the
//! same. A page discarded after the pause and before it was saved is saved as zeros: only
//! pages the guest gave up (balloon, free page reporting) are discarded, whose contents it
//! never reads back.
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
use crate::userfault::{UffdEvent, Userfaultfd};
use crate::writer::{finish_snapshot, memory_path, Finish, WriteOptions};

/// Pages the writer saves per step (2 MiB): large enough for few protection changes (each
/// may flush TLBs), small enough that a fault waits little for a chunk in progress.
const CHUNK_PAGES: u64 = 512;
/// How long the fault handler sleeps between checks that the writer is done.
const HANDLER_POLL_MS: i32 = 50;

/// Hooks and knobs for [`prepare_live_snapshot`].
pub struct LiveOptions {
    /// Run first on each thread this starts (seccomp filters).
    pub on_thread_start: Arc<dyn Fn() + Send + Sync>,
    /// Holds the guest memory mapped until the threads are done (e.g. a clone of the VM's
    /// `GuestMemoryMmap`): they read it while the guest runs.
    pub keep_alive: Box<dyn Send + Sync>,
    pub replace: bool,
    pub companions: Companions,
    pub sync: bool,
}

/// What a live snapshot did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LiveStats {
    /// Pages written to the memory file.
    pub pages_written: u64,
    /// Of those, pages saved early because something wrote to them first.
    pub pages_saved_on_fault: u64,
    /// Pages protected again at the pause (written or new since protection began).
    pub pages_reprotected: u64,
    /// From the pause to the complete memory file.
    pub memory_write: Duration,
}

/// One region's host mapping and its place in the memory file.
#[derive(Clone, Copy, Debug)]
struct Region {
    host: u64,
    first_page: u64,
    pages: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Before the pause: a write lifts the protection and is recorded.
    Tracking,
    /// After the pause: a write to an unsaved page saves it first.
    Saving,
    /// The protection is gone (writer done or aborted): messages are stale.
    Released,
}

/// Shared by the threads, behind one lock.
struct Progress {
    mode: Mode,
    /// Tracking: pages whose protection a write lifted, or that were discarded.
    unprotected: PageBitmap,
    /// Saving: pages that held data at the pause (the others are holes).
    selected: PageBitmap,
    /// Saving: pages already in the file (or holes that lost their protection).
    saved: PageBitmap,
    /// The chunk the writer is saving (its pages are not marked yet; a fault there waits for
    /// the writer's unprotect).
    in_progress: Option<(u64, u64)>,
}

struct Shared {
    uffd: Userfaultfd,
    file: File,
    path: PathBuf,
    regions: Vec<Region>,
    progress: Mutex<Progress>,
    abort: AtomicBool,
    done: OwnedFd,
    faults_saved: AtomicU64,
    first_error: Mutex<Option<String>>,
    _keep_alive: Box<dyn Send + Sync>,
}

/// Everything a live snapshot needs but the guest's state, set up while the guest runs.
/// [`PreparedLive::start`] (guest paused) takes the snapshot; dropping it instead lifts the
/// protection and leaves nothing behind.
pub struct PreparedLive {
    dir: PathBuf,
    staging: Option<StagingDir>,
    layout: Vec<MemoryRegion>,
    /// Pages holding data when protection began (memory-file numbering).
    resident_at_protect: PageBitmap,
    replace: bool,
    companions: Companions,
    sync: bool,
    /// Always `Some` until `start` hands the threads on (dropping them releases everything).
    threads: Option<Threads>,
    on_thread_start: Arc<dyn Fn() + Send + Sync>,
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
    threads: Threads,
    pages_reprotected: u64,
    started: Instant,
}

/// The shared state and the threads working on it; stopping them lifts all protection.
struct Threads {
    shared: Arc<Shared>,
    writer: Option<JoinHandle<()>>,
    handler: Option<JoinHandle<()>>,
}

/// Prepares a live snapshot of `memory` into `dir` while the guest runs: creates the staging
/// directory and memory file, registers and write-protects every region, and starts the fault
/// handler (tracking). `resident` (one bitmap per region) are the pages holding data, read just
/// before. Fails with [`SnapshotError::LiveUnsupported`] (nothing protected) where the kernel
/// cannot write-protect this memory.
pub fn prepare_live_snapshot(
    dir: &Path,
    memory: &MemorySource<'_>,
    resident: &[PageBitmap],
    options: LiveOptions,
) -> Result<PreparedLive> {
    let layout = memory.layout().to_vec();
    let resident_at_protect = file_bitmap(&layout, resident)?;
    let regions = layout
        .iter()
        .enumerate()
        .map(|(index, region)| {
            let bytes = memory
                .region_bytes(index)
                .ok_or_else(|| SnapshotError::InvalidMemory(format!("region {index} vanished")))?;
            Ok(Region {
                host: bytes.as_ptr() as u64,
                first_page: region.first_page(),
                pages: region.page_count(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let total_pages = resident_at_protect.page_count();

    let policy = TargetPolicy {
        replace: options.replace,
        companions: options.companions,
    };
    let staging = StagingDir::create(dir, policy)?;
    let path = memory_path(staging.path());
    let file = fsutil::create_private(&path)?;
    file.set_len(total_pages * PAGE_SIZE)
        .map_err(io_err("set length of", &path))?;

    let unsupported = |e: std::io::Error| SnapshotError::LiveUnsupported(e.to_string());
    let uffd = Userfaultfd::new_write_protect().map_err(unsupported)?;
    for region in &regions {
        if let Err(e) = uffd.register_write_protect(region.host, region.pages * PAGE_SIZE) {
            release(&uffd, &regions);
            return Err(unsupported(e));
        }
    }
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
            mode: Mode::Tracking,
            unprotected: PageBitmap::new(total_pages),
            selected: PageBitmap::new(total_pages),
            saved: PageBitmap::new(total_pages),
            in_progress: None,
        }),
        abort: AtomicBool::new(false),
        done,
        faults_saved: AtomicU64::new(0),
        first_error: Mutex::new(None),
        _keep_alive: options.keep_alive,
    });
    let mut threads = Threads {
        shared: Arc::clone(&shared),
        writer: None,
        handler: None,
    };
    // The handler first: from the first protected page on, the guest's writes need serving.
    // On a failure `threads` drops, which lifts the protection.
    threads.handler = Some(spawn(
        "snapshot-faults",
        &options.on_thread_start,
        &shared,
        serve_faults,
    )?);
    for region in &shared.regions {
        if let Err(e) = shared
            .uffd
            .write_protect(region.host, region.pages * PAGE_SIZE)
        {
            return Err(unsupported(e));
        }
    }
    Ok(PreparedLive {
        dir: dir.to_path_buf(),
        staging: Some(staging),
        layout,
        resident_at_protect,
        replace: options.replace,
        companions: options.companions,
        sync: options.sync,
        threads: Some(threads),
        on_thread_start: options.on_thread_start,
    })
}

/// One bitmap per region → one in memory-file numbering.
fn file_bitmap(layout: &[MemoryRegion], per_region: &[PageBitmap]) -> Result<PageBitmap> {
    if per_region.len() != layout.len() {
        return Err(SnapshotError::InvalidRequest(format!(
            "{} page bitmaps for {} memory regions",
            per_region.len(),
            layout.len()
        )));
    }
    let total_pages = layout.iter().map(MemoryRegion::page_count).sum::<u64>();
    let mut out = PageBitmap::new(total_pages);
    for (index, (region, pages)) in layout.iter().zip(per_region).enumerate() {
        if pages.page_count() != region.page_count() {
            return Err(SnapshotError::InvalidRequest(format!(
                "page bitmap {index} covers {} pages, region has {}",
                pages.page_count(),
                region.page_count()
            )));
        }
        for (start, count) in pages.runs() {
            out.set_range(region.first_page() + start, count);
        }
    }
    Ok(out)
}

fn spawn(
    name: &str,
    hook: &Arc<dyn Fn() + Send + Sync>,
    shared: &Arc<Shared>,
    body: fn(&Shared),
) -> Result<JoinHandle<()>> {
    let hook = Arc::clone(hook);
    let shared = Arc::clone(shared);
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            hook();
            body(&shared);
        })
        .map_err(io_err("spawn", Path::new(name)))
}

impl PreparedLive {
    /// Takes the snapshot; call it with the guest paused. `resident` (one bitmap per region)
    /// are the pages holding data now. Protects again the pages that lost their protection
    /// since [`prepare_live_snapshot`], switches the handler to saving and starts the writer;
    /// the caller may then resume the guest.
    pub fn start<T: Serialize>(
        mut self,
        state: T,
        resident: &[PageBitmap],
        meta: &SnapshotMeta,
    ) -> Result<LiveSnapshot<T>> {
        let started = Instant::now();
        let selected = file_bitmap(&self.layout, resident)?;
        let mut threads = self.threads.take().ok_or_else(|| {
            SnapshotError::LiveFailed("the live snapshot was already started".into())
        })?;
        let shared = Arc::clone(&threads.shared);
        let mut reprotected = 0;
        {
            let mut progress = shared.progress();
            // Present now and unprotected: written since or discarded and filled again
            // (recorded), or new since protection began.
            let recorded = std::mem::replace(
                &mut progress.unprotected,
                PageBitmap::new(selected.page_count()),
            );
            let mut not_recorded = selected.clone();
            not_recorded.and_not(&recorded);
            let mut again = selected.clone();
            again.and_not(&not_recorded);
            let mut new = selected.clone();
            new.and_not(&self.resident_at_protect);
            again.or_assign(&new);
            for (start, count) in again.runs() {
                shared
                    .write_protect(start, count)
                    .map_err(|e| SnapshotError::LiveFailed(format!("protecting: {e}")))?;
                reprotected += count;
            }
            progress.selected = selected;
            progress.mode = Mode::Saving;
        }
        threads.writer = Some(spawn(
            "snapshot-writer",
            &self.on_thread_start,
            &shared,
            write_memory,
        )?);
        Ok(LiveSnapshot {
            dir: std::mem::take(&mut self.dir),
            staging: self.staging.take(),
            state,
            layout: std::mem::take(&mut self.layout),
            meta: meta.clone(),
            replace: self.replace,
            companions: self.companions,
            sync: self.sync,
            threads,
            pages_reprotected: reprotected,
            started,
        })
    }
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

    /// Write-protects memory-file pages `[first, first + count)`, a run that may span
    /// regions (adjacent in the file, not in the host's address space).
    fn write_protect(&self, first: u64, count: u64) -> std::io::Result<()> {
        let end = first + count;
        for region in &self.regions {
            let start = first.max(region.first_page);
            let stop = end.min(region.first_page + region.pages);
            if start < stop {
                let host = region.host + (start - region.first_page) * PAGE_SIZE;
                self.uffd.write_protect(host, (stop - start) * PAGE_SIZE)?;
            }
        }
        Ok(())
    }

    /// Lifts the protection of pages `[first, first + count)` (waking their writers).
    fn unprotect(&self, first: u64, count: u64) {
        if let Some(host) = self.host_of_file_page(first) {
            if let Err(e) = self.uffd.unprotect(host, count * PAGE_SIZE) {
                self.fail(format!("lifting write protection: {e}"));
            }
        }
    }

    /// Ends the protection for good, once.
    fn release_all(&self) {
        let mut progress = self.progress();
        if progress.mode != Mode::Released {
            progress.mode = Mode::Released;
            release(&self.uffd, &self.regions);
        }
    }

    /// Tells the fault handler the protection is gone.
    fn signal_done(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd.
        unsafe { libc::write(self.done.as_raw_fd(), std::ptr::from_ref(&one).cast(), 8) };
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
                let runs = unsaved_runs(&progress.selected, &progress.saved, first, count);
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
    shared.release_all();
    shared.signal_done();
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

/// The fault handler thread: until the protection is released, serves writes to protected
/// pages (tracking, then saving) and records discarded ranges.
fn serve_faults(shared: &Shared) {
    let mut events: Vec<UffdEvent> = Vec::new();
    loop {
        let finished = match shared.uffd.wait(shared.done.as_raw_fd(), HANDLER_POLL_MS) {
            Ok(finished) => finished,
            Err(e) => {
                shared.fail(format!("waiting for write faults: {e}"));
                // Nothing left to serve them: lift all protection so no write blocks forever.
                shared.release_all();
                return;
            }
        };
        if let Err(e) = shared.uffd.read_events(&mut events) {
            shared.fail(format!("reading write faults: {e}"));
            shared.release_all();
            return;
        }
        for event in &events {
            match *event {
                UffdEvent::Fault(fault) => serve_write(shared, fault.address),
                UffdEvent::Remove { start, end } => record_discard(shared, start, end),
            }
        }
        if finished {
            return;
        }
    }
}

fn serve_write(shared: &Shared, address: u64) {
    let mut progress = shared.progress();
    let Some(page) = shared.file_page_of_host(address) else {
        // Not guest memory: cannot be registered here, but never leave a thread waiting.
        let _ = shared.uffd.unprotect(address & !(PAGE_SIZE - 1), PAGE_SIZE);
        return;
    };
    match progress.mode {
        Mode::Released => {}
        Mode::Tracking => {
            progress.unprotected.set_range(page, 1);
            shared.unprotect(page, 1);
        }
        Mode::Saving => {
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
            if progress.selected.get(page) {
                if let Err(e) = shared.save_run(page, 1) {
                    shared.fail(format!("writing {}: {e}", shared.path.display()));
                    shared.abort.store(true, Ordering::Relaxed);
                }
                shared.faults_saved.fetch_add(1, Ordering::Relaxed);
            }
            // An unselected page held no data at the pause: it stays a hole (zero).
            progress.saved.set_range(page, 1);
            shared.unprotect(page, 1);
        }
    }
}

/// Pages discarded before the pause come back unprotected when touched again: record them.
/// (After the pause a discarded page not yet saved is saved as zeros: see the module doc.)
fn record_discard(shared: &Shared, start: u64, end: u64) {
    let mut progress = shared.progress();
    if progress.mode != Mode::Tracking {
        return;
    }
    let mut address = start & !(PAGE_SIZE - 1);
    while address < end {
        if let Some(page) = shared.file_page_of_host(address) {
            progress.unprotected.set_range(page, 1);
        }
        address += PAGE_SIZE;
    }
}

impl<T: Serialize> LiveSnapshot<T> {
    /// Waits for the memory file, then writes state and manifest and moves the snapshot into
    /// place (as a paused snapshot would).
    pub fn finish(mut self) -> Result<(Manifest, LiveStats)> {
        self.threads.stop();
        let memory_write = self.started.elapsed();
        let shared = &self.threads.shared;
        if let Some(message) = shared
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
            shared
                .file
                .sync_all()
                .map_err(io_err("fsync", &shared.path))?;
        }
        let written = shared.progress().selected.clone();
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
            pages_saved_on_fault: shared.faults_saved.load(Ordering::Relaxed),
            pages_reprotected: self.pages_reprotected,
            memory_write,
        };
        tracing::debug!(dir = %self.dir.display(), ?stats, "live snapshot written");
        Ok((manifest, stats))
    }
}

impl Threads {
    /// Waits for the writer (if started), lifts whatever protection is left, stops the handler.
    fn stop(&mut self) {
        let panicked = |thread: JoinHandle<()>| thread.join().is_err();
        if self.writer.take().is_some_and(panicked) {
            self.shared.fail("the live snapshot writer panicked".into());
        }
        self.shared.release_all();
        self.shared.signal_done();
        if self.handler.take().is_some_and(panicked) {
            self.shared
                .fail("the live snapshot fault handler panicked".into());
        }
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        if self.writer.is_some() || self.handler.is_some() {
            self.shared.abort.store(true, Ordering::Relaxed);
        }
        self.stop();
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
