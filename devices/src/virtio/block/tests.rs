use std::io::{Read, Seek, Write};
use std::os::unix::fs::FileExt;

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::*;

const MEM_SIZE: usize = 0x100_0000;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const DISK_SECTORS: u64 = 64;

const R: u16 = 0;
const W: u16 = VRING_DESC_F_WRITE as u16;

fn mem() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 253) as u8).collect()
}

fn disk_with(read_only: bool) -> Disk {
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(&pattern((DISK_SECTORS * SECTOR_SIZE) as usize))
        .unwrap();
    disk_from_file(file, read_only, "dormouse-test").unwrap()
}

fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

fn header(mem: &GuestMemory, request_type: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&request_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
}

/// Runs one chain through the pure request path.
fn run(mem: &GuestMemory, disk: &Disk, descs: &[RawDescriptor]) -> Completion {
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let vq = MockSplitQueue::new(mem, 16);
    let chain = vq.build_desc_chain(descs).unwrap();
    process_request(mem, chain, disk)
}

fn status_byte(mem: &GuestMemory) -> u8 {
    mem.read_obj(GuestAddress(STATUS)).unwrap()
}

fn ok(used_len: u32) -> Completion {
    Completion {
        used_len,
        status: Some(VIRTIO_BLK_S_OK as u8),
    }
}

fn failed(status: u32) -> Completion {
    Completion {
        used_len: 1,
        status: Some(status as u8),
    }
}

const NO_STATUS: Completion = Completion {
    used_len: 0,
    status: None,
};

fn file_bytes(disk: &Disk) -> Vec<u8> {
    let mut f = disk.file.try_clone().unwrap();
    let mut out = Vec::new();
    f.rewind().unwrap();
    f.read_to_end(&mut out).unwrap();
    out
}

#[test]
fn read_scatters_sectors_into_guest_buffers() {
    let mem = mem();
    let disk = disk_with(false);
    header(&mem, VIRTIO_BLK_T_IN, 3);
    let done = run(
        &mem,
        &disk,
        &[
            desc(HDR, 16, R),
            desc(DATA, 512, W),
            desc(DATA + 0x1000, 1024, W),
            desc(STATUS, 1, W),
        ],
    );
    assert_eq!(done, ok(1537));
    assert_eq!(status_byte(&mem), VIRTIO_BLK_S_OK as u8);
    let expected = pattern((DISK_SECTORS * SECTOR_SIZE) as usize);
    let mut got = vec![0u8; 1536];
    mem.read_slice(&mut got[..512], GuestAddress(DATA)).unwrap();
    mem.read_slice(&mut got[512..], GuestAddress(DATA + 0x1000))
        .unwrap();
    assert_eq!(got, expected[3 * 512..6 * 512]);
}

#[test]
fn status_byte_may_share_the_last_data_descriptor() {
    let mem = mem();
    let disk = disk_with(false);
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let vq = MockSplitQueue::new(&mem, 16);
    let chain = vq
        .build_desc_chain(&[desc(HDR, 16, R), desc(DATA, 513, W)])
        .unwrap();
    assert_eq!(process_request(&mem, chain, &disk), ok(513));
    assert_eq!(mem.read_obj::<u8>(GuestAddress(DATA + 512)).unwrap(), 0);
    let mut got = vec![0u8; 512];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, pattern(512));
}

#[test]
fn write_gathers_guest_buffers_into_the_file() {
    let mem = mem();
    let disk = disk_with(false);
    header(&mem, VIRTIO_BLK_T_OUT, 10);
    mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
    mem.write_slice(&[0xcd; 512], GuestAddress(DATA + 0x1000))
        .unwrap();
    let done = run(
        &mem,
        &disk,
        &[
            desc(HDR, 16, R),
            desc(DATA, 512, R),
            desc(DATA + 0x1000, 512, R),
            desc(STATUS, 1, W),
        ],
    );
    assert_eq!(done, ok(1));
    let file = file_bytes(&disk);
    assert!(file[10 * 512..11 * 512].iter().all(|&b| b == 0xab));
    assert!(file[11 * 512..12 * 512].iter().all(|&b| b == 0xcd));
    assert_eq!(file[..10 * 512], pattern(10 * 512)[..]);
}

#[test]
fn header_and_data_may_share_a_descriptor() {
    let mem = mem();
    let disk = disk_with(false);
    header(&mem, VIRTIO_BLK_T_OUT, 1);
    mem.write_slice(&[0x5a; 512], GuestAddress(HDR + 16))
        .unwrap();
    let done = run(&mem, &disk, &[desc(HDR, 16 + 512, R), desc(STATUS, 1, W)]);
    assert_eq!(done, ok(1));
    assert!(file_bytes(&disk)[512..1024].iter().all(|&b| b == 0x5a));
}

