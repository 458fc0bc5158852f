//! Firecracker's side of the density row: the same Linux guest and initrd booted once with a
//! vsock device, its agent pinged through Firecracker's hybrid vsock socket, paused and
//! snapshotted; then N Firecracker processes load that snapshot at once and each agent must
//! answer a Ping.
//!
//! The snapshot records the vsock socket path Firecracker bound at boot. It is relative
//! (`v.sock`), and each restored process runs in its own directory, so N restores of one
//! snapshot bind N sockets without a vsock override (Firecracker has none).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;

use super::firecracker::{create_call, load_call, vm_state_call};
use super::http::ApiCall;
use super::process::{connect_when_listening, log_tail, with_log, Reaped};
use super::{find_on_path, PeerMode, STEP_TIMEOUT};
use crate::density::{DensityFigures, MemoryReading};
use crate::report::stats;

/// The agent's vsock port (dormouse-agent's default).
const AGENT_PORT: u32 = 1024;
const GUEST_CID: u32 = 3;
const VSOCK_UDS: &str = "v.sock";
/// A Linux boot with ring 0 emulated takes up to a minute; an agent after a restore, seconds.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const RESTORE_TIMEOUT: Duration = Duration::from_secs(600);
const SETTLE: Duration = Duration::from_secs(2);

/// The guest Firecracker boots: the kernel must be an uncompressed `vmlinux`.
pub struct DensityGuest {
    pub vmlinux: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    pub mem_mib: u64,
}

/// `None` when Firecracker is not on PATH or `--peers none` (with the line saying so).
pub fn run(
    mode: PeerMode,
    guest: &DensityGuest,
    count: usize,
    work: &Path,
) -> (String, Option<anyhow::Result<DensityFigures>>) {
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
    (line, Some(measure(&bin, guest, count, work)))
}

fn measure(
    bin: &Path,
    guest: &DensityGuest,
    count: usize,
    work: &Path,
) -> anyhow::Result<DensityFigures> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    let template = work.join("template");
    make_template(bin, guest, &template, &runtime)?;

    let before = MemoryReading::of(&[]);
    // Loads run from this thread, one after the other (each takes milliseconds): a child
    // started from a pool thread would get its parent-death signal when that thread ends.
    let started = Instant::now();
    let mut vms = Vec::with_capacity(count);
    let mut requested = Vec::with_capacity(count);
    for i in 0..count {
        requested.push(Instant::now());
        let vm = restore(bin, &template, &work.join(i.to_string()))
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
            let tail = vms.first().map(|vm| log_tail(&vm.log)).unwrap_or_default();
            return Err(e.context(format!("the restored agents (first log: {tail})")));
        }
    };
    std::thread::sleep(SETTLE);
    let answering = runtime.block_on(async {
        let mut n = 0;
        for vm in &mut vms {
            if vm.child.check_alive().is_ok() && ping_once(&vm.dir.join(VSOCK_UDS)).await.is_ok() {
                n += 1;
            }
        }
        n
    });
    let pids: Vec<u32> = vms.iter().map(|vm| vm.child.pid()).collect();
    let after = MemoryReading::of(&pids);
    Ok(DensityFigures {
        count: vms.len(),
        all_started,
        start_median: stats(starts).context("no starts")?.median,
        answering,
        per_sandbox: MemoryReading::per_sandbox(before, after, vms.len()),
    })
}

struct FcProcess {
    child: Reaped,
    sock: PathBuf,
    log: PathBuf,
    dir: PathBuf,
}

impl FcProcess {
    /// Firecracker in `dir` (its working directory: relative paths resolve there).
    fn spawn(bin: &Path, dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let (sock, log) = (dir.join("api.sock"), dir.join("fc.log"));
        std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Reaped::spawn(
            Command::new(bin)
                .arg("--api-sock")
                .arg(&sock)
                .arg("--log-path")
                .arg(&log)
                .current_dir(dir)
                .stdin(Stdio::null())
                // The serial console: nobody reads it, so it must not be a pipe.
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )?;
        Ok(Self {
            child,
            sock,
            log,
            dir: dir.to_path_buf(),
        })
    }

    fn call(&mut self, call: &ApiCall) -> anyhow::Result<()> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        let sent = connect_when_listening(&self.sock, &mut self.child, deadline)
            .and_then(|stream| call.send(stream, STEP_TIMEOUT).map(drop))
            .with_context(|| format!("Firecracker {} {}", call.method, call.path));
        with_log(sent, &self.log)
    }
}

fn boot_calls(guest: &DensityGuest) -> Vec<ApiCall> {
    vec![
        ApiCall::new(
            "PUT",
            "/boot-source",
            Some(json!({
                "kernel_image_path": guest.vmlinux.to_string_lossy(),
                "initrd_path": guest.initrd.to_string_lossy(),
                "boot_args": guest.cmdline,
            })),
        ),
        ApiCall::new(
            "PUT",
            "/machine-config",
            Some(json!({ "vcpu_count": 1, "mem_size_mib": guest.mem_mib })),
        ),
        ApiCall::new(
            "PUT",
            "/vsock",
            Some(json!({ "guest_cid": GUEST_CID, "uds_path": VSOCK_UDS })),
        ),
        ApiCall::new(
            "PUT",
            "/actions",
            Some(json!({ "action_type": "InstanceStart" })),
        ),
    ]
}

fn snapshot_calls(dir: &Path) -> Vec<ApiCall> {
    vec![vm_state_call("Paused"), create_call(dir)]
}

/// Boots the guest, waits for its agent, snapshots it into `dir` and ends the process.
fn make_template(
    bin: &Path,
    guest: &DensityGuest,
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
    with_log(ready.context("the booted guest's agent"), &vm.log)?;
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

async fn ping_once(uds: &Path) -> anyhow::Result<()> {
    let agent = agent_client::AgentClient::connect_hybrid_vsock(uds, AGENT_PORT).await?;
    tokio::time::timeout(Duration::from_secs(10), agent.ping())
        .await
        .context("Ping timed out")??;
    Ok(())
}

/// Pings the agent behind `uds` until it answers or `deadline` passes.
async fn ping_until(uds: &Path, deadline: Instant) -> anyhow::Result<()> {
    loop {
        match ping_once(uds).await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(e).with_context(|| format!("no agent Ping through {}", uds.display()))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_gets_a_vsock_with_a_relative_socket_and_restores_load_the_template() {
        let guest = DensityGuest {
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
