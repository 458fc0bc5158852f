//! `dormouse bench vsock`: the userspace vsock datapath.
//!
//! - Mock guest driver (`devices_bench_support::vsock`, the same code as
//!   `cargo bench -p devices-bench-support --bench vsock`): the VMM's cost per packet, guest → host and
//!   host → guest, counting only the time inside the device's handlers: thread CPU time (exact,
//!   so a busy host does not inflate it; packets/s and MiB/s are per second of it) and wall
//!   time.
//! - A real Linux guest running `dormouse-vsock-test` (tests/guest-vsock; build its initrd with
//!   `deploy/build-vsock-bench-initrd.sh`), booted once as a library VM (`vmm::Vm::start`) whose
//!   vsock has a hybrid Unix socket too: 1-byte ping-pong round trips and bulk throughput each
//!   way, over the in-process `VsockHandle` and over the Firecracker-style hybrid socket. These
//!   figures include the guest kernel, so they depend on the host kind, printed first: where
//!   the guest's ring 0 is emulated (PVM without a PVM-aware guest) they say so.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use devices::virtio::vsock::defs::MAX_PKT_DATA;
use devices::virtio::vsock::{BackendChoice, VsockConfig, VsockHandle};
use devices_bench_support::vsock::{self as mock, VsockFigure};
use devices_bench_support::BenchError;
use vmm::host::HostKind;

use crate::report::{stats, Stats};

/// The guest program's ports and ready line (tests/guest-vsock/src/protocol.rs; the vmm crate
/// does not depend on the test crate, and the e2e test of this command checks they agree).
const ECHO_PORT: u32 = 5000;
const SINK_PORT: u32 = 5001;
const SOURCE_PORT: u32 = 5002;
const READY_MARKER: &str = "DORMOUSE-VSOCK-TEST READY";
const GUEST_CID: u64 = 3;
/// Booting a Linux guest whose kernel runs under emulation takes ~11 s on a quiet host and
/// minutes on a loaded one.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const IO_TIMEOUT: Duration = Duration::from_secs(120);
const SKIPPED: &str = "skipped: pass --kernel and --vsock-initrd";

pub struct VsockBench<'a> {
    pub kernel: Option<&'a Path>,
    pub initrd: Option<&'a Path>,
    /// Timed ping-pong round trips per host path (after a warm-up).
    pub round_trips: usize,
    /// Bytes per real-guest throughput row.
    pub bytes: u64,
    /// Bytes per mock-driver row.
    pub mock_bytes: u64,
}

/// Prints the vsock table. Returns false when a row failed (it says why in the table).
pub fn bench_vsock(b: &VsockBench) -> anyhow::Result<bool> {
    if b.round_trips == 0 || b.bytes == 0 || b.mock_bytes == 0 {
        bail!("--vsock-round-trips, --vsock-bytes and --vsock-mock-bytes must be positive");
    }
    let mut ok = true;
    println!("| vsock figure (userspace datapath) | per operation | rate | MiB/s |");
    println!("|---|---|---|---|");
    mock_rows(b.mock_bytes, &mut ok);
    match (b.kernel, b.initrd) {
        (Some(kernel), Some(initrd)) => match guest_rows(kernel, initrd, b) {
            Ok(all_rows) => ok &= all_rows,
            Err(e) => {
                println!("| real guest | failed: {e:#} | | |");
                ok = false;
            }
        },
        _ => {
            println!("| real guest (dormouse-vsock-test): latency and throughput | {SKIPPED} | | |")
        }
    }
    Ok(ok)
}

fn mock_rows(total: u64, ok: &mut bool) {
    // Rates are per second of VMM thread CPU in the device's handlers.
    const WHAT: &str = "mock driver, VMM time in device handlers";
    for size in [64usize, 4096, MAX_PKT_DATA as usize] {
        // Small packets: the same packet count as 4 KiB ones, not the same bytes.
        let bytes = if size < 4096 { total / 64 } else { total };
        let name = format!("{WHAT}: guest → host, {size}-byte packets");
        mock_row(&name, mock::device_tx(size, bytes), ok);
    }
    for buf in [4096u32, MAX_PKT_DATA] {
        let name = format!("{WHAT}: host → guest, {buf}-byte RX buffers");
        mock_row(&name, mock::device_rx(buf, total), ok);
    }
}

fn mock_row(name: &str, figure: Result<VsockFigure, BenchError>, ok: &mut bool) {
    match figure {
        Ok(f) => println!(
            "| {name} | {:.0} ns/packet CPU ({:.0} ns wall) | {:.0} packets/s | {:.1} |",
            f.ns_per_packet(),
            f.wall_ns_per_packet(),
            f.packets_per_sec(),
            f.mib_per_sec(),
        ),
        Err(e) => {
            println!("| {name} | failed: {e} | | |");
            *ok = false;
        }
    }
}

