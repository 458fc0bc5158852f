use std::sync::atomic::{AtomicUsize, Ordering};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::interrupt::CountingLine;
use crate::persist::Persist;

const MEM_SIZE: usize = 0x100_0000;
const DATA: u64 = 0x10_0000;
const R: u16 = 0;
const W: u16 = VRING_DESC_F_WRITE as u16;

fn mem() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

fn write_pfns(mem: &GuestMemory, at: u64, pfns: &[u32]) -> u32 {
    let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(at)).unwrap();
    bytes.len() as u32
}

/// `pfn_ranges` or `reported_ranges`.
type Parser =
    fn(&GuestMemory, DescriptorChain<&GuestMemory>, &mut dyn FnMut(PageRange)) -> ChainReport;

fn collect(
    mem: &GuestMemory,
    descs: &[RawDescriptor],
    parse: Parser,
) -> (Vec<PageRange>, ChainReport) {
    let vq = MockSplitQueue::new(mem, 16);
    let chain = vq.build_desc_chain(descs).unwrap();
    let mut out = Vec::new();
    let report = parse(mem, chain, &mut |r| out.push(r));
    (out, report)
}

fn range(gpa: u64, pages: u64) -> PageRange {
    PageRange {
        gpa,
        len: pages * PAGE_SIZE,
    }
}

#[test]
fn pfns_merge_into_ranges_and_out_of_range_pfns_are_rejected() {
    let mem = mem();
    let last = (MEM_SIZE as u64 / PAGE_SIZE - 1) as u32;
    let len = write_pfns(
        &mem,
        DATA,
        &[0x200, 0x201, 0x202, 0x300, last, last + 1, u32::MAX],
    );
    let (ranges, report) = collect(&mem, &[desc(DATA, len, R)], pfn_ranges);
    assert_eq!(
        ranges,
        vec![
            range(0x200_000, 3),
            range(0x300_000, 1),
            range(u64::from(last) * PAGE_SIZE, 1)
        ]
    );
    assert_eq!(report.pages, 5);
    assert_eq!(report.invalid, 2);
    assert_eq!(report.bad_descriptors, 0);
}

#[test]
fn pfn_descriptors_of_the_wrong_direction_shape_or_place_are_skipped() {
    let mem = mem();
    let len = write_pfns(&mem, DATA, &[0x200]);
    let descs = [
        desc(DATA, len, W),                      // device-writable: wrong direction
        desc(DATA, 3, R),                        // not whole PFNs
        desc(MEM_SIZE as u64 - 4, 0x10_0000, R), // runs past guest memory
        desc(DATA, len, R),
    ];
    let (ranges, report) = collect(&mem, &descs, pfn_ranges);
    assert_eq!(ranges, vec![range(0x200_000, 1)]);
    assert_eq!(report.bad_descriptors, 3);
}

#[test]
fn a_huge_pfn_array_is_read_in_batches_without_growing_a_buffer() {
    let mem = mem();
    // 4 MiB of PFN 0x100 (valid), repeated: one range per batch at most, never one per PFN.
    let pfns = vec![0x100u32; 1 << 20];
    let len = write_pfns(&mem, 0x40_0000, &pfns);
    let mut calls = 0u64;
    let vq = MockSplitQueue::new(&mem, 16);
    let chain = vq.build_desc_chain(&[desc(0x40_0000, len, R)]).unwrap();
    let report = pfn_ranges(&mem, chain, &mut |_| calls += 1);
    assert_eq!(report.pages, 1 << 20);
    assert!(calls <= (1 << 20), "{calls}");
}

#[test]
fn reported_ranges_are_aligned_inward_and_checked() {
    let mem = mem();
    let descs = [
        desc(0x20_0000, 0x20_0000, W),             // a 2 MiB free block
        desc(0x50_0800, 0x2000, W),                // unaligned: only the whole page inside
        desc(0x60_0000, 0x800, W),                 // less than a page
        desc(0x70_0000, 0x1000, R),                // device-readable: wrong direction
        desc(MEM_SIZE as u64 - 0x1000, 0x2000, W), // runs past memory
        desc(u64::MAX - 0xfff, 0x1000, W),         // wraps
    ];
    let (ranges, report) = collect(&mem, &descs, reported_ranges);
    assert_eq!(ranges, vec![range(0x20_0000, 512), range(0x50_1000, 1)]);
    assert_eq!(report.pages, 513);
    assert_eq!(report.invalid, 3);
    assert_eq!(report.bad_descriptors, 1);
}

fn stat_bytes(entries: &[(u16, u64)]) -> Vec<u8> {
    entries
        .iter()
        .flat_map(|(t, v)| t.to_le_bytes().into_iter().chain(v.to_le_bytes()))
        .collect()
}

