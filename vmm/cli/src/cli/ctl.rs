//! `dormouse ctl`: drive a running VM through its control API socket (`dormouse run --api-sock`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};

use vmm_api::client::ApiClient;

#[derive(Args)]
pub struct CtlArgs {
    /// The VM's API socket (the path given to `dormouse run --api-sock`).
    #[arg(long)]
    pub sock: PathBuf,
    /// Seconds to wait for the VM's answer (default: 30, or 600 for snapshots).
    #[arg(long)]
    pub timeout: Option<u64>,
    #[command(subcommand)]
    pub action: CtlAction,
}

#[derive(Subcommand)]
pub enum CtlAction {
    /// Stop the vCPUs.
    Pause,
    /// Let paused vCPUs run again.
    Resume,
    /// Write a snapshot of the VM (pausing it meanwhile if it runs) and print what was written.
    Snapshot {
        /// Directory to write the snapshot into: missing or empty (relative paths are resolved
        /// here, not in the VM).
        #[arg(long)]
        dir: PathBuf,
        /// Only write pages dirtied since the previous snapshot, which becomes the parent.
        #[arg(long)]
        diff: bool,
        /// Replace a snapshot already in --dir (a directory holding anything else is always
        /// refused).
        #[arg(long)]
        replace: bool,
    },
    /// Stop the VM.
    Shutdown,
    /// Print the VM's state, size, devices and uptime as JSON.
    Info,
}

pub fn ctl(args: CtlArgs) -> anyhow::Result<i32> {
    let mut client = ApiClient::new(&args.sock);
    if let Some(secs) = args.timeout {
        client = client.with_timeout(Duration::from_secs(secs));
    }
    match args.action {
        CtlAction::Pause => {
            client.pause().context("pause")?;
            println!("paused");
        }
        CtlAction::Resume => {
            client.resume().context("resume")?;
            println!("resumed");
        }
        CtlAction::Snapshot { dir, diff, replace } => {
            let info = client.snapshot(&dir, diff, replace).context("snapshot")?;
            println!("{}", serde_json::to_string_pretty(&info)?);
        }
        CtlAction::Shutdown => {
            client.shutdown().context("shutdown")?;
            println!("shutting down");
        }
        CtlAction::Info => {
            let info = client.info().context("info")?;
            println!("{}", serde_json::to_string_pretty(&info)?);
        }
    }
    Ok(0)
}