#[test]
fn flush_succeeds() {
    let mem = mem();
    let disk = disk_with(false);
    header(&mem, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(
        run(&mem, &disk, &[desc(HDR, 16, R), desc(STATUS, 1, W)]),
        ok(1)
    );
    assert_eq!(status_byte(&mem), VIRTIO_BLK_S_OK as u8);
}

#[test]
fn get_id_returns_the_padded_serial() {
    let mem = mem();
    let disk = disk_with(false);
    header(&mem, VIRTIO_BLK_T_GET_ID, 0);
    mem.write_slice(&[0xff; 20], GuestAddress(DATA)).unwrap();
    let done = run(
        &mem,
        &disk,
        &[desc(HDR, 16, R), desc(DATA, 20, W), desc(STATUS, 1, W)],
    );
    assert_eq!(done, ok(21));
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..13], b"dormouse-test");
    assert!(id[13..].iter().all(|&b| b == 0));
}

fn discard_segment(mem: &GuestMemory, at: u64, sector: u64, num: u32, flags: u32) {
    let mut seg = [0u8; 16];
    seg[0..8].copy_from_slice(&sector.to_le_bytes());
    seg[8..12].copy_from_slice(&num.to_le_bytes());
    seg[12..16].copy_from_slice(&flags.to_le_bytes());
    mem.write_slice(&seg, GuestAddress(at)).unwrap();
}

#[test]
fn discard_punches_a_hole_that_reads_as_zeroes() {
    let mem = mem();
    let disk = disk_with(false);
    header(&mem, VIRTIO_BLK_T_DISCARD, 0);
    discard_segment(&mem, DATA, 8, 8, 0);
    discard_segment(&mem, DATA + 16, 32, 1, 0);
    let done = run(
        &mem,
        &disk,
        &[desc(HDR, 16, R), desc(DATA, 32, R), desc(STATUS, 1, W)],
    );
    assert_eq!(done, ok(1));
    let file = file_bytes(&disk);
    let original = pattern(file.len());
    assert_eq!(file.len() as u64, DISK_SECTORS * SECTOR_SIZE, "size kept");
    assert!(file[8 * 512..16 * 512].iter().all(|&b| b == 0));
    assert!(file[32 * 512..33 * 512].iter().all(|&b| b == 0));
    assert_eq!(file[..8 * 512], original[..8 * 512]);
    assert_eq!(file[16 * 512..32 * 512], original[16 * 512..32 * 512]);
    assert_eq!(file[33 * 512..], original[33 * 512..]);
}

