//! virtio-blk throughput and VMM CPU cost per request, driven by `devices_bench_support::blk`
//! (the same harness as `dormouse bench io`): the request path alone (`process_queue`) and the
//! whole device (eventfd kick, event loop, irqfd).
//!
//! `cargo bench -p devices-bench-support --bench virtio_blk` (BENCH_SECS=n per row, default 2).

use std::time::Duration;

use devices_bench_support::blk::{self, BlkWorkload, DISK_BYTES, QUEUE_DEPTH};
use devices_bench_support::{BenchError, IoFigure};

fn print(name: &str, f: &IoFigure) {
    println!(
        "{:<30} {:>10.0} {:>10.1} {:>10.2} {:>10.2}",
        name,
        f.ops_per_sec(),
        f.mib_per_sec(),
        f.user_us_per_op(),
        f.system_us_per_op(),
    );
}

/// `cargo bench` passes --bench; `cargo test --benches` wants a short run.
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
    let disk = blk::scratch_disk(DISK_BYTES)?;
    println!(
        "virtio-blk, queue depth {QUEUE_DEPTH}, {} MiB page-cached file, {:.2} s per row",
        DISK_BYTES >> 20,
        duration.as_secs_f64()
    );
    println!(
        "{:<30} {:>10} {:>10} {:>10} {:>10}",
        "workload", "req/s", "MiB/s", "usr us/req", "sys us/req"
    );
    for w in BlkWorkload::STANDARD {
        print(
            &format!("handler {}", w.name),
            &blk::run_handler(w, &disk, duration)?,
        );
    }
    for w in BlkWorkload::STANDARD {
        print(
            &format!("device+eventloop {}", w.name),
            &blk::run_device(w, &disk, duration)?,
        );
    }
    Ok(())
}
