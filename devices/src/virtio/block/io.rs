//! Moves bytes between a file and scattered guest buffers with one `preadv`/`pwritev` per
//! request (not per descriptor): no bounce buffer, and dirty pages are recorded for snapshots.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use vm_memory::bitmap::Bitmap;
use vm_memory::GuestMemoryBackend;

use crate::virtio::guest_buffers::Segment;

use crate::GuestMemory;

/// Host iovecs for `segments`. The pointers stay valid while `mem` is alive (guest memory is
/// never unmapped while devices run). Fails if any byte is outside guest memory.
fn iovecs(
    mem: &GuestMemory,
    segments: &[Segment],
    mark_dirty: bool,
) -> io::Result<Vec<libc::iovec>> {
    let mut iovs = Vec::with_capacity(segments.len());
    for seg in segments {
        let len = usize::try_from(seg.len).map_err(io::Error::other)?;
        for slice in GuestMemoryBackend::get_slices(mem, seg.addr, len) {
            let slice = slice.map_err(io::Error::other)?;
            if mark_dirty {
                // Marked before the I/O: a failed read may still have written part of it.
                slice.bitmap().mark_dirty(0, slice.len());
            }
            iovs.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    Ok(iovs)
}

/// Reads `total_len(segments)` bytes of `file` at `offset` into the guest buffers.
pub fn read_to_guest(
    mem: &GuestMemory,
    segments: &[Segment],
    file: &File,
    offset: u64,
) -> io::Result<()> {
    let mut iovs = iovecs(mem, segments, true)?;
    transfer(&mut iovs, offset, |iov, cnt, off| {
        // SAFETY: `iov` points to `cnt` iovecs describing guest memory that stays mapped for the
        // call (see `iovecs`); the kernel writes at most `iov_len` bytes to each.
        unsafe { libc::preadv(file.as_raw_fd(), iov, cnt, off) }
    })
}

/// Writes the guest buffers to `file` at `offset`.
pub fn write_from_guest(
    mem: &GuestMemory,
    segments: &[Segment],
    file: &File,
    offset: u64,
) -> io::Result<()> {
    let mut iovs = iovecs(mem, segments, false)?;
    transfer(&mut iovs, offset, |iov, cnt, off| {
        // SAFETY: as in `read_to_guest`; pwritev only reads the described memory.
        unsafe { libc::pwritev(file.as_raw_fd(), iov, cnt, off) }
    })
}

/// Runs a vectored positioned syscall until every iovec is consumed, resuming after short
/// transfers and EINTR.
fn transfer(
    iovs: &mut [libc::iovec],
    mut offset: u64,
    mut op: impl FnMut(*const libc::iovec, libc::c_int, libc::off_t) -> libc::ssize_t,
) -> io::Result<()> {
    const IOV_MAX: usize = 1024;
    let mut first = 0usize;
    while first < iovs.len() {
        let rest = iovs.get(first..).unwrap_or_default();
        let cnt = rest.len().min(IOV_MAX);
        let off = libc::off_t::try_from(offset).map_err(io::Error::other)?;
        let ret = op(rest.as_ptr(), cnt as libc::c_int, off);
        let done = match usize::try_from(ret) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => n,
            Err(_) => {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
        };
        offset = offset
            .checked_add(done as u64)
            .ok_or_else(|| io::Error::other("offset overflow"))?;
        let mut left = done;
        while left > 0 {
            let Some(iov) = iovs.get_mut(first) else {
                break;
            };
            if left >= iov.iov_len {
                left -= iov.iov_len;
                first += 1;
            } else {
                // SAFETY: `left < iov_len`, so the advanced pointer stays inside the same buffer.
                iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(left) }.cast();
                iov.iov_len -= left;
                left = 0;
            }
        }
        // Zero-length iovecs are skipped so the loop cannot spin on them.
        while iovs.get(first).is_some_and(|iov| iov.iov_len == 0) {
            first += 1;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::guest_buffers::gather;
    use std::io::{Read, Seek, Write};
    use vm_memory::Bytes;
    use vm_memory::GuestAddress;

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000), (GuestAddress(0x10000), 0x10000)])
            .unwrap()
    }

    #[test]
    fn vectored_io_round_trips_across_segments_and_regions() {
        let mem = mem();
        let mut file = tempfile::tempfile().unwrap();
        let pattern: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        file.write_all(&pattern).unwrap();
        // The second segment straddles the boundary between the two memory regions.
        let segs = [
            Segment {
                addr: GuestAddress(0x100),
                len: 1000,
            },
            Segment {
                addr: GuestAddress(0xfe00),
                len: 1000,
            },
            Segment {
                addr: GuestAddress(0x12000),
                len: 0,
            },
            Segment {
                addr: GuestAddress(0x13000),
                len: 1000,
            },
        ];
        read_to_guest(&mem, &segs, &file, 0).unwrap();
        let mut got = vec![0u8; 3000];
        gather(&mem, &segs, &mut got).unwrap();
        assert_eq!(got, pattern);
        mem.write_slice(&[0xaa; 1000], GuestAddress(0x13000))
            .unwrap();
        write_from_guest(&mem, &segs, &file, 3000).unwrap();
        let mut all = Vec::new();
        file.rewind().unwrap();
        file.read_to_end(&mut all).unwrap();
        assert_eq!(all.len(), 6000);
        assert_eq!(&all[3000..5000], &pattern[..2000]);
        assert!(all[5000..].iter().all(|&b| b == 0xaa));
    }

    #[test]
    fn reading_past_end_of_file_is_an_error() {
        let mem = mem();
        let file = tempfile::tempfile().unwrap();
        let segs = [Segment {
            addr: GuestAddress(0),
            len: 512,
        }];
        assert!(read_to_guest(&mem, &segs, &file, 0).is_err());
    }

    #[test]
    fn buffers_outside_guest_memory_are_rejected() {
        let mem = mem();
        let file = tempfile::tempfile().unwrap();
        let segs = [Segment {
            addr: GuestAddress(0x1f000),
            len: 0x2000,
        }];
        assert!(write_from_guest(&mem, &segs, &file, 0).is_err());
        assert!(gather(&mem, &segs, &mut [0u8; 0x2000]).is_err());
    }
}