fn wait_ready(console: &Receiver<String>) -> anyhow::Result<String> {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    // The last lines the guest printed, for the error if it never gets ready.
    let mut tail = std::collections::VecDeque::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match console.recv_timeout(left) {
            Ok(line) if line.contains(READY_MARKER) => return Ok(line),
            Ok(line) => {
                if tail.len() == 10 {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
            Err(_) => bail!(
                "the guest never printed {READY_MARKER:?} within {BOOT_TIMEOUT:?} (is the initrd \
                 from deploy/build-vsock-bench-initrd.sh?); its last console lines: {tail:?}"
            ),
        }
    }
}

/// How the host reaches the guest.
enum HostPath {
    InProcess(VsockHandle, tokio::runtime::Runtime),
    Hybrid(PathBuf),
}

impl HostPath {
    fn label(&self) -> &'static str {
        match self {
            HostPath::InProcess(..) => "in-process VsockHandle",
            HostPath::Hybrid(_) => "hybrid Unix socket",
        }
    }

    /// A blocking stream to the guest's `port`.
    fn connect(&self, port: u32) -> anyhow::Result<UnixStream> {
        let stream = match self {
            HostPath::InProcess(handle, rt) => {
                // Timers and leaving tokio's reactor (into_std) need the runtime's context.
                let _runtime = rt.enter();
                let s = rt
                    .block_on(tokio::time::timeout(IO_TIMEOUT, handle.connect(port)))
                    .context("in-process connect timed out")?
                    .with_context(|| format!("in-process connect to guest port {port}"))?;
                let s = s.into_std()?;
                s.set_nonblocking(false)?;
                s
            }
            HostPath::Hybrid(uds) => {
                let mut s = UnixStream::connect(uds)
                    .with_context(|| format!("connecting to {}", uds.display()))?;
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                s.write_all(format!("CONNECT {port}\n").as_bytes())?;
                let answer = read_line(&mut s)?;
                if !answer.starts_with("OK ") {
                    bail!("hybrid socket answered {answer:?} to CONNECT {port}");
                }
                s
            }
        };
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        Ok(stream)
    }
}

/// One `\n`-terminated line, a byte at a time so nothing after it is consumed.
fn read_line(s: &mut UnixStream) -> anyhow::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        if s.read(&mut byte)? == 0 {
            bail!("EOF after {:?}", String::from_utf8_lossy(&line));
        }
        if byte[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        if line.len() > 256 {
            bail!("line too long: {:?}", String::from_utf8_lossy(&line));
        }
        line.push(byte[0]);
    }
}

/// Boots the guest and prints its rows; false when a host path failed (its row says why).
fn guest_rows(kernel: &Path, initrd: &Path, b: &VsockBench) -> anyhow::Result<bool> {
    let dir = tempfile_dir()?;
    let uds = dir.join("v.sock");
    let (console_out, console) = vmm::Console::lines();
    let mut config = vmm::VmConfig::new(kernel);
    config.initrd = Some(initrd.to_path_buf());
    config.console = console_out;
    let mut vsock = VsockConfig::new(GUEST_CID)?;
    // Both host paths below need the userspace datapath, whatever the host offers.
    vsock.backend = BackendChoice::Userspace;
    vsock.uds_path = Some(uds.clone());
    config.vsock = Some(vsock);
    let start = Instant::now();
    let vm = vmm::Vm::start(config).context("starting the guest")?;
    let ready = wait_ready(&console)?;
    let host = vm.host();
    println!(
        "| real guest: host {host}; guest ready after {:.1} s ({}) | | | |",
        start.elapsed().as_secs_f64(),
        ready.trim()
    );
    let handle = vm
        .controller()
        .vsock()
        .context("the VM has no in-process vsock handle")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    let note = guest_note(host);
    let mut ok = true;
    for path in [HostPath::InProcess(handle, rt), HostPath::Hybrid(uds)] {
        if let Err(e) = path_rows(&path, b, note) {
            println!("| real guest, {}{note} | failed: {e:#} | | |", path.label());
            ok = false;
        }
    }
    drop(vm);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(ok)
}

/// Said on every real-guest row where the figures are the emulator's rather than the VMM's.
fn guest_note(host: HostKind) -> &'static str {
    match host {
        HostKind::Pvm {
            emulates_ring0: true,
        } => " [guest ring 0 emulated on this host]",
        HostKind::Pvm {
            emulates_ring0: false,
        } => " [PVM host]",
        HostKind::HardwareKvm { .. } => "",
    }
}

