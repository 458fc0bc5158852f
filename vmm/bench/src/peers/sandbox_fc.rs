//! Firecracker's side of `bench sandbox`: the same Linux guest and initrd booted once with a
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
pub struct PeerGuest {
    pub vmlinux: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    pub mem_mib: u64,
}

/// One restore of the peer's template → first Exec of `true`.
pub struct PeerStart {
    /// From spawning Firecracker until the Exec answered.
    pub total: Duration,
    /// From spawning Firecracker until its snapshot load (with `resume_vm`) answered: the
    /// host side.
    pub restore: Duration,
    /// The Exec that succeeded (the agent's connection excluded).
    pub exec: Duration,
}

impl PeerStart {
    /// From the vCPUs resuming until the agent took the connection that ran the Exec.
    pub fn agent_ready(&self) -> Duration {
        self.total.saturating_sub(self.restore + self.exec)
    }
}

/// What Firecracker measured; each part fails on its own.
pub struct PeerFigures {
    pub starts: anyhow::Result<Vec<PeerStart>>,
    /// None when the density row was not asked for.
    pub density: Option<anyhow::Result<DensityFigures>>,
}

/// `None` when Firecracker is not on PATH or `--peers none` (with the line saying so); an
/// error when its template could not be made.
pub fn run(
    mode: PeerMode,
    guest: &PeerGuest,
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
    guest: &PeerGuest,
    runs: usize,
    density: usize,
    work: &Path,
) -> anyhow::Result<PeerFigures> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    let template = work.join("template");
    make_template(bin, guest, &template, &runtime)?;
    let starts = restores_to_exec(bin, &template, runs, work, &runtime);
    let density = (density > 0).then(|| density_row(bin, &template, density, work, &runtime));
    Ok(PeerFigures { starts, density })
}

/// `runs` fresh Firecracker processes, one after the other, each loading the template and
/// running `true` through its agent, then ended.
fn restores_to_exec(
    bin: &Path,
    template: &Path,
    runs: usize,
    work: &Path,
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<Vec<PeerStart>> {
    let mut samples = Vec::with_capacity(runs);
    for i in 0..runs {
        let dir = work.join(format!("start-{i}"));
        let started = Instant::now();
        let vm = restore(bin, template, &dir).with_context(|| format!("restore {}", i + 1))?;
        let restore = started.elapsed();
        let ran = runtime.block_on(exec_true_until(
            &dir.join(VSOCK_UDS),
            Instant::now() + RESTORE_TIMEOUT,
        ));
        let exec = with_log(ran.context("the restored agent's first Exec"), &vm.log)?;
        samples.push(PeerStart {
            total: started.elapsed(),
            restore,
            exec,
        });
        drop(vm);
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(samples)
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

fn boot_calls(guest: &PeerGuest) -> Vec<ApiCall> {
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
    guest: &PeerGuest,
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

/// Connects to the agent behind `uds` until it answers, then runs `true`: how long that Exec
/// took.
async fn exec_true_until(uds: &Path, deadline: Instant) -> anyhow::Result<Duration> {
    let agent = loop {
        match agent_client::AgentClient::connect_hybrid_vsock(uds, AGENT_PORT).await {
            Ok(agent) => break agent,
            Err(e) if Instant::now() > deadline => {
                return Err(e).with_context(|| format!("no agent through {}", uds.display()))
            }
            // Short: the start's time includes this wait.
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    };
    let started = Instant::now();
    let ran = tokio::time::timeout(
        RESTORE_TIMEOUT,
        agent.exec(&agent_client::ExecCommand::new("true")),
    )
    .await
    .context("Exec of `true` timed out")??;
    if !ran.success() {
        anyhow::bail!("`true` ended with {:?}", ran.status);
    }
    Ok(started.elapsed())
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
        let guest = PeerGuest {
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
