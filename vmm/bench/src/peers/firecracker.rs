//! Firecracker as a peer, written from its documented API (`src/firecracker/swagger/
//! firecracker.yaml`, `docs/snapshotting/snapshot-support.md`) and verified against Firecracker
//! v1.16.1 (binaries in ../shared/peers/bin).
//!
//! Boot: `firecracker --api-sock S --log-path L` (its log goes to a file: on stdout it would
//! interleave with the guest's console mid-line and hide the ready line), `PUT /boot-source`
//! (the tiny guest ELF: Firecracker jumps to its 64-bit `e_entry`, or with PVH support to its
//! PVH entry; a Linux `vmlinux` with its initrd and command line through Linux's 64-bit boot
//! protocol), `PUT /machine-config`, `PUT /actions InstanceStart`; the serial console is
//! Firecracker's stdout. A failed step quotes the end of its log. Pause/resume:
//! `PATCH /vm`. Snapshot: `PUT /snapshot/create` (Full) on the paused VM. Restore: a new
//! process, `PUT /snapshot/load` with a File memory backend and `resume_vm: true`, which
//! answers once the vCPUs run.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::Context;
use serde_json::json;

use super::http::ApiCall;
use super::process::{connect_when_listening, wait_for_console, with_log, Reaped};
use super::{PeerGuest, PeerVm, PeerVmm, READY_TIMEOUT, STEP_TIMEOUT};

pub struct Firecracker;

const STATE_FILE: &str = "vmstate";
const MEMORY_FILE: &str = "memory";

impl PeerVmm for Firecracker {
    type Vm = FirecrackerVm;

    fn name(&self) -> &'static str {
        "firecracker"
    }

    fn program(&self) -> &'static str {
        "firecracker"
    }

    fn provenance(&self) -> &'static str {
        "runner verified against Firecracker v1.16.1 (binaries in ../shared/peers/bin)"
    }

    fn boot(&self, bin: &Path, guest: &PeerGuest, work: &Path) -> anyhow::Result<FirecrackerVm> {
        let mut vm = spawn(bin, work, "fc", Stdio::piped())?;
        let booted = boot_calls(guest)
            .iter()
            .try_for_each(|call| vm.call(call))
            .and_then(|()| wait_for_console(&mut vm.child, guest.ready, READY_TIMEOUT));
        with_log(booted, &vm.log)?;
        Ok(vm)
    }

    fn restore(
        &self,
        bin: &Path,
        _guest: &PeerGuest,
        snap_dir: &Path,
        work: &Path,
    ) -> anyhow::Result<FirecrackerVm> {
        let mut vm = spawn(bin, work, "fc-restored", Stdio::null())?;
        let loaded = vm.call(&load_call(snap_dir));
        with_log(loaded, &vm.log)?;
        Ok(vm)
    }

    fn memory_file(&self, snap_dir: &Path) -> PathBuf {
        snap_dir.join(MEMORY_FILE)
    }
}

/// Starts `bin` in `work` (relative paths in its calls resolve there) with its API socket
/// `work/NAME.sock` and its log in `work/NAME.log`.
pub(super) fn spawn(
    bin: &Path,
    work: &Path,
    name: &str,
    console: Stdio,
) -> anyhow::Result<FirecrackerVm> {
    let sock = work.join(format!("{name}.sock"));
    let log = work.join(format!("{name}.log"));
    let _ = std::fs::remove_file(&sock);
    // Created first: Firecracker documents the path as an existing fifo or file.
    std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let child = Reaped::spawn(
        Command::new(bin)
            .args(spawn_args(&sock, &log))
            .current_dir(work)
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(Stdio::null()),
    )?;
    Ok(FirecrackerVm { child, sock, log })
}

fn spawn_args(sock: &Path, log: &Path) -> Vec<String> {
    vec![
        "--api-sock".to_string(),
        sock.to_string_lossy().into_owned(),
        "--log-path".to_string(),
        log.to_string_lossy().into_owned(),
    ]
}

fn boot_calls(guest: &PeerGuest) -> Vec<ApiCall> {
    let linux = guest.linux.as_ref();
    machine_calls(&MachineSpec {
        kernel: &guest.elf,
        boot_args: linux.map_or("console=ttyS0", |l| l.cmdline.as_str()),
        initrd: linux.and_then(|l| l.initrd.as_deref()),
        mem_mib: guest.mem_mib,
        vsock: None,
    })
}

/// One vCPU, a kernel and what a boot of it needs; the guest's vsock (CID, socket path) when
/// it has one.
pub(super) struct MachineSpec<'a> {
    pub kernel: &'a Path,
    pub boot_args: &'a str,
    pub initrd: Option<&'a Path>,
    pub mem_mib: u64,
    pub vsock: Option<(u32, &'a str)>,
}

/// The API calls that configure `spec` and start it, in order.
pub(super) fn machine_calls(spec: &MachineSpec<'_>) -> Vec<ApiCall> {
    let mut source = json!({
        "kernel_image_path": spec.kernel.to_string_lossy(),
        "boot_args": spec.boot_args,
    });
    if let Some(initrd) = spec.initrd {
        source["initrd_path"] = json!(initrd.to_string_lossy());
    }
    let mut calls = vec![
        ApiCall::new("PUT", "/boot-source", Some(source)),
        ApiCall::new(
            "PUT",
            "/machine-config",
            Some(json!({ "vcpu_count": 1, "mem_size_mib": spec.mem_mib })),
        ),
    ];
    if let Some((cid, uds)) = spec.vsock {
        calls.push(ApiCall::new(
            "PUT",
            "/vsock",
            Some(json!({ "guest_cid": cid, "uds_path": uds })),
        ));
    }
    calls.push(ApiCall::new(
        "PUT",
        "/actions",
        Some(json!({ "action_type": "InstanceStart" })),
    ));
    calls
}

