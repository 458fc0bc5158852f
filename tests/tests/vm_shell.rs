//! Restoring into a pre-built VM shell (`Vm::restore_into`, what the sandbox library's warm pool
//! does), in this process, with the tiny guest that writes every page of its memory pass after
//! pass and checks each page holds the previous pass's value (`WriteForever`): a guest restored
//! into a shell whose RAM did not map the snapshot's memory would find zeroes and print
//! `tiny-BAD`. A snapshot of the restored guest restores normally and runs on; the shell's RAM
//! is unmapped with its VM; a shell of another shape is refused and handed back untouched.

use std::sync::mpsc::Receiver;
use std::time::Duration;

use tests::{require_kvm, writer_passes};
use vmm::tiny_guest::{self, TinyGuestEnd};
use vmm::vm::{ShellShape, VmShell};
use vmm::{Console, RestoreOptions, Vm, VmConfig, VmError, VmExit};

const MEM_MIB: u64 = 64;
/// A pass over 64 MiB takes well under a second even with the guest's code emulated.
const PASS_BOUND: Duration = Duration::from_secs(60);

/// Waits for `n` more passes; panics on a `tiny-BAD` line or a silent guest.
fn passes(lines: &Receiver<String>, n: usize) {
    writer_passes(
        n,
        PASS_BOUND,
        |bound| lines.recv_timeout(bound).ok(),
        String::new,
    );
}

/// The writer guest booted in this process, two passes done; its console lines.
fn boot_writer(dir: &std::path::Path) -> (Vm, Receiver<String>) {
    let kernel = dir.join("write-forever.elf");
    tiny_guest::write_to(
        &kernel,
        TinyGuestEnd::WriteForever {
            mem_bytes: MEM_MIB << 20,
        },
    )
    .unwrap();
    let mut config = VmConfig::new(&kernel);
    config.mem_mib = MEM_MIB;
    let (console, lines) = Console::lines();
    config.console = console;
    let booted = Vm::start(config).unwrap();
    passes(&lines, 2);
    (booted, lines)
}

fn stop(vm: Vm) {
    vm.controller().shutdown();
    assert_eq!(vm.wait(), VmExit::HostShutdown);
}

fn restore_options(dir: &std::path::Path, console: Console) -> RestoreOptions {
    let mut options = RestoreOptions::new(dir);
    options.console = console;
    options
}

#[test]
fn a_guest_restored_into_a_shell_runs_on_with_its_memory() {
    if !require_kvm() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // Its console stays open until the guest is stopped.
    let (booted, _console) = boot_writer(tmp.path());
    let first = tmp.path().join("first");
    booted.checkpoint(&first, false).unwrap();
    stop(booted);

    let shape = ShellShape::for_snapshot(&RestoreOptions::new(&first)).unwrap();
    assert_eq!((shape.vcpus, shape.mem_mib), (1, MEM_MIB));

    // Another shape: refused before the shell is used, and the shell comes back.
    let bigger = ShellShape {
        mem_mib: MEM_MIB * 2,
        ..shape
    };
    let wrong = VmShell::build(bigger).unwrap();
    let refused = Vm::restore_into(wrong, restore_options(&first, Console::Null))
        .err()
        .expect("a shell of another size must be refused");
    assert!(
        matches!(refused.error, VmError::ShellMismatch { .. }),
        "{}",
        refused.error
    );
    assert!(
        refused.error.to_string().contains("does not fit"),
        "{}",
        refused.error
    );
    let (back, options) = *refused.refused.expect("the refused shell is handed back");
    assert_eq!(back.shape(), bigger);
    assert_eq!(options.dir, first, "so are the options");
    drop(back);

    // The right shape: the guest goes on from the snapshot's instant with the snapshot's memory.
    let shell = VmShell::build(shape).unwrap();
    let (console, lines) = Console::lines();
    let restored = Vm::restore_into(shell, restore_options(&first, console))
        .unwrap_or_else(|e| panic!("restore into a shell: {e}"));
    passes(&lines, 3);
    let text = restored.controller().metrics().prometheus_text().unwrap();
    assert!(
        text.lines()
            .any(|l| l.contains("snapshot_loads_total") && l.ends_with(" 1")),
        "the restore is counted as Vm::restore counts it:\n{text}"
    );

    // Its own snapshot (a diff chain's base is the shell-restored VM's memory) restores
    // normally and is as consistent.
    let second = tmp.path().join("second");
    restored.checkpoint(&second, false).unwrap();
    passes(&lines, 1);
    assert!(
        maps_of(&first.join("memory.bin")) > 0,
        "the shell's RAM maps the snapshot's memory file"
    );
    stop(restored);
    // The shell's RAM is unmapped with the VM (a warm pool's worker restores thousands).
    assert_eq!(
        maps_of(&first.join("memory.bin")),
        0,
        "the restored VM is gone, its memory too"
    );
    let (console, lines) = Console::lines();
    let again = Vm::restore(restore_options(&second, console)).unwrap();
    passes(&lines, 2);
    stop(again);
}

