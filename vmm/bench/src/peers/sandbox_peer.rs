//! What `bench sandbox`'s peers share: the guest they boot (the same `vmlinux` and initrd as
//! dormouse's template, with a vsock device), one restore → first Exec sample, and reaching the
//! agent through a peer's hybrid vsock socket (the `CONNECT <port>` protocol Firecracker
//! defined). Each peer's module (`sandbox_fc`) boots, snapshots and restores in its own way.
//!
//! Cloud Hypervisor has no module: it offers only virtio-pci devices, and dormouse's guest
//! kernel has no PCI, so its vsock (and the agent) would never appear in the guest.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::process::with_log;
use crate::density::DensityFigures;

/// The agent's vsock port (dormouse-agent's default).
pub const AGENT_PORT: u32 = 1024;
pub const GUEST_CID: u32 = 3;
/// A Linux boot with ring 0 emulated takes up to a minute; an agent after a restore, seconds.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
pub const RESTORE_TIMEOUT: Duration = Duration::from_secs(600);

/// The guest a peer boots: the kernel must be an uncompressed `vmlinux`.
pub struct SandboxGuest {
    pub vmlinux: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    pub mem_mib: u64,
}

/// One restore of the peer's template → first Exec of `true`.
pub struct PeerStart {
    /// From spawning the peer until the Exec answered.
    pub total: Duration,
    /// From spawning the peer until its restore answered with the vCPUs running: the host side.
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

/// What a peer measured; each part fails on its own.
pub struct PeerFigures {
    pub starts: anyhow::Result<Vec<PeerStart>>,
    /// None when the density row was not asked for, or the peer has none.
    pub density: Option<anyhow::Result<DensityFigures>>,
}

/// A restored peer: its process (ended when dropped), the hybrid vsock socket its agent is
/// reached through, and the log a failure quotes.
pub struct RestoredPeer<G> {
    pub guard: G,
    pub uds: PathBuf,
    pub log: PathBuf,
}

/// `runs` restores one after the other (`restore(i)` returns once the peer's vCPUs run), each
/// running `true` through its agent, then ended.
pub fn restores_to_exec<G>(
    runs: usize,
    runtime: &tokio::runtime::Runtime,
    mut restore: impl FnMut(usize) -> anyhow::Result<RestoredPeer<G>>,
) -> anyhow::Result<Vec<PeerStart>> {
    let mut samples = Vec::with_capacity(runs);
    for i in 0..runs {
        let started = Instant::now();
        let RestoredPeer { guard, uds, log } =
            restore(i).with_context(|| format!("restore {}", i + 1))?;
        let restored = started.elapsed();
        let ran = runtime.block_on(exec_true_until(&uds, Instant::now() + RESTORE_TIMEOUT));
        let exec = with_log(ran.context("the restored agent's first Exec"), &log)?;
        samples.push(PeerStart {
            total: started.elapsed(),
            restore: restored,
            exec,
        });
        // Ended before the next restore starts.
        drop(guard);
    }
    Ok(samples)
}

/// A multi-threaded runtime for the agent client.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the tokio runtime")
}

/// Connects to the agent behind `uds` until it answers, then runs `true`: how long that Exec
/// took.
pub async fn exec_true_until(uds: &Path, deadline: Instant) -> anyhow::Result<Duration> {
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

/// One Ping through the agent behind `uds`.
pub async fn ping_once(uds: &Path) -> anyhow::Result<()> {
    let agent = agent_client::AgentClient::connect_hybrid_vsock(uds, AGENT_PORT).await?;
    tokio::time::timeout(Duration::from_secs(10), agent.ping())
        .await
        .context("Ping timed out")??;
    Ok(())
}

/// Pings the agent behind `uds` until it answers or `deadline` passes.
pub async fn ping_until(uds: &Path, deadline: Instant) -> anyhow::Result<()> {
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
