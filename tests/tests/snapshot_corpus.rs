//! Snapshots made by earlier formats must keep restoring (docs/snapshot-compat.md).
//!
//! `tests/snapshot-corpus/<format>/` holds snapshots written by released formats:
//! - `tiny/`: a whole snapshot (state, manifest, memory) of the idle tiny test guest, restored
//!   and run here on every build;
//! - `linux-devices/`: the state and manifest of a Linux guest with virtio-blk, virtio-net and
//!   vsock (its memory is too large to commit), decoded and checked on every build.
//!
//! `make_snapshot_corpus` (ignored; run it by hand when the format changes) writes a new entry
//! for the current format: `DORMOUSE_CORPUS_OUT=tests/snapshot-corpus/vN cargo test -p tests
//! --test snapshot_corpus -- --ignored make_snapshot_corpus`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use snapshot::{Manifest, SnapshotError, MANIFEST_FILE};
use tests::*;
use vmm::device_manager::VirtioKind;
use vmm::vm::VmSnapshotState;
use vmm::{Console, RestoreOptions, Vm, VmError, VmExit};

const TINY_MEM_MIB: &str = "16";

/// Every committed corpus entry: `tests/snapshot-corpus/<format>/<name>/`.
fn corpus_entries() -> Vec<PathBuf> {
    let root = repo_root().join("tests/snapshot-corpus");
    let mut entries = Vec::new();
    for format in std::fs::read_dir(&root).unwrap() {
        let format = format.unwrap().path();
        if !format.is_dir() {
            continue;
        }
        for entry in std::fs::read_dir(&format).unwrap() {
            entries.push(entry.unwrap().path());
        }
    }
    entries.sort();
    assert!(
        entries.len() >= 2,
        "the snapshot corpus is missing from {}",
        root.display()
    );
    entries
}