/// How many of this process's mappings map `file`.
fn maps_of(file: &std::path::Path) -> usize {
    let file = file.canonicalize().unwrap();
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let name = file.to_string_lossy();
    maps.lines().filter(|l| l.ends_with(name.as_ref())).count()
}

/// A template restored many times: its state decoded once (`RestoreOptions::known_state`),
/// or kept from the snapshot that wrote it (a hibernate, then a wake), stands in for
/// `state.bin`, which is spoiled here, into a shell and without one; it never stands in for
/// another snapshot's state.
#[test]
fn a_known_state_stands_in_for_its_own_snapshot_only() {
    if !require_kvm() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (booted, lines) = boot_writer(tmp.path());
    let (first, second) = (tmp.path().join("first"), tmp.path().join("second"));
    let written = booted.checkpoint(&first, false).unwrap().state;
    passes(&lines, 1);
    booted.checkpoint(&second, false).unwrap();
    stop(booted);
    let known = std::sync::Arc::new(
        snapshot::DecodedState::<vmm::vm::VmSnapshotState>::read(&first).unwrap(),
    );
    // The state a snapshot hands back is the one its `state.bin` decodes to.
    let written = written.expect("a paused snapshot hands back the state it wrote");
    assert_eq!(written.snapshot_id(), known.snapshot_id());
    assert_eq!(
        snapshot::encode_state(written.state()).unwrap(),
        snapshot::encode_state(known.state()).unwrap()
    );
    for dir in [&first, &second] {
        std::fs::write(dir.join(snapshot::STATE_FILE), b"spoiled").unwrap();
    }
    let with_known = |dir: &std::path::Path, console: Console| {
        let mut options = restore_options(dir, console);
        options.known_state = Some(known.clone());
        options
    };

    let shape = ShellShape::for_snapshot(&with_known(&first, Console::Null)).unwrap();
    assert_eq!((shape.vcpus, shape.mem_mib), (1, MEM_MIB));
    let (console, lines) = Console::lines();
    let restored = Vm::restore_into(VmShell::build(shape).unwrap(), with_known(&first, console))
        .unwrap_or_else(|e| panic!("restore into a shell with a known state: {e}"));
    passes(&lines, 2);
    stop(restored);
    let (console, lines) = Console::lines();
    let mut options = restore_options(&first, console);
    options.known_state = Some(written);
    let restored =
        Vm::restore(options).unwrap_or_else(|e| panic!("restore with the state written: {e}"));
    passes(&lines, 2);
    stop(restored);

    // The second snapshot's own (spoiled) state is read, and refused.
    let refused = Vm::restore_into(
        VmShell::build(shape).unwrap(),
        with_known(&second, Console::Null),
    )
    .err()
    .expect("another snapshot restored with the first one's state");
    assert!(
        refused.refused.is_some(),
        "refused before the shell was used"
    );
    assert!(Vm::restore(with_known(&second, Console::Null)).is_err());
}
