//! `dormouse bench sandbox --images busybox,debian,oci`: the guest images' own figures, one row
//! each: `deploy/build-rootfs.sh` time with an empty cache (cold: for Debian the package
//! download and unpack included) and again with it filled (cached), the image's size, a boot
//! of it through the sandbox library to the agent's first answer, and, from a template of it,
//! create → first Exec (median of `--runs`).
//!
//! The agent binary is built once beforehand (`--agent`, else the script's own cache) so that
//! the cold figure is the image's, not a Rust build's.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::ValueEnum;

use vmm_sandbox::{
    BootSpec, DiskSpec, ExecCommand, Isolation, ManagerConfig, SandboxConfig, SandboxManager,
    SandboxSource,
};

use crate::report::{ms, stats};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ImageKind {
    /// The default busybox image.
    Busybox,
    /// `--from debian` (bookworm, minbase plus the worker's tools).
    Debian,
    /// `--from oci:` the OCI test image of deploy/build-oci-test-image.sh.
    Oci,
}

pub struct ImagesBench<'a> {
    pub kernel: &'a Path,
    /// The checkout whose deploy/ scripts build the images.
    pub repo: &'a Path,
    pub images: &'a [ImageKind],
    pub runs: usize,
}

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const RESTORE_TIMEOUT: Duration = Duration::from_secs(60);

struct Row {
    kind: ImageKind,
    cold: Duration,
    cached: Duration,
    apparent_mib: f64,
    allocated_mib: f64,
    boot_to_agent: Duration,
    from_template: Vec<Duration>,
    /// Per create: the host side (restoring the VM until its vCPUs run, the disk copy included).
    from_template_host: Vec<Duration>,
}

