//! Seeds of the `vm_state` and `manifest_reader` fuzz targets (tests/fuzz/seeds/): real
//! `state.bin` and `manifest.json` images written by the types restore reads. Every build checks
//! that each committed seed still decodes, so the fuzzers keep starting from inputs that reach
//! past the format's first checks. `DORMOUSE_WRITE_FUZZ_SEEDS=1` (re)writes them first.

use std::path::{Path, PathBuf};

use devices::legacy::SerialState;
use devices::virtio::block::BlockState;
use devices::virtio::mmio::{MmioTransportState, SavedQueue};
use devices::virtio::net::NetState;
use devices::virtio::vsock::{Datapath, VsockConfig, VsockState};
use snapshot::{
    compute_layout, decode_state, encode_state, HostInfo, Manifest, PageCounts, ParentRef,
    SnapshotId, SnapshotKind, SnapshotMeta,
};
use vmm::device_manager::{DevicesState, SavedDevice, SavedVirtio};
use vmm::hypervisor::state::{FpuState, MsrEntry, VcpuState, VmState};
use vmm::vm::VmSnapshotState;

fn seeds(target: &str) -> PathBuf {
    // This crate's own directory (not `tests::repo_root()`, which a `target/` copied from
    // another checkout can leave pointing there).
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target)
}

fn vcpu(index: u64) -> VcpuState {
    let mut v = VcpuState {
        regs: Default::default(),
        sregs: Default::default(),
        fpu: FpuState::default(),
        xsave: Some(vec![0; 1024]),
        xcrs: Some(Default::default()),
        debug_regs: Default::default(),
        lapic: Default::default(),
        mp_state: Default::default(),
        vcpu_events: Default::default(),
        cpuid: vec![Default::default(); 4],
        tsc_khz: Some(2_500_000),
        msrs: vec![
            MsrEntry {
                index: 0x10,
                value: 123_456_789,
            },
            MsrEntry {
                index: 0x6e0,
                value: 0,
            },
        ],
    };
    v.regs.rip = 0x1000_0000 + index;
    v.regs.rflags = 2;
    v.sregs.cr0 = 0x8005_0033;
    v.sregs.efer = 0xd01;
    v.fpu.fcw = 0x37f;
    v.fpu.mxcsr = 0x1f80;
    v
}

fn transport(queues: usize) -> MmioTransportState {
    let queue = SavedQueue {
        max_size: 256,
        size: 256,
        ready: true,
        desc_table: 0x10_0000,
        avail_ring: 0x10_1000,
        used_ring: 0x10_2000,
        next_avail: 7,
        next_used: 7,
        ..SavedQueue::default()
    };
    MmioTransportState {
        status: 0xf,
        acked_features: 1 << 32,
        queues: vec![queue; queues],
        ..MmioTransportState::default()
    }
}

/// A Linux guest with blk, net and vsock (`full`), or a bare one (`tiny`).
fn state(full: bool) -> VmSnapshotState {
    let vcpus = if full { 2 } else { 1 };
    let mut vm = VmState {
        pic_master: Default::default(),
        pic_slave: Default::default(),
        ioapic: Default::default(),
        pit: (!full).then(Default::default),
        clock: Default::default(),
        clock_taken_at_unix_ns: 1_700_000_000_000_000_000,
    };
    vm.pic_slave.chip_id = 1;
    vm.ioapic.chip_id = 2;
    vm.clock.clock = 5_000_000_000;
    let vsock_config = VsockConfig::new(3).expect("valid CID");
    let virtio = if full {
        vec![
            SavedVirtio {
                irq: 5,
                mmio_base: 0xd000_0000,
                transport: transport(1),
                device: SavedDevice::Block(BlockState {
                    path: "/var/lib/dormouse/rootfs.ext4".into(),
                    read_only: false,
                    id: Some("rootfs".into()),
                    rate_limiter: Default::default(),
                }),
            },
            SavedVirtio {
                irq: 6,
                mmio_base: 0xd000_1000,
                transport: transport(2),
                device: SavedDevice::Net(NetState {
                    tap: "tap0".into(),
                    mac: [0x06, 0, 0xac, 0x10, 0, 2],
                    rx_rate_limiter: Default::default(),
                    tx_rate_limiter: Default::default(),
                    mmds: None,
                }),
            },
            SavedVirtio {
                irq: 7,
                mmio_base: 0xd000_2000,
                transport: transport(3),
                device: SavedDevice::Vsock(VsockState {
                    config: vsock_config,
                    datapath: Datapath::Userspace,
                    avail_features: 1 << 32,
                    acked_features: 1 << 32,
                    next_local_port: Some(1 << 30),
                }),
            },
        ]
    } else {
        Vec::new()
    };
    VmSnapshotState {
        vcpu_count: vcpus as u8,
        mem_mib: if full { 256 } else { 16 },
        cmdline: "console=ttyS0 reboot=k panic=-1 root=/dev/vda rw".into(),
        vm,
        vcpus: (0..vcpus).map(vcpu).collect(),
        devices: DevicesState {
            serial: SerialState {
                line_status: 0x60,
                in_buffer: b"ls\n".to_vec(),
                ..SerialState::default()
            },
            virtio,
        },
    }
}