#[test]
fn discard_with_unmap_flag_is_unsupported() {
    let mem = mem();
    let disk = disk_with(false);
    header(&mem, VIRTIO_BLK_T_DISCARD, 0);
    discard_segment(&mem, DATA, 0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    let done = run(
        &mem,
        &disk,
        &[desc(HDR, 16, R), desc(DATA, 16, R), desc(STATUS, 1, W)],
    );
    assert_eq!(done, failed(VIRTIO_BLK_S_UNSUPP));
    assert_eq!(file_bytes(&disk), pattern(file_bytes(&disk).len()));
}

#[test]
fn write_zeroes_with_and_without_unmap() {
    for flags in [0, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP] {
        let mem = mem();
        let disk = disk_with(false);
        header(&mem, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        discard_segment(&mem, DATA, 1, 3, flags);
        let done = run(
            &mem,
            &disk,
            &[desc(HDR, 16, R), desc(DATA, 16, R), desc(STATUS, 1, W)],
        );
        assert_eq!(done, ok(1), "flags {flags}");
        let file = file_bytes(&disk);
        assert!(file[512..4 * 512].iter().all(|&b| b == 0));
        assert_eq!(file[..512], pattern(512)[..]);
        assert_eq!(file[4 * 512..5 * 512], pattern(5 * 512)[4 * 512..]);
    }
}

#[test]
fn discard_out_of_range_or_malformed_payload_fails() {
    let mem = mem();
    let disk = disk_with(false);
    header(&mem, VIRTIO_BLK_T_DISCARD, 0);
    discard_segment(&mem, DATA, DISK_SECTORS - 1, 2, 0);
    let chain = [desc(HDR, 16, R), desc(DATA, 16, R), desc(STATUS, 1, W)];
    assert_eq!(run(&mem, &disk, &chain), failed(VIRTIO_BLK_S_IOERR));
    discard_segment(&mem, DATA, u64::MAX, u32::MAX, 0);
    assert_eq!(run(&mem, &disk, &chain), failed(VIRTIO_BLK_S_IOERR));
    // 15 bytes is not a whole segment; 17 segments is over the advertised maximum.
    let short = [desc(HDR, 16, R), desc(DATA, 15, R), desc(STATUS, 1, W)];
    assert_eq!(run(&mem, &disk, &short), failed(VIRTIO_BLK_S_IOERR));
    let many = [desc(HDR, 16, R), desc(DATA, 16 * 17, R), desc(STATUS, 1, W)];
    assert_eq!(run(&mem, &disk, &many), failed(VIRTIO_BLK_S_IOERR));
    assert_eq!(file_bytes(&disk), pattern(file_bytes(&disk).len()));
}

#[test]
fn out_of_range_sectors_fail_without_touching_memory() {
    let mem = mem();
    let disk = disk_with(false);
    for (sector, len) in [
        (DISK_SECTORS - 1, 1024),
        (DISK_SECTORS, 512),
        (u64::MAX, 512),
        (u64::MAX >> 9, 512),
    ] {
        header(&mem, VIRTIO_BLK_T_IN, sector);
        mem.write_slice(&[0xee; 1024], GuestAddress(DATA)).unwrap();
        let done = run(
            &mem,
            &disk,
            &[desc(HDR, 16, R), desc(DATA, len, W), desc(STATUS, 1, W)],
        );
        assert_eq!(done, failed(VIRTIO_BLK_S_IOERR), "sector {sector}");
        let mut buf = [0u8; 1024];
        mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
        assert!(buf.iter().all(|&b| b == 0xee));
        header(&mem, VIRTIO_BLK_T_OUT, sector);
        let done = run(
            &mem,
            &disk,
            &[desc(HDR, 16, R), desc(DATA, len, R), desc(STATUS, 1, W)],
        );
        assert_eq!(done, failed(VIRTIO_BLK_S_IOERR), "sector {sector}");
    }
    // The very last sector is in range.
    header(&mem, VIRTIO_BLK_T_IN, DISK_SECTORS - 1);
    let done = run(
        &mem,
        &disk,
        &[desc(HDR, 16, R), desc(DATA, 512, W), desc(STATUS, 1, W)],
    );
    assert_eq!(done, ok(513));
}

#[test]
fn read_only_disk_refuses_writes_and_discards_but_reads() {
    let mem = mem();
    let disk = disk_with(true);
    header(&mem, VIRTIO_BLK_T_OUT, 0);
    mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
    let write = [desc(HDR, 16, R), desc(DATA, 512, R), desc(STATUS, 1, W)];
    assert_eq!(run(&mem, &disk, &write), failed(VIRTIO_BLK_S_IOERR));
    for t in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        header(&mem, t, 0);
        discard_segment(&mem, DATA, 0, 1, 0);
        let chain = [desc(HDR, 16, R), desc(DATA, 16, R), desc(STATUS, 1, W)];
        assert_eq!(run(&mem, &disk, &chain), failed(VIRTIO_BLK_S_IOERR));
    }
    assert_eq!(file_bytes(&disk), pattern(file_bytes(&disk).len()));
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let read = [desc(HDR, 16, R), desc(DATA, 512, W), desc(STATUS, 1, W)];
    assert_eq!(run(&mem, &disk, &read), ok(513));
}

#[test]
fn read_only_device_offers_ro_and_no_discard() {
    let ro = Block::from_disk(disk_with(true)).unwrap();
    let rw = Block::from_disk(disk_with(false)).unwrap();
    assert_ne!(ro.device_features() & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(ro.device_features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
    assert_eq!(rw.device_features() & (1 << VIRTIO_BLK_F_RO), 0);
    assert_ne!(rw.device_features() & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
    let mut cap = [0u8; 8];
    rw.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), DISK_SECTORS);
}

#[test]
fn chains_without_a_writable_status_byte_are_returned_empty() {
    let mem = mem();
    let disk = disk_with(false);
    header(&mem, VIRTIO_BLK_T_IN, 0);
    // Only a header.
    assert_eq!(run(&mem, &disk, &[desc(HDR, 16, R)]), NO_STATUS);
    // Status descriptor in the wrong direction.
    assert_eq!(
        run(&mem, &disk, &[desc(HDR, 16, R), desc(STATUS, 1, R)]),
        NO_STATUS
    );
    // Zero-length status descriptor.
    assert_eq!(
        run(&mem, &disk, &[desc(HDR, 16, R), desc(STATUS, 0, W)]),
        NO_STATUS
    );
    // Status byte outside guest memory.
    assert_eq!(
        run(
            &mem,
            &disk,
            &[desc(HDR, 16, R), desc(MEM_SIZE as u64, 1, W)]
        ),
        NO_STATUS
    );
    assert_eq!(
        run(&mem, &disk, &[desc(HDR, 16, R), desc(u64::MAX, 2, W)]),
        NO_STATUS
    );
    // Lengths adding up past 4 GiB: the chain ends where the total overflows, before the status.
    assert_eq!(
        run(
            &mem,
            &disk,
            &[
                desc(HDR, 16, R),
                desc(DATA, u32::MAX, R),
                desc(STATUS, 1, W)
            ]
        ),
        NO_STATUS
    );
    assert_eq!(status_byte(&mem), 0xff, "nothing was written");
}

#[test]
fn malformed_chains_with_a_status_byte_get_ioerr() {
    let mem = mem();
    let disk = disk_with(false);
    let cases: Vec<(&str, u32, Vec<RawDescriptor>)> = vec![
        (
            "short header",
            VIRTIO_BLK_T_IN,
            vec![desc(HDR, 8, R), desc(DATA, 512, W), desc(STATUS, 1, W)],
        ),
        (
            "no header",
            VIRTIO_BLK_T_IN,
            vec![desc(DATA, 512, W), desc(STATUS, 1, W)],
        ),
        (
            "readable after writable",
            VIRTIO_BLK_T_IN,
            vec![
                desc(HDR, 16, R),
                desc(DATA, 512, W),
                desc(DATA, 512, R),
                desc(STATUS, 1, W),
            ],
        ),
        (
            "read into readable buffer",
            VIRTIO_BLK_T_IN,
            vec![desc(HDR, 16, R), desc(DATA, 512, R), desc(STATUS, 1, W)],
        ),
        (
            "write from writable buffer",
            VIRTIO_BLK_T_OUT,
            vec![desc(HDR, 16, R), desc(DATA, 512, W), desc(STATUS, 1, W)],
        ),
        (
            "length not sector multiple",
            VIRTIO_BLK_T_IN,
            vec![desc(HDR, 16, R), desc(DATA, 100, W), desc(STATUS, 1, W)],
        ),
        (
            "data outside memory",
            VIRTIO_BLK_T_IN,
            vec![
                desc(HDR, 16, R),
                desc(MEM_SIZE as u64 - 512, 1024, W),
                desc(STATUS, 1, W),
            ],
        ),
        (
            "header outside memory",
            VIRTIO_BLK_T_IN,
            vec![desc(u64::MAX - 4, 16, R), desc(STATUS, 1, W)],
        ),
        (
            "huge length",
            VIRTIO_BLK_T_OUT,
            vec![
                desc(HDR, 16, R),
                desc(DATA, u32::MAX - 100, R),
                desc(STATUS, 1, W),
            ],
        ),
    ];
    for (name, t, chain) in cases {
        header(&mem, t, 0);
        assert_eq!(
            run(&mem, &disk, &chain),
            failed(VIRTIO_BLK_S_IOERR),
            "{name}"
        );
        assert_eq!(status_byte(&mem), VIRTIO_BLK_S_IOERR as u8, "{name}");
    }
    assert_eq!(file_bytes(&disk), pattern(file_bytes(&disk).len()));
}

#[test]
fn unknown_request_types_are_unsupported() {
    let mem = mem();
    let disk = disk_with(false);
    for t in [
        VIRTIO_BLK_T_SCSI_CMD,
        VIRTIO_BLK_T_SECURE_ERASE,
        0xdead_beef,
    ] {
        header(&mem, t, 0);
        let done = run(&mem, &disk, &[desc(HDR, 16, R), desc(STATUS, 1, W)]);
        assert_eq!(done, failed(VIRTIO_BLK_S_UNSUPP));
    }
}

#[test]
fn io_errors_from_the_file_become_ioerr() {
    let mem = mem();
    // A read-only handle behind a device that believes it is writable: pwritev fails (EBADF).
    let path = tempfile::NamedTempFile::new().unwrap();
    path.as_file().write_all_at(&[0u8; 4096], 0).unwrap();
    let file = std::fs::File::open(path.path()).unwrap();
    let disk = disk_from_file(file, false, "x").unwrap();
    header(&mem, VIRTIO_BLK_T_OUT, 0);
    let chain = [desc(HDR, 16, R), desc(DATA, 512, R), desc(STATUS, 1, W)];
    assert_eq!(run(&mem, &disk, &chain), failed(VIRTIO_BLK_S_IOERR));
}

/// Puts `n` 4 KiB reads on the queue, each a 3-descriptor chain.
fn queue_reads(vq: &MockSplitQueue<GuestMemory>, mem: &GuestMemory, n: u16) {
    let mut descs = Vec::new();
    for i in 0..n {
        let hdr = HDR + u64::from(i) * 16;
        let mut h = [0u8; 16];
        h[8..16].copy_from_slice(&u64::from(i).to_le_bytes());
        mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        let base = 3 * i;
        descs.push(RawDescriptor::from(SplitDescriptor::new(
            hdr,
            16,
            VRING_DESC_F_NEXT as u16,
            base + 1,
        )));
        descs.push(RawDescriptor::from(SplitDescriptor::new(
            DATA + u64::from(i) * 4096,
            4096,
            (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
            base + 2,
        )));
        descs.push(desc(STATUS + u64::from(i), 1, W));
    }
    vq.add_desc_chains(&descs, 0).unwrap();
}

#[test]
fn a_batch_of_requests_is_completed_with_one_notification() {
    let mem = mem();
    let disk = disk_with(false);
    let vq = MockSplitQueue::new(&mem, 64);
    let mut queue: Queue = vq.create_queue().unwrap();
    queue_reads(&vq, &mem, 8);
    let run = process_queue(&mut queue, &mem, &disk).unwrap();
    assert_eq!(
        run,
        QueueRun {
            completed: 8,
            notify: true,
            throttled: false
        }
    );
    assert_eq!(vq.used().idx().load(), 8);
    for i in 0..8u64 {
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS + i)).unwrap(), 0);
        let elem = vq.used().ring().ref_at(i as usize).unwrap().load();
        assert_eq!(elem.len(), 8 * 512 + 1);
        assert_eq!(elem.id(), 3 * i as u32);
    }
    // Nothing new: no completion, no interrupt.
    assert_eq!(
        process_queue(&mut queue, &mem, &disk).unwrap(),
        QueueRun::default()
    );
}

