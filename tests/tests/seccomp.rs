//! seccomp on every thread, end to end: `dormouse run` (enforcing by default) dies with status
//! 159 and a message naming the thread kind and the system call when one of its threads makes
//! a call outside its allowlist; with `--seccomp log` the same calls go through and the VM
//! carries on. The calls are injected through `vmm::fault` (`PUT /v1/fault` with
//! `"fault": "syscall"`, test builds only). That the allowlists are complete is what every
//! other end-to-end test shows: they all run with the filters enforcing.
//! The VMs are the idle tiny guest: no Linux boot, milliseconds each.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tests::*;
use vmm::fault::FORBIDDEN_SYSCALL;
use vmm::seccomp::{VIOLATION_EXIT_STATUS, VIOLATION_PREFIX};
use vmm::tiny_guest::{self, TinyGuestEnd};

/// Far above the milliseconds a dying VMM takes: only tells "exits" from "hangs".
const STOP_BOUND: Duration = Duration::from_secs(20);

fn idle_guest(dir: &Path) -> PathBuf {
    let kernel = dir.join("tiny-idle.elf");
    tiny_guest::write_portable_to(&kernel, TinyGuestEnd::Idle).unwrap();
    kernel
}

/// `dormouse run` of the idle tiny guest with an API socket and `extra` arguments.
fn spawn_cli(kernel: &Path, sock: &Path, extra: &[&str]) -> std::process::Child {
    let child = Command::new(dormouse_bin())
        .args(["run", "--kernel"])
        .arg(kernel)
        .args(["--mem-mib", "16", "--console", "null", "--api-sock"])
        .arg(sock)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning dormouse");
    wait_for_socket(sock);
    child
}

fn inject_syscall(sock: &Path, thread: &str) -> String {
    let (status, _) = api_request(
        sock,
        "PUT",
        "/v1/fault",
        &format!(r#"{{"thread": "{thread}", "fault": "syscall"}}"#),
    );
    assert!(
        !status.contains(" 404 "),
        "this dormouse has no fault injection: build it with the workspace's tests \
         (`cargo build --workspace --tests`, as deploy/test.sh does)"
    );
    status
}

fn violation(kind: &str) -> String {
    format!("{VIOLATION_PREFIX}{kind} called syscall {FORBIDDEN_SYSCALL} (socket)")
}

#[test]
fn a_forbidden_call_on_any_thread_kind_ends_the_cli_naming_the_kind() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = idle_guest(dir.path());
    // (fault thread, thread kind in the message); main makes the call once the VM ended.
    for (thread, kind) in [
        ("vcpu", "vcpu"),
        ("devices", "devices"),
        ("api", "api"),
        ("main", "main"),
    ] {
        let sock = dir.path().join(format!("{thread}.sock"));
        let child = spawn_cli(&kernel, &sock, &[]);
        let status = inject_syscall(&sock, thread);
        if thread == "main" {
            assert!(status.contains(" 204 "), "{status}");
            // The VM's end wakes the main thread, whose forbidden call kills the process: that
            // may come before the API thread has written this answer (then the connection
            // just closes). The exit status and message below are what is asserted.
            let (status, _) = api_request(&sock, "PUT", "/v1/vm/shutdown", "");
            assert!(
                status.is_empty() || status.contains(" 204 "),
                "shutdown: {status}"
            );
        }
        let (exit, stderr) = wait_child_within(child, STOP_BOUND);
        assert_eq!(
            exit.code(),
            Some(VIOLATION_EXIT_STATUS),
            "{thread}: {stderr}"
        );
        assert!(stderr.contains(&violation(kind)), "{thread}: {stderr}");
    }
}

#[test]
fn a_forbidden_call_in_the_teardown_helper_ends_only_the_helper() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = idle_guest(dir.path());
    let sock = dir.path().join("teardown.sock");
    let child = spawn_cli(&kernel, &sock, &[]);
    let status = inject_syscall(&sock, "teardown");
    assert!(status.contains(" 204 "), "{status}");
    let (status, _) = api_request(&sock, "PUT", "/v1/vm/shutdown", "");
    assert!(status.contains(" 204 "), "{status}");
    let (exit, stderr) = wait_child_within(child, STOP_BOUND);
    // The CLI's own status is the VM's; the helper's message reached the same stderr.
    assert_eq!(exit.code(), Some(0), "{stderr}");
    assert!(stderr.contains(&violation("teardown")), "{stderr}");
}

#[test]
fn with_seccomp_log_the_calls_go_through_and_the_vm_carries_on() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = idle_guest(dir.path());
    let sock = dir.path().join("log.sock");
    let child = spawn_cli(&kernel, &sock, &["--seccomp", "log"]);
    for thread in ["vcpu", "devices", "api", "main", "teardown"] {
        let status = inject_syscall(&sock, thread);
        assert!(status.contains(" 204 "), "{thread}: {status}");
    }
    // Still serving, and its vCPU and device threads still answer a pause.
    let (status, _) = api_request(&sock, "PUT", "/v1/vm/pause", "");
    assert!(status.contains(" 204 "), "{status}");
    let (status, _) = api_request(&sock, "PUT", "/v1/vm/resume", "");
    assert!(status.contains(" 204 "), "{status}");
    let (status, _) = api_request(&sock, "PUT", "/v1/vm/shutdown", "");
    assert!(status.contains(" 204 "), "{status}");
    let (exit, stderr) = wait_child_within(child, STOP_BOUND);
    assert_eq!(exit.code(), Some(0), "{stderr}");
    assert!(!stderr.contains(VIOLATION_PREFIX), "{stderr}");
}

#[test]
fn seccomp_off_and_an_unknown_level() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = idle_guest(dir.path());
    let sock = dir.path().join("off.sock");
    let child = spawn_cli(&kernel, &sock, &["--seccomp", "off"]);
    let status = inject_syscall(&sock, "vcpu");
    assert!(status.contains(" 204 "), "{status}");
    let (status, _) = api_request(&sock, "PUT", "/v1/vm/shutdown", "");
    assert!(status.contains(" 204 "), "{status}");
    let (exit, stderr) = wait_child_within(child, STOP_BOUND);
    assert_eq!(exit.code(), Some(0), "{stderr}");

    let refused = Command::new(dormouse_bin())
        .args(["run", "--kernel"])
        .arg(&kernel)
        .args(["--seccomp", "strict"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("enforce"));
}

/// The library: a VM started in-process runs its threads at the configured level (here `log`,
/// so that the injected calls do not end the test process) and reports it.
#[test]
fn library_vms_filter_their_threads_at_the_configured_level() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = idle_guest(dir.path());
    let mut config = vmm::VmConfig::new(&kernel);
    config.console = vmm::Console::Null;
    config.mem_mib = 16;
    assert_eq!(config.seccomp, vmm::SeccompLevel::Enforce, "the default");
    config.seccomp = vmm::SeccompLevel::Log;
    let vm = vmm::Vm::start(config).unwrap();
    let ctl = vm.controller();
    assert_eq!(ctl.seccomp_level(), vmm::SeccompLevel::Log);
    for thread in [
        vmm::fault::FaultThread::Vcpu,
        vmm::fault::FaultThread::Devices,
    ] {
        ctl.inject(thread, vmm::fault::FaultKind::Syscall).unwrap();
    }
    ctl.pause().unwrap();
    ctl.resume().unwrap();
    ctl.shutdown();
    drop(ctl);
    assert_eq!(vm.wait(), vmm::VmExit::HostShutdown);
}