#[test]
fn stats_are_whole_entries_bounded_and_read_only() {
    let mem = mem();
    let mut bytes = stat_bytes(&[(4, 1 << 30), (5, 2 << 30)]);
    bytes.push(0xaa); // a partial trailing entry
    mem.write_slice(&bytes, GuestAddress(DATA)).unwrap();
    let vq = MockSplitQueue::new(&mem, 16);
    let chain = vq
        .build_desc_chain(&[desc(DATA, bytes.len() as u32, R), desc(DATA, 10, W)])
        .unwrap();
    let (got, report) = stats(&mem, chain);
    assert_eq!(
        got,
        vec![
            Stat {
                tag: 4,
                value: 1 << 30
            },
            Stat {
                tag: 5,
                value: 2 << 30
            }
        ]
    );
    assert_eq!(report.bad_descriptors, 1);

    let many = stat_bytes(&vec![(1, 7); 100]);
    mem.write_slice(&many, GuestAddress(DATA)).unwrap();
    let chain = vq.build_desc_chain(&[desc(DATA, u32::MAX, R)]).unwrap();
    let (got, _) = stats(&mem, chain);
    assert_eq!(got.len(), queues::MAX_STATS);
}

#[test]
fn features_and_queues_follow_the_config() {
    let plain = Balloon::new(BalloonConfig::default()).unwrap();
    assert_eq!(plain.queue_max_sizes().len(), 2);
    assert_eq!(plain.device_features(), 1 << VIRTIO_F_VERSION_1);
    let full = Balloon::new(BalloonConfig {
        target_mib: 1,
        deflate_on_oom: true,
        stats_interval_s: 1,
        free_page_reporting: true,
    })
    .unwrap();
    assert_eq!(full.queue_max_sizes().len(), 4);
    assert_eq!(
        full.device_features(),
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_BALLOON_F_STATS_VQ)
            | (1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM)
            | (1 << VIRTIO_BALLOON_F_FREE_PAGE_REPORTING)
    );
    let mut cs = [0u8; 4];
    full.read_config(0, &mut cs);
    assert_eq!(u32::from_le_bytes(cs), 256);
    assert!(matches!(
        Balloon::new(BalloonConfig {
            target_mib: u32::MAX,
            ..BalloonConfig::default()
        }),
        Err(BalloonError::TargetTooLarge(_))
    ));
}

struct Harness {
    balloon: Balloon,
    line: Arc<CountingLine>,
}

/// Queue `i` lives at `i * 0x1000` (size 16).
fn queue_addr(i: usize) -> GuestAddress {
    GuestAddress(i as u64 * 0x1000)
}

fn active(mem: &GuestMemory, config: BalloonConfig) -> Harness {
    let mut balloon = Balloon::new(config).unwrap();
    let count = balloon.queue_max_sizes().len();
    let queues = (0..count)
        .map(|i| {
            MockSplitQueue::create(mem, queue_addr(i), 16)
                .create_queue()
                .unwrap()
        })
        .collect();
    let line = Arc::new(CountingLine(AtomicUsize::new(0)));
    let interrupt = Arc::new(VirtioInterrupt::new(line.clone()));
    balloon
        .activate(ActivationContext {
            mem: mem.clone(),
            acked_features: balloon.device_features(),
            queues,
            queue_events: (0..count).map(|_| EventFd::new(0).unwrap()).collect(),
            interrupt,
        })
        .unwrap();
    Harness { balloon, line }
}

fn offer(mem: &GuestMemory, queue: usize, descs: &[RawDescriptor], offset: u16) {
    MockSplitQueue::create(mem, queue_addr(queue), 16)
        .add_desc_chains(descs, offset)
        .unwrap();
}

/// The used index the device wrote (read in place: a new mock would reset the rings).
fn used_idx(h: &Harness, mem: &GuestMemory, queue: usize) -> u16 {
    let used = h.balloon.active.as_ref().unwrap().queues[queue]
        .state()
        .used_ring;
    mem.read_obj(GuestAddress(used + 2)).unwrap()
}

fn all_on() -> BalloonConfig {
    BalloonConfig {
        target_mib: 0,
        deflate_on_oom: true,
        stats_interval_s: 1,
        free_page_reporting: true,
    }
}

#[test]
fn inflate_and_reporting_release_host_memory_and_return_the_buffers() {
    let mem = mem();
    let mut h = active(&mem, all_on());
    mem.write_slice(&[0x5a; 4096], GuestAddress(0x80_0000))
        .unwrap();
    mem.write_slice(&[0x5a; 8192], GuestAddress(0x90_0000))
        .unwrap();
    let len = write_pfns(&mem, DATA, &[0x800]);
    offer(&mem, 0, &[desc(DATA, len, R)], 0);
    h.balloon.process_queue(0);
    assert_eq!(used_idx(&h, &mem, 0), 1);
    // Anonymous memory: a released page reads as zeros.
    assert_eq!(mem.read_obj::<u64>(GuestAddress(0x80_0000)).unwrap(), 0);
    assert_ne!(mem.read_obj::<u8>(GuestAddress(0x90_0000)).unwrap(), 0);

    offer(&mem, 3, &[desc(0x90_0000, 0x2000, W)], 0);
    h.balloon.process_queue(3);
    assert_eq!(used_idx(&h, &mem, 3), 1);
    assert_eq!(mem.read_obj::<u64>(GuestAddress(0x90_1000)).unwrap(), 0);
    let counters = h.balloon.status().counters;
    assert_eq!(counters.inflated_pages, 1);
    assert_eq!(counters.reported_pages, 2);
    assert_eq!(counters.released_bytes, 3 * 4096);
    assert!(h.line.0.load(Ordering::SeqCst) >= 2);

    // Deflate returns the buffer and releases nothing.
    mem.write_slice(&[0x5a; 4096], GuestAddress(0x80_0000))
        .unwrap();
    offer(&mem, 1, &[desc(DATA, len, R)], 0);
    h.balloon.process_queue(1);
    assert_eq!(used_idx(&h, &mem, 1), 1);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x80_0000)).unwrap(), 0x5a);
    assert_eq!(h.balloon.status().counters.deflated_pages, 1);
}

