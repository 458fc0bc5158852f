//! vsock benchmark (harness = false): `cargo bench -p devices-bench-support --bench vsock [-- --quick]`.
//!
//! The measurements live in `devices_bench_support::vsock` (shared with `dormouse bench
//! vsock`): the device driven through mock virtqueues with its host end a Unix socket, only the
//! time inside the device's handlers counted; then the muxer alone (the whole loop timed).
//! MiB/s and packets/s are per second of VMM thread CPU.

use devices::virtio::vsock::defs::MAX_PKT_DATA;
use devices_bench_support::vsock::{self, VsockFigure};
use devices_bench_support::BenchError;

fn print(name: &str, figure: Result<VsockFigure, BenchError>) {
    match figure {
        Ok(f) => println!(
            "{name:<40} {:>9} {:>10} {:>12.0} {:>12.0} {:>10.1} {:>12.0}",
            f.packet_bytes(),
            f.packets,
            f.ns_per_packet(),
            f.wall_ns_per_packet(),
            f.mib_per_sec(),
            f.packets_per_sec(),
        ),
        Err(e) => println!("{name:<40} failed: {e}"),
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let total: u64 = if quick { 8 << 20 } else { 256 << 20 };
    println!(
        "{:<40} {:>9} {:>10} {:>12} {:>12} {:>10} {:>12}",
        "scenario", "pkt bytes", "packets", "CPU ns/pkt", "wall ns/pkt", "MiB/s", "packets/s"
    );
    for size in [64usize, 4096, 65536] {
        let bytes = if size == 64 { total / 64 } else { total };
        print(
            "device TX: guest -> unix socket",
            vsock::device_tx(size, bytes),
        );
    }
    for buf in [4096, MAX_PKT_DATA] {
        print(
            "device RX: unix socket -> guest",
            vsock::device_rx(buf, total),
        );
    }
    for size in [4096usize, 65536] {
        print("muxer: guest -> unix socket", vsock::muxer_tx(size, total));
    }
    print("muxer: unix socket -> guest", vsock::muxer_rx(total));
}
