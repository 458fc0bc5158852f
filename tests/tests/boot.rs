//! End-to-end boot tests (issue: boot a Linux guest from the CLI).

use std::time::Duration;

use tests::*;
use vmm::tiny_guest::{self, TinyGuestEnd};

#[test]
fn tiny_guest_prints_and_exits_zero() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("tiny.elf");
    tiny_guest::write_to(&kernel, TinyGuestEnd::Reset).unwrap();
    let out = run_dormouse(
        &["run", "--kernel", kernel.to_str().unwrap()],
        Duration::from_secs(30),
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    assert_eq!(stdout.as_bytes(), tiny_guest::TINY_GUEST_MESSAGE);
    assert!(stderr.contains("host: "), "host kind is logged: {stderr}");
}

#[test]
fn linux_boots_smp_prints_marker_and_reboots_cleanly() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let initrd = build_initrd(
        dir.path(),
        "smp.cpio",
        r#"echo "E2E-MARKER-$((6*7))"; echo "NPROC=$(nproc)""#,
    );
    let kernel = vmlinux();
    let _serial = linux_boot_lock();
    let out = run_dormouse(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--vcpus",
            "2",
        ],
        LINUX_BOOT_TIMEOUT,
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(stdout.contains("E2E-MARKER-42"), "marker missing: {stdout}");
    assert!(
        stdout.contains("NPROC=2"),
        "guest should see 2 CPUs: {stdout}"
    );
}

#[test]
fn bzimage_boots_with_one_vcpu() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let initrd = build_initrd(dir.path(), "bz.cpio", r#"echo "BZ-MARKER NPROC=$(nproc)""#);
    let kernel = bzimage();
    let _serial = linux_boot_lock();
    let out = run_dormouse(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
        ],
        LINUX_BOOT_TIMEOUT,
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(stdout.contains("BZ-MARKER NPROC=1"), "{stdout}");
}

#[test]
fn guest_kernel_panic_gives_nonzero_exit() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // PID 1 exiting makes the kernel panic ("Attempted to kill init!").
    let initrd = build_initrd_with_init(
        dir.path(),
        "panic.cpio",
        "#!/bin/sh\necho INIT-EXITING\nexit 3\n",
    );
    let kernel = vmlinux();
    let _serial = linux_boot_lock();
    let out = run_dormouse(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
        ],
        LINUX_BOOT_TIMEOUT,
    );
    let (stdout, stderr) = text(&out);
    assert!(stdout.contains("INIT-EXITING"), "{stdout}");
    assert!(stdout.contains("Kernel panic"), "{stdout}");
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.contains("panicked"),
        "clear message expected: {stderr}"
    );
}

#[test]
fn missing_and_garbage_kernels_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-kernel");
    let out = run_dormouse(
        &["run", "--kernel", missing.to_str().unwrap()],
        Duration::from_secs(20),
    );
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no-such-kernel") && stderr.contains("No such file"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked at"), "{stderr}");

    let garbage = dir.path().join("garbage");
    std::fs::write(&garbage, vec![0x5au8; 10_000]).unwrap();
    let out = run_dormouse(
        &["run", "--kernel", garbage.to_str().unwrap()],
        Duration::from_secs(20),
    );
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("neither a vmlinux ELF nor a bzImage"),
        "{stderr}"
    );

    // An ELF header that lies about its program headers.
    let mut bad_elf = vmm::tiny_guest::elf_image(TinyGuestEnd::Reset);
    bad_elf[0x38] = 0xff; // e_phnum
    bad_elf.truncate(100);
    let bad = dir.path().join("bad.elf");
    std::fs::write(&bad, bad_elf).unwrap();
    if require_kvm() {
        let out = run_dormouse(
            &["run", "--kernel", bad.to_str().unwrap()],
            Duration::from_secs(20),
        );
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("cannot load kernel"), "{stderr}");
        assert!(!stderr.contains("panicked at"), "{stderr}");
    }
}

#[test]
fn bad_vcpu_count_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("tiny.elf");
    tiny_guest::write_to(&kernel, TinyGuestEnd::Reset).unwrap();
    for n in ["0", "33"] {
        let out = run_dormouse(
            &["run", "--kernel", kernel.to_str().unwrap(), "--vcpus", n],
            Duration::from_secs(20),
        );
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("--vcpus must be between 1 and 32"),
            "{stderr}"
        );
    }
}
