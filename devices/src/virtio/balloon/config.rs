//! The balloon's configuration space (virtio 1.2, 5.5.4): `num_pages`, the target the host
//! writes, and `actual`, which the driver writes back. Both count 4 KiB pages, little-endian.
//! The free-page-hint and poison fields are not offered, so the space is 8 bytes.

/// Bytes of configuration space the device exposes.
pub const CONFIG_SPACE_SIZE: usize = 8;
const ACTUAL_OFFSET: u64 = 4;

/// `num_pages` and `actual`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConfigSpace {
    pub num_pages: u32,
    pub actual_pages: u32,
}

impl ConfigSpace {
    fn bytes(&self) -> [u8; CONFIG_SPACE_SIZE] {
        let mut out = [0u8; CONFIG_SPACE_SIZE];
        out[..4].copy_from_slice(&self.num_pages.to_le_bytes());
        out[4..].copy_from_slice(&self.actual_pages.to_le_bytes());
        out
    }

    /// Reads `data.len()` bytes at `offset`; bytes past the end read as zero.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        let bytes = self.bytes();
        for (i, out) in data.iter_mut().enumerate() {
            *out = offset
                .checked_add(i as u64)
                .and_then(|at| usize::try_from(at).ok())
                .and_then(|at| bytes.get(at).copied())
                .unwrap_or(0);
        }
    }

    /// The driver writes only `actual` (a 4-byte write at offset 4); anything else, including
    /// writes to the host's `num_pages`, is ignored. Returns whether `actual` changed.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> bool {
        if offset != ACTUAL_OFFSET {
            return false;
        }
        let Ok(raw) = <[u8; 4]>::try_from(data) else {
            return false;
        };
        let actual = u32::from_le_bytes(raw);
        let changed = actual != self.actual_pages;
        self.actual_pages = actual;
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_little_endian_and_zero_past_the_end() {
        let cs = ConfigSpace {
            num_pages: 0x0102_0304,
            actual_pages: 7,
        };
        let mut out = [0xffu8; 12];
        cs.read(0, &mut out);
        assert_eq!(out, [4, 3, 2, 1, 7, 0, 0, 0, 0, 0, 0, 0]);
        let mut one = [0xffu8; 1];
        cs.read(u64::MAX, &mut one);
        assert_eq!(one, [0]);
    }

    #[test]
    fn the_driver_writes_only_actual() {
        let mut cs = ConfigSpace {
            num_pages: 10,
            actual_pages: 0,
        };
        assert!(!cs.write(0, &99u32.to_le_bytes()));
        assert_eq!(cs.num_pages, 10);
        assert!(!cs.write(4, &[1, 0]));
        assert!(!cs.write(5, &1u32.to_le_bytes()));
        assert!(cs.write(4, &10u32.to_le_bytes()));
        assert_eq!(cs.actual_pages, 10);
        assert!(!cs.write(4, &10u32.to_le_bytes()));
    }
}
