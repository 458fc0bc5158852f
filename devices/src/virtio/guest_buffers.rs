//! Guest buffers described by descriptor chains, and byte copies in and out of them. Every
//! address and length comes from the guest: all arithmetic is checked.

use std::io;

use vm_memory::{Address, Bytes, GuestAddress};

use crate::GuestMemory;

/// A guest buffer: one descriptor's worth of memory (possibly trimmed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// Total byte length of `segments` (cannot overflow: at most 2^16 segments of < 2^32 bytes).
pub fn total_len(segments: &[Segment]) -> u64 {
    segments.iter().map(|s| u64::from(s.len)).sum()
}

/// Drops the first `bytes` bytes of `segments`; returns None if there are fewer.
pub fn skip_bytes(segments: &[Segment], mut bytes: u64) -> Option<Vec<Segment>> {
    let mut out = Vec::with_capacity(segments.len());
    for seg in segments {
        let len = u64::from(seg.len);
        if bytes >= len {
            bytes -= len;
            continue;
        }
        // bytes < len <= u32::MAX here.
        let skip = u32::try_from(bytes).ok()?;
        out.push(Segment {
            addr: seg.addr.checked_add(bytes)?,
            len: seg.len - skip,
        });
        bytes = 0;
    }
    (bytes == 0).then_some(out)
}

/// Copies the first `buf.len()` bytes of `segments` into `buf`.
pub fn gather(mem: &GuestMemory, segments: &[Segment], buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0usize;
    for seg in segments {
        if done == buf.len() {
            break;
        }
        if seg.len == 0 {
            continue;
        }
        let take = usize::try_from(seg.len)
            .unwrap_or(usize::MAX)
            .min(buf.len() - done);
        let dst = buf
            .get_mut(done..done + take)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        mem.read_slice(dst, seg.addr).map_err(io::Error::other)?;
        done += take;
    }
    if done == buf.len() {
        Ok(())
    } else {
        Err(io::ErrorKind::UnexpectedEof.into())
    }
}

/// Copies `data` into the start of `segments`; returns the number of bytes written (all of
/// `data` unless the segments are shorter).
pub fn scatter(mem: &GuestMemory, segments: &[Segment], data: &[u8]) -> io::Result<usize> {
    let mut done = 0usize;
    for seg in segments {
        if done == data.len() {
            break;
        }
        if seg.len == 0 {
            continue;
        }
        let take = usize::try_from(seg.len)
            .unwrap_or(usize::MAX)
            .min(data.len() - done);
        let src = data
            .get(done..done + take)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        mem.write_slice(src, seg.addr).map_err(io::Error::other)?;
        done += take;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_bytes_splits_segments() {
        let segs = [
            Segment {
                addr: GuestAddress(0x1000),
                len: 10,
            },
            Segment {
                addr: GuestAddress(0x2000),
                len: 10,
            },
        ];
        assert_eq!(
            skip_bytes(&segs, 15).unwrap(),
            vec![Segment {
                addr: GuestAddress(0x2005),
                len: 5
            }]
        );
        assert_eq!(skip_bytes(&segs, 20).unwrap(), vec![]);
        assert!(skip_bytes(&segs, 21).is_none());
    }
}
