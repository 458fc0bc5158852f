//! `dormouse bench store --kernel K --initrd I`: wake → first successful agent `Exec` of a
//! Linux guest with 2 GiB of RAM (it touches what its boot and the agent need, ~30–40 MiB),
//! through the sandbox library (in-process):
//!
//! - local: `SandboxConfig::template(dir)` of its checkpoint on this disk;
//! - remote, lazy, cold cache: `SandboxConfig::from_store(url)` with an empty chunk cache (the
//!   memory fetched on first touch, the working set first, the rest streamed behind);
//! - remote, lazy, warm cache: the same with the chunks of an earlier wake in the cache.
//!
//! Beside each remote row, what the chunk cache held when the first `Exec` returned: the chunks
//! fetched by then (compressed, as sent; the background stream included).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use vmm_sandbox::{
    BootSpec, DiskSpec, ExecCommand, Isolation, ManagerConfig, SandboxConfig, SandboxManager,
    SandboxSource,
};

use crate::report::{ms, stats};

const MIB: u64 = 1 << 20;
/// The guest's RAM: large, mostly untouched (what a lazy wake is for).
pub const WAKE_GUEST_MIB: u64 = 2048;
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const WAKE_TIMEOUT: Duration = Duration::from_secs(120);

pub struct WakeBench<'a> {
    /// The store's name in the table.
    pub store_label: &'a str,
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub rootfs: Option<&'a Path>,
    pub runs: usize,
}

/// One wake: to the first Exec, and the cache's bytes then.
struct Wake {
    total: Duration,
    cache_bytes: u64,
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

async fn wake_once(work: &Path, cache: &Path, mut config: SandboxConfig) -> anyhow::Result<Wake> {
    let mut manager_config = ManagerConfig::new(work).with_isolation(Isolation::InProcess);
    manager_config.chunk_cache = Some(cache.to_path_buf());
    let manager = SandboxManager::new(manager_config)?;
    config.agent_timeout = WAKE_TIMEOUT;
    let started = Instant::now();
    let id = manager.create(config).await?;
    let out = manager.exec(&id, &ExecCommand::new("true")).await?;
    let total = started.elapsed();
    let cache_bytes = dir_bytes(cache);
    if !out.success() {
        bail!("`true` ended with {:?}", out.status);
    }
    manager.remove_sandbox(&id).await?;
    Ok(Wake { total, cache_bytes })
}

/// Boots the template, pushes its checkpoint to `store_url/NAME`, and prints the rows.
/// `store_url` is `s3://bucket/prefix` or `file:///…` (S3 settings in the environment).
pub async fn wake_rows(bench: &WakeBench<'_>, store_url: &str, dir: &Path) -> anyhow::Result<()> {
    let runs = bench.runs.max(1);
    let manager = SandboxManager::new(
        ManagerConfig::new(dir.join("template-work")).with_isolation(Isolation::InProcess),
    )?;
    let mut spec = BootSpec::new(bench.kernel);
    spec.initrd = bench.initrd.map(Path::to_path_buf);
    spec.rootfs = bench.rootfs.map(DiskSpec::copy_of);
    spec.mem_mib = WAKE_GUEST_MIB;
    let mut config = SandboxConfig::from_source(SandboxSource::Boot(spec));
    config.agent_timeout = BOOT_TIMEOUT;
    let template = manager
        .create(config)
        .await
        .context("booting the template (does the guest run dormouse-agent?)")?;
    let out = manager.exec(&template, &ExecCommand::new("true")).await?;
    if !out.success() {
        bail!("`true` in the template ended with {:?}", out.status);
    }
    let checkpoint = dir.join("wake-checkpoint");
    let outcome = manager.checkpoint(&template, &checkpoint).await?;
    manager.remove_sandbox(&template).await?;
    let touched_mib = outcome.pages_written as f64 * 4096.0 / MIB as f64;

    let url = format!("{}/wake-tpl", store_url.trim_end_matches('/'));
    let snapshot_url = snapshot_store::SnapshotUrl::parse(&url)?;
    let store = snapshot_store::open_store(&snapshot_url.store, snapshot_store::Access::Write)?;
    snapshot_store::push(
        store.as_ref(),
        &checkpoint,
        &snapshot_url.name,
        snapshot_store::TransferOptions::default(),
        &snapshot_store::NoProgress,
    )
    .await
    .context("pushing the wake template")?;

    let warm_cache = dir.join("warm-cache");
    // One untimed wake fills the warm cache (and the page cache of the local checkpoint).
    wake_once(
        &dir.join("warm-up"),
        &warm_cache,
        SandboxConfig::from_store(&url),
    )
    .await?;
    wake_once(
        &dir.join("warm-up-local"),
        &dir.join("unused-cache"),
        SandboxConfig::template(&checkpoint),
    )
    .await?;

    let (mut local, mut cold, mut warm) = (Vec::new(), Vec::new(), Vec::new());
    let mut cold_bytes = Vec::new();
    for run in 0..runs {
        let work = |kind: &str| dir.join(format!("{kind}-{run}"));
        local.push(
            wake_once(
                &work("local"),
                &dir.join("unused-cache"),
                SandboxConfig::template(&checkpoint),
            )
            .await?
            .total,
        );
        let cold_cache: PathBuf = work("cold-cache");
        let wake = wake_once(&work("cold"), &cold_cache, SandboxConfig::from_store(&url)).await?;
        cold.push(wake.total);
        cold_bytes.push(wake.cache_bytes);
        let _ = std::fs::remove_dir_all(&cold_cache);
        warm.push(
            wake_once(&work("warm"), &warm_cache, SandboxConfig::from_store(&url))
                .await?
                .total,
        );
    }
    let local = stats(local).context("no samples")?;
    let cold = stats(cold).context("no samples")?;
    let warm = stats(warm).context("no samples")?;
    cold_bytes.sort_unstable();
    let cold_fetched = cold_bytes[cold_bytes.len() / 2];
    let store_label = bench.store_label;
    println!();
    println!(
        "| wake → first Exec (Linux guest {WAKE_GUEST_MIB} MiB, {touched_mib:.0} MiB touched; \
         in-process; {runs} runs) | median | best | vs local |"
    );
    println!("|---|---|---|---|");
    println!(
        "| local snapshot (`SandboxConfig::template`) | {} | {} | 1.00× |",
        ms(local.median),
        ms(local.min)
    );
    let ratio = |d: Duration| d.as_secs_f64() / local.median.as_secs_f64().max(1e-9);
    println!(
        "| {store_label} lazy, cold cache (fetched by the first Exec: {:.1} MiB) | {} | {} | \
         {:.2}× |",
        cold_fetched as f64 / MIB as f64,
        ms(cold.median),
        ms(cold.min),
        ratio(cold.median)
    );
    println!(
        "| {store_label} lazy, warm cache | {} | {} | {:.2}× |",
        ms(warm.median),
        ms(warm.min),
        ratio(warm.median)
    );
    let verdict = if ratio(cold.median) <= 2.0 {
        "met"
    } else {
        "NOT met"
    };
    println!(
        "| goal: remote lazy wake (cold) within 2× of a local wake | {verdict} ({:.2}×) | | |",
        ratio(cold.median)
    );
    Ok(())
}
