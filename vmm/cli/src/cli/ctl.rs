//! `dormouse ctl`: drive a running VM through its control API socket (`dormouse run --api-sock`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};

use vmm::options::{parse_bucket, BucketUnit};
use vmm_api::client::ApiClient;
use vmm_api::{BalloonUpdate, DriveUpdate, NetUpdate, RateLimiter, TokenBucket};

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
        /// Pause the guest only to save its state and write-protect its memory (a few ms), and
        /// write memory while it runs. Full snapshots of a booted VM; otherwise the snapshot is
        /// taken paused and the answer's `live_unavailable` says why.
        #[arg(long, conflicts_with = "diff")]
        live: bool,
    },
    /// Stop the VM.
    Shutdown,
    /// Print the VM's state, size, devices and uptime as JSON.
    Info,
    /// Change a disk's I/O limits (docs/rate-limits.md) and print the limits now in force.
    /// A limit left out stays as it is; `off` removes it.
    LimitDisk {
        /// The disk: 0 is the first (`--rootfs` when given), then each `--disk` in order.
        index: usize,
        /// Bandwidth: `SIZE/REFILL_MS[/BURST]` in bytes (K, M, G suffixes), or `off`.
        #[arg(long, value_parser = bytes_bucket)]
        bw: Option<TokenBucket>,
        /// Requests: `N/REFILL_MS[/BURST]`, or `off`.
        #[arg(long, value_parser = ops_bucket)]
        ops: Option<TokenBucket>,
    },
    /// Set the balloon's target (docs/balloon.md) and print the balloon's state (`actual`
    /// follows as the guest inflates or deflates).
    Balloon {
        /// MiB the guest should give back (0 deflates fully).
        #[arg(long)]
        target_mib: Option<u32>,
        /// Seconds between statistics requests (a balloon created with statistics only).
        #[arg(long)]
        stats_s: Option<u16>,
    },
    /// Change a network device's RX/TX limits (as `limit-disk`).
    LimitNet {
        /// The network device: each `--net` in order, from 0.
        index: usize,
        #[arg(long, value_parser = bytes_bucket)]
        rx_bw: Option<TokenBucket>,
        #[arg(long, value_parser = ops_bucket)]
        rx_ops: Option<TokenBucket>,
        #[arg(long, value_parser = bytes_bucket)]
        tx_bw: Option<TokenBucket>,
        #[arg(long, value_parser = ops_bucket)]
        tx_ops: Option<TokenBucket>,
    },
}

/// `off` is Firecracker's switch-off bucket (size 0).
fn bucket(s: &str, unit: BucketUnit) -> Result<TokenBucket, String> {
    if s == "off" {
        return Ok(TokenBucket::default());
    }
    parse_bucket(s, unit)
        .map(Into::into)
        .map_err(|why| format!("{s:?}: {why}, or `off`"))
}

fn bytes_bucket(s: &str) -> Result<TokenBucket, String> {
    bucket(s, BucketUnit::Bytes)
}

fn ops_bucket(s: &str) -> Result<TokenBucket, String> {
    bucket(s, BucketUnit::Ops)
}

fn limiter(bandwidth: Option<TokenBucket>, ops: Option<TokenBucket>) -> Option<RateLimiter> {
    (bandwidth.is_some() || ops.is_some()).then_some(RateLimiter { bandwidth, ops })
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
        CtlAction::Snapshot {
            dir,
            diff,
            replace,
            live,
        } => {
            let info = client
                .snapshot_with(vmm_api::SnapshotRequest {
                    dir,
                    diff,
                    replace,
                    live,
                })
                .context("snapshot")?;
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
        CtlAction::LimitDisk { index, bw, ops } => {
            let update = DriveUpdate {
                rate_limiter: limiter(bw, ops),
            };
            let now = client
                .update_drive(index, &update)
                .with_context(|| format!("limit-disk {index}"))?;
            println!("{}", serde_json::to_string_pretty(&now)?);
        }
        CtlAction::Balloon {
            target_mib,
            stats_s,
        } => {
            let update = BalloonUpdate {
                target_mib,
                stats_interval_s: stats_s,
            };
            let now = client.set_balloon(&update).context("balloon")?;
            println!("{}", serde_json::to_string_pretty(&now)?);
        }
        CtlAction::LimitNet {
            index,
            rx_bw,
            rx_ops,
            tx_bw,
            tx_ops,
        } => {
            let update = NetUpdate {
                rx_rate_limiter: limiter(rx_bw, rx_ops),
                tx_rate_limiter: limiter(tx_bw, tx_ops),
            };
            let now = client
                .update_net(index, &update)
                .with_context(|| format!("limit-net {index}"))?;
            println!("{}", serde_json::to_string_pretty(&now)?);
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        ctl: CtlArgs,
    }

    fn parse(args: &[&str]) -> Result<CtlAction, clap::Error> {
        let mut all = vec!["ctl", "--sock", "/s"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).map(|c| c.ctl.action)
    }

    #[test]
    fn limit_subcommands_parse() {
        let CtlAction::LimitDisk { index, bw, ops } =
            parse(&["limit-disk", "1", "--bw", "50M/1000", "--ops", "off"]).unwrap()
        else {
            panic!("not limit-disk");
        };
        assert_eq!(index, 1);
        assert_eq!(
            bw,
            Some(TokenBucket {
                size: 50 << 20,
                one_time_burst: None,
                refill_time: 1000
            })
        );
        assert_eq!(ops, Some(TokenBucket::default()));
        assert_eq!(limiter(None, None), None, "nothing given: nothing changes");
        let CtlAction::LimitNet { rx_ops, tx_bw, .. } = parse(&[
            "limit-net",
            "0",
            "--rx-ops",
            "100/1000/500",
            "--tx-bw",
            "1G/1000",
        ])
        .unwrap() else {
            panic!("not limit-net");
        };
        assert_eq!(rx_ops.unwrap().one_time_burst, Some(500));
        assert_eq!(tx_bw.unwrap().size, 1 << 30);
        for bad in [
            &["limit-disk", "0", "--bw", "50M"][..],
            &["limit-disk", "0", "--ops", "1K/10"],
            &["limit-disk", "x"],
            &["limit-net", "0", "--bw", "1M/10"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        let Err(err) = parse(&["limit-disk", "0", "--bw", "0/1000"]) else {
            panic!("a zero-sized bucket parsed");
        };
        let err = err.to_string();
        assert!(err.contains("or `off`"), "{err}");
    }
}