fn manifest(kind: SnapshotKind, mem_mib: u64) -> Manifest {
    let size = mem_mib << 20;
    let ranges: Vec<(u64, u64)> = if size > 3 << 30 {
        vec![(0, 3 << 30), (4 << 30, size - (3 << 30))]
    } else {
        vec![(0, size)]
    };
    let regions = compute_layout(&ranges).expect("layout");
    let parent = (kind == SnapshotKind::Diff).then(|| ParentRef {
        dir: "/var/lib/dormouse/snap-0".into(),
        id: SnapshotId::random().expect("random id"),
    });
    let meta = SnapshotMeta {
        vcpus: 2,
        kernel_id: "vmlinux-6.1:abc123".into(),
        rootfs_id: "rootfs.ext4:4096".into(),
        host: HostInfo {
            kind: "kvm-vmx".into(),
            paging_levels: 4,
            cpu_features: vec!["xsave".into(), "avx2".into()],
        },
    };
    let pages = size / snapshot::PAGE_SIZE;
    let counts = PageCounts {
        total: pages,
        written: pages / 10,
        dirty: if kind == SnapshotKind::Diff {
            pages / 10
        } else {
            0
        },
    };
    Manifest::new(kind, parent, &meta, regions, counts).expect("manifest")
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let path = e.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            (path, bytes)
        })
        .collect();
    out.sort();
    out
}

#[test]
fn committed_fuzz_seeds_decode() {
    if std::env::var_os("DORMOUSE_WRITE_FUZZ_SEEDS").is_some() {
        let dir = seeds("vm_state");
        write(&dir, "seed-tiny", &encode_state(&state(false)).unwrap());
        write(
            &dir,
            "seed-blk-net-vsock",
            &encode_state(&state(true)).unwrap(),
        );
        let dir = seeds("manifest_reader");
        let full = manifest(SnapshotKind::Full, 256);
        write(&dir, "seed-full", &full.to_json().unwrap());
        let diff = manifest(SnapshotKind::Diff, 4096);
        write(&dir, "seed-diff-two-regions", &diff.to_json().unwrap());
    }

    let states = files(&seeds("vm_state"));
    assert!(states.len() >= 2, "vm_state seeds are missing");
    for (path, bytes) in states {
        let state = decode_state::<VmSnapshotState>(&bytes)
            .unwrap_or_else(|e| panic!("{}: {e} (regenerate the seeds?)", path.display()));
        assert!(!state.vcpus.is_empty(), "{}", path.display());
    }
    let manifests = files(&seeds("manifest_reader"));
    assert!(manifests.len() >= 2, "manifest_reader seeds are missing");
    for (path, bytes) in manifests {
        let manifest = Manifest::from_json(&bytes, &path)
            .unwrap_or_else(|e| panic!("{}: {e} (regenerate the seeds?)", path.display()));
        manifest.validate().unwrap();
    }
}