pub(super) fn vm_state_call(state: &str) -> ApiCall {
    ApiCall::new("PATCH", "/vm", Some(json!({ "state": state })))
}

pub(super) fn create_call(dir: &Path) -> ApiCall {
    ApiCall::new(
        "PUT",
        "/snapshot/create",
        Some(json!({
            "snapshot_type": "Full",
            "snapshot_path": dir.join(STATE_FILE).to_string_lossy(),
            "mem_file_path": dir.join(MEMORY_FILE).to_string_lossy(),
        })),
    )
}

pub(super) fn load_call(dir: &Path) -> ApiCall {
    ApiCall::new(
        "PUT",
        "/snapshot/load",
        Some(json!({
            "snapshot_path": dir.join(STATE_FILE).to_string_lossy(),
            "mem_backend": {
                "backend_type": "File",
                "backend_path": dir.join(MEMORY_FILE).to_string_lossy(),
            },
            "resume_vm": true,
        })),
    )
}

/// Also the VM of `dormouse_fc`, which runs dormouse through this runner.
pub struct FirecrackerVm {
    pub(super) child: Reaped,
    sock: PathBuf,
    pub(super) log: PathBuf,
}

impl FirecrackerVm {
    pub(super) fn call(&mut self, call: &ApiCall) -> anyhow::Result<()> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        let stream = connect_when_listening(&self.sock, &mut self.child, deadline)?;
        call.send(stream, STEP_TIMEOUT)
            .map(drop)
            .with_context(|| format!("Firecracker {} {}", call.method, call.path))
    }
}

impl PeerVm for FirecrackerVm {
    fn pause(&mut self) -> anyhow::Result<()> {
        self.call(&vm_state_call("Paused"))
    }

    fn resume(&mut self) -> anyhow::Result<()> {
        self.call(&vm_state_call("Resumed"))
    }

    fn snapshot(&mut self, dir: &Path) -> anyhow::Result<()> {
        self.call(&create_call(dir))
    }

    fn pid(&self) -> u32 {
        self.child.pid()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_configures_the_guest_then_starts_it() {
        let guest = PeerGuest {
            label: "64 MiB idle".to_string(),
            elf: PathBuf::from("/tmp/tiny.elf"),
            linux: None,
            mem_mib: 64,
            load: crate::plot::Load::Idle,
            ready: b"ready\n",
        };
        let calls = boot_calls(&guest);
        assert_eq!(calls.len(), 3);
        assert_eq!(
            (calls[0].method, calls[0].path.as_str()),
            ("PUT", "/boot-source")
        );
        assert_eq!(
            calls[0].body,
            Some(json!({"kernel_image_path": "/tmp/tiny.elf", "boot_args": "console=ttyS0"}))
        );
        assert_eq!(calls[1].path, "/machine-config");
        assert_eq!(
            calls[1].body,
            Some(json!({"vcpu_count": 1, "mem_size_mib": 64}))
        );
        assert_eq!(calls[2].path, "/actions");
        assert_eq!(calls[2].body, Some(json!({"action_type": "InstanceStart"})));
        assert_eq!(
            spawn_args(Path::new("/w/fc.sock"), Path::new("/w/fc.log")),
            ["--api-sock", "/w/fc.sock", "--log-path", "/w/fc.log"]
        );
    }

    #[test]
    fn a_linux_guest_boots_with_its_initrd_and_command_line() {
        let guest = PeerGuest {
            label: "Linux 256 MiB".to_string(),
            elf: PathBuf::from("/k/vmlinux"),
            linux: Some(super::super::LinuxBoot {
                initrd: Some(PathBuf::from("/k/initrd")),
                cmdline: "console=ttyS0 reboot=k panic=-1".to_string(),
                settle: std::time::Duration::ZERO,
            }),
            mem_mib: 256,
            load: crate::plot::Load::Linux,
            ready: b"Run /init",
        };
        assert_eq!(
            boot_calls(&guest)[0].body,
            Some(json!({
                "kernel_image_path": "/k/vmlinux",
                "boot_args": "console=ttyS0 reboot=k panic=-1",
                "initrd_path": "/k/initrd",
            }))
        );
    }

    #[test]
    fn pause_and_resume_patch_the_vm_state() {
        let call = vm_state_call("Paused");
        assert_eq!((call.method, call.path.as_str()), ("PATCH", "/vm"));
        assert_eq!(call.body, Some(json!({"state": "Paused"})));
        assert_eq!(
            vm_state_call("Resumed").body,
            Some(json!({"state": "Resumed"}))
        );
    }

    #[test]
    fn snapshot_create_and_load_name_the_same_files() {
        let create = create_call(Path::new("/s"));
        assert_eq!(
            (create.method, create.path.as_str()),
            ("PUT", "/snapshot/create")
        );
        assert_eq!(
            create.body,
            Some(json!({
                "snapshot_type": "Full",
                "snapshot_path": "/s/vmstate",
                "mem_file_path": "/s/memory",
            }))
        );
        let load = load_call(Path::new("/s"));
        assert_eq!((load.method, load.path.as_str()), ("PUT", "/snapshot/load"));
        assert_eq!(
            load.body,
            Some(json!({
                "snapshot_path": "/s/vmstate",
                "mem_backend": {"backend_type": "File", "backend_path": "/s/memory"},
                "resume_vm": true,
            }))
        );
        assert_eq!(
            Firecracker.memory_file(Path::new("/s")),
            Path::new("/s/memory")
        );
    }
}
