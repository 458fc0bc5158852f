//! `dormouse bench sandbox`: the sandbox library's start-to-first-command figures, through the
//! same `SandboxManager` a worker embeds. One template guest is booted (its boot → first Exec
//! is one figure), checkpointed, and then, N times each: create from the template → first Exec,
//! fork from the checkpoint → first Exec, and wake (after hibernate) → first Exec; then the
//! guest's floor under one agent call (see `exec_floor`).
//!
//! Each figure is split into host-side time (building or restoring the VM until its vCPUs run,
//! disk copies included) and guest-side time (the agent answering its first connection and
//! Ping, SetTime, and the Exec of `/bin/true`), because on an emulating host the guest side
//! dominates and says nothing about dormouse.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use vmm_sandbox::{
    BootSpec, DiskSpec, ExecCommand, ForkConfig, Isolation, JailSettings, ManagerConfig,
    ProcessIsolation, SandboxConfig, SandboxId, SandboxManager, SandboxSource, StartTimings,
};

use crate::density;
use crate::exec_floor;
use crate::peers::sandbox_fc;
use crate::peers::sandbox_peer::{PeerFigures, PeerStart, SandboxGuest};
use crate::report::{ms, stats};
use crate::sandbox_memory;
use crate::warm_shell;

/// Idle sandboxes started from the template for the memory figures.
const MEMORY_SANDBOXES: usize = 3;

pub struct SandboxBench<'a> {
    pub kernel: Option<&'a Path>,
    pub initrd: Option<&'a Path>,
    pub rootfs: Option<&'a Path>,
    pub runs: usize,
    /// Sandboxes of the density row (0: none).
    pub density: usize,
    /// Whether Firecracker gets a density row too.
    pub peers: crate::peers::PeerMode,
    /// Only the guest floor, in the booted template.
    pub floor_only: bool,
}

/// A Linux boot under emulation can take a minute.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const RESTORE_TIMEOUT: Duration = Duration::from_secs(60);
const PINGS: usize = 20;
/// The template guest's memory (the density row's Firecracker guest gets the same).
const TEMPLATE_MEM_MIB: u64 = 256;

/// One start → first Exec.
#[derive(Clone)]
struct Sample {
    total: Duration,
    start: StartTimings,
    exec: Duration,
}

impl Sample {
    fn guest(&self) -> Duration {
        self.start.agent_ready + self.start.set_time + self.exec
    }
}

pub fn bench_sandbox(bench: &SandboxBench) -> anyhow::Result<()> {
    const TITLE: &str = "sandbox figures";
    let Some(kernel) = bench.kernel else {
        println!(
            "| {TITLE} | skipped (pass --kernel and --initrd or --rootfs with the agent as init) |"
        );
        return Ok(());
    };
    if bench.initrd.is_none() && bench.rootfs.is_none() {
        bail!("bench sandbox needs --initrd or --rootfs (a guest whose init runs dormouse-agent)");
    }
    let dir = std::env::temp_dir().join(format!("dormouse-bench-sandbox-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    let result = runtime.block_on(run(bench, kernel, &dir));
    drop(runtime);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn first_exec(manager: &SandboxManager, id: &SandboxId) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let out = manager.exec(id, &ExecCommand::new("true")).await?;
    if !out.success() {
        bail!("`true` in {id} ended with {:?}", out.status);
    }
    Ok(started.elapsed())
}

async fn sample_after(
    manager: &SandboxManager,
    id: &SandboxId,
    started: Instant,
) -> anyhow::Result<Sample> {
    let exec = first_exec(manager, id).await?;
    let total = started.elapsed();
    let start = manager.get(id).await?.last_start;
    Ok(Sample { total, start, exec })
}

/// The Process isolation the bench compares with: this binary, jailed when run as root (the
/// jail's directories under `dir`).
fn process_isolation(dir: &Path) -> anyhow::Result<Isolation> {
    // SAFETY: geteuid has no arguments and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    Ok(Isolation::Process(ProcessIsolation {
        binary: Some(std::env::current_exe().context("finding this dormouse binary")?),
        jail: root.then(|| JailSettings {
            chroot_base: dir.join("jails"),
            ..JailSettings::default()
        }),
        ..ProcessIsolation::unjailed()
    }))
}

