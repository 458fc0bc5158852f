//! A panic on any thread of a VM ends that VM, not the host: `wait()` returns
//! `VmExit::Failed` with the panic message, the CLI exits 1 saying so, and other VMs in the same
//! process carry on. Faults are injected through `vmm::fault` (the cargo feature
//! `fault-injection`, which this crate enables for the workspace's test build only).
//! The sandbox library's side is in `sandbox.rs` (`five_sandboxes_in_one_process_and_kill`).
//! The VMs are the idle tiny guest: no Linux boot, milliseconds each.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tests::*;
use vmm::fault::{FaultThread, INJECTED_PANIC};
use vmm::tiny_guest::{self, TinyGuestEnd};
use vmm::{Console, Vm, VmConfig, VmExit};

/// Far above the milliseconds a failing VM takes to stop: only tells "stops" from "hangs".
const STOP_BOUND: Duration = Duration::from_secs(20);

fn idle_guest(dir: &Path) -> PathBuf {
    let kernel = dir.join("tiny-idle.elf");
    tiny_guest::write_portable_to(&kernel, TinyGuestEnd::Idle).unwrap();
    kernel
}

fn idle_vm(kernel: &Path) -> Vm {
    let mut config = VmConfig::new(kernel);
    config.console = Console::Null;
    config.mem_mib = 16;
    Vm::start(config).expect("starting the tiny guest")
}

/// `vm.wait()` on another thread, bounded: a hang fails the test instead of stalling it.
fn wait_bounded(vm: Vm) -> VmExit {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(vm.wait());
    });
    rx.recv_timeout(STOP_BOUND)
        .expect("the VM did not stop after a panic on one of its threads")
}

fn failed_with(exit: &VmExit, thread: &str) -> bool {
    matches!(exit, VmExit::Failed(msg)
        if msg.contains(&format!("{thread} thread panicked")) && msg.contains(INJECTED_PANIC))
}

/// The bystander VM still works: pause, resume, then a clean shutdown.
fn assert_unaffected(bystander: Vm) {
    let ctl = bystander.controller();
    ctl.pause().expect("the other VM pauses");
    ctl.resume().expect("the other VM resumes");
    ctl.shutdown();
    drop(ctl);
    assert_eq!(wait_bounded(bystander), VmExit::HostShutdown);
}

#[test]
fn a_panicking_vcpu_or_device_thread_fails_its_vm_and_spares_the_others() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = idle_guest(dir.path());
    for (thread, name) in [
        (FaultThread::Vcpu, "vcpu0"),
        (FaultThread::Devices, "devices"),
    ] {
        let victim = idle_vm(&kernel);
        let bystander = idle_vm(&kernel);
        victim.controller().inject_fault(thread).unwrap();
        let exit = wait_bounded(victim);
        assert!(failed_with(&exit, name), "{thread:?}: {exit:?}");
        assert_eq!(exit.exit_code(), 1);
        assert_unaffected(bystander);
    }
}

#[test]
fn a_panicking_api_handler_fails_its_vm_and_answers_500() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = idle_guest(dir.path());
    let victim = idle_vm(&kernel);
    let bystander = idle_vm(&kernel);
    let sock = dir.path().join("api.sock");
    let server = vmm_api::ApiServer::start(&sock, Arc::new(victim.controller())).unwrap();
    let (status, body) = api_request(&sock, "PUT", "/v1/fault", r#"{"thread": "api"}"#);
    assert!(status.contains(" 500 "), "{status} {body}");
    assert!(body.contains(INJECTED_PANIC), "{body}");
    let exit = wait_bounded(victim);
    assert!(failed_with(&exit, "api-conn"), "{exit:?}");
    drop(server);
    assert_unaffected(bystander);
}

/// `dormouse run` with an API socket, stdout/stderr captured.
fn spawn_cli(kernel: &Path, sock: &Path) -> std::process::Child {
    Command::new(dormouse_bin())
        .args(["run", "--kernel"])
        .arg(kernel)
        .args(["--mem-mib", "16", "--console", "null", "--api-sock"])
        .arg(sock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning dormouse")
}

#[test]
fn the_cli_exits_1_with_the_panic_message() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = idle_guest(dir.path());
    for (thread, name) in [
        ("vcpu", "vcpu0"),
        ("devices", "devices"),
        ("api", "api-conn"),
    ] {
        let sock = dir.path().join(format!("{thread}.sock"));
        let child = spawn_cli(&kernel, &sock);
        wait_for_socket(&sock);
        let (status, body) = api_request(
            &sock,
            "PUT",
            "/v1/fault",
            &format!(r#"{{"thread": "{thread}"}}"#),
        );
        assert!(
            !status.contains(" 404 "),
            "this dormouse has no fault injection: build it with the workspace's tests \
             (`cargo build --workspace --tests`, as deploy/test.sh does)"
        );
        let _ = body;
        let (exit, stderr) = wait_child_within(child, STOP_BOUND);
        assert_eq!(exit.code(), Some(1), "{thread}: {stderr}");
        assert!(
            stderr.contains(&format!("VM failed: {name}")) && stderr.contains(INJECTED_PANIC),
            "{thread}: {stderr}"
        );
    }
}

#[test]
fn a_crashing_teardown_helper_does_not_change_the_cli_exit() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = idle_guest(dir.path());
    let sock = dir.path().join("teardown.sock");
    let child = spawn_cli(&kernel, &sock);
    wait_for_socket(&sock);
    let (status, _) = api_request(&sock, "PUT", "/v1/fault", r#"{"thread": "teardown"}"#);
    assert!(status.contains(" 204 "), "{status}");
    let (status, _) = api_request(&sock, "PUT", "/v1/vm/shutdown", "");
    assert!(status.contains(" 204 "), "{status}");
    let (exit, stderr) = wait_child_within(child, STOP_BOUND);
    assert_eq!(exit.code(), Some(0), "{stderr}");
}
