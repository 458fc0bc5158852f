//! Firecracker's side of `bench sandbox` (shared parts in `sandbox_peer`): the same Linux
//! guest and initrd booted once with a
//! vsock device, its agent pinged through Firecracker's hybrid vsock socket, paused and
//! snapshotted (the peer's template). Then, from that snapshot:
//! - restore → first Exec, `runs` times: a fresh Firecracker process loads the snapshot and the
//!   agent runs `true`, as dormouse's create from template → first Exec does;
//! - the density row: N Firecracker processes load it at once and each agent must answer a
//!   Ping.
//!
//! The snapshot records the vsock socket path Firecracker bound at boot. It is relative
//! (`v.sock`), and each restored process runs in its own directory, so N restores of one
//! snapshot bind N sockets without a vsock override (Firecracker has none).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::firecracker::{self, create_call, load_call, vm_state_call, FirecrackerVm, MachineSpec};
use super::http::ApiCall;
use super::process::{log_tail, with_log};
use super::sandbox_peer::{
    self, ping_once, ping_until, PeerFigures, RestoredPeer, SandboxGuest, BOOT_TIMEOUT, GUEST_CID,
    RESTORE_TIMEOUT,
};
use super::{find_on_path, PeerMode};
use crate::density::{DensityFigures, MemoryReading};

const VSOCK_UDS: &str = "v.sock";
const SETTLE: Duration = Duration::from_secs(2);

/// `None` when Firecracker is not on PATH or `--peers none` (with the line saying so); an
/// error when its template could not be made.
pub fn run(
    mode: PeerMode,
    guest: &SandboxGuest,
    runs: usize,
    density: usize,
    work: &Path,
) -> (String, Option<anyhow::Result<PeerFigures>>) {
    let Some(bin) = find_on_path("firecracker") else {
        return ("firecracker: not found on PATH".to_string(), None);
    };
    if mode == PeerMode::None {
        let line = format!(
            "firecracker: found at {}, not run (--peers none)",
            bin.display()
        );
        return (line, None);
    }
    let line = format!("firecracker: found at {}", bin.display());
    (line, Some(measure(&bin, guest, runs, density, work)))
}

fn measure(
    bin: &Path,
    guest: &SandboxGuest,
    runs: usize,
    density: usize,
    work: &Path,
) -> anyhow::Result<PeerFigures> {
    let runtime = sandbox_peer::runtime()?;
    let template = work.join("template");
    make_template(bin, guest, &template, &runtime)?;
    let starts = sandbox_peer::restores_to_exec(runs, &runtime, |i| {
        let dir = work.join(format!("start-{i}"));
        let _ = std::fs::remove_dir_all(&dir);
        let vm = restore(bin, &template, &dir)?;
        Ok(RestoredPeer {
            uds: dir.join(VSOCK_UDS),
            log: vm.vm.log.clone(),
            guard: vm,
        })
    });
    let density = (density > 0).then(|| density_row(bin, &template, density, work, &runtime));
    Ok(PeerFigures { starts, density })
}

