//! `dormouse snapshot merge`: offline work on snapshot directories.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

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
            Ok(0)
        }
    }
}
