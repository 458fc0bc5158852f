//! End-to-end: devices across snapshot/restore, with the real guest kernel. One guest is booted
//! once with a virtio-blk disk, a virtio-net device on a TAP and a vsock device; it runs a disk
//! writer (one fixed-width record per second on the raw disk), the static vsock test program, and
//! has eth0 configured. It is paused with a host vsock connection open, snapshotted, its disk
//! copied (the disk as it was at snapshot time), and killed. Every test restores from that
//! snapshot, each restore in its own network namespace with its own TAP (`--net` override),
//! disk copy (`--disk`) and vsock socket (`--vsock-uds`):
//!
//! - the disk: the restored guest keeps writing; after a clean guest shutdown (`sync`) the raw
//!   disk holds records 1..N with no gap, no stray record, nothing after them — both on the
//!   original disk file and on a clone's copy, and the clone never touches the original;
//! - the network: traffic passes through a different TAP in another namespace, with the guest's
//!   IP configuration as it was in memory;
//! - vsock: the connection open at snapshot time ends cleanly on both sides (the host peer sees
//!   EOF, the guest's handler ends), and a new connection echoes right after restore, every time.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use guest_vsock::protocol::{StatsReport, ECHO_PORT, READY_MARKER, STATS_PORT};
use tests::*;

/// Fixed-width records, `seq=<11 digits>\n`: record k (from 1) sits at byte (k-1)*16.
const RECORD_LEN: usize = 16;
const DISK_BYTES: u64 = 1 << 20;
const GUEST_IP: &str = "172.30.0.2";
const HOST_CIDR: &str = "172.30.0.1/30";
/// A bound to tell "works" from "hangs" (Firecracker and Cloud Hypervisor have hung here), not a
/// speed target. A restore takes milliseconds, but a new connection waits until the guest has
/// handled the transport-reset event (else the guest would reset it too), and a restored guest
/// whose ring 0 is emulated, on a loaded 2-core host, has taken up to 12 s for that (it faults
/// its memory back in first).
const VSOCK_READY_BOUND: Duration = Duration::from_secs(60);
/// How long a freshly restored guest may take to print its first tick (see `run_and_check_disk`).
const FIRST_TICK_BOUND: Duration = LINUX_BOOT_TIMEOUT;

fn record(k: u64) -> String {
    format!("seq={k:011}\n")
}

/// The guest's /init body. Long-lived processes only: a fork+exec costs ~0.45 s of emulated
/// guest kernel time on a PVM host, so the disk writer is a shell loop of builtins (printf,
/// echo, `read -t` as the one-second sleep) and the whole guest is idle between ticks.
const GUEST_SCRIPT: &str = r#"
ip link set lo up
ip addr add 172.30.0.2/30 dev eth0 && ip link set eth0 up && echo NET-UP
/bin/dormouse-vsock-test serve &
mkfifo /tmp/never
exec 4<>/tmp/never
exec 3<>/dev/vda
( i=0; while :; do i=$((i+1)); printf 'seq=%011d\n' $i >&3; echo "tick seq=$i"; read -t 1 x <&4; done ) &
writer=$!
while read cmd; do [ "$cmd" = stop ] && break; done
kill $writer
exec 3>&-
sync
echo DISK-SYNCED
"#;

/// What these tests do with a running guest, on the harness's [`Running`].
trait TickingGuest {
    fn next_tick(&self, timeout: Duration) -> u64;
    fn stop_guest(self, last_tick: u64) -> u64;
}

impl TickingGuest for Running {
    fn next_tick(&self, timeout: Duration) -> u64 {
        let line = self.wait_for("tick seq=", timeout);
        tick_of(&line).unwrap_or_else(|| panic!("bad tick line {line:?}"))
    }