#[test]
fn a_looping_chain_breaks_the_device_until_reset() {
    let mem = mem();
    let mut h = active(&mem, all_on());
    let next = VRING_DESC_F_NEXT as u16;
    let looped = [
        RawDescriptor::from(SplitDescriptor::new(DATA, 4, next, 1)),
        RawDescriptor::from(SplitDescriptor::new(DATA, 4, next, 0)),
    ];
    let vq = MockSplitQueue::create(&mem, queue_addr(0), 16);
    vq.desc_table().store(0, looped[0]).unwrap();
    vq.desc_table().store(1, looped[1]).unwrap();
    vq.avail().ring().ref_at(0).unwrap().store(0);
    vq.avail().idx().store(1);
    h.balloon.process_queue(0);
    assert_eq!(used_idx(&h, &mem, 0), 0);
    assert!(h.balloon.active.as_ref().unwrap().interrupt.needs_reset());
    assert_eq!(h.balloon.status().counters.released_bytes, 0);
}

#[test]
fn the_stats_buffer_is_held_until_the_timer_asks_again() {
    let mem = mem();
    let mut h = active(&mem, all_on());
    let bytes = stat_bytes(&[(4, 123)]);
    mem.write_slice(&bytes, GuestAddress(DATA)).unwrap();
    offer(&mem, 2, &[desc(DATA, bytes.len() as u32, R)], 0);
    h.balloon.process_queue(2);
    assert_eq!(used_idx(&h, &mem, 2), 0, "held, not returned");
    assert_eq!(h.balloon.status().stats, vec![Stat { tag: 4, value: 123 }]);
    assert_eq!(h.balloon.save().stats_head, Some(0));
    h.balloon.request_stats();
    assert_eq!(used_idx(&h, &mem, 2), 1);
    assert_eq!(h.balloon.save().stats_head, None);
}

#[test]
fn the_target_is_the_host_s_and_actual_the_driver_s() {
    let mem = mem();
    let mut h = active(&mem, all_on());
    let before = h.line.0.load(Ordering::SeqCst);
    h.balloon.set_target_mib(64).unwrap();
    assert!(
        h.line.0.load(Ordering::SeqCst) > before,
        "config change interrupt"
    );
    let mut cs = [0u8; 8];
    h.balloon.read_config(0, &mut cs);
    assert_eq!(&cs[..4], &(64u32 * 256).to_le_bytes());
    h.balloon.write_config(0, &0u32.to_le_bytes());
    h.balloon.write_config(4, &100u32.to_le_bytes());
    let status = h.balloon.status();
    assert_eq!((status.target_pages, status.actual_pages), (64 * 256, 100));
    assert!(matches!(
        h.balloon.set_target_mib(u32::MAX),
        Err(BalloonError::TargetTooLarge(_))
    ));
}

#[test]
fn stats_interval_changes_only_on_a_device_with_statistics() {
    let mut none = Balloon::new(BalloonConfig::default()).unwrap();
    assert!(matches!(
        none.set_stats_interval(5),
        Err(BalloonError::StatsDisabled)
    ));
    let mut some = Balloon::new(all_on()).unwrap();
    assert!(matches!(
        some.set_stats_interval(0),
        Err(BalloonError::StatsCannotStop)
    ));
    some.set_stats_interval(5).unwrap();
    assert_eq!(some.config().stats_interval_s, 5);
}

#[test]
fn save_and_restore_keep_target_actual_and_the_held_stats_buffer() {
    let mut b = Balloon::new(all_on()).unwrap();
    b.set_target_mib(32).unwrap();
    b.write_config(4, &7u32.to_le_bytes());
    b.stats_head = Some(3);
    let state = b.save();
    let r = Balloon::restore(BalloonConstructorArgs, &state).unwrap();
    assert_eq!(r.save(), state);
    assert_eq!(r.status().target_pages, 32 * 256);
    assert_eq!(r.status().actual_pages, 7);

    let bad = BalloonState {
        stats_head: Some(QUEUE_SIZE),
        ..state.clone()
    };
    assert!(Balloon::restore(BalloonConstructorArgs, &bad).is_err());
    let no_stats = BalloonState {
        config: BalloonConfig {
            stats_interval_s: 0,
            ..state.config
        },
        ..state
    };
    assert!(Balloon::restore(BalloonConstructorArgs, &no_stats).is_err());
}
