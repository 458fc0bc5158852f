//! `dormouse snapshot merge|push|pull|gc`: offline work on snapshot directories and stores.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};
use snapshot_store::{Access, SnapshotUrl, StoreUrl, TransferOptions};

use super::store_progress::Bar;

#[derive(Args)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    pub command: SnapshotCommand,
}

#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Merge a diff snapshot and its parents into one full snapshot.
    Merge {
        /// The newest snapshot of the chain.
        #[arg(long)]
        dir: PathBuf,
        /// Where the full snapshot goes: missing, empty, or a snapshot with --replace (--dir
        /// itself included).
        #[arg(long)]
        out: PathBuf,
        /// Replace a snapshot already at --out.
        #[arg(long)]
        replace: bool,
    },
    /// Upload a snapshot directory to a store: file:///abs/store/NAME or s3://bucket/prefix/NAME
    /// (S3 settings from AWS_* variables; docs/store.md). Chunks the store has are not sent
    /// again; a diff is pushed as its merged full view.
    Push {
        dir: PathBuf,
        url: String,
        #[command(flatten)]
        transfer: TransferArgs,
        /// Chunk size in MiB (a power of two, 1 to 64); 4 fits guest memory best (docs/store.md).
        #[arg(long, default_value_t = snapshot_store::DEFAULT_CHUNK_SIZE >> 20)]
        chunk_mib: u64,
    },
    /// Download a snapshot from a store into DIR (missing or empty).
    Pull {
        url: String,
        dir: PathBuf,
        #[command(flatten)]
        transfer: TransferArgs,
    },
    /// Delete the chunks of a store (file:///abs/store or s3://bucket/prefix) that no snapshot
    /// references and that are older than --grace (which protects pushes in progress).
    Gc {
        url: String,
        /// Seconds an unreferenced chunk must have existed to be deleted; must exceed the
        /// longest push plus an hour (docs/store.md).
        #[arg(long, default_value_t = snapshot_store::DEFAULT_GRACE.as_secs())]
        grace: u64,
    },
}

#[derive(Args, Clone, Copy)]
pub struct TransferArgs {
    /// Chunk transfers in flight at once.
    #[arg(long, default_value_t = 8)]
    pub jobs: usize,
}

impl TransferArgs {
    fn options(self) -> TransferOptions {
        TransferOptions {
            concurrency: self.jobs.clamp(1, 64),
            ..TransferOptions::default()
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

const MIB: f64 = (1u64 << 20) as f64;

/// Pulls the snapshot at `url` into `dir` (missing or empty).
pub fn pull(url: &SnapshotUrl, dir: &Path, transfer: TransferArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    runtime()?.block_on(async {
        let store = snapshot_store::open_store(&url.store, Access::Read)?;
        snapshot_store::pull(
            store.as_ref(),
            &url.name,
            dir,
            transfer.options(),
            &Bar::new("pull"),
        )
        .await
        .with_context(|| format!("pulling {url} into {}", dir.display()))
    })?;
    tracing::info!(
        "pulled {url} into {} in {:.2} s",
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

pub fn snapshot(args: SnapshotArgs) -> anyhow::Result<i32> {
    match args.command {
        SnapshotCommand::Merge { dir, out, replace } => {
            let manifest = snapshot::merge_chain(&dir, &out, replace)
                .with_context(|| format!("merging the chain ending at {}", dir.display()))?;
            println!(
                "{}: full snapshot {} ({} pages stored)",
                out.display(),
                manifest.snapshot_id,
                manifest.pages.written
            );
        }
        SnapshotCommand::Push {
            dir,
            url,
            transfer,
            chunk_mib,
        } => {
            let url = SnapshotUrl::parse(&url)?;
            let started = Instant::now();
            let report = runtime()?.block_on(async {
                let store = snapshot_store::open_store(&url.store, Access::Write)?;
                snapshot_store::push(
                    store.as_ref(),
                    &dir,
                    &url.name,
                    TransferOptions {
                        chunk_size: chunk_mib.saturating_mul(1 << 20),
                        ..transfer.options()
                    },
                    &Bar::new("push"),
                )
                .await
                .with_context(|| format!("pushing {} to {url}", dir.display()))
            })?;
            println!(
                "{url}: {} chunks ({} new, {:.1} MiB sent), {} zero chunks skipped, \
                 {:.1} MiB of files, {:.2} s",
                report.chunks,
                report.uploaded_chunks,
                report.uploaded_bytes as f64 / MIB,
                report.zero_chunks,
                report.snapshot_bytes as f64 / MIB,
                started.elapsed().as_secs_f64()
            );
        }
        SnapshotCommand::Pull { url, dir, transfer } => {
            pull(&SnapshotUrl::parse(&url)?, &dir, transfer)?;
            println!("{}: pulled from {url}", dir.display());
        }
        SnapshotCommand::Gc { url, grace } => {
            let store_url = StoreUrl::parse(url.trim_end_matches('/'))?;
            let report = runtime()?.block_on(async {
                let store = snapshot_store::open_store(&store_url, Access::Read)?;
                snapshot_store::gc(store.as_ref(), Duration::from_secs(grace), 16)
                    .await
                    .with_context(|| format!("collecting garbage in {store_url}"))
            })?;
            println!(
                "{store_url}: {} snapshots, {} chunks referenced, {} deleted ({:.1} MiB), \
                 {} unreferenced kept (younger than {grace} s)",
                report.snapshots,
                report.referenced,
                report.deleted,
                report.deleted_bytes as f64 / MIB,
                report.kept_young
            );
        }
    }
    Ok(0)
}