    /// Tells the guest to stop writing, sync and power off; waits for a clean exit and returns
    /// the last tick printed.
    fn stop_guest(mut self, mut last_tick: u64) -> u64 {
        let mut stdin = self.take_console_input().expect("console input");
        stdin.write_all(b"stop\n").expect("console input");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left) {
                Some(line) => {
                    if let Some(t) = tick_of(&line) {
                        last_tick = last_tick.max(t);
                    }
                    if line.contains("DISK-SYNCED") {
                        break;
                    }
                }
                None => panic!(
                    "the guest did not sync its disk after \"stop\"; console:\n{}",
                    self.console_tail()
                ),
            }
        }
        loop {
            if let Some(status) = self.try_wait() {
                assert!(status.success(), "dormouse ended with {status}");
                return last_tick;
            }
            assert!(
                Instant::now() < deadline,
                "dormouse did not exit after the guest's reboot"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn tick_of(line: &str) -> Option<u64> {
    line.split("tick seq=").nth(1)?.trim().parse().ok()
}

/// A namespace holding one TAP (with the host address), so restores never meet in one namespace.
struct TapNs {
    ns: NetNs,
    tap: String,
}

impl TapNs {
    fn new(tag: &str) -> Self {
        let ns = NetNs::new(tag);
        let tap = format!("dmt{tag}");
        ns.exec(&[
            "ip", "tuntap", "add", "dev", &tap, "mode", "tap", "vnet_hdr",
        ]);
        ns.exec(&["ip", "addr", "add", HOST_CIDR, "dev", &tap]);
        ns.exec(&["ip", "link", "set", &tap, "up"]);
        Self { ns, tap }
    }

    fn dormouse(&self, args: &[&str]) -> Command {
        let mut cmd = self.ns.command(&dormouse_bin());
        cmd.args(args);
        cmd
    }
}

struct Base {
    dir: tempfile::TempDir,
    snapshot: PathBuf,
    /// The disk the guest booted with (left as it was at snapshot time: the VM never resumed).
    disk: PathBuf,
    /// A copy of the disk taken while the VM was paused for the snapshot.
    disk_at_snapshot: PathBuf,
    tick_at_snapshot: u64,
}

impl Base {
    /// A fresh copy of the disk as it was at snapshot time.
    fn disk_copy(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::copy(&self.disk_at_snapshot, &p).expect("copying the disk");
        p
    }
}

fn hybrid_connect(uds: &Path, port: u32, timeout: Duration) -> std::io::Result<UnixStream> {
    let s = UnixStream::connect(uds)?;
    s.set_read_timeout(Some(timeout))?;
    (&s).write_all(format!("CONNECT {port}\n").as_bytes())?;
    let answer = read_line(&s)?;
    if !answer.starts_with("OK") {
        return Err(std::io::Error::other(format!(
            "handshake answer {answer:?}"
        )));
    }
    Ok(s)
}

fn read_line(mut s: &UnixStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        if s.read(&mut byte)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if byte[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(byte[0]);
    }
}

fn echo_once(s: &UnixStream, msg: &str) -> std::io::Result<()> {
    let mut w = s;
    w.write_all(format!("{msg}\n").as_bytes())?;
    let back = read_line(s)?;
    if back != msg {
        return Err(std::io::Error::other(format!(
            "echoed {back:?}, sent {msg:?}"
        )));
    }
    Ok(())
}

/// Boots the guest once per test process, snapshots it with a vsock connection open, copies its
/// disk and kills it.
fn base() -> &'static Base {
    static BASE: OnceLock<Base> = OnceLock::new();
    BASE.get_or_init(|| {
        // In the run directory: a `static` is never dropped, so its TempDir would never be.
        let dir = run_tempdir();
        let bin = static_guest_binary("guest-vsock", "dormouse-vsock-test");
        let initrd = build_initrd_adding(
            dir.path(),
            "devices.cpio",
            GUEST_SCRIPT,
            &[(bin.as_path(), "/bin/dormouse-vsock-test")],
        );
        let disk = dir.path().join("disk.img");
        std::fs::File::create(&disk)
            .and_then(|f| f.set_len(DISK_BYTES))
            .unwrap();
        let kernel = vmlinux();
        let sock = dir.path().join("base.sock");
        let uds = dir.path().join("base.vsock");
        let net = TapNs::new("sb");
        let _serial = linux_boot_lock();
        let vm = Running::spawn_with_console_input(net.dormouse(&[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--disk",
            &format!("path={}", disk.display()),
            "--net",
            &format!("tap={}", net.tap),
            "--vsock",
            &format!("cid=3,uds={}", uds.display()),
            "--api-sock",
            sock.to_str().unwrap(),
        ]));
        // Twice the usual bound: this guest boots while other tests' guests may run.
        vm.wait_for("NET-UP", 2 * LINUX_BOOT_TIMEOUT);
        vm.wait_for(READY_MARKER, LINUX_BOOT_TIMEOUT);
        let mut tick = vm.next_tick(Duration::from_secs(60));
        while tick < 2 {
            tick = vm.next_tick(Duration::from_secs(60));
        }
        // A connection that is open, and known to work, when the snapshot is taken.
        let old = hybrid_connect(&uds, ECHO_PORT, Duration::from_secs(60)).expect("connect");
        echo_once(&old, "before-snapshot").expect("echo before the snapshot");

        let ctl = |args: &[&str]| {
            let out = run_dormouse(
                &[&["ctl", "--sock", sock.to_str().unwrap()], args].concat(),
                Duration::from_secs(120),
            );
            assert_eq!(out.status.code(), Some(0), "ctl {args:?}: {}", text(&out).1);
        };
        ctl(&["pause"]);
        let snapshot = dir.path().join("snap");
        ctl(&["snapshot", "--dir", snapshot.to_str().unwrap()]);
        let disk_at_snapshot = dir.path().join("disk-at-snapshot.img");
        std::fs::copy(&disk, &disk_at_snapshot).unwrap();
        while let Some(line) = vm.try_recv() {
            if let Some(t) = tick_of(&line) {
                tick = tick.max(t);
            }
        }
        vm.kill();

        // The host peer of the connection that was open sees its end (EOF or a reset), not a
        // hang, once the VM is gone.
        old.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 16];
        match (&old).read(&mut buf) {
            Ok(0) => {}
            Err(e)
                if e.kind() != std::io::ErrorKind::WouldBlock
                    && e.kind() != std::io::ErrorKind::TimedOut => {}
            other => panic!("old vsock connection after the VMM ended: {other:?}"),
        }
        Base {
            dir,
            snapshot,
            disk,
            disk_at_snapshot,
            tick_at_snapshot: tick,
        }
    })
}

