//! Cloud Hypervisor as a peer, written from its documentation (`docs/snapshot_restore.md`,
//! `docs/api.md`) and verified against Cloud Hypervisor v53 (binaries in ../shared/peers/bin;
//! on a PVM host its snapshot needs the `cloud-hypervisor` there, patched for
//! `KVM_GET_NESTED_STATE`'s EINVAL, see that README).
//!
//! Boot: `cloud-hypervisor --api-socket S --kernel ELF --memory size=NM --cpus boot=1 --serial
//! tty --console off` (the tiny guest's PVH entry; serial console on stdout), plus `--initramfs
//! I --cmdline C` for a Linux guest, whose `vmlinux` it also loads only through a PVH entry.
//! Its stderr goes to a log file a failed step quotes the end of. Pause, resume and
//! snapshot go straight to the REST API `ch-remote` wraps (`PUT /api/v1/vm.pause`, `vm.resume`,
//! `vm.snapshot` with `destination_url: file://DIR`), so no `ch-remote` process start is timed.
//! Restore: `cloud-hypervisor --api-socket S2 --restore source_url=file://DIR` (the VM comes
//! back paused) then `vm.resume`, which answers once the vCPUs run.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::Context;
use serde_json::json;

use super::http::ApiCall;
use super::process::{connect_when_listening, wait_for_console, with_log, Reaped};
use super::{PeerGuest, PeerVm, PeerVmm, READY_TIMEOUT, STEP_TIMEOUT};

pub struct CloudHypervisor;

/// Where Cloud Hypervisor writes guest memory in a snapshot directory.
const MEMORY_FILE: &str = "memory-ranges";

impl PeerVmm for CloudHypervisor {
    type Vm = CloudHypervisorVm;

    fn name(&self) -> &'static str {
        "cloud-hypervisor"
    }

    fn program(&self) -> &'static str {
        "cloud-hypervisor"
    }

    fn provenance(&self) -> &'static str {
        "runner verified against Cloud Hypervisor v53 (binaries in ../shared/peers/bin)"
    }

    fn boot(
        &self,
        bin: &Path,
        guest: &PeerGuest,
        work: &Path,
    ) -> anyhow::Result<CloudHypervisorVm> {
        let sock = work.join("ch.sock");
        let log = work.join("ch.log");
        let _ = std::fs::remove_file(&sock);
        let mut child = Reaped::spawn(
            Command::new(bin)
                .args(boot_args(guest, &sock))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(log_file(&log)?),
        )?;
        // Its errors (e.g. a kernel without a PVH entry) go to stderr, not the console.
        with_log(
            wait_for_console(&mut child, guest.ready, READY_TIMEOUT),
            &log,
        )?;
        Ok(CloudHypervisorVm { child, sock })
    }

    fn restore(
        &self,
        bin: &Path,
        _guest: &PeerGuest,
        snap_dir: &Path,
        work: &Path,
    ) -> anyhow::Result<CloudHypervisorVm> {
        let sock = work.join("ch-restored.sock");
        let log = work.join("ch-restored.log");
        let _ = std::fs::remove_file(&sock);
        let child = Reaped::spawn(
            Command::new(bin)
                .args(restore_args(&sock, snap_dir))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log_file(&log)?),
        )?;
        let mut vm = CloudHypervisorVm { child, sock };
        with_log(vm.resume_once_restored(), &log)?;
        Ok(vm)
    }

    fn memory_file(&self, snap_dir: &Path) -> PathBuf {
        snap_dir.join(MEMORY_FILE)
    }
}

fn boot_args(guest: &PeerGuest, sock: &Path) -> Vec<String> {
    let mut args: Vec<String> = [
        "--api-socket",
        &sock.to_string_lossy(),
        "--kernel",
        &guest.elf.to_string_lossy(),
        "--memory",
        &format!("size={}M", guest.mem_mib),
        "--cpus",
        "boot=1",
        "--serial",
        "tty",
        "--console",
        "off",
    ]
    .map(str::to_string)
    .to_vec();
    if let Some(linux) = &guest.linux {
        if let Some(initrd) = &linux.initrd {
            args.push("--initramfs".to_string());
            args.push(initrd.to_string_lossy().into_owned());
        }
        args.push("--cmdline".to_string());
        args.push(linux.cmdline.clone());
    }
    args
}

fn log_file(path: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))
}

fn file_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

fn restore_args(sock: &Path, snap_dir: &Path) -> Vec<String> {
    vec![
        "--api-socket".to_string(),
        sock.to_string_lossy().into_owned(),
        "--restore".to_string(),
        format!("source_url={}", file_url(snap_dir)),
    ]
}

fn action_call(action: &str) -> ApiCall {
    ApiCall::new("PUT", &format!("/api/v1/vm.{action}"), None)
}

fn snapshot_call(dir: &Path) -> ApiCall {
    ApiCall::new(
        "PUT",
        "/api/v1/vm.snapshot",
        Some(json!({ "destination_url": file_url(dir) })),
    )
}

