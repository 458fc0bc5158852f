//! virtio-blk request parsing and execution, with no event-loop or queue state: a request is a
//! descriptor chain in guest memory, executed against a `Disk`. Every field comes from the guest
//! and is checked; a bad request gets an error status, never a panic.
//!
//! Chain layout (virtio 1.2, 5.2.6): device-readable header `{type: u32, reserved: u32, sector:
//! u64}` and OUT/DISCARD/WRITE_ZEROES payload, then device-writable IN/GET_ID payload, then one
//! device-writable status byte (the chain's last byte).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_metrics::BlockMetrics;

use super::io::{read_to_guest, write_from_guest};
use crate::virtio::guest_buffers::{gather, scatter, skip_bytes, total_len, Segment};
use crate::GuestMemory;

pub const SECTOR_SHIFT: u32 = 9;
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
/// Segments accepted in one DISCARD / WRITE_ZEROES request (advertised in config space).
pub const MAX_DISCARD_SEGMENTS: u32 = 16;
/// Sectors accepted in one DISCARD / WRITE_ZEROES segment (advertised in config space).
pub const MAX_DISCARD_SECTORS: u32 = u32::MAX >> SECTOR_SHIFT;

const HEADER_LEN: u64 = 16;
const DISCARD_SEGMENT_LEN: u64 = 16;

/// The backing file and what the guest was told about it.
#[derive(Debug)]
pub struct Disk {
    pub file: File,
    /// Size in 512-byte sectors (a partial last sector is not exposed).
    pub capacity_sectors: u64,
    pub read_only: bool,
    /// VIRTIO_BLK_T_GET_ID answer: NUL-padded, not necessarily NUL-terminated.
    pub id: [u8; VIRTIO_BLK_ID_BYTES as usize],
}

/// Outcome of one request, for statistics and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// Bytes written into the chain's device-writable buffers (goes into the used ring).
    pub used_len: u32,
    /// Status written to the status byte; None when the chain had no place for it.
    pub status: Option<u8>,
}

/// A chain split into its parts, before looking at the header.
struct Layout {
    readable: Vec<Segment>,
    /// Device-writable payload, without the status byte.
    writable: Vec<Segment>,
    status: GuestAddress,
}

enum LayoutError {
    /// Nowhere to report an error: the chain goes back with len 0.
    NoStatus,
    /// The chain has a status byte but is otherwise unusable: reported as IOERR.
    Malformed {
        status: GuestAddress,
        why: &'static str,
    },
}

fn layout(chain: DescriptorChain<&GuestMemory>) -> Result<Layout, LayoutError> {
    let descs: Vec<(Segment, bool)> = chain
        .map(|d| {
            let seg = Segment {
                addr: d.addr(),
                len: d.len(),
            };
            (seg, d.is_write_only())
        })
        .collect();
    // The status byte is the last byte of the last descriptor, which must be device-writable.
    let Some((&(last, true), rest)) = descs.split_last() else {
        return Err(LayoutError::NoStatus);
    };
    let status = status_addr(last).ok_or(LayoutError::NoStatus)?;
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    for &(seg, is_writable) in rest {
        if is_writable {
            writable.push(seg);
        } else if !writable.is_empty() {
            return Err(LayoutError::Malformed {
                status,
                why: "device-readable descriptor after a device-writable one",
            });
        } else {
            readable.push(seg);
        }
    }
    if last.len > 1 {
        writable.push(Segment {
            addr: last.addr,
            len: last.len - 1,
        });
    }
    Ok(Layout {
        readable,
        writable,
        status,
    })
}

fn status_addr(last: Segment) -> Option<GuestAddress> {
    let offset = u64::from(last.len.checked_sub(1)?);
    last.addr.checked_add(offset)
}

/// Payload bytes of the request in `chain` as a rate limiter counts them: the data read by IN
/// or written by OUT, 0 for other requests and for chains that are not requests at all (they
/// still cost an operation). Reads only the header's type; the chain itself is not consumed.
pub fn data_len(mem: &GuestMemory, chain: &DescriptorChain<&GuestMemory>) -> u64 {
    let Ok(layout) = layout(chain.clone()) else {
        return 0;
    };
    let mut request_type = [0u8; 4];
    if gather(mem, &layout.readable, &mut request_type).is_err() {
        return 0;
    }
    match u32::from_le_bytes(request_type) {
        VIRTIO_BLK_T_IN => total_len(&layout.writable),
        VIRTIO_BLK_T_OUT => total_len(&layout.readable).saturating_sub(HEADER_LEN),
        _ => 0,
    }
}

