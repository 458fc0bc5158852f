//! virtio-net frame path cost, driven by `devices_bench_support` (the same harness as
//! `dormouse bench io`):
//! - with an in-memory TAP: `process_rx` / `process_tx` alone, no network stack;
//! - as root, through a real TAP in a network namespace the bench creates and removes.
//!
//! `cargo bench -p devices-bench-support --bench virtio_net` (BENCH_SECS=n per row, default 2).

use std::time::Duration;

use devices::virtio::net::VNET_HDR_LEN;
use devices_bench_support::net_mem::{self, NetPath, BATCH};
use devices_bench_support::net_tap::{self, TapBench, MTU_PAYLOAD, SMALL_PAYLOAD};
use devices_bench_support::netns::is_root;
use devices_bench_support::{BenchError, IoFigure};

fn print(name: &str, bytes: usize, f: &IoFigure) {
    println!(
        "{:<22} {:>8} {:>12.0} {:>10.1} {:>12.2} {:>6}",
        name,
        bytes,
        f.ops_per_sec(),
        f.mib_per_sec(),
        f.cpu_us_per_op(),
        f.lost,
    );
}

fn row_duration() -> Duration {
    let default = if std::env::args().any(|a| a == "--bench") {
        2.0
    } else {
        0.05
    };
    let secs = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    Duration::from_secs_f64(secs)
}

fn main() -> Result<(), BenchError> {
    let duration = row_duration();
    println!(
        "virtio-net, {:.2} s per row; bytes = frame incl. 12-byte virtio-net header (in-memory) \
         or Ethernet frame (TAP)",
        duration.as_secs_f64()
    );
    println!(
        "{:<22} {:>8} {:>12} {:>10} {:>12} {:>6}",
        "path", "bytes", "frames/s", "MiB/s", "CPU us/frame", "lost"
    );
    for eth in [64, 1514, 65536] {
        let len = eth + VNET_HDR_LEN;
        for path in [NetPath::Rx, NetPath::Tx] {
            let name = format!("mem-tap {} (x{BATCH})", path.name());
            print(&name, len, &net_mem::run(path, len, duration)?);
        }
    }
    if !is_root() {
        println!("real TAP in a network namespace: skipped (needs root)");
        return Ok(());
    }
    let mut tap = TapBench::setup()?;
    for path in [NetPath::Tx, NetPath::Rx] {
        for payload in [SMALL_PAYLOAD, MTU_PAYLOAD] {
            let name = format!("netns-tap {}", path.name());
            print(
                &name,
                net_tap::frame_len(payload),
                &tap.run(path, payload, duration)?,
            );
        }
    }
    Ok(())
}