/// The start figures of one isolation mode.
struct ModeFigures {
    from_template: Vec<Sample>,
    forks: Vec<Sample>,
    wakes: Vec<Sample>,
    hibernates: Vec<Duration>,
    /// Per idle sandbox: (RSS MiB, PSS MiB) of the worker and its sandbox processes.
    memory: (f64, f64),
}

async fn mode_figures(
    manager: &SandboxManager,
    checkpoint: &Path,
    dir: &Path,
    runs: usize,
) -> anyhow::Result<ModeFigures> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let from_template = template_creates(manager, checkpoint, runs, Pool::Unused).await?;

    let mut forks = Vec::with_capacity(runs);
    for _ in 0..runs {
        let config = ForkConfig {
            agent_timeout: RESTORE_TIMEOUT,
            ..ForkConfig::default()
        };
        let started = Instant::now();
        let id = manager.fork(checkpoint, config).await?;
        forks.push(sample_after(manager, &id, started).await?);
        manager.kill(&id).await?;
    }

    let (wakes, hibernates) = wake_cycles(manager, checkpoint, dir, runs, Pool::Unused).await?;

    // Memory: N idle sandboxes from the template, each having run one command.
    let before = sandbox_memory::worker_and(&[]);
    let mut ids = Vec::with_capacity(MEMORY_SANDBOXES);
    for _ in 0..MEMORY_SANDBOXES {
        let mut config = SandboxConfig::template(checkpoint);
        config.agent_timeout = RESTORE_TIMEOUT;
        let id = manager.create(config).await?;
        first_exec(manager, &id).await?;
        ids.push(id);
    }
    let mut groups = Vec::new();
    for id in &ids {
        groups.extend(manager.get(id).await?.pid);
    }
    let after = sandbox_memory::worker_and(&groups);
    for id in &ids {
        manager.kill(id).await?;
    }
    let memory = sandbox_memory::per_sandbox(before, after, MEMORY_SANDBOXES);
    Ok(ModeFigures {
        from_template,
        forks,
        wakes,
        hibernates,
        memory,
    })
}

