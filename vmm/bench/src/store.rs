//! `dormouse bench store`: the snapshot store (crate `snapshot-store`, docs/store.md) on a
//! snapshot of the tiny guest with 256 MiB, every page written, then the memory past the guest's
//! code overwritten on the host with pseudo-random bytes (so zstd cannot shrink it: the figures
//! are for incompressible memory, the worst case).
//!
//! Stores: S3 (a SeaweedFS this suite starts on free 127.0.0.1 ports, or `--store-url
//! s3://…` with credentials from the AWS_* environment) and a local `file://` store.
//! - push and pull throughput, in MiB/s of the snapshot's files, each run into an empty store;
//! - bytes stored for a template plus 10 clones that each rewrote 3 MiB, against 11 full
//!   copies (the directories' allocated bytes);
//! - `restore --from URL` (download, then restore) to running vCPUs against `restore --dir` of
//!   the same snapshot.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use snapshot_store::{open_store, Access, NoProgress, S3Store, Store, StoreUrl, TransferOptions};

use crate::report::{ms, stats};
use crate::snapshot::{touched_tiny_snapshot, until_restored};
use crate::weed::{self, Weed};

const MIB: u64 = 1 << 20;
const GUEST_MIB: u64 = 256;
/// Memory below this is the guest's code and page tables: kept, so the restored guest runs.
const NOISE_FROM: u64 = 2 * MIB;
const CLONES: usize = 10;
/// What each clone rewrites: this many 1 MiB pieces, at different offsets.
const CLONE_CHANGED_MIB: u64 = 3;

pub struct StoreBench<'a> {
    pub runs: usize,
    /// A store to use instead of a SeaweedFS started here (`s3://bucket/prefix`).
    pub store_url: Option<&'a str>,
    /// A Linux guest running the agent, for the wake → first Exec rows (skipped without).
    pub kernel: Option<&'a Path>,
    pub initrd: Option<&'a Path>,
    pub rootfs: Option<&'a Path>,
}

/// A store under test: where the suite writes, and how `dormouse` commands reach it.
struct Target<'a> {
    label: String,
    url: StoreUrl,
    weed: Option<&'a Weed>,
}

impl Target<'_> {
    /// The store `sub` below this one (each run pushes into an empty one).
    fn child(&self, sub: &str) -> StoreUrl {
        match &self.url {
            StoreUrl::File { root } => StoreUrl::File {
                root: root.join(sub),
            },
            StoreUrl::S3 { bucket, prefix } => StoreUrl::S3 {
                bucket: bucket.clone(),
                prefix: if prefix.is_empty() {
                    sub.to_string()
                } else {
                    format!("{prefix}/{sub}")
                },
            },
        }
    }

    fn open(&self, url: &StoreUrl) -> anyhow::Result<Arc<dyn Store>> {
        Ok(match (url, self.weed) {
            (StoreUrl::S3 { bucket, prefix }, Some(weed)) => {
                Arc::new(S3Store::new(bucket, prefix, &weed.config())?)
            }
            _ => open_store(url, Access::Write)?,
        })
    }
}

fn url_text(url: &StoreUrl) -> String {
    match url {
        StoreUrl::File { root } => format!("file://{}", root.display()),
        StoreUrl::S3 { bucket, prefix } if prefix.is_empty() => format!("s3://{bucket}"),
        StoreUrl::S3 { bucket, prefix } => format!("s3://{bucket}/{prefix}"),
    }
}