/// Parses and executes the request in `chain`, writes its status byte, and returns what goes
/// into the used ring. Never panics, whatever the chain contains.
pub fn process_request(
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
    disk: &Disk,
) -> Completion {
    process_request_counted(mem, chain, disk, None)
}

/// `process_request`, counting the request in `metrics`.
pub fn process_request_counted(
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
    disk: &Disk,
    metrics: Option<&BlockMetrics>,
) -> Completion {
    let layout = match layout(chain) {
        Ok(layout) => layout,
        Err(LayoutError::NoStatus) => {
            if let Some(m) = metrics {
                m.invalid_reqs_count.inc();
            }
            tracing::debug!("virtio-blk: chain without a status byte");
            return Completion {
                used_len: 0,
                status: None,
            };
        }
        Err(LayoutError::Malformed { status, why }) => {
            if let Some(m) = metrics {
                m.invalid_reqs_count.inc();
            }
            tracing::debug!("virtio-blk: malformed chain: {why}");
            return finish(mem, status, VIRTIO_BLK_S_IOERR as u8, 0);
        }
    };
    let (status, data_len) = match execute(mem, &layout, disk, metrics) {
        Ok(written) => (VIRTIO_BLK_S_OK as u8, written),
        Err(RequestError::Unsupported) => {
            if let Some(m) = metrics {
                m.invalid_reqs_count.inc();
            }
            (VIRTIO_BLK_S_UNSUPP as u8, 0)
        }
        Err(RequestError::Io(why)) => {
            if let Some(m) = metrics {
                m.execute_fails.inc();
            }
            tracing::debug!("virtio-blk: request failed: {why}");
            (VIRTIO_BLK_S_IOERR as u8, 0)
        }
    };
    finish(mem, layout.status, status, data_len)
}

fn finish(mem: &GuestMemory, status_addr: GuestAddress, status: u8, data_len: u32) -> Completion {
    if mem.write_obj(status, status_addr).is_err() {
        return Completion {
            used_len: 0,
            status: None,
        };
    }
    Completion {
        used_len: data_len.saturating_add(1),
        status: Some(status),
    }
}

enum RequestError {
    Unsupported,
    Io(String),
}

impl From<io::Error> for RequestError {
    fn from(e: io::Error) -> Self {
        RequestError::Io(e.to_string())
    }
}

fn io_err(why: impl Into<String>) -> RequestError {
    RequestError::Io(why.into())
}

/// Runs the request; returns the number of payload bytes written into guest buffers.
fn execute(
    mem: &GuestMemory,
    layout: &Layout,
    disk: &Disk,
    metrics: Option<&BlockMetrics>,
) -> Result<u32, RequestError> {
    let mut header = [0u8; HEADER_LEN as usize];
    gather(mem, &layout.readable, &mut header).map_err(|_| io_err("short or unreadable header"))?;
    let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = header;
    let request_type = u32::from_le_bytes([t0, t1, t2, t3]);
    let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
    let out_data =
        skip_bytes(&layout.readable, HEADER_LEN).ok_or_else(|| io_err("short header"))?;
    let in_data = &layout.writable;

    match request_type {
        VIRTIO_BLK_T_IN => {
            if total_len(&out_data) > 0 {
                return Err(io_err("IN request with device-readable payload"));
            }
            let len = total_len(in_data);
            let offset = checked_range(disk, sector, len)?;
            read_to_guest(mem, in_data, &disk.file, offset)?;
            if let Some(m) = metrics {
                m.read_count.inc();
                m.read_bytes.inc_by(len);
            }
            u32::try_from(len).map_err(|_| io_err("IN payload over 4 GiB"))
        }
        VIRTIO_BLK_T_OUT => {
            if total_len(in_data) > 0 {
                return Err(io_err("OUT request with device-writable payload"));
            }
            if disk.read_only {
                return Err(io_err("write to read-only disk"));
            }
            let len = total_len(&out_data);
            let offset = checked_range(disk, sector, len)?;
            write_from_guest(mem, &out_data, &disk.file, offset)?;
            if let Some(m) = metrics {
                m.write_count.inc();
                m.write_bytes.inc_by(len);
            }
            Ok(0)
        }
        VIRTIO_BLK_T_FLUSH => {
            disk.file.sync_all()?;
            if let Some(m) = metrics {
                m.flush_count.inc();
            }
            Ok(0)
        }
        VIRTIO_BLK_T_GET_ID => {
            let written = scatter(mem, in_data, &disk.id)?;
            u32::try_from(written).map_err(|_| io_err("id length"))
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if disk.read_only {
                return Err(io_err("discard/write-zeroes on read-only disk"));
            }
            let zeroes = request_type == VIRTIO_BLK_T_WRITE_ZEROES;
            for range in discard_ranges(mem, &out_data)? {
                if !zeroes && range.flags != 0 {
                    // The unmap flag (or any other) is not valid for DISCARD.
                    return Err(RequestError::Unsupported);
                }
                if range.flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 {
                    return Err(RequestError::Unsupported);
                }
                if range.num_sectors > MAX_DISCARD_SECTORS {
                    return Err(io_err("discard range too long"));
                }
                let len = u64::from(range.num_sectors) << SECTOR_SHIFT;
                let offset = checked_range(disk, range.sector, len)?;
                let unmap = !zeroes || range.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
                zero_range(&disk.file, offset, len, unmap)?;
            }
            Ok(0)
        }
        _ => Err(RequestError::Unsupported),
    }
}