/// `dormouse restore` of the base snapshot in its own namespace/TAP, vsock socket and (unless
/// `disk` says otherwise) disk copy.
fn restore(net: &TapNs, disk: &Path, uds: &Path) -> Running {
    let base = base();
    Running::spawn_with_console_input(net.dormouse(&[
        "restore",
        "--dir",
        base.snapshot.to_str().unwrap(),
        "--disk",
        &format!("path={}", disk.display()),
        "--net",
        &format!("tap={}", net.tap),
        "--vsock-uds",
        uds.to_str().unwrap(),
    ]))
}

/// Checks the raw disk holds records 1..=n and zeros after them; returns n.
fn check_disk(path: &Path) -> u64 {
    let data = std::fs::read(path).unwrap();
    let mut n = 0u64;
    for chunk in data.chunks(RECORD_LEN) {
        if chunk.iter().all(|&b| b == 0) {
            break;
        }
        n += 1;
        assert_eq!(
            String::from_utf8_lossy(chunk),
            record(n),
            "record {n} of {}",
            path.display()
        );
    }
    let end = (n as usize) * RECORD_LEN;
    if let Some(off) = data
        .get(end..)
        .and_then(|rest| rest.iter().position(|&b| b != 0))
    {
        panic!(
            "{}: stray data at byte {} after record {n}",
            path.display(),
            end + off
        );
    }
    n
}

/// Lets a restored guest write `ticks` more records, stops it cleanly, and checks its disk.
fn run_and_check_disk(vm: Running, disk: &Path, base_tick: u64, ticks: u64) -> u64 {
    // Generous: on an emulating PVM host a restored guest faults its memory in at a few ms per
    // page and has taken 10 s (60+ s with other guests running) to print its first line.
    let first = vm.next_tick(FIRST_TICK_BOUND);
    assert!(
        first <= base_tick + 1,
        "first tick after restore {first}, snapshot at {base_tick}"
    );
    let mut last = first;
    while last < first + ticks {
        let t = vm.next_tick(Duration::from_secs(60));
        assert_eq!(t, last + 1, "ticks go on one by one");
        last = t;
    }
    let last = vm.stop_guest(last);
    let n = check_disk(disk);
    // Every record the guest announced is on disk; at most the one being written when "stop"
    // arrived is beyond.
    assert!(
        n >= last && n <= last + 1,
        "{}: {n} records, last tick printed {last}",
        disk.display()
    );
    n
}

#[test]
fn disk_contents_are_consistent_after_restore_and_a_clone_writes_only_its_copy() {
    if !require_kvm() || !require_root() {
        return;
    }
    let base = base();
    let tmp = tempfile::tempdir().unwrap();

    // The restored guest writes on to the original disk file.
    let net = TapNs::new("sd1");
    let vm = restore(&net, &base.disk, &tmp.path().join("d1.vsock"));
    let n = run_and_check_disk(vm, &base.disk, base.tick_at_snapshot, 3);
    assert!(n > base.tick_at_snapshot + 2);

    // A clone: the disk copied at snapshot time. Its writes land there, never in the original.
    let original = std::fs::read(&base.disk).unwrap();
    let copy = base.disk_copy("clone.img");
    let net = TapNs::new("sd2");
    let vm = restore(&net, &copy, &tmp.path().join("d2.vsock"));
    let clone_n = run_and_check_disk(vm, &copy, base.tick_at_snapshot, 5);
    assert!(clone_n > base.tick_at_snapshot + 4);
    assert_eq!(
        std::fs::read(&base.disk).unwrap(),
        original,
        "the clone wrote to the original disk"
    );
}