/// Runs the benchmark and prints its table.
pub fn bench_store(opts: &StoreBench<'_>) -> anyhow::Result<()> {
    let runs = opts.runs.max(1);
    let dir = tempfile::Builder::new()
        .prefix("dormouse-bench-store-")
        .tempdir()
        .context("creating the scratch directory")?;
    let dir = dir.path();
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    // Everything this run writes to a given store goes below one prefix of its own.
    let run_prefix = format!("dormouse-bench-{}", std::process::id());

    let weed = match opts.store_url {
        Some(_) => None,
        None => match weed::installed_binary() {
            Some(bin) => Some(Weed::start(&bin, dir)?),
            None => None,
        },
    };
    let s3 = match (opts.store_url, &weed) {
        (Some(url), _) => {
            let url = StoreUrl::parse(url)?;
            let label = format!("{} (--store-url)", url_text(&url));
            let base = Target {
                label,
                url,
                weed: None,
            };
            Some(Target {
                url: base.child(&run_prefix),
                ..base
            })
        }
        (None, Some(weed)) => Some(Target {
            label: "S3: SeaweedFS 4.48 on 127.0.0.1".into(),
            url: StoreUrl::S3 {
                bucket: weed::BUCKET.into(),
                prefix: run_prefix.clone(),
            },
            weed: Some(weed),
        }),
        (None, None) => None,
    };
    let local = Target {
        label: "file:// (same disk)".into(),
        url: StoreUrl::File {
            root: dir.join("file-store"),
        },
        weed: None,
    };

    let snap = dir.join("tpl");
    touched_tiny_snapshot(dir, GUEST_MIB, &snap).context("making the tiny guest's snapshot")?;
    fill_noise(
        &snap.join("memory.bin"),
        NOISE_FROM,
        None,
        0x9e37_79b9_7f4a_7c15,
    )?;

    println!(
        "| store figure (tiny guest {GUEST_MIB} MiB, every page written, memory random: zstd \
         cannot shrink it; {runs} runs) | median | best | |"
    );
    println!("|---|---|---|---|");
    if s3.is_none() {
        println!(
            "| S3 rows | skipped: SeaweedFS is not installed (run deploy/install-seaweedfs.sh, \
             or pass --store-url s3://…) | | |"
        );
    }
    let targets: Vec<&Target> = s3.iter().chain([&local]).collect();
    for target in &targets {
        throughput(&rt, target, &snap, dir, runs)
            .with_context(|| format!("push/pull with {}", target.label))?;
    }
    // Sharing and restore --from on the S3 store when there is one.
    let main = targets.first().copied().unwrap_or(&local);
    let shared = main.child("shared");
    sharing(&rt, main, &shared, &snap, dir).context("template and clones")?;
    restore_from(main, &shared, &snap, dir, runs).context("restore --from")?;

    match opts.kernel {
        Some(kernel) if opts.initrd.is_some() || opts.rootfs.is_some() => {
            if let Some(weed) = main.weed {
                // The sandbox library reads S3 settings from the environment; nothing else
                // in this process reads it while the suite runs.
                for (key, value) in weed.env_pairs() {
                    std::env::set_var(key, value);
                }
            }
            let wake_url = url_text(&main.child("wake"));
            rt.block_on(crate::store_wake::wake_rows(
                &crate::store_wake::WakeBench {
                    store_label: &main.label,
                    kernel,
                    initrd: opts.initrd,
                    rootfs: opts.rootfs,
                    runs,
                },
                &wake_url,
                &dir.join("wake"),
            ))
            .context("wake → first Exec")?;
        }
        _ => println!(
            "\n| wake → first Exec rows | skipped (pass --kernel and --initrd or --rootfs with \
             the agent as init) | | |"
        ),
    }

    if opts.store_url.is_some() {
        if let Some(s3) = &s3 {
            clean_up(&rt, s3).context("deleting the objects this run wrote")?;
        }
    }
    Ok(())
}

/// Overwrites `path` from `from` to `to` (default: its end) with xorshift bytes.
fn fill_noise(path: &Path, from: u64, to: Option<u64>, seed: u64) -> anyhow::Result<()> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let end = match to {
        Some(to) => to,
        None => file.metadata()?.len(),
    };
    let mut x = seed | 1;
    let mut block = vec![0u8; (4 * MIB) as usize];
    let mut at = from;
    while at < end {
        let len = (end - at).min(block.len() as u64) as usize;
        for word in block[..len].chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let bytes = x.to_le_bytes();
            word.copy_from_slice(&bytes[..word.len()]);
        }
        file.write_all_at(&block[..len], at)
            .with_context(|| format!("writing {}", path.display()))?;
        at += len as u64;
    }
    Ok(())
}

fn mib_per_s(bytes: u64, time: Duration) -> String {
    format!(
        "{:.0} MiB/s",
        bytes as f64 / MIB as f64 / time.as_secs_f64().max(1e-9)
    )
}

