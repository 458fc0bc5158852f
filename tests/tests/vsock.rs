//! End-to-end virtio-vsock with the real guest kernel and a small static test program in the
//! guest (`dormouse-vsock-test`, built from tests/guest-vsock). Each test boots ONE guest and runs
//! the whole suite against it: echo both ways, 16 MiB each way with matching SHA-256, 64
//! concurrent connections, a host client killed mid-transfer, a guest-initiated connection to
//! the host (and one nobody listens for), and 1,000 sequential connect/close cycles with no fd
//! growth in the VMM.
//!
//! The suite runs on every host-side path the machine has, and says which one it tested:
//! - userspace datapath, Firecracker-style hybrid Unix socket (`dormouse run --vsock uds=`);
//! - userspace datapath, the in-process `VsockHandle` of a library-embedded VM (16 concurrent
//!   connections and 200 cycles there, to save time; `DORMOUSE_VSOCK_FULL=1` runs 64 and 1,000);
//! - vhost-kernel datapath (host AF_VSOCK sockets), only where /dev/vhost-vsock exists. The
//!   development machine (a PVM host whose kernel has no vhost_vsock) lacks it: that test then
//!   prints "vhost-kernel datapath NOT TESTED" and passes without booting.
//!
//! Every run prints `vsock e2e: DATAPATH TESTED: ...` and one timing line per case.
//!
//! The tests hold one lock so that only one guest runs at a time: the fd counts stay exact and a
//! guest kernel under emulation does not compete with another one for the two cores.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Barrier, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use guest_vsock::protocol::{self, Pattern, StatsReport};
use sha2::Digest;
use tests::*;

const GUEST_CID: u32 = 3;
const MIB: usize = 1024 * 1024;
const BIG_TRANSFER: usize = 16 * MIB;
/// The issue's numbers, run on the hybrid socket and vhost paths.
const FULL: SuiteSize = SuiteSize {
    concurrent: 64,
    cycles: 1000,
};
/// The in-process path shares the muxer and guest side with the hybrid socket; a lighter run
/// keeps the whole file within a few minutes on an emulating host (a guest-side connection
/// costs ~0.1-0.2 s there). `DORMOUSE_VSOCK_FULL=1` runs the full numbers on it too.
const LIGHT: SuiteSize = SuiteSize {
    concurrent: 16,
    cycles: 200,
};
/// Host ports the guest dials: one with a listener, one without.
const DIAL_HOST_PORT: u32 = 6000;
const DIAL_NOBODY_PORT: u32 = 6001;
const IO_TIMEOUT: Duration = Duration::from_secs(120);

fn suite_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The static guest program and an initrd whose init runs it; built once per test process.
fn guest_initrd() -> &'static Path {
    static INITRD: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = INITRD.get_or_init(|| {
        let bin = static_guest_binary("guest-vsock", "dormouse-vsock-test");
        // In the run directory: a `static` is never dropped, so its TempDir would never be.
        let dir = run_tempdir();
        // Not exec'd: the program must not be PID 1 (its exit would panic the kernel).
        let initrd = build_initrd_adding(
            dir.path(),
            "vsock.cpio",
            "/bin/dormouse-vsock-test serve",
            &[(bin.as_path(), "/bin/dormouse-vsock-test")],
        );
        (dir, initrd)
    });
    path
}

// ---------------------------------------------------------------------------------------------
// The host end of a connection, whatever the datapath.

enum Stream {
    Unix(UnixStream),
    Vsock(guest_vsock::VsockStream),
}