fn load(dir: &Path) -> (Manifest, VmSnapshotState) {
    let manifest_path = dir.join(MANIFEST_FILE);
    let manifest = Manifest::from_json(&std::fs::read(&manifest_path).unwrap(), &manifest_path)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let state: VmSnapshotState =
        snapshot::read_state(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    (manifest, state)
}

#[test]
fn every_corpus_snapshot_decodes_and_is_consistent() {
    for dir in corpus_entries() {
        let (manifest, state) = load(&dir);
        state
            .check_consistent(&manifest)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        if dir.ends_with("linux-devices") {
            let kinds: Vec<&str> = state
                .devices
                .virtio
                .iter()
                .map(|d| match d.kind() {
                    VirtioKind::Block { .. } => "blk",
                    VirtioKind::Net { .. } => "net",
                    VirtioKind::Vsock { .. } => "vsock",
                    VirtioKind::Balloon { .. } => "balloon",
                })
                .collect();
            assert_eq!(kinds, ["blk", "net", "vsock"], "{}", dir.display());
            assert!(state.cmdline.contains("virtio_mmio.device="));
        }
        eprintln!(
            "{}: format {}, {} vCPUs, {} devices: decoded and consistent",
            dir.display(),
            manifest.format_version,
            state.vcpu_count,
            state.devices.virtio.len()
        );
    }
}

/// The restore side of the consistency checks, on a real saved state: each lie is refused with
/// a message naming it.
#[test]
fn inconsistent_manifest_and_state_are_refused() {
    let dir = repo_root().join("tests/snapshot-corpus/v2/linux-devices");
    let (manifest, state) = load(&dir);
    type Lie = Box<dyn Fn(&mut Manifest, &mut VmSnapshotState)>;
    let lies: Vec<(&str, Lie)> = vec![
        ("manifest vCPUs", Box::new(|m, _| m.vcpus += 1)),
        ("state vCPU count", Box::new(|_, s| s.vcpu_count += 1)),
        (
            "no vCPUs",
            Box::new(|m, s| {
                m.vcpus = 0;
                s.vcpu_count = 0;
                s.vcpus.clear();
            }),
        ),
        (
            "too many vCPUs",
            Box::new(|m, s| {
                m.vcpus = 200;
                s.vcpu_count = 200;
            }),
        ),
        ("memory size", Box::new(|_, s| s.mem_mib *= 2)),
        (
            "memory layout",
            Box::new(|m, _| m.regions[0].guest_addr += 4096),
        ),
        ("IRQ 0", Box::new(|_, s| s.devices.virtio[0].irq = 0)),
        ("serial IRQ", Box::new(|_, s| s.devices.virtio[0].irq = 4)),
        (
            "IRQ past the IOAPIC",
            Box::new(|_, s| s.devices.virtio[0].irq = 24),
        ),
        (
            "shared IRQ",
            Box::new(|_, s| s.devices.virtio[1].irq = s.devices.virtio[0].irq),
        ),
        (
            "window below the area",
            Box::new(|_, s| s.devices.virtio[0].mmio_base = 0x1000),
        ),
        (
            "window over the IOAPIC",
            Box::new(|_, s| s.devices.virtio[0].mmio_base = 0xfec0_0000),
        ),
        (
            "unaligned window",
            Box::new(|_, s| s.devices.virtio[0].mmio_base += 8),
        ),
        (
            "shared window",
            Box::new(|_, s| s.devices.virtio[1].mmio_base = s.devices.virtio[0].mmio_base),
        ),
        // A vsock device's state is part of its kind (no side table that could disagree);
        // what remains to refuse is a second one.
        (
            "two vsock devices",
            Box::new(|_, s| s.devices.virtio[0].device = s.devices.virtio[2].device.clone()),
        ),
    ];
    for (name, lie) in lies {
        let (mut m, mut s) = (manifest.clone(), state.clone());
        lie(&mut m, &mut s);
        let refused = s.check_consistent(&m);
        assert!(refused.is_err(), "{name} was accepted");
        eprintln!("{name}: {}", refused.unwrap_err());
    }
}

/// Restores the committed tiny snapshot, runs it, snapshots it again with this build's format
/// and restores that too. On a host unlike the one that made the corpus (another CPU, hardware
/// KVM) the restore is first refused as incompatible, as it must be; the tiny guest uses no
/// host-specific CPU feature and does not read the time, so the test then moves a copy to this
/// host (the manifest's host record, and no TSC rate in the state, which it writes again in
/// today's format from the decoded format-2 state) and restores that: on every KVM host the
/// state a format-2 snapshot converts to restores and runs.
#[test]
fn the_tiny_corpus_snapshot_restores_on_this_build() {
    if !require_kvm() {
        return;
    }
    let transplanted = tempfile::tempdir().unwrap();
    for format_dir in std::fs::read_dir(repo_root().join("tests/snapshot-corpus")).unwrap() {
        let dir = format_dir.unwrap().path().join("tiny");
        let mut options = RestoreOptions::new(&dir);
        options.console = Console::Null;
        let vm = match Vm::restore(options) {
            Ok(vm) => vm,
            Err(VmError::Snapshot(SnapshotError::Incompatible { reasons })) => {
                eprintln!(
                    "{}: refused as it must be on this host ({reasons:?}); restoring a copy \
                     moved to this host's facts",
                    dir.display()
                );
                let moved = transplanted.path().join(format_dir_name(&dir));
                transplant(&dir, &moved);
                let mut options = RestoreOptions::new(&moved);
                options.console = Console::Null;
                Vm::restore(options).unwrap_or_else(|e| panic!("{}: {e}", moved.display()))
            }
            Err(e) => panic!("{}: {e}", dir.display()),
        };
        let ctl = vm.controller();
        ctl.pause().unwrap();
        ctl.resume().unwrap();
        let work = tempfile::tempdir().unwrap();
        let again = work.path().join("again");
        let outcome = vm.checkpoint(&again, false).unwrap();
        assert!(!outcome.diff);
        ctl.shutdown();
        drop(ctl);
        assert_eq!(vm.wait(), VmExit::HostShutdown);
        let (manifest, _) = load(&again);
        assert_eq!(manifest.format_version, snapshot::FORMAT_VERSION);

        let mut options = RestoreOptions::new(&again);
        options.console = Console::Null;
        let vm = Vm::restore(options).unwrap();
        let ctl = vm.controller();
        ctl.shutdown();
        drop(ctl);
        assert_eq!(vm.wait(), VmExit::HostShutdown);
        eprintln!(
            "{}: restored, ran, re-snapshotted and restored",
            dir.display()
        );
    }
}

fn format_dir_name(tiny: &Path) -> String {
    let format = tiny.parent().and_then(Path::file_name).unwrap();
    format!("{}-tiny", format.to_string_lossy())
}

/// A copy of `from` whose manifest records this host (kind, paging, CPU features) and whose
/// vCPUs carry no TSC rate (re-encoded from the decoded state); memory untouched.
fn transplant(from: &Path, to: &Path) {
    keep(from, to, &[MANIFEST_FILE, "memory.bin"]);
    let mut state: VmSnapshotState = snapshot::read_state(from).unwrap();
    for vcpu in &mut state.vcpus {
        vcpu.tsc_khz = None;
    }
    snapshot::write_state(to, &state).unwrap();
    let hv = vmm::hypervisor::Hypervisor::open().unwrap();
    let host = vmm::host::detect(
        Path::new("/sys"),
        hv.vendor,
        vmm::host::GuestKernelKind::Unmodified,
    );
    let mut manifest = Manifest::read(to).unwrap();
    manifest.host = vmm::vm::host_info(host);
    std::fs::write(to.join(MANIFEST_FILE), manifest.to_json().unwrap()).unwrap();
}

fn ctl(sock: &Path, args: &[&str]) -> std::process::Output {
    Command::new(dormouse_bin())
        .arg("ctl")
        .arg("--sock")
        .arg(sock)
        .args(args)
        .output()
        .expect("dormouse ctl")
}

fn keep(from: &Path, to: &Path, names: &[&str]) {
    std::fs::create_dir_all(to).unwrap();
    for name in names {
        std::fs::copy(from.join(name), to.join(name)).unwrap();
    }
}

fn snapshot_running(vm: Running, sock: &Path, dir: &Path) {
    let out = ctl(sock, &["snapshot", "--dir", dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "snapshot failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    vm.kill();
}

#[test]
#[ignore = "writes a corpus entry for the current format; run by hand"]
fn make_snapshot_corpus() {
    if !require_kvm() || !require_root() {
        return;
    }
    let out_root =
        PathBuf::from(std::env::var("DORMOUSE_CORPUS_OUT").expect("DORMOUSE_CORPUS_OUT"));
    let work = run_tempdir();

    // The idle tiny guest: small enough to commit whole.
    let tiny = work.path().join("tiny.elf");
    vmm::tiny_guest::write_portable_to(&tiny, vmm::tiny_guest::TinyGuestEnd::Idle).unwrap();
    let sock = work.path().join("tiny.sock");
    let mut cmd = Command::new(dormouse_bin());
    cmd.args([
        "run",
        "--kernel",
        tiny.to_str().unwrap(),
        "--mem-mib",
        TINY_MEM_MIB,
        "--vcpus",
        "2",
    ])
    .arg("--api-sock")
    .arg(&sock);
    let vm = Running::spawn(cmd);
    vm.wait_for("dormouse-tiny-guest", Duration::from_secs(30));
    let snap = work.path().join("tiny-snap");
    snapshot_running(vm, &sock, &snap);
    keep(
        &snap,
        &out_root.join("tiny"),
        &["manifest.json", "state.bin", "memory.bin"],
    );

    // A Linux guest with every device kind: state and manifest only.
    let initrd = build_initrd(
        work.path(),
        "corpus.cpio",
        "echo CORPUS-READY; exec sleep 100000",
    );
    let disk = work.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let tap = format!("dmcorp{}", std::process::id() % 10000);
    let sock = work.path().join("linux.sock");
    let uds = work.path().join("vsock.sock");
    let mut cmd = Command::new(dormouse_bin());
    cmd.args(["run", "--kernel", vmlinux().to_str().unwrap()])
        .args(["--initrd", initrd.to_str().unwrap()])
        .args(["--mem-mib", "128"])
        .arg("--disk")
        .arg(format!("path={},id=scratch", disk.display()))
        .arg("--net")
        .arg(format!("tap={tap},mac=02:00:00:00:00:07"))
        .arg("--vsock")
        .arg(format!("cid=3,uds={}", uds.display()))
        .arg("--api-sock")
        .arg(&sock);
    let vm = Running::spawn(cmd);
    vm.wait_for("CORPUS-READY", LINUX_BOOT_TIMEOUT);
    let snap = work.path().join("linux-snap");
    snapshot_running(vm, &sock, &snap);
    let _ = Command::new("ip").args(["link", "del", &tap]).status();
    keep(
        &snap,
        &out_root.join("linux-devices"),
        &["manifest.json", "state.bin"],
    );
}
