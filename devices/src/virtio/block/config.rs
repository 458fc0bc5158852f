//! virtio-blk configuration space (struct virtio_blk_config, little endian).

use super::request::{MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS};

/// Bytes of config space we expose: through `write_zeroes_may_unmap` and its padding.
const CONFIG_LEN: usize = 60;
/// Largest single data segment the driver may use (VIRTIO_BLK_F_SIZE_MAX).
pub const SIZE_MAX: u32 = 1 << 20;
/// Discard granularity in sectors: one 4 KiB filesystem block.
const DISCARD_SECTOR_ALIGNMENT: u32 = 8;

pub fn config_space(capacity_sectors: u64, queue_size: u16) -> Vec<u8> {
    let mut cfg = vec![0u8; CONFIG_LEN];
    // A request needs a header and a status descriptor besides its data segments.
    let seg_max = u32::from(queue_size).saturating_sub(2).max(1);
    put(&mut cfg, 0, &capacity_sectors.to_le_bytes());
    put(&mut cfg, 8, &SIZE_MAX.to_le_bytes());
    put(&mut cfg, 12, &seg_max.to_le_bytes());
    put(&mut cfg, 36, &MAX_DISCARD_SECTORS.to_le_bytes());
    put(&mut cfg, 40, &MAX_DISCARD_SEGMENTS.to_le_bytes());
    put(&mut cfg, 44, &DISCARD_SECTOR_ALIGNMENT.to_le_bytes());
    put(&mut cfg, 48, &MAX_DISCARD_SECTORS.to_le_bytes());
    put(&mut cfg, 52, &MAX_DISCARD_SEGMENTS.to_le_bytes());
    put(&mut cfg, 56, &[1]); // write_zeroes_may_unmap
    cfg
}

fn put(cfg: &mut [u8], offset: usize, bytes: &[u8]) {
    if let Some(dst) = cfg.get_mut(offset..offset + bytes.len()) {
        dst.copy_from_slice(bytes);
    }
}

/// Copies config bytes at `offset` into `data`; anything past the end reads as zero.
pub fn read(cfg: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    let Some(src) = cfg.get(start..) else {
        return;
    };
    for (dst, src) in data.iter_mut().zip(src) {
        *dst = *src;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;
    use virtio_bindings::virtio_blk::virtio_blk_config as C;

    fn field(cfg: &[u8], offset: usize, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        read(cfg, offset as u64, &mut out);
        out
    }

    #[test]
    fn fields_sit_at_the_spec_offsets() {
        let cfg = config_space(0x1_0000_0002, 256);
        assert_eq!(
            field(&cfg, offset_of!(C, capacity), 8),
            0x1_0000_0002u64.to_le_bytes()
        );
        assert_eq!(field(&cfg, offset_of!(C, seg_max), 4), 254u32.to_le_bytes());
        assert_eq!(
            field(&cfg, offset_of!(C, size_max), 4),
            SIZE_MAX.to_le_bytes()
        );
        assert_eq!(
            field(&cfg, offset_of!(C, max_discard_seg), 4),
            MAX_DISCARD_SEGMENTS.to_le_bytes()
        );
        assert_eq!(
            field(&cfg, offset_of!(C, max_write_zeroes_seg), 4),
            MAX_DISCARD_SEGMENTS.to_le_bytes()
        );
        assert_eq!(field(&cfg, offset_of!(C, write_zeroes_may_unmap), 1), [1]);
        assert!(offset_of!(C, unused1) + 3 == CONFIG_LEN);
    }

    #[test]
    fn reads_past_the_end_are_zero() {
        let cfg = config_space(8, 256);
        assert_eq!(field(&cfg, 58, 4), [0, 0, 0, 0]);
        assert_eq!(field(&cfg, u64::MAX as usize, 2), [0, 0]);
        let mut buf = [0xffu8; 2];
        read(&cfg, u64::MAX, &mut buf);
        assert_eq!(buf, [0, 0]);
    }
}