impl Stream {
    fn shutdown_write(&self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Write),
            Stream::Vsock(s) => s.shutdown_write(),
        }
    }

    fn shutdown_both(&self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Vsock(s) => s.shutdown_both(),
        }
    }

    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Vsock(s) => Stream::Vsock(s.try_clone()?),
        })
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Vsock(s) => s.set_read_timeout(t),
        }
    }

    /// One `\n`-terminated line, read a byte at a time so nothing after it is consumed.
    fn read_line(&mut self) -> io::Result<String> {
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            if self.read(&mut byte)? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("EOF after {:?}", String::from_utf8_lossy(&line)),
                ));
            }
            if byte[0] == b'\n' {
                return Ok(String::from_utf8_lossy(&line).into_owned());
            }
            line.push(byte[0]);
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Vsock(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Vsock(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Accepts guest-initiated connections to one host port.
enum Listener {
    /// Hybrid vsock: the VMM connects to `<uds>_<port>`.
    Unix(UnixListener, PathBuf),
    InProcess(
        devices::virtio::vsock::VsockListener,
        Arc<tokio::runtime::Runtime>,
    ),
    Vsock(guest_vsock::VsockListener),
}

impl Listener {
    /// The next connection and, where the path tells it, the guest's source port.
    fn accept(&mut self, timeout: Duration) -> io::Result<(Stream, Option<u32>)> {
        let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "no guest connection");
        match self {
            Listener::Unix(l, _) => {
                l.set_nonblocking(true)?;
                let deadline = Instant::now() + timeout;
                loop {
                    match l.accept() {
                        Ok((s, _)) => {
                            s.set_nonblocking(false)?;
                            return Ok((Stream::Unix(s), None));
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            if Instant::now() > deadline {
                                return Err(timed_out());
                            }
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            Listener::InProcess(l, rt) => {
                let (s, guest_port) = rt
                    .block_on(async { tokio::time::timeout(timeout, l.accept()).await })
                    .map_err(|_| timed_out())??;
                let s = s.into_std()?;
                s.set_nonblocking(false)?;
                Ok((Stream::Unix(s), Some(guest_port)))
            }
            Listener::Vsock(l) => {
                let mut pfd = libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(l),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the duration of the call.
                let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
                if n <= 0 {
                    return Err(timed_out());
                }
                let (s, (_cid, port)) = l.accept()?;
                Ok((Stream::Vsock(s), Some(port)))
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// How the host reaches the guest.
enum HostSide {
    HybridUds(PathBuf),
    InProcess(
        devices::virtio::vsock::VsockHandle,
        Arc<tokio::runtime::Runtime>,
    ),
    VhostKernel(u32),
}

impl HostSide {
    fn connect(&self, port: u32) -> io::Result<Stream> {
        let stream = match self {
            HostSide::HybridUds(path) => {
                let mut s = Stream::Unix(UnixStream::connect(path)?);
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                s.write_all(format!("CONNECT {port}\n").as_bytes())?;
                let ok = s.read_line()?;
                if !ok.starts_with("OK ") {
                    return Err(io::Error::other(format!("handshake answer {ok:?}")));
                }
                s
            }
            HostSide::InProcess(handle, rt) => {
                let s = rt
                    .block_on(async {
                        tokio::time::timeout(IO_TIMEOUT, handle.connect(port)).await
                    })
                    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "in-process connect"))??;
                let s = s.into_std()?;
                s.set_nonblocking(false)?;
                Stream::Unix(s)
            }
            HostSide::VhostKernel(cid) => {
                Stream::Vsock(guest_vsock::VsockStream::connect(*cid, port)?)
            }
        };
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        Ok(stream)
    }

    fn listen(&self, port: u32) -> io::Result<Listener> {
        Ok(match self {
            HostSide::HybridUds(path) => {
                let mut p = path.as_os_str().to_owned();
                p.push(format!("_{port}"));
                let p = PathBuf::from(p);
                Listener::Unix(UnixListener::bind(&p)?, p)
            }
            HostSide::InProcess(handle, rt) => {
                Listener::InProcess(handle.listen(port)?, rt.clone())
            }
            HostSide::VhostKernel(_) => {
                Listener::Vsock(guest_vsock::VsockListener::bind(port, 16)?)
            }
        })
    }
}

/// A VM under test: how to reach it, where its VMM keeps its fds, whether it still runs.
#[derive(Clone, Copy)]
struct SuiteSize {
    concurrent: usize,
    cycles: usize,
}

struct Target {
    label: String,
    side: HostSide,
    fd_dir: PathBuf,
    vmm_pid: Option<u32>,
    size: SuiteSize,
}

impl Target {
    fn connect(&self, port: u32) -> Stream {
        self.side
            .connect(port)
            .unwrap_or_else(|e| panic!("[{}] connect to guest port {port}: {e}", self.label))
    }

    fn fd_count(&self) -> usize {
        std::fs::read_dir(&self.fd_dir)
            .unwrap_or_else(|e| panic!("{}: {e}", self.fd_dir.display()))
            .count()
    }

    /// The fd count once it stops changing (connections close asynchronously).
    fn settled_fd_count(&self) -> usize {
        let mut last = self.fd_count();
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(100));
            let now = self.fd_count();
            if now == last {
                return now;
            }
            last = now;
        }
        last
    }

    /// Waits until the VMM holds no more fds than `baseline`; returns the last count.
    fn wait_fds_back_to(&self, baseline: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.fd_count();
            if n <= baseline || Instant::now() > deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn vmm_alive(&self) -> bool {
        match self.vmm_pid {
            None => true,
            Some(pid) => std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.rsplit(')').next().map(|r| r.trim_start().to_string()))
                .is_some_and(|rest| !rest.starts_with('Z') && !rest.starts_with('X')),
        }
    }

    fn stats(&self) -> StatsReport {
        let mut s = self.connect(protocol::STATS_PORT);
        let line = s.read_line().expect("stats line");
        StatsReport::parse(&line).unwrap_or_else(|| panic!("bad stats line {line:?}"))
    }

    /// Polls the guest's counters until `pred` holds.
    fn wait_stats(&self, what: &str, timeout: Duration, pred: impl Fn(&StatsReport) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.stats();
            if pred(&s) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "[{}] guest never reached {what}: {s:?}",
                self.label
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The cases.

/// Sends `data` (from another thread) while reading the echo; returns what came back.
fn echo_exchange(stream: Stream, data: Arc<Vec<u8>>) -> Vec<u8> {
    let mut writer = stream.try_clone().expect("clone stream");
    let sender = std::thread::spawn(move || -> io::Result<()> {
        writer.write_all(&data)?;
        writer.shutdown_write()
    });
    let mut back = Vec::new();
    let mut reader = stream;
    reader.read_to_end(&mut back).expect("reading the echo");
    sender.join().unwrap().expect("sending to echo");
    back
}

fn case_echo(t: &Target) {
    let mut data = format!("hello guest, this is the host over {}\n", t.label).into_bytes();
    data.extend(protocol::pattern(1, 300 * 1024));
    let data = Arc::new(data);
    let back = echo_exchange(t.connect(protocol::ECHO_PORT), data.clone());
    assert_eq!(back.len(), data.len(), "[{}] echo length", t.label);
    assert!(back == *data, "[{}] echo content differs", t.label);
}

fn case_host_to_guest_sha(t: &Target) -> f64 {
    let seed = 0x5eed_0001;
    let mut s = t.connect(protocol::SINK_PORT);
    let start = Instant::now();
    let mut pattern = Pattern::new(seed);
    let mut hash = sha2::Sha256::new();
    let mut chunk = vec![0u8; MIB];
    for _ in 0..BIG_TRANSFER / MIB {
        pattern.fill(&mut chunk);
        hash.update(&chunk);
        s.write_all(&chunk).expect("sending to the guest sink");
    }
    s.shutdown_write().unwrap();
    let answer = s.read_line().expect("sink answer");
    let secs = start.elapsed().as_secs_f64();
    let expected = format!("{BIG_TRANSFER} {}", protocol::hex(&hash.finalize()));
    assert_eq!(
        answer, expected,
        "[{}] guest's byte count and SHA-256",
        t.label
    );
    secs
}

fn case_guest_to_host_sha(t: &Target) -> f64 {
    let seed = 0x5eed_0002;
    let mut s = t.connect(protocol::SOURCE_PORT);
    let start = Instant::now();
    s.write_all(format!("{BIG_TRANSFER} {seed}\n").as_bytes())
        .unwrap();
    let mut hash = sha2::Sha256::new();
    let mut buf = vec![0u8; MIB];
    let mut left = BIG_TRANSFER;
    while left > 0 {
        let n = s
            .read(&mut buf[..left.min(MIB)])
            .expect("reading from the guest source");
        assert!(n > 0, "[{}] source ended {left} bytes early", t.label);
        hash.update(&buf[..n]);
        left -= n;
    }
    let secs = start.elapsed().as_secs_f64();
    let received = protocol::hex(&hash.finalize());
    let guest_says = s.read_line().expect("source digest line");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "[{}] bytes after the digest", t.label);
    assert_eq!(
        received, guest_says,
        "[{}] SHA-256 of what arrived vs what the guest sent",
        t.label
    );
    assert_eq!(
        received,
        protocol::pattern_sha256_hex(seed, BIG_TRANSFER as u64),
        "[{}] SHA-256 of the expected pattern",
        t.label
    );
    secs
}

fn case_concurrent(t: &Target) {
    let n = t.size.concurrent;
    let before = t.stats();
    let connected = Arc::new(Barrier::new(n + 1));
    let go = Arc::new(Barrier::new(n + 1));
    let results: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let (connected, go) = (connected.clone(), go.clone());
                scope.spawn(move || {
                    let stream = t.connect(protocol::ECHO_PORT);
                    connected.wait();
                    go.wait();
                    let data = Arc::new(protocol::pattern(1000 + i as u64, 64 * 1024));
                    let back = echo_exchange(stream, data.clone());
                    back == *data
                })
            })
            .collect();
        connected.wait();
        // Every connection is open at once, and the guest has a handler running for each.
        t.wait_stats("every echo connection open at once", IO_TIMEOUT, |s| {
            s.active >= before.active + n as u64
        });
        go.wait();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let bad: Vec<usize> = (0..n).filter(|&i| !results[i]).collect();
    assert!(
        bad.is_empty(),
        "[{}] connections with a wrong echo: {bad:?}",
        t.label
    );
    t.wait_stats("all handlers done", IO_TIMEOUT, |s| s.active == 0);
}

/// A client that streams into the guest's echo port and never reads. `Killer` ends it the
/// hard way: SIGKILL for a real process (the kernel closes its socket), or shutting the socket
/// down under the writer for the in-process path (no process of its own to kill there).
enum Killer {
    Process(Child),
    InProcess(Stream, std::thread::JoinHandle<()>),
}

fn start_streaming_client(t: &Target) -> Killer {
    const CLIENT: &str = r#"
import socket, sys
mode, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "uds":
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(addr)
    s.sendall(b"CONNECT %d\n" % port)
    line = b""
    while not line.endswith(b"\n"):
        b = s.recv(1)
        if not b:
            sys.exit("closed during the handshake")
        line += b
    if not line.startswith(b"OK "):
        sys.exit("handshake answer %r" % line)
else:
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    s.connect((int(addr), port))
chunk = bytes(range(256)) * 256
sent = 0
while True:
    s.sendall(chunk)
    sent += len(chunk)
    if sent == 128 * 1024:
        print("progress", flush=True)
"#;
    let (mode, addr) = match &t.side {
        HostSide::HybridUds(path) => ("uds", path.display().to_string()),
        HostSide::VhostKernel(cid) => ("vsock", cid.to_string()),
        HostSide::InProcess(..) => {
            let stream = t.connect(protocol::ECHO_PORT);
            let mut writer = stream.try_clone().unwrap();
            let (tx, rx) = channel();
            let th = std::thread::spawn(move || {
                let chunk = vec![0xa5u8; 64 * 1024];
                let mut sent = 0;
                while writer.write_all(&chunk).is_ok() {
                    sent += chunk.len();
                    if sent == 128 * 1024 {
                        let _ = tx.send(());
                    }
                }
            });
            rx.recv_timeout(IO_TIMEOUT)
                .expect("in-process client made progress");
            return Killer::InProcess(stream, th);
        }
    };
    let mut child = Command::new("python3")
        .args(["-c", CLIENT, mode, &addr, &protocol::ECHO_PORT.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawning the python3 client");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "progress", "[{}] streaming client", t.label);
    Killer::Process(child)
}

fn case_killed_client(t: &Target) {
    let baseline = t.settled_fd_count();
    let before = t.stats();
    let client = start_streaming_client(t);
    // Let the pipe fill: the guest's echo now blocks writing to a host that never reads.
    std::thread::sleep(Duration::from_millis(500));
    let during = t.stats();
    assert!(
        during.active > before.active,
        "[{}] the streaming connection is live in the guest: {during:?}",
        t.label
    );
    match client {
        Killer::Process(mut child) => {
            child.kill().unwrap();
            let _ = child.wait();
        }
        Killer::InProcess(stream, th) => {
            stream.shutdown_both().unwrap();
            drop(stream);
            th.join().unwrap();
        }
    }
    t.wait_stats("the killed client's handler ended", IO_TIMEOUT, |s| {
        s.active == before.active
    });
    assert!(t.vmm_alive(), "[{}] the VMM died with the client", t.label);
    case_echo(t);
    let after = t.wait_fds_back_to(baseline, Duration::from_secs(30));
    assert!(
        after <= baseline,
        "[{}] VMM fds after the killed client: {after}, before: {baseline}",
        t.label
    );
}

/// The guest connects to the host (CID 2), sends a pattern; the host echoes it back, and the
/// guest reports the SHA-256 of what it sent and of what came back.
fn case_guest_initiated(t: &Target) {
    let len: usize = MIB;
    let seed = 0x5eed_0003;
    let mut listener = t.side.listen(DIAL_HOST_PORT).expect("host listener");
    let mut ctl = t.connect(protocol::DIAL_PORT);
    ctl.write_all(format!("{DIAL_HOST_PORT} {len} {seed}\n").as_bytes())
        .unwrap();
    let (mut from_guest, guest_port) = listener.accept(IO_TIMEOUT).expect("guest connected");
    from_guest.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    // The guest half-closes after sending, so read it all, then echo it all.
    let mut got = Vec::new();
    from_guest
        .read_to_end(&mut got)
        .expect("reading the guest's payload");
    from_guest.write_all(&got).expect("echoing to the guest");
    drop(from_guest);
    let answer = ctl.read_line().expect("dial answer");
    assert_eq!(got.len(), len, "[{}] bytes from the guest", t.label);
    let sha = protocol::sha256_hex(&got);
    assert_eq!(
        sha,
        protocol::pattern_sha256_hex(seed, len as u64),
        "[{}] what the guest sent",
        t.label
    );
    let fields: Vec<&str> = answer.split_whitespace().collect();
    assert_eq!(fields.first(), Some(&"DIALED"), "[{}] {answer}", t.label);
    for want in [
        format!("sha={sha}"),
        format!("echoed={len}"),
        format!("echo_sha={sha}"),
    ] {
        assert!(
            fields.contains(&want.as_str()),
            "[{}] expected {want} in the guest's report: {answer}",
            t.label
        );
    }
    if let Some(port) = guest_port {
        assert!(
            fields.contains(&format!("local_port={port}").as_str()),
            "[{}] the guest's source port {port}: {answer}",
            t.label
        );
    }

    // Nobody listens on this host port: the guest's connect fails instead of hanging.
    let mut ctl = t.connect(protocol::DIAL_PORT);
    ctl.write_all(format!("{DIAL_NOBODY_PORT} 1 1\n").as_bytes())
        .unwrap();
    let answer = ctl.read_line().expect("dial answer");
    assert!(
        answer.starts_with("DIAL-ERROR"),
        "[{}] dialing a port nobody listens on: {answer}",
        t.label
    );
}

fn case_cycles(t: &Target) -> (usize, usize, f64) {
    let cycles = t.size.cycles;
    let baseline = t.settled_fd_count();
    let start = Instant::now();
    for i in 0..cycles {
        let mut s = t.connect(protocol::ECHO_PORT);
        let msg = format!("c{i:07}");
        s.write_all(msg.as_bytes()).unwrap();
        s.shutdown_write().unwrap();
        let mut back = String::new();
        s.read_to_string(&mut back)
            .unwrap_or_else(|e| panic!("[{}] cycle {i}: {e}", t.label));
        assert_eq!(back, msg, "[{}] cycle {i}", t.label);
    }
    let per_cycle_ms = start.elapsed().as_secs_f64() * 1000.0 / cycles as f64;
    let after = t.wait_fds_back_to(baseline, Duration::from_secs(30));
    assert!(
        after <= baseline,
        "[{}] VMM fds grew over {cycles} cycles: {baseline} -> {after}",
        t.label
    );
    t.wait_stats("no handler left after the cycles", IO_TIMEOUT, |s| {
        s.active == 0
    });
    (baseline, after, per_cycle_ms)
}

/// Runs every case and prints a timing line per case.
fn run_suite(t: &Target) {
    eprintln!("vsock e2e: DATAPATH TESTED: {}", t.label);
    let timed = |name: &str, f: &mut dyn FnMut() -> String| {
        let start = Instant::now();
        let extra = f();
        eprintln!(
            "vsock e2e [{}] {name}: ok in {:.2?} {extra}",
            t.label,
            start.elapsed()
        );
    };
    timed("host-initiated echo", &mut || {
        case_echo(t);
        String::new()
    });
    timed("16 MiB host->guest, SHA-256 matches", &mut || {
        let s = case_host_to_guest_sha(t);
        format!("({:.1} MiB/s)", 16.0 / s)
    });
    timed("16 MiB guest->host, SHA-256 matches", &mut || {
        let s = case_guest_to_host_sha(t);
        format!("({:.1} MiB/s)", 16.0 / s)
    });
    timed(
        &format!("{} concurrent echo connections", t.size.concurrent),
        &mut || {
            case_concurrent(t);
            String::new()
        },
    );
    timed("host client killed mid-transfer", &mut || {
        case_killed_client(t);
        String::new()
    });
    timed(
        "guest-initiated connection, host echoes 1 MiB (and a refused one)",
        &mut || {
            case_guest_initiated(t);
            String::new()
        },
    );
    timed(
        &format!("{} connect/close cycles", t.size.cycles),
        &mut || {
            let (before, after, ms) = case_cycles(t);
            format!("({ms:.1} ms/cycle; VMM fds {before} -> {after})")
        },
    );
    let s = t.stats();
    eprintln!("vsock e2e [{}] guest counters at the end: {s:?}", t.label);
}

// ---------------------------------------------------------------------------------------------
// Booting the guest.

/// Waits on `lines` for one containing `needle`.
fn wait_line(lines: &Receiver<String>, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return line,
            Ok(_) => {}
            Err(_) => panic!("no line containing {needle:?} within {timeout:?}"),
        }
    }
}

fn forward_lines(from: impl Read + Send + 'static, tag: &'static str, tx: Sender<String>) {
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            if std::env::var_os("DORMOUSE_VSOCK_VERBOSE").is_some() {
                eprintln!("{tag}: {line}");
            }
            if tx.send(line).is_err() {
                break;
            }
        }
    });
}

/// `dormouse run` with the vsock guest; killed on drop.
struct CliVm {
    child: Child,
    console: Receiver<String>,
    log: Receiver<String>,
}

impl CliVm {
    /// Boots with `--vsock cid=<cid><more>`; returns once the guest program listens.
    fn boot(cid: u32, more: &str) -> Self {
        let vsock = format!("cid={cid}{more}");
        let kernel = vmlinux();
        let initrd = guest_initrd();
        let _serial = linux_boot_lock();
        let mut child = Command::new(dormouse_bin())
            .args(["--log-level", "info", "run", "--kernel"])
            .arg(&kernel)
            .arg("--initrd")
            .arg(initrd)
            .args(["--vsock", &vsock])
            .env_remove("DORMOUSE_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn dormouse");
        let (ctx, console) = channel();
        let (ltx, log) = channel();
        forward_lines(child.stdout.take().unwrap(), "guest", ctx);
        forward_lines(child.stderr.take().unwrap(), "dormouse", ltx);
        let vm = CliVm {
            child,
            console,
            log,
        };
        let start = Instant::now();
        let ready = wait_line(&vm.console, protocol::READY_MARKER, LINUX_BOOT_TIMEOUT);
        eprintln!("vsock e2e: guest ready in {:.1?}: {ready}", start.elapsed());
        assert!(
            ready.contains(&format!("cid={cid}")),
            "guest's own CID: {ready}"
        );
        vm
    }

    /// What the VMM logged about the vsock datapath: "userspace" or "vhost".
    fn datapath(&self) -> String {
        // "vsock: guest CID 3, Userspace datapath"
        let line = wait_line(&self.log, "vsock: guest CID", Duration::from_secs(5));
        let words: Vec<&str> = line.split_whitespace().collect();
        words
            .windows(2)
            .find(|w| w[1].starts_with("datapath"))
            .map(|w| w[0].to_lowercase())
            .unwrap_or_else(|| panic!("no datapath in {line:?}"))
    }
}

impl Drop for CliVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn hybrid_uds_suite_on_the_cli_vmm() {
    if !require_kvm() {
        return;
    }
    let _suite = suite_lock();
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let vm = CliVm::boot(GUEST_CID, &format!(",uds={}", uds.display()));
    let datapath = vm.datapath();
    assert_eq!(
        datapath, "userspace",
        "a uds= vsock runs the userspace datapath"
    );
    let t = Target {
        label: format!("{datapath} datapath, hybrid unix socket"),
        side: HostSide::HybridUds(uds),
        fd_dir: PathBuf::from(format!("/proc/{}/fd", vm.child.id())),
        vmm_pid: Some(vm.child.id()),
        size: FULL,
    };
    run_suite(&t);
    assert!(t.vmm_alive());
}

#[test]
fn in_process_handle_suite_on_a_library_vm() {
    if !require_kvm() {
        return;
    }
    let _suite = suite_lock();
    let initrd = guest_initrd().to_path_buf();
    let rt = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap(),
    );
    let (console_out, console) = vmm::Console::lines();
    let mut config = vmm::VmConfig::new(vmlinux());
    config.initrd = Some(initrd);
    config.console = console_out;
    let mut vsock = devices::virtio::vsock::VsockConfig::new(GUEST_CID.into()).unwrap();
    // The in-process handle needs the userspace datapath, whatever the host offers.
    vsock.backend = devices::virtio::vsock::BackendChoice::Userspace;
    config.vsock = Some(vsock);
    let vm = {
        let _serial = linux_boot_lock();
        let start = Instant::now();
        let vm = vmm::Vm::start(config).expect("starting the in-process VM");
        let ready = wait_line(&console, protocol::READY_MARKER, LINUX_BOOT_TIMEOUT);
        eprintln!(
            "vsock e2e: in-process guest ready in {:.1?}: {ready}",
            start.elapsed()
        );
        assert!(ready.contains(&format!("cid={GUEST_CID}")), "{ready}");
        vm
    };
    let handle = vm.controller().vsock().expect("the VM has a vsock handle");
    let t = Target {
        label: "userspace datapath, in-process VsockHandle".into(),
        side: HostSide::InProcess(handle, rt),
        fd_dir: PathBuf::from("/proc/self/fd"),
        vmm_pid: None,
        size: if std::env::var_os("DORMOUSE_VSOCK_FULL").is_some() {
            FULL
        } else {
            LIGHT
        },
    };
    run_suite(&t);
    drop(vm);
}

#[test]
fn vhost_kernel_suite_when_the_host_has_it() {
    if !require_kvm() {
        return;
    }
    let dev = Path::new(devices::virtio::vsock::config::VHOST_VSOCK_DEV);
    if !devices::virtio::vsock::config::vhost_usable(dev) {
        eprintln!(
            "vsock e2e: vhost-kernel datapath NOT TESTED: {} is missing or not usable on this \
             host (the userspace datapath was tested by the other tests)",
            dev.display()
        );
        return;
    }
    let _suite = suite_lock();
    // vhost CIDs are host-global: pick one unlikely to be taken.
    let cid = 10_000 + std::process::id() % 50_000;
    let vm = CliVm::boot(cid, ",backend=vhost");
    let datapath = vm.datapath();
    assert_eq!(
        datapath, "vhost",
        "backend=vhost runs the vhost-kernel datapath"
    );
    let t = Target {
        label: "vhost-kernel datapath, host AF_VSOCK".into(),
        side: HostSide::VhostKernel(cid),
        fd_dir: PathBuf::from(format!("/proc/{}/fd", vm.child.id())),
        vmm_pid: Some(vm.child.id()),
        size: FULL,
    };
    run_suite(&t);
    assert!(t.vmm_alive());
}