fn density_row(
    bin: &Path,
    template: &Path,
    count: usize,
    work: &Path,
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<DensityFigures> {
    let before = MemoryReading::of(&[]);
    // Loads run from this thread, one after the other (each takes milliseconds): a child
    // started from a pool thread would get its parent-death signal when that thread ends.
    let started = Instant::now();
    let mut vms = Vec::with_capacity(count);
    let mut requested = Vec::with_capacity(count);
    for i in 0..count {
        requested.push(Instant::now());
        let vm = restore(bin, template, &work.join(i.to_string()))
            .with_context(|| format!("restore {} of {count}", i + 1))?;
        vms.push(vm);
    }
    // Then every agent must answer, all at once.
    let deadline = Instant::now() + RESTORE_TIMEOUT;
    let answered = runtime.block_on(async {
        let mut pings = tokio::task::JoinSet::new();
        for (vm, asked) in vms.iter().zip(&requested) {
            let (uds, asked) = (vm.dir.join(VSOCK_UDS), *asked);
            pings.spawn(async move {
                ping_until(&uds, deadline).await?;
                anyhow::Ok(asked.elapsed())
            });
        }
        let mut starts = Vec::with_capacity(count);
        while let Some(joined) = pings.join_next().await {
            starts.push(joined.context("a Ping task")??);
        }
        anyhow::Ok(starts)
    });
    let all_started = started.elapsed();
    let starts = match answered {
        Ok(starts) => starts,
        Err(e) => {
            let tail = vms
                .first()
                .map(|vm| log_tail(&vm.vm.log))
                .unwrap_or_default();
            return Err(e.context(format!("the restored agents (first log: {tail})")));
        }
    };
    std::thread::sleep(SETTLE);
    let answering = runtime.block_on(async {
        let mut n = 0;
        for vm in &mut vms {
            if vm.vm.child.check_alive().is_ok() && ping_once(&vm.dir.join(VSOCK_UDS)).await.is_ok()
            {
                n += 1;
            }
        }
        n
    });
    let pids: Vec<u32> = vms.iter().map(|vm| vm.vm.child.pid()).collect();
    let after = MemoryReading::of(&pids);
    DensityFigures::new(vms.len(), all_started, starts, answering, before, after)
}

/// A restored or booting Firecracker and the directory it runs in (its vsock socket is there).
struct FcProcess {
    vm: FirecrackerVm,
    dir: PathBuf,
}

impl FcProcess {
    fn spawn(bin: &Path, dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        // The serial console: nobody reads it, so it must not be a pipe.
        let vm = firecracker::spawn(bin, dir, "api", Stdio::null())?;
        Ok(Self {
            vm,
            dir: dir.to_path_buf(),
        })
    }

    fn call(&mut self, call: &ApiCall) -> anyhow::Result<()> {
        let sent = self.vm.call(call);
        with_log(sent, &self.vm.log)
    }
}

fn boot_calls(guest: &SandboxGuest) -> Vec<ApiCall> {
    firecracker::machine_calls(&MachineSpec {
        kernel: &guest.vmlinux,
        boot_args: &guest.cmdline,
        initrd: Some(&guest.initrd),
        mem_mib: guest.mem_mib,
        vsock: Some((GUEST_CID, VSOCK_UDS)),
    })
}

fn snapshot_calls(dir: &Path) -> Vec<ApiCall> {
    vec![vm_state_call("Paused"), create_call(dir)]
}

/// Boots the guest, waits for its agent, snapshots it into `dir` and ends the process.
fn make_template(
    bin: &Path,
    guest: &SandboxGuest,
    dir: &Path,
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<()> {
    let mut vm = FcProcess::spawn(bin, dir)?;
    for call in boot_calls(guest) {
        vm.call(&call)?;
    }
    let ready = runtime.block_on(ping_until(
        &dir.join(VSOCK_UDS),
        Instant::now() + BOOT_TIMEOUT,
    ));
    with_log(ready.context("the booted guest's agent"), &vm.vm.log)?;
    for call in snapshot_calls(dir) {
        vm.call(&call)?;
    }
    Ok(())
}

fn restore(bin: &Path, template: &Path, dir: &Path) -> anyhow::Result<FcProcess> {
    let mut vm = FcProcess::spawn(bin, dir)?;
    vm.call(&load_call(template))?;
    Ok(vm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_gets_a_vsock_with_a_relative_socket_and_restores_load_the_template() {
        let guest = SandboxGuest {
            vmlinux: "/k/vmlinux".into(),
            initrd: "/k/initrd".into(),
            cmdline: "console=ttyS0".into(),
            mem_mib: 256,
        };
        let calls = boot_calls(&guest);
        let paths: Vec<&str> = calls.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(
            paths,
            ["/boot-source", "/machine-config", "/vsock", "/actions"]
        );
        let vsock = calls[2].body.as_ref().expect("a body");
        assert_eq!(vsock["uds_path"], "v.sock");
        assert!(Path::new(VSOCK_UDS).is_relative());
        let load = load_call(Path::new("/t"));
        let body = load.body.expect("a body");
        assert_eq!(body["snapshot_path"], "/t/vmstate");
        assert_eq!(body["mem_backend"]["backend_path"], "/t/memory");
        assert_eq!(body["resume_vm"], true);
        let snap = snapshot_calls(Path::new("/t"));
        assert_eq!(snap[0].method, "PATCH");
        assert_eq!(snap[1].path, "/snapshot/create");
    }
}