#[test]
fn event_idx_suppresses_interrupts_the_driver_did_not_ask_for() {
    let mem = mem();
    let disk = disk_with(false);
    let vq = MockSplitQueue::new(&mem, 64);
    let mut queue: Queue = vq.create_queue().unwrap();
    queue.set_event_idx(true);
    // used_event (after the avail ring) = 5: the driver wants an interrupt once entry 5 is used.
    let used_event_addr = vq.avail_addr().0 + 4 + 2 * 64;
    mem.write_obj(5u16, GuestAddress(used_event_addr)).unwrap();
    queue_reads(&vq, &mem, 3);
    assert_eq!(
        process_queue(&mut queue, &mem, &disk).unwrap(),
        QueueRun {
            completed: 3,
            notify: false,
            throttled: false
        }
    );
    // avail_event (after the used ring) tells the driver to kick for the next request.
    let avail_event_addr = vq.used_addr().0 + 4 + 8 * 64;
    assert_eq!(
        mem.read_obj::<u16>(GuestAddress(avail_event_addr)).unwrap(),
        3
    );
    let mut more = Vec::new();
    for i in 3..6u16 {
        more.push(RawDescriptor::from(SplitDescriptor::new(
            HDR,
            16,
            VRING_DESC_F_NEXT as u16,
            3 * i + 1,
        )));
        more.push(RawDescriptor::from(SplitDescriptor::new(
            DATA,
            512,
            (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
            3 * i + 2,
        )));
        more.push(desc(STATUS, 1, W));
    }
    header(&mem, VIRTIO_BLK_T_IN, 0);
    vq.add_desc_chains(&more, 9).unwrap();
    assert_eq!(
        process_queue(&mut queue, &mem, &disk).unwrap(),
        QueueRun {
            completed: 3,
            notify: true,
            throttled: false
        }
    );
}

#[test]
fn a_bogus_available_index_does_not_hang_the_handler() {
    let mem = mem();
    let disk = disk_with(false);
    let vq = MockSplitQueue::new(&mem, 16);
    let mut queue: Queue = vq.create_queue().unwrap();
    vq.avail().idx().store(1000);
    // A broken ring: an error at once (the device then needs a reset), nothing completed.
    assert!(matches!(
        process_queue(&mut queue, &mem, &disk),
        Err(virtio_queue::Error::InvalidAvailRingIndex)
    ));
    assert_eq!(vq.used().idx().load(), 0);
}

#[test]
fn indirect_chains_are_followed() {
    let mem = mem();
    let disk = disk_with(false);
    let table = 0x50_0000u64;
    let entries = [
        RawDescriptor::from(SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1)),
        RawDescriptor::from(SplitDescriptor::new(
            DATA,
            512,
            (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
            2,
        )),
        desc(STATUS, 1, W),
    ];
    for (i, d) in entries.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    header(&mem, VIRTIO_BLK_T_IN, 2);
    let done = run(
        &mem,
        &disk,
        &[desc(table, 48, VRING_DESC_F_INDIRECT as u16)],
    );
    assert_eq!(done, ok(513));
    let mut got = vec![0u8; 512];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, pattern(3 * 512)[1024..]);
}