/// Byte offset of `sector` if `len` bytes from there are sector-multiple and inside the disk.
fn checked_range(disk: &Disk, sector: u64, len: u64) -> Result<u64, RequestError> {
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(io_err("length is not a multiple of 512"));
    }
    let end_sector = sector
        .checked_add(len >> SECTOR_SHIFT)
        .ok_or_else(|| io_err("sector overflow"))?;
    if end_sector > disk.capacity_sectors {
        return Err(io_err(format!(
            "sectors {sector}..{end_sector} beyond capacity {}",
            disk.capacity_sectors
        )));
    }
    // sector < capacity <= file size / 512, so this cannot overflow.
    Ok(sector << SECTOR_SHIFT)
}

struct DiscardRange {
    sector: u64,
    num_sectors: u32,
    flags: u32,
}

fn discard_ranges(
    mem: &GuestMemory,
    payload: &[Segment],
) -> Result<Vec<DiscardRange>, RequestError> {
    let len = total_len(payload);
    if len == 0 || !len.is_multiple_of(DISCARD_SEGMENT_LEN) {
        return Err(io_err("discard payload is not a whole number of segments"));
    }
    let count = len / DISCARD_SEGMENT_LEN;
    if count > u64::from(MAX_DISCARD_SEGMENTS) {
        return Err(io_err("too many discard segments"));
    }
    // count <= 16, so this is at most 256 bytes.
    let mut buf = vec![0u8; (count * DISCARD_SEGMENT_LEN) as usize];
    gather(mem, payload, &mut buf).map_err(|_| io_err("unreadable discard segments"))?;
    Ok(buf
        .chunks_exact(DISCARD_SEGMENT_LEN as usize)
        .filter_map(|c| {
            let sector = u64::from_le_bytes(c.get(0..8)?.try_into().ok()?);
            let num_sectors = u32::from_le_bytes(c.get(8..12)?.try_into().ok()?);
            let flags = u32::from_le_bytes(c.get(12..16)?.try_into().ok()?);
            Some(DiscardRange {
                sector,
                num_sectors,
                flags,
            })
        })
        .collect())
}

/// Makes `len` bytes at `offset` read as zeroes: deallocating them if `unmap`, else keeping
/// them allocated. Falls back to writing zeroes where the filesystem lacks fallocate modes.
fn zero_range(file: &File, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let keep = libc::FALLOC_FL_KEEP_SIZE;
    let modes: &[libc::c_int] = if unmap {
        &[
            libc::FALLOC_FL_PUNCH_HOLE | keep,
            libc::FALLOC_FL_ZERO_RANGE | keep,
        ]
    } else {
        &[libc::FALLOC_FL_ZERO_RANGE | keep]
    };
    let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::other("range does not fit off_t"));
    };
    for &mode in modes {
        // SAFETY: fallocate only operates on the file behind a valid, owned fd.
        let ret = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, n) };
        if ret == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(err);
        }
    }
    write_zeroes(file, offset, len)
}

fn write_zeroes(file: &File, mut offset: u64, len: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    const CHUNK: u64 = 64 * 1024;
    let zeroes = vec![0u8; CHUNK as usize];
    let end = offset
        .checked_add(len)
        .ok_or_else(|| io::Error::other("range overflow"))?;
    while offset < end {
        let n = (end - offset).min(CHUNK) as usize;
        file.write_all_at(zeroes.get(..n).unwrap_or_default(), offset)?;
        offset += n as u64;
    }
    Ok(())
}
