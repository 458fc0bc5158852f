//! Parsing what the driver puts on the balloon's queues. Pure: guest memory and one descriptor
//! chain in, page ranges or statistics out; nothing here touches host memory. Every address,
//! length and direction comes from the guest and is checked; a bad descriptor is counted and
//! skipped, never trusted in part.
//!
//! - inflateq / deflateq: device-readable arrays of little-endian u32 page frame numbers (4 KiB
//!   pages whatever the guest's page size, virtio 1.2, 5.5.6).
//! - reporting_vq: device-writable buffers, each one a free range (address and length).
//! - statsq: one device-readable buffer of packed `{ le16 tag; le64 val; }` entries.

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::GuestMemory;

/// Balloon page size: PFNs count 4 KiB pages.
pub const PAGE_SIZE: u64 = 4096;
const PAGE_SHIFT: u32 = 12;
/// PFNs read from guest memory per copy (bounds the device's buffer whatever the guest sends).
const PFN_BATCH: usize = 256;
/// Bytes of one statistics entry.
const STAT_ENTRY: usize = 10;
/// Entries read from one statistics buffer at most (Linux 6.12 sends 16 or fewer).
pub const MAX_STATS: usize = 32;

/// A page-aligned range of guest physical memory, inside guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRange {
    pub gpa: u64,
    pub len: u64,
}

/// What one chain held.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChainReport {
    /// Pages handed to the sink.
    pub pages: u64,
    /// PFNs or ranges outside guest memory, or ranges smaller than a page once aligned.
    pub invalid: u64,
    /// Descriptors skipped: wrong direction, unreadable, or a length that is not whole entries.
    pub bad_descriptors: u64,
}

/// Whether `[gpa, gpa + len)` lies in guest memory.
fn in_memory(mem: &GuestMemory, gpa: u64, len: u64) -> bool {
    let Ok(len) = usize::try_from(len) else {
        return false;
    };
    gpa.checked_add(len as u64).is_some() && mem.check_range(GuestAddress(gpa), len)
}

/// Reads an inflate or deflate chain: each valid PFN becomes a page; consecutive pages are
/// merged before `sink` sees them, and the sink is called at least every [`PFN_BATCH`] PFNs so
/// nothing accumulates.
pub fn pfn_ranges(
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
    sink: &mut dyn FnMut(PageRange),
) -> ChainReport {
    let mut report = ChainReport::default();
    let mut pending: Option<PageRange> = None;
    let flush = |pending: &mut Option<PageRange>, sink: &mut dyn FnMut(PageRange)| {
        if let Some(range) = pending.take() {
            sink(range);
        }
    };
    let mut buf = [0u8; PFN_BATCH * 4];
    for desc in chain {
        let len = u64::from(desc.len());
        if desc.is_write_only() || len % 4 != 0 {
            report.bad_descriptors += 1;
            continue;
        }
        let mut done = 0u64;
        while done < len {
            let take = (len - done).min(buf.len() as u64) as usize;
            let Some(addr) = desc.addr().0.checked_add(done) else {
                report.bad_descriptors += 1;
                break;
            };
            let Some(dst) = buf.get_mut(..take) else {
                break;
            };
            if mem.read_slice(dst, GuestAddress(addr)).is_err() {
                report.bad_descriptors += 1;
                break;
            }
            for raw in dst.chunks_exact(4) {
                let pfn = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
                let gpa = u64::from(pfn) << PAGE_SHIFT;
                if !in_memory(mem, gpa, PAGE_SIZE) {
                    report.invalid += 1;
                    continue;
                }
                report.pages += 1;
                match pending.as_mut() {
                    Some(range) if range.gpa + range.len == gpa => range.len += PAGE_SIZE,
                    _ => {
                        flush(&mut pending, sink);
                        pending = Some(PageRange {
                            gpa,
                            len: PAGE_SIZE,
                        });
                    }
                }
            }
            flush(&mut pending, sink);
            done += take as u64;
        }
    }
    flush(&mut pending, sink);
    report
}

/// Reads a free-page-reporting chain: every device-writable descriptor is a free range. Its
/// ends are aligned inward to whole pages (a partial page may hold live data); a range that is
/// not entirely in guest memory is skipped whole.
pub fn reported_ranges(
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
    sink: &mut dyn FnMut(PageRange),
) -> ChainReport {
    let mut report = ChainReport::default();
    for desc in chain {
        if !desc.is_write_only() {
            report.bad_descriptors += 1;
            continue;
        }
        let gpa = desc.addr().0;
        let len = u64::from(desc.len());
        if !in_memory(mem, gpa, len) {
            report.invalid += 1;
            continue;
        }
        // In memory, so gpa + len does not overflow and neither does rounding up below it.
        let start = gpa.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let end = (gpa + len) / PAGE_SIZE * PAGE_SIZE;
        if end <= start {
            report.invalid += 1;
            continue;
        }
        report.pages += (end - start) / PAGE_SIZE;
        sink(PageRange {
            gpa: start,
            len: end - start,
        });
    }
    report
}

/// One statistic the driver reported (virtio 1.2, 5.5.6.3; tags past the spec's are kept as
/// numbers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    pub tag: u16,
    pub value: u64,
}

/// Names of the statistics tags (virtio 1.2, 5.5.6.3, and the ones Linux added since), as
/// Firecracker's API spells them.
const STAT_NAMES: [&str; 16] = [
    "swap_in",
    "swap_out",
    "major_faults",
    "minor_faults",
    "free_memory",
    "total_memory",
    "available_memory",
    "disk_caches",
    "hugetlb_allocations",
    "hugetlb_failures",
    "oom_kills",
    "alloc_stalls",
    "async_scans",
    "direct_scans",
    "async_reclaims",
    "direct_reclaims",
];

impl Stat {
    /// The tag's name, or `tag_N` for one this build does not know.
    pub fn name(&self) -> String {
        STAT_NAMES
            .get(usize::from(self.tag))
            .map_or_else(|| format!("tag_{}", self.tag), |n| (*n).to_string())
    }
}

/// Reads a statistics buffer: up to [`MAX_STATS`] whole entries from its device-readable
/// descriptors (a trailing partial entry is dropped).
pub fn stats(mem: &GuestMemory, chain: DescriptorChain<&GuestMemory>) -> (Vec<Stat>, ChainReport) {
    let mut report = ChainReport::default();
    let mut bytes = Vec::with_capacity(MAX_STATS * STAT_ENTRY);
    for desc in chain {
        if desc.is_write_only() {
            report.bad_descriptors += 1;
            continue;
        }
        let room = MAX_STATS * STAT_ENTRY - bytes.len();
        let take = usize::try_from(desc.len()).unwrap_or(usize::MAX).min(room);
        let mut part = vec![0u8; take];
        if mem.read_slice(&mut part, desc.addr()).is_err() {
            report.bad_descriptors += 1;
            continue;
        }
        bytes.extend_from_slice(&part);
        if bytes.len() == MAX_STATS * STAT_ENTRY {
            break;
        }
    }
    let stats = bytes
        .chunks_exact(STAT_ENTRY)
        .map(|e| Stat {
            tag: u16::from_le_bytes([e[0], e[1]]),
            value: u64::from_le_bytes([e[2], e[3], e[4], e[5], e[6], e[7], e[8], e[9]]),
        })
        .collect();
    (stats, report)
}