/// xorshift64*: deterministic and dependency-free.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Random descriptor tables, headers and ring indices: the handler must never panic, must not
/// write outside the chain's buffers' memory, and must never return more chains than offered.
#[test]
fn random_descriptor_chains_never_panic() {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x4_0000)]).unwrap();
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(&[0x11; 16 * 512]).unwrap();
    let disk = disk_from_file(file, false, "fuzz").unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let interesting_addrs = [
        0u64,
        0x1_0000,
        0x2_0000,
        0x3_fff0,
        0x3_ffff,
        0x4_0000,
        u64::MAX - 8,
    ];
    let interesting_lens = [0u32, 1, 15, 16, 17, 512, 513, 4096, u32::MAX];
    let mut total_completed = 0u32;
    let mut broken_rings = 0u32;
    for _ in 0..3000 {
        let qsize = 1u16 << rng.below(5);
        // Own ring layout: the mock's places the used ring over the tail of the avail ring.
        let (desc_table, avail, used) = (0x8000u64, 0x9000u64, 0xa000u64);
        mem.write_slice(&[0u8; 0x3000], GuestAddress(desc_table))
            .unwrap();
        let mut queue = Queue::new(qsize).unwrap();
        queue.set_desc_table_address(Some(desc_table as u32), Some(0));
        queue.set_avail_ring_address(Some(avail as u32), Some(0));
        queue.set_used_ring_address(Some(used as u32), Some(0));
        queue.set_ready(true);
        if rng.below(2) == 0 {
            queue.set_event_idx(true);
        }
        for i in 0..qsize {
            let addr = if rng.below(2) == 0 {
                interesting_addrs[rng.below(interesting_addrs.len() as u64) as usize]
            } else {
                0x1_0000 + rng.below(0x2_0000)
            };
            let len = if rng.below(2) == 0 {
                interesting_lens[rng.below(interesting_lens.len() as u64) as usize]
            } else {
                rng.below(5000) as u32
            };
            let flags = (rng.below(8)) as u16; // NEXT | WRITE | INDIRECT in any mix
            let next = rng.below(u64::from(qsize) + 2) as u16;
            let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
            mem.write_obj(d, GuestAddress(desc_table + 16 * u64::from(i)))
                .unwrap();
        }
        // Random request headers wherever descriptors may point.
        for _ in 0..8 {
            let at = 0x1_0000 + rng.below(0x2_0000);
            let t = [0u32, 1, 4, 8, 11, 13, 99][rng.below(7) as usize];
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&t.to_le_bytes());
            h[8..16].copy_from_slice(&rng.below(40).to_le_bytes());
            mem.write_slice(&h, GuestAddress(at)).unwrap();
        }
        let offered = rng.below(u64::from(qsize) + 3) as u16;
        for j in 0..offered.min(qsize) {
            let head = rng.below(u64::from(qsize) + 1) as u16;
            mem.write_obj(head, GuestAddress(avail + 4 + 2 * u64::from(j)))
                .unwrap();
        }
        mem.write_obj(offered, GuestAddress(avail + 2)).unwrap();
        let used_idx = || mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap();
        let used_before = used_idx();
        match process_queue(&mut queue, &mem, &disk) {
            Ok(run) => assert!(u32::from(offered) >= run.completed),
            // A loop, an unterminated chain or a bad index stops the run (needs reset).
            Err(_) => broken_rings += 1,
        }
        let used_after = used_idx();
        let completed = used_after.wrapping_sub(used_before);
        assert!(
            completed <= offered,
            "qsize {qsize} offered {offered} used {used_before}->{used_after}"
        );
        total_completed += u32::from(completed);
    }
    // The generator must get chains through and break rings, not only one of the two.
    assert!(
        total_completed > 250 && broken_rings > 250,
        "{total_completed} chains completed, {broken_rings} broken rings"
    );
}

