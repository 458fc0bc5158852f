//! `dormouse bench io`: the VMM's own datapath cost, measured with the driver-side harness in
//! `devices-bench-support` (mock guest memory and queues, the real device code): virtio-blk
//! against a page-cached file, virtio-net through a real TAP in a throw-away network namespace.

use std::time::Duration;

use devices::rate_limiter::{RateLimiterConfig, TokenBucketConfig};
use devices_bench_support::blk::{self, BlkWorkload, DISK_BYTES, QUEUE_DEPTH};
use devices_bench_support::net_mem::NetPath;
use devices_bench_support::net_tap::{self, TapBench, MTU_PAYLOAD, SMALL_PAYLOAD};
use devices_bench_support::netns::is_root;
use devices_bench_support::IoFigure;

/// Prints the io table; `row` is the measuring time of each row.
pub fn bench_io(row: Duration) -> anyhow::Result<()> {
    println!(
        "| io figure ({:.1} s per row, mock guest driver) | rate | MiB/s | VMM CPU per op (usr + sys) |",
        row.as_secs_f64()
    );
    println!("|---|---|---|---|");
    let disk = blk::scratch_disk(DISK_BYTES)?;
    for w in BlkWorkload::STANDARD {
        let figure = blk::run_device(w, &disk, row)?;
        let name = format!(
            "virtio-blk {} (QD {QUEUE_DEPTH}, {} MiB page-cached file)",
            w.label,
            DISK_BYTES >> 20
        );
        print_row(&name, "req", &figure);
    }
    bench_blk_limits(&disk, row)?;
    drop(disk);
    bench_net(row);
    Ok(())
}

/// The limit the rate-limited rows set: 50 MiB/s as a bucket refilled every 100 ms.
pub const LIMIT_MIB_S: u64 = 50;
/// The operations limit of the 4 KiB row.
pub const LIMIT_OPS_S: u64 = 2000;

fn per_second(size_per_second: u64) -> RateLimiterConfig {
    // A tenth of a second's worth, refilled in 100 ms: small enough that the initial full
    // bucket is gone after the warm-up.
    RateLimiterConfig {
        bandwidth: Some(TokenBucketConfig {
            size: size_per_second / 10,
            one_time_burst: None,
            refill_time: 100,
        }),
        ops: None,
    }
}

fn ops_per_second(ops: u64) -> RateLimiterConfig {
    RateLimiterConfig {
        bandwidth: None,
        ops: Some(TokenBucketConfig {
            size: ops / 10,
            one_time_burst: None,
            refill_time: 100,
        }),
    }
}

/// Rate-limited rows, and the unlimited 1 MiB read row again (limiter compiled in, not
/// configured) next to the first, so run-to-run noise is visible.
fn bench_blk_limits(disk: &devices::virtio::block::Disk, row: Duration) -> anyhow::Result<()> {
    let w = BlkWorkload::SEQ_READ_1M;
    let limit = per_second(LIMIT_MIB_S << 20);
    let figure = blk::run_device_limited(w, disk, Some(limit), row)?;
    let name = format!("virtio-blk {} limited to bw={LIMIT_MIB_S}M/s", w.label);
    print_limited_row(
        &name,
        "req",
        &figure,
        figure.mib_per_sec(),
        LIMIT_MIB_S as f64,
        "MiB/s",
    );
    let w4 = BlkWorkload::RAND_READ_4K;
    let figure = blk::run_device_limited(w4, disk, Some(ops_per_second(LIMIT_OPS_S)), row)?;
    let name = format!("virtio-blk {} limited to ops={LIMIT_OPS_S}/s", w4.label);
    print_limited_row(
        &name,
        "req",
        &figure,
        figure.ops_per_sec(),
        LIMIT_OPS_S as f64,
        "req/s",
    );
    let figure = blk::run_device(w, disk, row)?;
    let name = format!(
        "virtio-blk {} unlimited, again (limiter not configured)",
        w.label
    );
    print_row(&name, "req", &figure);
    Ok(())
}

fn print_limited_row(name: &str, unit: &str, f: &IoFigure, got: f64, limit: f64, what: &str) {
    println!(
        "| {name} | {:.0} {unit}s/s, {:+.1} % vs the limit ({got:.1} {what}) | {:.1} | {:.2} µs/{unit} ({:.2} + {:.2}) |",
        f.ops_per_sec(),
        (got / limit - 1.0) * 100.0,
        f.mib_per_sec(),
        f.cpu_us_per_op(),
        f.user_us_per_op(),
        f.system_us_per_op(),
    );
}

fn bench_net(row: Duration) {
    const NET: &str = "virtio-net through a TAP in a network namespace";
    if !is_root() {
        println!("| {NET} | skipped (needs root) | | |");
        return;
    }
    let mut tap = match TapBench::setup() {
        Ok(tap) => tap,
        Err(e) => {
            println!("| {NET} | skipped ({e}) | | |");
            return;
        }
    };
    for path in [NetPath::Tx, NetPath::Rx] {
        for payload in [SMALL_PAYLOAD, MTU_PAYLOAD] {
            let frame = net_tap::frame_len(payload);
            let name = match path {
                NetPath::Tx => {
                    format!("virtio-net TX, {frame}-byte frames → TAP → UDP socket in netns")
                }
                NetPath::Rx => {
                    format!("virtio-net RX, {frame}-byte frames: UDP sender in netns → TAP → guest")
                }
            };
            match tap.run(path, payload, row) {
                Ok(figure) => print_row(&name, "frame", &figure),
                Err(e) => println!("| {name} | failed: {e} | | |"),
            }
        }
    }
    let limit = per_second(LIMIT_MIB_S << 20);
    for path in [NetPath::Tx, NetPath::Rx] {
        let frame = net_tap::frame_len(MTU_PAYLOAD);
        let dir = match path {
            NetPath::Tx => "TX",
            NetPath::Rx => "RX",
        };
        let name = format!(
            "virtio-net {dir}, {frame}-byte frames, limited to {}_bw={LIMIT_MIB_S}M/s (header included)",
            dir.to_lowercase()
        );
        match tap.run_limited(path, MTU_PAYLOAD, limit, row) {
            Ok(f) => {
                let got = f.mib_per_sec();
                print_limited_row(&name, "frame", &f, got, LIMIT_MIB_S as f64, "MiB/s");
            }
            Err(e) => println!("| {name} | failed: {e} | | |"),
        }
    }
    for path in [NetPath::Tx, NetPath::Rx] {
        let frame = net_tap::frame_len(MTU_PAYLOAD);
        let name = match path {
            NetPath::Tx => format!("virtio-net TX, {frame}-byte frames, unlimited, again"),
            NetPath::Rx => format!("virtio-net RX, {frame}-byte frames, unlimited, again"),
        };
        match tap.run(path, MTU_PAYLOAD, row) {
            Ok(figure) => print_row(&name, "frame", &figure),
            Err(e) => println!("| {name} | failed: {e} | | |"),
        }
    }
}

fn print_row(name: &str, unit: &str, f: &IoFigure) {
    let lost = if f.lost > 0 {
        format!(" ({} lost)", f.lost)
    } else {
        String::new()
    };
    println!(
        "| {name} | {:.0} {unit}s/s{lost} | {:.1} | {:.2} µs/{unit} ({:.2} + {:.2}) |",
        f.ops_per_sec(),
        f.mib_per_sec(),
        f.cpu_us_per_op(),
        f.user_us_per_op(),
        f.system_us_per_op(),
    );
}