async fn run(bench: &SandboxBench<'_>, kernel: &Path, dir: &Path) -> anyhow::Result<()> {
    let runs = bench.runs.max(1);
    let manager = SandboxManager::new(
        ManagerConfig::new(dir.join("work")).with_isolation(Isolation::InProcess),
    )?;

    let mut spec = BootSpec::new(kernel);
    spec.initrd = bench.initrd.map(Path::to_path_buf);
    spec.rootfs = bench.rootfs.map(DiskSpec::copy_of);
    spec.mem_mib = TEMPLATE_MEM_MIB;
    let mut config = SandboxConfig::from_source(SandboxSource::Boot(spec));
    config.agent_timeout = BOOT_TIMEOUT;
    config.console_log = Some(dir.join("template-console.log"));
    let started = Instant::now();
    let template = manager
        .create(config)
        .await
        .context("booting the template sandbox (does the guest run dormouse-agent?)")?;
    let boot = sample_after(&manager, &template, started).await?;
    if bench.floor_only {
        let floor = exec_floor::measure(&manager, &template, runs).await;
        manager.kill(&template).await?;
        println!("Boot → first Exec: {}", ms(boot.total));
        println!();
        exec_floor::print(&floor?);
        return Ok(());
    }

    let agent = manager.agent(&template).await?;
    let mut pings = Vec::with_capacity(PINGS);
    for _ in 0..PINGS {
        let t = Instant::now();
        agent.ping().await?;
        pings.push(t.elapsed());
    }
    drop(agent);
    let checkpoint = dir.join("checkpoint");
    let outcome = manager.checkpoint(&template, &checkpoint).await?;
    manager.kill(&template).await?;

    let in_process = mode_figures(&manager, &checkpoint, &dir.join("in-process"), runs).await?;
    let warm = warm_figures(&manager, &checkpoint, &dir.join("warm"), runs).await?;
    let process_manager = SandboxManager::new(
        ManagerConfig::new(dir.join("work-process")).with_isolation(process_isolation(dir)?),
    )?;
    let process = mode_figures(&process_manager, &checkpoint, &dir.join("process"), runs).await?;

    for (title, figures) in [
        ("Isolation::InProcess", &in_process),
        ("Isolation::Process", &process),
    ] {
        println!("{title}:");
        println!();
        print_table(
            runs,
            &boot,
            &[
                ("create from template → first Exec", &figures.from_template),
                ("fork from checkpoint → first Exec", &figures.forks),
                ("wake → first Exec", &figures.wakes),
            ],
        )?;
        println!();
    }
    println!(
        "Isolation::InProcess with a warm pool (`keep_warm(shape, 1)`: the VM restored into a \
         pre-built shell; {} of {} starts took one):",
        warm.hits,
        2 * runs
    );
    println!();
    print_table(
        runs,
        &boot,
        &[
            (
                "create from template → first Exec, warm pool",
                &warm.from_template,
            ),
            ("wake → first Exec, warm pool", &warm.wakes),
        ],
    )?;
    println!();
    print_warm_wake_verdict(&warm.wakes)?;
    println!();
    println!(
        "| memory per idle sandbox ({MEMORY_SANDBOXES} from one template, one Exec each; worker + its sandbox processes) | RSS | PSS |"
    );
    println!("|---|---|---|");
    for (title, figures) in [
        ("Isolation::InProcess", &in_process),
        ("Isolation::Process", &process),
    ] {
        println!(
            "| {title} | {:.1} MiB | {:.1} MiB |",
            figures.memory.0, figures.memory.1
        );
    }
    let ours_density = if bench.density > 0 {
        Some(density::dormouse(&manager, &checkpoint, bench.density).await)
    } else {
        None
    };
    let (peer_line, peer) = firecracker_figures(bench, kernel, runs, dir).await;
    println!();
    print_peer_starts(runs, &in_process.from_template, peer.as_ref());
    if let Some(ours) = ours_density {
        let mut rows = vec![("dormouse (Isolation::InProcess)", ours)];
        match peer {
            Some(Ok(PeerFigures {
                density: Some(theirs),
                ..
            })) => rows.push(("firecracker", theirs)),
            Some(Err(e)) => rows.push(("firecracker", Err(e))),
            _ => {}
        }
        println!();
        density::print(bench.density, &rows);
    }
    println!("{peer_line}");
    // The guest's floor, in one more sandbox from the template.
    let mut config = SandboxConfig::template(&checkpoint);
    config.agent_timeout = RESTORE_TIMEOUT;
    let floor_sandbox = manager.create(config).await?;
    let floor = exec_floor::measure(&manager, &floor_sandbox, runs).await;
    manager.kill(&floor_sandbox).await?;
    println!();
    exec_floor::print(&floor?);
    println!();

    let checkpoint_time = outcome.duration;
    let hibernate = stats(in_process.hibernates.clone()).context("no hibernate samples")?;
    let hibernate_process = stats(process.hibernates.clone()).context("no hibernate samples")?;
    let ping = stats(pings).context("no ping samples")?;
    println!();
    println!(
        "Checkpoint of the template: {} (VM paused, memory written, disks copied). Hibernate: \
         median {} in-process, {} as a process (SyncFs, snapshot, VM freed). Agent Ping round \
         trip in a running sandbox: median {} (vsock + gRPC + one agent call: the floor of every \
         guest-side figure).",
        ms(checkpoint_time),
        ms(hibernate.median),
        ms(hibernate_process.median),
        ms(ping.median)
    );
    println!(
        "Host side = dormouse building (boot) or restoring the VM until its vCPUs run, disk \
         copies included (Process: until the sandbox process's API answers). Guest side = from \
         vCPUs running to the agent answering its first \
         connection and Ping (for a boot: the whole kernel boot and agent start), SetTime, and \
         the Exec of /bin/true (a fork + exec in the guest). On an emulating host (PVM without \
         a PVM-aware guest kernel) guest ring 0 is emulated — a guest syscall costs ~0.3 ms and \
         fork + exec ~0.45 s — so the guest side dominates; on hardware KVM it shrinks by orders \
         of magnitude while the host side stays. PSS divides shared pages (the template's memory \
         file in the page cache, the binary) among their users; RSS counts them in full."
    );
    Ok(())
}