pub fn bench_images(bench: &ImagesBench) -> anyhow::Result<()> {
    let script = bench.repo.join("deploy/build-rootfs.sh");
    if !script.is_file() {
        bail!(
            "{} not found: run from the checkout or pass --repo",
            script.display()
        );
    }
    let dir = std::env::temp_dir().join(format!("dormouse-bench-images-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = run(bench, &script, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    let rows = result?;
    print_table(bench.runs, &rows)
}

fn run(bench: &ImagesBench, script: &Path, dir: &Path) -> anyhow::Result<Vec<Row>> {
    // The agent, built (or found) once in the normal cache, then handed to every build.
    let probe = build(script, &[], None, None, &dir.join("probe.ext4"))?;
    let agent = agent_of(&probe.0)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    let mut rows = Vec::new();
    for &kind in bench.images {
        let args: Vec<String> = match kind {
            ImageKind::Busybox => Vec::new(),
            ImageKind::Debian => vec!["--from".into(), "debian".into()],
            ImageKind::Oci => {
                let layout = oci_test_layout(bench.repo, &dir.join("oci-layout"))?;
                vec!["--from".into(), format!("oci:{}", layout.display())]
            }
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let cache = dir.join(format!("cache-{kind:?}"));
        let (image, cold) = build(script, &args, Some(&agent), Some(&cache), &dir.join("x"))?;
        let (_, cached) = build(script, &args, Some(&agent), Some(&cache), &dir.join("x"))?;
        let (apparent_mib, allocated_mib) = sizes(&image)?;
        let (boot_to_agent, from_template, from_template_host) =
            runtime.block_on(start_figures(bench, &image, &dir.join(format!("{kind:?}"))))?;
        let _ = std::fs::remove_dir_all(&cache);
        rows.push(Row {
            kind,
            cold,
            cached,
            apparent_mib,
            allocated_mib,
            boot_to_agent,
            from_template,
            from_template_host,
        });
    }
    Ok(rows)
}

/// Runs build-rootfs.sh; `cache` replaces XDG_CACHE_HOME (the cold/cached pair), `out` is
/// used only for the probe. Returns the image and the time taken.
fn build(
    script: &Path,
    args: &[&str],
    agent: Option<&Path>,
    cache: Option<&Path>,
    out: &Path,
) -> anyhow::Result<(PathBuf, Duration)> {
    let mut command = Command::new(script);
    command.args(args).stderr(Stdio::inherit());
    if let Some(agent) = agent {
        command.arg("--agent").arg(agent);
    }
    match cache {
        Some(cache) => {
            command.env("XDG_CACHE_HOME", cache);
        }
        None => {
            command.arg("--out").arg(out);
        }
    }
    let started = Instant::now();
    let output = command
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    let took = started.elapsed();
    if !output.status.success() {
        bail!("{} {args:?} failed", script.display());
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let image = stdout
        .lines()
        .last()
        .map(|line| PathBuf::from(line.trim()))
        .filter(|path| path.is_file())
        .with_context(|| format!("{} printed no image path", script.display()))?;
    Ok((image, took))
}

/// The agent inside the probe image, copied out with debugfs (e2fsprogs): exactly the binary
/// the script put in the images.
fn agent_of(probe: &Path) -> anyhow::Result<PathBuf> {
    let agent = probe.with_file_name("dormouse-agent");
    let status = Command::new("debugfs")
        .arg("-R")
        .arg(format!("dump /usr/bin/dormouse-agent {}", agent.display()))
        .arg(probe)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("running debugfs (e2fsprogs)")?;
    let size = agent.metadata().map(|m| m.len()).unwrap_or(0);
    if !status.success() || size == 0 {
        bail!("cannot copy the agent out of {}", probe.display());
    }
    std::fs::set_permissions(&agent, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .with_context(|| format!("making {} executable", agent.display()))?;
    Ok(agent)
}

fn oci_test_layout(repo: &Path, out: &Path) -> anyhow::Result<PathBuf> {
    let script = repo.join("deploy/build-oci-test-image.sh");
    let output = Command::new(&script)
        .arg(out)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !output.status.success() {
        bail!("{} failed", script.display());
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .last()
        .map(|line| PathBuf::from(line.trim()))
        .with_context(|| format!("{} printed no layout path", script.display()))
}

/// (apparent size, allocated blocks) in MiB.
fn sizes(image: &Path) -> anyhow::Result<(f64, f64)> {
    use std::os::unix::fs::MetadataExt;
    let metadata = image
        .metadata()
        .with_context(|| format!("reading {}", image.display()))?;
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    Ok((mib(metadata.len()), mib(metadata.blocks() * 512)))
}

/// Boot → agent ready, then a template and `runs` creates from it → first Exec.
async fn start_figures(
    bench: &ImagesBench<'_>,
    image: &Path,
    dir: &Path,
) -> anyhow::Result<(Duration, Vec<Duration>, Vec<Duration>)> {
    let manager = SandboxManager::new(
        ManagerConfig::new(dir.join("work")).with_isolation(Isolation::InProcess),
    )?;
    let mut spec = BootSpec::new(bench.kernel);
    spec.rootfs = Some(DiskSpec::copy_of(image));
    spec.mem_mib = 256;
    let mut config = SandboxConfig::from_source(SandboxSource::Boot(spec));
    config.agent_timeout = BOOT_TIMEOUT;
    config.console_log = Some(dir.join("boot-console.log"));
    let started = Instant::now();
    let template = manager
        .create(config)
        .await
        .with_context(|| format!("booting {}", image.display()))?;
    let boot_to_agent = started.elapsed();
    let checkpoint = dir.join("template");
    manager.checkpoint(&template, &checkpoint).await?;
    manager.kill(&template).await?;
    let mut from_template = Vec::with_capacity(bench.runs);
    let mut from_template_host = Vec::with_capacity(bench.runs);
    for _ in 0..bench.runs.max(1) {
        let mut config = SandboxConfig::template(&checkpoint);
        config.agent_timeout = RESTORE_TIMEOUT;
        let started = Instant::now();
        let id = manager.create(config).await?;
        let out = manager.exec(&id, &ExecCommand::new("true")).await?;
        from_template.push(started.elapsed());
        from_template_host.push(manager.get(&id).await?.last_start.vm_start);
        manager.kill(&id).await?;
        if !out.success() {
            bail!("`true` failed in a sandbox of {}", image.display());
        }
    }
    Ok((boot_to_agent, from_template, from_template_host))
}

fn print_table(runs: usize, rows: &[Row]) -> anyhow::Result<()> {
    println!(
        "| image | build, cold | build, cached | image size (apparent / allocated) | boot → agent ready | template create → first Exec (median of {runs}) | of which host side |"
    );
    println!("|---|---|---|---|---|---|---|");
    for row in rows {
        let from_template = stats(row.from_template.clone()).context("no samples")?;
        let host = stats(row.from_template_host.clone()).context("no samples")?;
        println!(
            "| {:?} | {:.1} s | {:.2} s | {:.0} / {:.0} MiB | {:.1} s | {} | {} |",
            row.kind,
            row.cold.as_secs_f64(),
            row.cached.as_secs_f64(),
            row.apparent_mib,
            row.allocated_mib,
            row.boot_to_agent.as_secs_f64(),
            ms(from_template.median),
            ms(host.median)
        );
    }
    println!();
    println!(
        "Cold = deploy/build-rootfs.sh with an empty cache (Debian: package download and \
         unpack included) and the agent already built; cached = the same command again. Boot → \
         agent ready and create → first Exec go through the sandbox library (Isolation::\
         InProcess, 256 MiB, 1 vCPU); the host side is dormouse restoring the VM until its vCPUs \
         run, the sandbox's private copy of the image included; the rest is the guest's. On an \
         emulating host the guest side dominates: its kernel code is emulated (see the sandbox \
         table's notes)."
    );
    Ok(())
}