#[test]
fn network_works_through_an_overridden_tap_in_another_namespace() {
    if !require_kvm() || !require_root() {
        return;
    }
    let base = base();
    let tmp = tempfile::tempdir().unwrap();
    let net = TapNs::new("sn");
    let disk = base.disk_copy("net.img");
    let vm = restore(&net, &disk, &tmp.path().join("n.vsock"));
    vm.next_tick(FIRST_TICK_BOUND);
    // From the host side of the new TAP, a TCP connection to a guest port nobody listens on:
    // the SYN goes in through the new TAP and the guest kernel, with the IP configuration it
    // had in memory, answers with a RST (connection refused; a timeout would mean no traffic).
    let ns_name = net.ns.name.clone();
    let outcome = std::thread::spawn(move || {
        let f = std::fs::File::open(format!("/var/run/netns/{ns_name}")).expect("netns file");
        // SAFETY: setns on this helper thread only, with a namespace fd we own.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns");
        let addr: std::net::SocketAddr = format!("{GUEST_IP}:9").parse().unwrap();
        let mut results = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            let r = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(20));
            results.push((r.map(drop).map_err(|e| e.kind()), t.elapsed()));
        }
        results
    })
    .join()
    .expect("netns thread");
    for (result, took) in outcome {
        assert_eq!(
            result,
            Err(std::io::ErrorKind::ConnectionRefused),
            "TCP to {GUEST_IP} through {} after {took:?}",
            net.tap
        );
    }
    // The guest lives on.
    vm.next_tick(Duration::from_secs(60));
    vm.kill();
}

/// Connects as soon as the restored VMM's vsock socket exists and echoes once; returns how long
/// after `start` the echo came back.
fn echo_right_after_restore(uds: &Path, start: Instant) -> Duration {
    let deadline = start + VSOCK_READY_BOUND;
    let stream = loop {
        match UnixStream::connect(uds) {
            Ok(s) => break s,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "no vsock socket at {} within {VSOCK_READY_BOUND:?}: {e}",
                    uds.display()
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    };
    let left = deadline.saturating_duration_since(Instant::now());
    stream
        .set_read_timeout(Some(left.max(Duration::from_millis(1))))
        .unwrap();
    (&stream)
        .write_all(format!("CONNECT {ECHO_PORT}\n").as_bytes())
        .unwrap();
    let answer = read_line(&stream).unwrap_or_else(|e| {
        panic!("CONNECT right after restore: no answer within {VSOCK_READY_BOUND:?}: {e}")
    });
    assert!(answer.starts_with("OK"), "handshake answer {answer:?}");
    echo_once(&stream, "after-restore").unwrap_or_else(|e| panic!("echo right after restore: {e}"));
    start.elapsed()
}

fn guest_stats(uds: &Path) -> StatsReport {
    let s = hybrid_connect(uds, STATS_PORT, Duration::from_secs(30)).expect("connect STATS");
    let line = read_line(&s).expect("stats line");
    StatsReport::parse(&line).unwrap_or_else(|| panic!("bad stats line {line:?}"))
}

#[test]
fn vsock_connects_immediately_after_restore_and_the_old_connection_is_reset() {
    if !require_kvm() || !require_root() {
        return;
    }
    let base = base();
    let tmp = tempfile::tempdir().unwrap();
    for round in 0..3 {
        let net = TapNs::new(&format!("sv{round}"));
        let disk = base.disk_copy(&format!("vsock{round}.img"));
        let uds = tmp.path().join(format!("v{round}.vsock"));
        let start = Instant::now();
        let vm = restore(&net, &disk, &uds);
        let took = echo_right_after_restore(&uds, start);
        eprintln!("vsock round {round}: restore → first echo {took:?}");

        // In the guest, the handler of the connection open at snapshot time has ended (the
        // transport reset reached it): with ours closed too, no data connection is active.
        let deadline = Instant::now() + VSOCK_READY_BOUND;
        let stats = loop {
            let s = guest_stats(&uds);
            if s.active == 0 || Instant::now() > deadline {
                break s;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(
            stats.active, 0,
            "round {round}: guest connections still open after restore: {stats:?}"
        );
        // The snapshot's connection plus ours were accepted; nothing more.
        assert_eq!(stats.accepted, 2, "round {round}: {stats:?}");
        // And the next connection works too.
        let s = hybrid_connect(&uds, ECHO_PORT, Duration::from_secs(30)).expect("second connect");
        echo_once(&s, "again").expect("second echo");
        vm.kill();
    }
}
