//! A running device's disk file replaced by another (Firecracker's `PATCH /drives` with a new
//! `path_on_host`). The caller opens the new file ([`open_disk`]) on its own thread, then hands
//! it to [`Block::replace_disk`] on the device's thread (or with the event loop parked): the
//! queue is processed there one whole request at a time, so every request is served entirely
//! from the old file or entirely from the new one.

use std::fs::OpenOptions;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::SECTOR_SIZE;
use super::{config, encode_id, encode_id_truncated, Block, BlockError, Disk, QUEUE_SIZE};

/// Opens `path` as a disk: read-only or read-write, the serial `id` or one derived from the
/// file (distinct between files, stable for the same file across restarts).
pub fn open_disk(path: &Path, read_only: bool, id: Option<&str>) -> Result<Disk, BlockError> {
    let file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(|source| BlockError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    let metadata = file.metadata().map_err(|source| BlockError::Metadata {
        path: path.to_path_buf(),
        source,
    })?;
    let id = match id {
        Some(id) => encode_id(id)?,
        None => encode_id_truncated(&format!("{:x}-{:x}", metadata.dev(), metadata.ino())),
    };
    Ok(Disk {
        file,
        capacity_sectors: metadata.len() / SECTOR_SIZE,
        read_only,
        id,
    })
}

impl Block {
    /// Whether the device is read-only (a new disk must be opened the same way).
    pub fn read_only(&self) -> bool {
        self.config.read_only
    }

    /// The serial given at creation, if any (else each file gets its own).
    pub fn configured_id(&self) -> Option<&str> {
        self.config.id.as_deref()
    }

    /// Serves `disk` (opened from `path`) from now on and returns the previous disk, so the
    /// caller closes it off this thread. The capacity in config space follows the new file and
    /// an active device raises a configuration-change interrupt (virtio 1.2, 4.2.2.1) so the
    /// driver rereads it. Call between requests: on the event-loop thread, or with it parked.
    pub fn replace_disk(&mut self, path: PathBuf, disk: Disk) -> Disk {
        let old = std::mem::replace(&mut self.disk, disk);
        self.config.path = path;
        self.config_space = config::config_space(self.disk.capacity_sectors, QUEUE_SIZE);
        if let Some(active) = &self.active {
            if let Err(e) = active.interrupt.signal_config_change() {
                tracing::error!("virtio-blk: raising the config-change interrupt: {e}");
            }
        }
        tracing::info!(
            path = %self.config.path.display(),
            sectors = self.disk.capacity_sectors,
            "virtio-blk: disk replaced"
        );
        old
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::atomic::Ordering;
    use std::sync::{Arc, Mutex};

    use event_manager::{EventManager, SubscriberOps};
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN};
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::interrupt::CountingLine;
    use crate::persist::Persist;
    use crate::rate_limiter::RateLimiterConfig;
    use crate::virtio::block::BlockConfig;
    use crate::virtio::{ActivationContext, VirtioDevice, VirtioInterrupt, VIRTIO_MMIO_INT_CONFIG};
    use crate::GuestMemory;

    const HDR: u64 = 0x1000;
    const DATA: u64 = 0x2000;
    const STATUS: u64 = 0x3000;

    fn image(dir: &Path, name: &str, fill: u8, sectors: u64) -> PathBuf {
        let path = dir.join(name);
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&vec![fill; (sectors * SECTOR_SIZE) as usize])
            .unwrap();
        path
    }

    fn capacity(blk: &Block) -> u64 {
        let mut b = [0u8; 8];
        blk.read_config(0, &mut b);
        u64::from_le_bytes(b)
    }

    #[test]
    fn open_disk_fails_on_a_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = open_disk(&dir.path().join("nope.img"), false, None).unwrap_err();
        assert!(matches!(err, BlockError::Open { .. }), "{err}");
    }

    #[test]
    fn replaced_disk_serves_the_next_request_with_new_capacity_and_a_config_interrupt() {
        let dir = tempfile::tempdir().unwrap();
        let old_path = image(dir.path(), "old.img", 0x11, 8);
        let new_path = image(dir.path(), "new.img", 0x22, 24);
        let blk = Arc::new(Mutex::new(
            Block::new(BlockConfig {
                path: old_path.clone(),
                read_only: true,
                id: None,
                rate_limiter: RateLimiterConfig::default(),
            })
            .unwrap(),
        ));
        assert_eq!(capacity(&blk.lock().unwrap()), 8);
        let mut manager = EventManager::<Arc<Mutex<Block>>>::new().unwrap();
        manager.add_subscriber(blk.clone());

        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        let queue: Queue = vq.create_queue().unwrap();
        let line = Arc::new(CountingLine::default());
        let interrupt = Arc::new(VirtioInterrupt::new(line.clone()));
        let notify = EventFd::new(0).unwrap();
        blk.lock()
            .unwrap()
            .activate(ActivationContext {
                mem: mem.clone(),
                acked_features: 0,
                queues: vec![queue],
                queue_events: vec![notify.try_clone().unwrap()],
                interrupt: interrupt.clone(),
            })
            .unwrap();
        manager.run_with_timeout(100).unwrap();

        let new_disk = open_disk(&new_path, true, None).unwrap();
        let old = blk.lock().unwrap().replace_disk(new_path.clone(), new_disk);
        assert_eq!(old.capacity_sectors, 8);
        assert_eq!(capacity(&blk.lock().unwrap()), 24);
        assert_eq!(
            interrupt.status() & VIRTIO_MMIO_INT_CONFIG,
            VIRTIO_MMIO_INT_CONFIG
        );
        assert_eq!(line.0.load(Ordering::SeqCst), 1);
        // A snapshot now records (and a restore reopens) the new file.
        assert_eq!(blk.lock().unwrap().save().path, new_path);

        // Read sector 20, which only the new file has.
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        hdr[8..16].copy_from_slice(&20u64.to_le_bytes());
        mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
        let next = VRING_DESC_F_NEXT as u16;
        let w = VRING_DESC_F_WRITE as u16;
        vq.add_desc_chains(
            &[
                RawDescriptor::from(SplitDescriptor::new(HDR, 16, next, 1)),
                RawDescriptor::from(SplitDescriptor::new(DATA, 512, next | w, 2)),
                RawDescriptor::from(SplitDescriptor::new(STATUS, 1, w, 0)),
            ],
            0,
        )
        .unwrap();
        notify.write(1).unwrap();
        manager.run_with_timeout(100).unwrap();
        assert_eq!(vq.used().idx().load(), 1);
        let status: u8 = mem.read_obj(GuestAddress(STATUS)).unwrap();
        assert_eq!(status, VIRTIO_BLK_S_OK as u8);
        let mut data = [0u8; 512];
        mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
        assert!(data.iter().all(|b| *b == 0x22));
    }

    #[test]
    fn an_inactive_device_takes_the_disk_without_an_interrupt() {
        let dir = tempfile::tempdir().unwrap();
        let a = image(dir.path(), "a.img", 1, 4);
        let b = image(dir.path(), "b.img", 2, 6);
        let mut blk = Block::new(BlockConfig {
            path: a,
            read_only: false,
            id: Some("serial".into()),
            rate_limiter: RateLimiterConfig::default(),
        })
        .unwrap();
        assert!(!blk.read_only());
        assert_eq!(blk.configured_id(), Some("serial"));
        let disk = open_disk(&b, blk.read_only(), blk.configured_id()).unwrap();
        assert_eq!(&disk.id[..6], b"serial");
        blk.replace_disk(b, disk);
        assert_eq!(capacity(&blk), 6);
        assert_eq!(blk.capacity_sectors(), 6);
    }
}