mod device {
    use super::*;
    use crate::interrupt::CountingLine;
    use crate::virtio::ActivationContext;
    use std::sync::atomic::Ordering;
    use vmm_sys_util::eventfd::EventFd;

    fn ctx(mem: &GuestMemory, queues: Vec<Queue>) -> (ActivationContext, Arc<CountingLine>) {
        let line = Arc::new(CountingLine::default());
        let n = queues.len();
        let ctx = ActivationContext {
            mem: mem.clone(),
            acked_features: 0,
            queues,
            queue_events: (0..n).map(|_| EventFd::new(0).unwrap()).collect(),
            interrupt: Arc::new(VirtioInterrupt::new(line.clone())),
        };
        (ctx, line)
    }

    #[test]
    fn activation_checks_queue_count_and_reset_deactivates() {
        let mem = mem();
        let mut blk = Block::from_disk(disk_with(false)).unwrap();
        let (two, _) = ctx(&mem, vec![Queue::new(16).unwrap(), Queue::new(16).unwrap()]);
        assert!(matches!(
            blk.activate(two),
            Err(ActivateError::QueueCount {
                expected: 1,
                got: 2
            })
        ));
        assert!(!blk.is_active());
        let (one, _) = ctx(&mem, vec![Queue::new(16).unwrap()]);
        blk.activate(one).unwrap();
        assert!(blk.is_active());
        assert_eq!(blk.queue_states().len(), 1);
        let (again, _) = ctx(&mem, vec![Queue::new(16).unwrap()]);
        assert!(matches!(
            blk.activate(again),
            Err(ActivateError::AlreadyActive)
        ));
        blk.reset();
        assert!(!blk.is_active());
        assert!(blk.queue_states().is_empty());
    }

