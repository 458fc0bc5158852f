//! `dormouse bench io`: the VMM's own datapath cost, measured with the driver-side harness in
//! `devices-bench-support` (mock guest memory and queues, the real device code): virtio-blk
//! against a page-cached file, virtio-net through a real TAP in a throw-away network namespace.

use std::time::Duration;

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
    drop(disk);
    bench_net(row);
    Ok(())
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