/// Push into an empty store, then pull into an empty directory, `runs` times.
fn throughput(
    rt: &tokio::runtime::Runtime,
    target: &Target,
    snap: &Path,
    dir: &Path,
    runs: usize,
) -> anyhow::Result<()> {
    let mut pushes = Vec::with_capacity(runs);
    let mut pulls = Vec::with_capacity(runs);
    let mut logical = 0;
    let mut uploaded = 0;
    for i in 0..runs {
        let url = target.child(&format!("run-{i}"));
        let store = target.open(&url)?;
        let t = Instant::now();
        let report = rt.block_on(snapshot_store::push(
            store.as_ref(),
            snap,
            "tpl",
            TransferOptions::default(),
            &NoProgress,
        ))?;
        pushes.push(t.elapsed());
        logical = report.snapshot_bytes;
        uploaded = report.uploaded_bytes;
        let pulled = dir.join(format!("pulled-{i}"));
        let t = Instant::now();
        rt.block_on(snapshot_store::pull(
            store.as_ref(),
            "tpl",
            &pulled,
            TransferOptions::default(),
            &NoProgress,
        ))?;
        pulls.push(t.elapsed());
        std::fs::remove_dir_all(&pulled)
            .with_context(|| format!("removing {}", pulled.display()))?;
        if let StoreUrl::File { root } = &url {
            std::fs::remove_dir_all(root)
                .with_context(|| format!("removing {}", root.display()))?;
        }
    }
    let push = stats(pushes).context("no samples")?;
    let pull = stats(pulls).context("no samples")?;
    println!(
        "| push, {} ({:.1} MiB of files, {:.1} MiB stored) | {} | {} | {} median |",
        target.label,
        logical as f64 / MIB as f64,
        uploaded as f64 / MIB as f64,
        mib_per_s(logical, push.median),
        mib_per_s(logical, push.min),
        ms(push.median)
    );
    println!(
        "| pull, {} (chunks checked, files synced) | {} | {} | {} median |",
        target.label,
        mib_per_s(logical, pull.median),
        mib_per_s(logical, pull.min),
        ms(pull.median)
    );
    Ok(())
}

/// Bytes the file system allocated for the files of `dir`.
fn allocated(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        total += entry?.metadata()?.blocks() * 512;
    }
    Ok(total)
}

/// A copy of `src` in `dst` with [`CLONE_CHANGED_MIB`] MiB of its memory rewritten.
fn clone_of(src: &Path, dst: &Path, index: u64) -> anyhow::Result<()> {
    std::fs::create_dir(dst).with_context(|| format!("creating {}", dst.display()))?;
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        std::fs::copy(entry.path(), dst.join(entry.file_name()))
            .with_context(|| format!("copying {}", entry.path().display()))?;
    }
    let memory = dst.join("memory.bin");
    for piece in 0..CLONE_CHANGED_MIB {
        // Spread over the memory, a different place per clone.
        let at = (16 + piece * 80 + index * 7) * MIB;
        fill_noise(&memory, at, Some(at + MIB), 0x5eed + index * 31 + piece)?;
    }
    Ok(())
}

async fn stored_bytes(store: &dyn Store) -> snapshot_store::Result<u64> {
    let mut total = 0;
    for prefix in ["chunks/", "snapshots/"] {
        total += store
            .list(prefix)
            .await?
            .iter()
            .map(|o| o.size)
            .sum::<u64>();
    }
    Ok(total)
}

/// The template and its clones pushed into one store: what it holds against full copies.
fn sharing(
    rt: &tokio::runtime::Runtime,
    target: &Target,
    url: &StoreUrl,
    snap: &Path,
    dir: &Path,
) -> anyhow::Result<()> {
    let store = target.open(url)?;
    let options = TransferOptions::default();
    rt.block_on(snapshot_store::push(
        store.as_ref(),
        snap,
        "tpl",
        options,
        &NoProgress,
    ))?;
    let mut copies = allocated(snap)?;
    for i in 0..CLONES {
        let clone = dir.join(format!("clone-{i}"));
        clone_of(snap, &clone, i as u64)?;
        copies += allocated(&clone)?;
        rt.block_on(snapshot_store::push(
            store.as_ref(),
            &clone,
            &format!("clone-{i}"),
            options,
            &NoProgress,
        ))?;
        std::fs::remove_dir_all(&clone).with_context(|| format!("removing {}", clone.display()))?;
    }
    let stored = rt.block_on(stored_bytes(store.as_ref()))?;
    println!(
        "| bytes stored, {}: template + {CLONES} clones (each rewrote {CLONE_CHANGED_MIB} MiB in \
         3 places) | {:.1} MiB | | 11 full copies: {:.1} MiB allocated, {:.1}× more |",
        target.label,
        stored as f64 / MIB as f64,
        copies as f64 / MIB as f64,
        copies as f64 / stored.max(1) as f64
    );
    Ok(())
}