    #[test]
    fn a_descriptor_loop_makes_the_device_need_reset_and_stop() {
        use event_manager::{EventManager, SubscriberOps};
        let mem = mem();
        let blk = Arc::new(std::sync::Mutex::new(
            Block::from_disk(disk_with(false)).unwrap(),
        ));
        let mut manager = EventManager::<Arc<std::sync::Mutex<Block>>>::new().unwrap();
        manager.add_subscriber(blk.clone());
        let vq = MockSplitQueue::new(&mem, 16);
        let queue: Queue = vq.create_queue().unwrap();
        // Descriptor 0 -> 1 -> 0: the chain never ends.
        let next = VRING_DESC_F_NEXT as u16;
        let looped = [
            SplitDescriptor::new(HDR, 16, next, 1),
            SplitDescriptor::new(STATUS, 1, next | W, 0),
        ];
        for (i, d) in looped.into_iter().enumerate() {
            vq.desc_table()
                .store(i as u16, RawDescriptor::from(d))
                .unwrap();
        }
        vq.avail().ring().ref_at(0).unwrap().store(0);
        vq.avail().idx().store(1);
        let (mut c, line) = ctx(&mem, vec![queue]);
        let interrupt = c.interrupt.clone();
        let notify = EventFd::new(0).unwrap();
        c.queue_events = vec![notify.try_clone().unwrap()];
        blk.lock().unwrap().activate(c).unwrap();
        manager.run_with_timeout(100).unwrap();
        assert!(interrupt.needs_reset());
        assert_eq!(
            interrupt.status() & crate::virtio::VIRTIO_MMIO_INT_CONFIG,
            crate::virtio::VIRTIO_MMIO_INT_CONFIG
        );
        assert_eq!(
            vq.used().idx().load(),
            0,
            "the broken chain is not returned"
        );
        let raised = line.0.load(Ordering::SeqCst);
        assert!(raised >= 1);

        // A valid request after the fault is left alone until the driver resets the device.
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        vq.add_desc_chains(
            &[
                RawDescriptor::from(SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 3)),
                desc(STATUS, 1, W),
            ],
            2,
        )
        .unwrap();
        notify.write(1).unwrap();
        manager.run_with_timeout(100).unwrap();
        manager.run_with_timeout(10).unwrap();
        assert_eq!(vq.used().idx().load(), 0);
        assert_eq!(line.0.load(Ordering::SeqCst), raised);
    }

    #[test]
    fn event_loop_processes_the_queue_after_activation_and_on_notification() {
        use event_manager::{EventManager, SubscriberOps};
        let mem = mem();
        let blk = Arc::new(std::sync::Mutex::new(
            Block::from_disk(disk_with(false)).unwrap(),
        ));
        let mut manager = EventManager::<Arc<std::sync::Mutex<Block>>>::new().unwrap();
        manager.add_subscriber(blk.clone());

        let vq = MockSplitQueue::new(&mem, 16);
        let queue: Queue = vq.create_queue().unwrap();
        // A request queued before activation is served once the device starts.
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        vq.add_desc_chains(
            &[
                RawDescriptor::from(SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1)),
                desc(STATUS, 1, W),
            ],
            0,
        )
        .unwrap();
        let (mut c, line) = ctx(&mem, vec![queue]);
        let notify = EventFd::new(0).unwrap();
        c.queue_events = vec![notify.try_clone().unwrap()];
        blk.lock().unwrap().activate(c).unwrap();
        manager.run_with_timeout(100).unwrap();
        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(line.0.load(Ordering::SeqCst), 1);

        vq.add_desc_chains(
            &[
                RawDescriptor::from(SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 3)),
                desc(STATUS, 1, W),
            ],
            2,
        )
        .unwrap();
        notify.write(1).unwrap();
        manager.run_with_timeout(100).unwrap();
        assert_eq!(vq.used().idx().load(), 2);
        assert_eq!(line.0.load(Ordering::SeqCst), 2);

        // After reset, notifications are drained but nothing is processed.
        blk.lock().unwrap().reset();
        vq.add_desc_chains(
            &[
                RawDescriptor::from(SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 5)),
                desc(STATUS, 1, W),
            ],
            4,
        )
        .unwrap();
        notify.write(1).unwrap();
        manager.run_with_timeout(100).unwrap();
        manager.run_with_timeout(10).unwrap();
        assert_eq!(vq.used().idx().load(), 2);
    }

    fn limited(config: crate::rate_limiter::RateLimiterConfig) -> Arc<std::sync::Mutex<Block>> {
        let mut blk = Block::from_disk(disk_with(false)).unwrap();
        blk.update_rate_limiter(&crate::rate_limiter::RateLimiterUpdate::replace_with(
            &config,
        ))
        .unwrap();
        Arc::new(std::sync::Mutex::new(blk))
    }

    fn bucket(size: u64, refill_time: u64) -> Option<crate::rate_limiter::TokenBucketConfig> {
        Some(crate::rate_limiter::TokenBucketConfig {
            size,
            one_time_burst: None,
            refill_time,
        })
    }

    #[test]
    fn a_throttled_queue_stops_ignores_kicks_and_resumes_when_the_timer_fires() {
        use crate::rate_limiter::{BucketUpdate, RateLimiterConfig, RateLimiterUpdate};
        use event_manager::{EventManager, SubscriberOps};
        let mem = mem();
        // Two operations, then one every 30 s: the test never waits for a refill.
        let blk = limited(RateLimiterConfig {
            bandwidth: None,
            ops: bucket(2, 60_000),
        });
        let mut manager = EventManager::<Arc<std::sync::Mutex<Block>>>::new().unwrap();
        manager.add_subscriber(blk.clone());
        let vq = MockSplitQueue::new(&mem, 16);
        let queue: Queue = vq.create_queue().unwrap();
        queue_reads(&vq, &mem, 4);
        let (mut c, line) = ctx(&mem, vec![queue]);
        let notify = EventFd::new(0).unwrap();
        c.queue_events = vec![notify.try_clone().unwrap()];
        blk.lock().unwrap().activate(c).unwrap();
        manager.run_with_timeout(100).unwrap();
        assert_eq!(vq.used().idx().load(), 2, "two requests, then the limiter");
        assert_eq!(line.0.load(Ordering::SeqCst), 1);
        assert!(blk.lock().unwrap().rate_limiter().is_blocked());

        // Kicks while throttled are consumed and change nothing; the loop then sleeps.
        notify.write(1).unwrap();
        assert_eq!(manager.run_with_timeout(100).unwrap(), 1);
        assert_eq!(manager.run_with_timeout(20).unwrap(), 0, "no busy polling");
        assert_eq!(vq.used().idx().load(), 2);

        // Lifting the limit wakes the device through its timer: the rest is served.
        blk.lock()
            .unwrap()
            .update_rate_limiter(&RateLimiterUpdate {
                bandwidth: BucketUpdate::Keep,
                ops: BucketUpdate::Disable,
            })
            .unwrap();
        assert_eq!(manager.run_with_timeout(1000).unwrap(), 1);
        assert_eq!(vq.used().idx().load(), 4);
        assert_eq!(line.0.load(Ordering::SeqCst), 2);
        assert!(!blk.lock().unwrap().rate_limiter().is_blocked());
        for i in 0..4u64 {
            let status: u8 = mem.read_obj(GuestAddress(STATUS + i)).unwrap();
            assert_eq!(status, VIRTIO_BLK_S_OK as u8);
        }
    }

    #[test]
    fn a_bandwidth_limit_paces_requests_by_timer() {
        use crate::rate_limiter::RateLimiterConfig;
        use event_manager::{EventManager, SubscriberOps};
        let mem = mem();
        // Two 4 KiB reads fit; each further one waits ~10 ms for its tokens.
        let blk = limited(RateLimiterConfig {
            bandwidth: bucket(8192, 20),
            ops: None,
        });
        let mut manager = EventManager::<Arc<std::sync::Mutex<Block>>>::new().unwrap();
        manager.add_subscriber(blk.clone());
        let vq = MockSplitQueue::new(&mem, 16);
        let queue: Queue = vq.create_queue().unwrap();
        queue_reads(&vq, &mem, 5);
        let (c, _line) = ctx(&mem, vec![queue]);
        blk.lock().unwrap().activate(c).unwrap();
        manager.run_with_timeout(100).unwrap();
        assert_eq!(vq.used().idx().load(), 2);
        // Every further pass is a timer expiry that serves at least one request.
        let mut wakeups = 0;
        while vq.used().idx().load() < 5 {
            assert_eq!(
                manager.run_with_timeout(1000).unwrap(),
                1,
                "woken by the timer"
            );
            wakeups += 1;
            assert!(wakeups <= 3, "{wakeups} wake-ups for 3 requests");
        }
    }
}