fn path_rows(path: &HostPath, b: &VsockBench, note: &str) -> anyhow::Result<()> {
    let label = path.label();
    let rtt = ping_pong(path, b.round_trips)?;
    println!(
        "| real guest, {label}: 1-byte ping-pong round trip, min / median of {}{note} | {} | {:.1} round trips/s | |",
        b.round_trips,
        min_median(&rtt),
        1.0 / rtt.median.as_secs_f64().max(1e-9),
    );
    let secs = host_to_guest(path, b.bytes)?;
    println!(
        "| real guest, {label}: host → guest, {} bytes{note} | | | {:.2} |",
        b.bytes,
        mib_per_sec(b.bytes, secs)
    );
    let secs = guest_to_host(path, b.bytes)?;
    println!(
        "| real guest, {label}: guest → host, {} bytes{note} | | | {:.2} |",
        b.bytes,
        mib_per_sec(b.bytes, secs)
    );
    Ok(())
}

/// "min / median" in one unit (µs below a millisecond, else ms), so the two compare at a glance.
fn min_median(s: &Stats) -> String {
    let (scale, unit) = if s.median < Duration::from_millis(1) {
        (1e6, "µs")
    } else {
        (1e3, "ms")
    };
    format!(
        "{:.1} {unit} / {:.1} {unit}",
        s.min.as_secs_f64() * scale,
        s.median.as_secs_f64() * scale
    )
}

fn mib_per_sec(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / f64::from(1u32 << 20) / secs.max(1e-9)
}

/// 1-byte round trips through the guest's echo port on one connection: a warm-up, then
/// `count` timed ones.
fn ping_pong(path: &HostPath, count: usize) -> anyhow::Result<Stats> {
    let mut s = path.connect(ECHO_PORT)?;
    let warm_up = (count / 10).clamp(10, 100);
    let mut samples = Vec::with_capacity(count);
    let mut byte = [0u8; 1];
    for i in 0..warm_up + count {
        let sent = [i as u8];
        let start = Instant::now();
        s.write_all(&sent)?;
        s.read_exact(&mut byte).context("reading the echo")?;
        let rtt = start.elapsed();
        if byte != sent {
            bail!("round trip {i}: sent {sent:?}, got {byte:?}");
        }
        if i >= warm_up {
            samples.push(rtt);
        }
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)?;
    if !rest.is_empty() {
        bail!("{} unexpected bytes after the ping-pong", rest.len());
    }
    stats(samples).context("no round trips")
}

const CHUNK: usize = 256 * 1024;

/// Seconds to send `bytes` into the guest's sink, until it confirmed the count.
fn host_to_guest(path: &HostPath, bytes: u64) -> anyhow::Result<f64> {
    let mut s = path.connect(SINK_PORT)?;
    let chunk = vec![0x5au8; CHUNK];
    let start = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left).map_or(CHUNK, |l| l.min(CHUNK));
        s.write_all(chunk.get(..n).context("chunk")?)?;
        left -= n as u64;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    // "<bytes> <sha256-hex>"
    let answer = read_line(&mut s)?;
    let secs = start.elapsed().as_secs_f64();
    let counted = answer
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok());
    if counted != Some(bytes) {
        bail!("the guest's sink counted {answer:?}, sent {bytes}");
    }
    Ok(secs)
}

/// Seconds to receive `bytes` from the guest's source.
fn guest_to_host(path: &HostPath, bytes: u64) -> anyhow::Result<f64> {
    let mut s = path.connect(SOURCE_PORT)?;
    let mut buf = vec![0u8; CHUNK];
    let start = Instant::now();
    s.write_all(format!("{bytes} 1\n").as_bytes())?;
    let mut left = bytes;
    while left > 0 {
        let want = usize::try_from(left).map_or(CHUNK, |l| l.min(CHUNK));
        let n = s.read(buf.get_mut(..want).context("chunk")?)?;
        if n == 0 {
            bail!("the guest's source ended {left} bytes early");
        }
        left -= n as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    // Then "<sha256-hex>" and EOF.
    let digest = read_line(&mut s)?;
    if digest.len() != 64 || !digest.bytes().all(|c| c.is_ascii_hexdigit()) {
        bail!("the guest's source ended with {digest:?} instead of its SHA-256");
    }
    Ok(secs)
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("dormouse-vsock-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_pairs_share_one_unit() {
        let fast = Stats {
            min: Duration::from_micros(80),
            median: Duration::from_micros(120),
        };
        assert_eq!(min_median(&fast), "80.0 µs / 120.0 µs");
        let slow = Stats {
            min: Duration::from_micros(900),
            median: Duration::from_millis(17),
        };
        assert_eq!(min_median(&slow), "0.9 ms / 17.0 ms");
    }

    #[test]
    fn only_emulating_hosts_get_the_emulation_note() {
        assert!(guest_note(HostKind::Pvm {
            emulates_ring0: true
        })
        .contains("emulated"));
        assert_eq!(
            guest_note(HostKind::HardwareKvm {
                vendor: vmm::host::CpuVendor::Intel
            }),
            ""
        );
    }
}