/// `restore --from` (download into the scratch directory, then restore) against `restore
/// --dir` of the local snapshot, interleaved, after one warm-up of each.
fn restore_from(
    target: &Target,
    store: &StoreUrl,
    snap: &Path,
    dir: &Path,
    runs: usize,
) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating the dormouse binary")?;
    let from = format!("{}/tpl", url_text(store));
    let cache = dir.join("restore-chunk-cache");
    let remote = |fetch: &str| {
        let mut cmd = Command::new(&exe);
        cmd.args([
            "restore",
            "--console",
            "null",
            "--from",
            &from,
            "--fetch",
            fetch,
        ])
        .arg("--chunk-cache")
        .arg(&cache)
        .env("TMPDIR", dir);
        if let Some(weed) = target.weed {
            weed.env(&mut cmd);
        }
        until_restored(cmd)
    };
    let local = || {
        let mut cmd = Command::new(&exe);
        cmd.args(["restore", "--console", "null", "--dir"])
            .arg(snap);
        until_restored(cmd)
    };
    drop(remote("full")?);
    drop(remote("lazy")?);
    drop(local()?);
    let mut full_times = Vec::with_capacity(runs);
    let mut lazy_times = Vec::with_capacity(runs);
    let mut local_times = Vec::with_capacity(runs);
    for _ in 0..runs {
        full_times.push(remote("full")?.to_running);
        lazy_times.push(remote("lazy")?.to_running);
        local_times.push(local()?.to_running);
        remove_pulled_copies(dir)?;
    }
    let f = stats(full_times).context("no samples")?;
    let z = stats(lazy_times).context("no samples")?;
    let l = stats(local_times).context("no samples")?;
    println!(
        "| `restore --from` {} `--fetch full` → vCPUs running (download, then restore) | {} | \
         {} | |",
        target.label,
        ms(f.median),
        ms(f.min)
    );
    println!(
        "| `restore --from` {} (lazy: state fetched, memory on first touch) → vCPUs running | \
         {} | {} | |",
        target.label,
        ms(z.median),
        ms(z.min)
    );
    println!(
        "| `restore --dir` of the same snapshot (local disk, page cache warm) → vCPUs running | \
         {} | {} | |",
        ms(l.median),
        ms(l.min)
    );
    Ok(())
}

/// A killed `restore --from` leaves its download in TMPDIR (`dormouse-restore-…`).
fn remove_pulled_copies(dir: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with("dormouse-restore-")
        {
            let path: PathBuf = entry.path();
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

/// Deletes every object below the run's prefix of a store the user named.
fn clean_up(rt: &tokio::runtime::Runtime, target: &Target) -> anyhow::Result<()> {
    let store = target.open(&target.url)?;
    rt.block_on(async {
        for object in store.list("").await? {
            store.delete(&object.key).await?;
        }
        Ok::<_, snapshot_store::StoreError>(())
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_write_below_their_own_prefix() {
        let s3 = Target {
            label: String::new(),
            url: StoreUrl::S3 {
                bucket: "b".into(),
                prefix: String::new(),
            },
            weed: None,
        };
        let run = s3.child("dormouse-bench-1");
        assert_eq!(url_text(&run), "s3://b/dormouse-bench-1");
        let nested = Target { url: run, ..s3 };
        assert_eq!(
            url_text(&nested.child("run-0")),
            "s3://b/dormouse-bench-1/run-0"
        );
        let local = Target {
            label: String::new(),
            url: StoreUrl::File {
                root: PathBuf::from("/tmp/s"),
            },
            weed: None,
        };
        assert_eq!(url_text(&local.child("shared")), "file:///tmp/s/shared");
    }

    #[test]
    fn noise_fills_exactly_the_range() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        std::fs::write(&path, vec![0u8; 3 * MIB as usize]).unwrap();
        fill_noise(&path, MIB, Some(MIB + 4099), 7).unwrap();
        let data = std::fs::read(&path).unwrap();
        assert!(data[..MIB as usize].iter().all(|&b| b == 0));
        assert!(data[(MIB + 4099) as usize..].iter().all(|&b| b == 0));
        let noise = &data[MIB as usize..(MIB + 4099) as usize];
        assert!(noise.iter().filter(|&&b| b == 0).count() < 100);
        let mut seen = [false; 256];
        noise.iter().for_each(|&b| seen[usize::from(b)] = true);
        assert!(seen.iter().filter(|&&s| s).count() > 250);
    }
}