/// Starts through the sandbox library's warm pool: the same creates from the template and
/// hibernate → wake cycles as [`mode_figures`], each taken once a shell is ready (the pool
/// refills in the background between starts).
struct WarmFigures {
    from_template: Vec<Sample>,
    wakes: Vec<Sample>,
    /// Starts that took a shell (`warm_pool().hits`).
    hits: u64,
}

/// How long a shell may take to be ready before a start (building one takes milliseconds).
const SHELL_READY_TIMEOUT: Duration = Duration::from_secs(10);

async fn shell_ready(manager: &SandboxManager) -> anyhow::Result<()> {
    let deadline = Instant::now() + SHELL_READY_TIMEOUT;
    while manager.warm_pool().shapes.iter().all(|s| s.ready == 0) {
        if Instant::now() > deadline {
            anyhow::bail!("no warm shell ready within {SHELL_READY_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

async fn warm_figures(
    manager: &SandboxManager,
    checkpoint: &Path,
    dir: &Path,
    runs: usize,
) -> anyhow::Result<WarmFigures> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let shape = manager.shell_shape(checkpoint)?;
    manager.keep_warm(shape, 1).await?;
    let hits_before = manager.warm_pool().hits;
    let from_template = template_creates(manager, checkpoint, runs, Pool::WaitForShell).await?;
    let (wakes, _) = wake_cycles(manager, checkpoint, dir, runs, Pool::WaitForShell).await?;
    // The template create before the wakes took a shell too.
    let hits = manager
        .warm_pool()
        .hits
        .saturating_sub(hits_before)
        .saturating_sub(1);
    manager.keep_warm(shape, 0).await?;
    Ok(WarmFigures {
        from_template,
        wakes,
        hits,
    })
}

/// Whether each start first waits for a warm shell.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pool {
    Unused,
    WaitForShell,
}

impl Pool {
    async fn before_start(self, manager: &SandboxManager) -> anyhow::Result<()> {
        match self {
            Pool::Unused => Ok(()),
            Pool::WaitForShell => shell_ready(manager).await,
        }
    }
}

/// `runs` sandboxes created from the template, each → first Exec, then killed.
async fn template_creates(
    manager: &SandboxManager,
    checkpoint: &Path,
    runs: usize,
    pool: Pool,
) -> anyhow::Result<Vec<Sample>> {
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        pool.before_start(manager).await?;
        let mut config = SandboxConfig::template(checkpoint);
        config.agent_timeout = RESTORE_TIMEOUT;
        let started = Instant::now();
        let id = manager.create(config).await?;
        samples.push(sample_after(manager, &id, started).await?);
        manager.kill(&id).await?;
    }
    Ok(samples)
}

/// How long a hibernated sandbox sleeps before its wake. A platform wakes a sandbox seconds or
/// hours after it hibernated; waking at once would also time what the hibernate leaves running
/// (the kernel's writeback of the new snapshot, the old one's unlink) on a small host's CPUs.
const WAKE_AFTER_HIBERNATE: Duration = Duration::from_millis(200);

/// One sandbox from the template, hibernated into `dir` and woken `runs` times (each
/// [`WAKE_AFTER_HIBERNATE`] after its hibernate): each wake → first Exec, and each
/// hibernate's time.
async fn wake_cycles(
    manager: &SandboxManager,
    checkpoint: &Path,
    dir: &Path,
    runs: usize,
    pool: Pool,
) -> anyhow::Result<(Vec<Sample>, Vec<Duration>)> {
    let mut wakes = Vec::with_capacity(runs);
    let mut hibernates = Vec::with_capacity(runs);
    let mut config = SandboxConfig::template(checkpoint);
    config.agent_timeout = RESTORE_TIMEOUT;
    pool.before_start(manager).await?;
    let id = manager.create(config).await?;
    let mut previous: Option<PathBuf> = None;
    for i in 0..runs {
        let hibernated = dir.join(format!("hibernated-{i}"));
        let t = Instant::now();
        manager.hibernate(&id, &hibernated).await?;
        hibernates.push(t.elapsed());
        // The VM that mapped the previous directory is gone now.
        if let Some(p) = previous.replace(hibernated.clone()) {
            let _ = std::fs::remove_dir_all(p);
        }
        pool.before_start(manager).await?;
        tokio::time::sleep(WAKE_AFTER_HIBERNATE).await;
        let started = Instant::now();
        manager.wake(&id, &hibernated).await?;
        wakes.push(sample_after(manager, &id, started).await?);
    }
    manager.kill(&id).await?;
    Ok((wakes, hibernates))
}

/// Firecracker's figures on the same kernel and initrd (its own snapshot of the booted guest):
/// restore → first Exec `runs` times, and the density row when one is asked for. The line says
/// whether it ran. Cloud Hypervisor is not a peer here: it offers only virtio-pci devices, and
/// the guest kernel has no PCI (dormouse needs none), so its vsock, and the agent, would never
/// appear.
async fn firecracker_figures(
    bench: &SandboxBench<'_>,
    kernel: &Path,
    runs: usize,
    dir: &Path,
) -> (String, Option<anyhow::Result<PeerFigures>>) {
    let Some(initrd) = bench.initrd else {
        let line = "firecracker: not run (it boots the initrd; this run has a rootfs)";
        return (line.to_string(), None);
    };
    let cmdline = match crate::snapshot::dormouse_cmdline(kernel) {
        Ok(cmdline) => cmdline,
        Err(e) => {
            return (
                "firecracker: no guest command line".to_string(),
                Some(Err(e)),
            )
        }
    };
    let guest = SandboxGuest {
        vmlinux: kernel.to_path_buf(),
        initrd: initrd.to_path_buf(),
        cmdline,
        mem_mib: TEMPLATE_MEM_MIB,
    };
    let (mode, density, work) = (bench.peers, bench.density, dir.join("firecracker"));
    // Its own thread: the peer runner blocks and runs its own tokio runtime.
    let peer = std::thread::spawn(move || sandbox_fc::run(mode, &guest, runs, density, &work));
    match tokio::task::spawn_blocking(move || peer.join()).await {
        Ok(Ok(done)) => done,
        _ => (
            "firecracker: its thread panicked".to_string(),
            Some(Err(anyhow::anyhow!("the Firecracker thread panicked"))),
        ),
    }
}

/// Firecracker's restore → first Exec against dormouse's create from template → first Exec
/// (both restore a snapshot of the booted guest into a new VM and run `true` through the
/// agent).
fn print_peer_starts(runs: usize, ours: &[Sample], peer: Option<&anyhow::Result<PeerFigures>>) {
    println!(
        "| restore of the booted guest's snapshot → first Exec ({runs} runs) | min | median | host: VM restore | guest: agent ready | guest: Exec `true` | median ÷ dormouse's | host part ÷ dormouse's |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let (Some(total), Some(host)) = (
        median(ours.iter().map(|s| s.total)),
        median(ours.iter().map(|s| s.start.vm_start)),
    ) else {
        println!("| dormouse: create from template | no samples | | | | | | |");
        return;
    };
    let min = ours.iter().map(|s| s.total).min().unwrap_or_default();
    let ready = median(ours.iter().map(|s| s.start.agent_ready + s.start.set_time));
    let exec = median(ours.iter().map(|s| s.exec));
    println!(
        "| dormouse: create from template (InProcess; agent ready includes SetTime) | {} | {} | {} | {} | {} | 1.00× | 1.00× |",
        ms(min),
        ms(total),
        ms(host),
        ready.map(ms).unwrap_or_default(),
        exec.map(ms).unwrap_or_default(),
    );
    let label = "firecracker: snapshot restore";
    match peer.map(|p| p.as_ref().map(|f| &f.starts)) {
        None => println!("| {label} | not run | | | | | | |"),
        Some(Err(e)) | Some(Ok(Err(e))) => println!("| {label} | failed: {e:#} | | | | | | |"),
        Some(Ok(Ok(starts))) => print_peer_row(label, starts, total, host),
    }
}

fn print_peer_row(label: &str, starts: &[PeerStart], our_total: Duration, our_host: Duration) {
    let (Some(total), Some(host), Some(ready), Some(exec)) = (
        median(starts.iter().map(|s| s.total)),
        median(starts.iter().map(|s| s.restore)),
        median(starts.iter().map(PeerStart::agent_ready)),
        median(starts.iter().map(|s| s.exec)),
    ) else {
        println!("| {label} | no samples | | | | | | |");
        return;
    };
    let min = starts.iter().map(|s| s.total).min().unwrap_or_default();
    println!(
        "| {label} | {} | {} | {} | {} | {} | {} | {} |",
        ms(min),
        ms(total),
        ms(host),
        ms(ready),
        ms(exec),
        ratio(total, our_total),
        ratio(host, our_host),
    );
}

fn median(samples: impl Iterator<Item = Duration>) -> Option<Duration> {
    stats(samples.collect()).map(|s| s.median)
}

/// `theirs ÷ ours`, as the tables print ratios.
fn ratio(theirs: Duration, ours: Duration) -> String {
    format!(
        "{:.2}×",
        theirs.as_secs_f64() / ours.as_secs_f64().max(1e-9)
    )
}

fn print_table(runs: usize, boot: &Sample, rows: &[(&str, &[Sample])]) -> anyhow::Result<()> {
    println!(
        "| sandbox figure ({runs} runs) | min | median | host: VM build/restore | guest: agent ready | guest: SetTime | guest: Exec `true` | guest share |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    print_row(
        "boot → first Exec (1 run, template)",
        std::slice::from_ref(boot),
    )?;
    for (name, samples) in rows {
        print_row(name, samples)?;
    }
    Ok(())
}

/// The target for `wake()` through the pool: its host part (the restore into a shell
/// until the vCPUs run, as `SandboxManager::wake` times it) at most 1 ms, median.
fn print_warm_wake_verdict(wakes: &[Sample]) -> anyhow::Result<()> {
    let host = median_of(wakes, |s| s.start.vm_start)?;
    println!(
        "wake() with a warm shell, host part (restore → vCPUs running, inside `SandboxManager::wake`): median {} of {} wakes; target ≤ {}: {}",
        ms(host),
        wakes.len(),
        ms(warm_shell::TARGET_WARM_RESTORE),
        crate::snapshot::verdict(host <= warm_shell::TARGET_WARM_RESTORE)
    );
    Ok(())
}

fn median_of(samples: &[Sample], f: impl Fn(&Sample) -> Duration) -> anyhow::Result<Duration> {
    median(samples.iter().map(f)).context("no samples")
}

fn print_row(name: &str, samples: &[Sample]) -> anyhow::Result<()> {
    let total = stats(samples.iter().map(|s| s.total).collect()).context("no samples")?;
    let mut shares: Vec<f64> = samples
        .iter()
        .map(|s| s.guest().as_secs_f64() / s.total.as_secs_f64().max(1e-9))
        .collect();
    shares.sort_by(f64::total_cmp);
    let share = shares.get(shares.len() / 2).copied().unwrap_or(0.0);
    println!(
        "| {name} | {} | {} | {} | {} | {} | {} | {:.1} % |",
        ms(total.min),
        ms(total.median),
        ms(median_of(samples, |s| s.start.vm_start)?),
        ms(median_of(samples, |s| s.start.agent_ready)?),
        ms(median_of(samples, |s| s.start.set_time)?),
        ms(median_of(samples, |s| s.exec)?),
        share * 100.0
    );
    Ok(())
}