pub struct CloudHypervisorVm {
    child: Reaped,
    sock: PathBuf,
}

impl CloudHypervisorVm {
    fn call(&mut self, call: &ApiCall) -> anyhow::Result<()> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        let stream = connect_when_listening(&self.sock, &mut self.child, deadline)?;
        call.send(stream, STEP_TIMEOUT)
            .map(drop)
            .with_context(|| format!("Cloud Hypervisor {} {}", call.method, call.path))
    }
}

/// What Cloud Hypervisor answers to `vm.resume` while its `--restore` has not yet created the
/// VM: its API socket can listen before the restore request from its own command line is
/// handled (seen at 64 MiB, about one restore in four).
const RESTORE_PENDING: &str = "VM is not running";

impl CloudHypervisorVm {
    /// `vm.resume` on a VM restored from the command line: retried while the restore is still
    /// under way, so the time measured ends when the vCPUs run.
    fn resume_once_restored(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            match self.resume() {
                Err(e) if is_restore_pending(&e) && Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
                other => return other.context("resuming the restored VM"),
            }
        }
    }
}

fn is_restore_pending(e: &anyhow::Error) -> bool {
    format!("{e:#}").contains(RESTORE_PENDING)
}

impl PeerVm for CloudHypervisorVm {
    fn pause(&mut self) -> anyhow::Result<()> {
        self.call(&action_call("pause"))
    }

    fn resume(&mut self) -> anyhow::Result<()> {
        self.call(&action_call("resume"))
    }

    fn snapshot(&mut self, dir: &Path) -> anyhow::Result<()> {
        self.call(&snapshot_call(dir))
    }

    fn pid(&self) -> u32 {
        self.child.pid()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_loads_the_pvh_image_with_its_memory_and_a_serial_console() {
        let guest = PeerGuest {
            label: "2 GiB all touched".to_string(),
            elf: PathBuf::from("/tmp/tiny.elf"),
            linux: None,
            mem_mib: 2048,
            load: crate::plot::Load::AllTouched,
            ready: b"ready\n",
        };
        assert_eq!(
            boot_args(&guest, Path::new("/w/ch.sock")),
            [
                "--api-socket",
                "/w/ch.sock",
                "--kernel",
                "/tmp/tiny.elf",
                "--memory",
                "size=2048M",
                "--cpus",
                "boot=1",
                "--serial",
                "tty",
                "--console",
                "off"
            ]
        );
    }

    #[test]
    fn a_linux_guest_gets_its_initrd_and_command_line() {
        let guest = PeerGuest {
            label: "Linux 256 MiB".to_string(),
            elf: PathBuf::from("/k/vmlinux"),
            linux: Some(super::super::LinuxBoot {
                initrd: Some(PathBuf::from("/k/initrd")),
                cmdline: "console=ttyS0 reboot=k".to_string(),
                settle: std::time::Duration::ZERO,
            }),
            mem_mib: 256,
            load: crate::plot::Load::Linux,
            ready: b"Run /init",
        };
        let args = boot_args(&guest, Path::new("/w/ch.sock"));
        assert_eq!(
            args[..4],
            ["--api-socket", "/w/ch.sock", "--kernel", "/k/vmlinux"]
        );
        assert_eq!(
            args[args.len() - 4..],
            [
                "--initramfs",
                "/k/initrd",
                "--cmdline",
                "console=ttyS0 reboot=k"
            ]
        );
    }

    #[test]
    fn only_a_not_yet_restored_vm_is_retried() {
        let pending = anyhow::anyhow!(
            r#"PUT /api/v1/vm.resume answered 500: ["Error from API","The VM could not resume","VM is not running"]"#
        )
        .context("Cloud Hypervisor PUT /api/v1/vm.resume");
        assert!(is_restore_pending(&pending));
        let other = anyhow::anyhow!("PUT /api/v1/vm.resume answered 500: [\"bad state\"]");
        assert!(!is_restore_pending(&other));
    }

    #[test]
    fn snapshot_and_restore_use_file_urls() {
        let call = snapshot_call(Path::new("/s/snap-0"));
        assert_eq!(
            (call.method, call.path.as_str()),
            ("PUT", "/api/v1/vm.snapshot")
        );
        assert_eq!(
            call.body,
            Some(json!({"destination_url": "file:///s/snap-0"}))
        );
        assert_eq!(
            restore_args(Path::new("/w/r.sock"), Path::new("/s/snap-0")),
            [
                "--api-socket",
                "/w/r.sock",
                "--restore",
                "source_url=file:///s/snap-0"
            ]
        );
        assert_eq!(action_call("pause").path, "/api/v1/vm.pause");
        assert_eq!(action_call("resume").body, None);
        assert_eq!(
            CloudHypervisor.memory_file(Path::new("/s")),
            Path::new("/s/memory-ranges")
        );
    }
}