/// Runs one chain through the request path, counting it in `m`.
fn run_counted(
    mem: &GuestMemory,
    disk: &Disk,
    descs: &[RawDescriptor],
    m: &vmm_metrics::BlockMetrics,
) -> Completion {
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let vq = MockSplitQueue::new(mem, 16);
    let chain = vq.build_desc_chain(descs).unwrap();
    process_request_counted(mem, chain, disk, Some(m))
}

#[test]
fn requests_are_counted_by_kind_with_their_bytes() {
    let metrics = vmm_metrics::VmMetrics::new("t").unwrap();
    let m = metrics.block("vda").unwrap();
    let mem = mem();
    let disk = disk_with(false);

    // Eight reads through the queue: 8 requests of 4 KiB each.
    let vq = MockSplitQueue::new(&mem, 64);
    let mut queue: Queue = vq.create_queue().unwrap();
    queue_reads(&vq, &mem, 8);
    process_queue_limited(&mut queue, &mem, &disk, None, Some(&m)).unwrap();
    assert_eq!(m.read_count.get(), 8);
    assert_eq!(m.read_bytes.get(), 8 * 8 * 512);

    header(&mem, VIRTIO_BLK_T_OUT, 10);
    let write = [desc(HDR, 16, R), desc(DATA, 1024, R), desc(STATUS, 1, W)];
    assert_eq!(run_counted(&mem, &disk, &write, &m), ok(1));
    assert_eq!((m.write_count.get(), m.write_bytes.get()), (1, 1024));

    header(&mem, VIRTIO_BLK_T_FLUSH, 0);
    run_counted(&mem, &disk, &[desc(HDR, 16, R), desc(STATUS, 1, W)], &m);
    assert_eq!(m.flush_count.get(), 1);

    // An unknown request type, and a read past the end of the disk.
    header(&mem, 0x7777, 0);
    run_counted(&mem, &disk, &[desc(HDR, 16, R), desc(STATUS, 1, W)], &m);
    assert_eq!(m.invalid_reqs_count.get(), 1);
    header(&mem, VIRTIO_BLK_T_IN, DISK_SECTORS);
    run_counted(
        &mem,
        &disk,
        &[desc(HDR, 16, R), desc(DATA, 512, W), desc(STATUS, 1, W)],
        &m,
    );
    assert_eq!(m.execute_fails.get(), 1);
    // Failed requests moved no bytes.
    assert_eq!(m.read_count.get(), 8);
    assert_eq!(m.read_bytes.get(), 8 * 8 * 512);
}
