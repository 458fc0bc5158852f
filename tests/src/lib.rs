//! Shared harness for dormouse's end-to-end tests.
//!
//! Tests that need KVM call [`require_kvm`]: without /dev/kvm they skip on a developer machine but
//! fail loudly when `CI` is set. Linux boots are serialised with [`linux_boot_lock`] because a
//! guest whose kernel runs under emulation is CPU-bound and two at once on a 2-core host slow each
//! other into RCU stall warnings.

use std::cell::RefCell;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// The repository root (this crate lives in `<root>/tests`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A field of `/proc/<pid>/status` (`Uid`, `Cpus_allowed_list`, …), its words joined by one
/// space.
pub fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The names in `dir`, sorted.
pub fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Console line of the `WriteForever` tiny guest after each pass over its memory.
pub const WRITER_PASS: &str = "tiny-pass";
/// Its line when a page did not hold the value its previous pass wrote.
pub const WRITER_BAD: &str = "tiny-BAD";

/// Waits for `n` more passes of the `WriteForever` tiny guest, each within `bound`, reading its
/// console with `next_line(bound)` (`None`: nothing came). Panics on a `tiny-BAD` line or a
/// silent guest, adding `context()` (e.g. the console's last lines).
pub fn writer_passes(
    n: usize,
    bound: Duration,
    mut next_line: impl FnMut(Duration) -> Option<String>,
    context: impl Fn() -> String,
) {
    let mut seen = 0;
    while seen < n {
        let line = next_line(bound)
            .unwrap_or_else(|| panic!("no guest pass within {bound:?}\n{}", context()));
        assert!(
            !line.contains(WRITER_BAD),
            "the guest found memory it did not write\n{}",
            context()
        );
        if line.contains(WRITER_PASS) {
            seen += 1;
        }
    }
}

/// A benchmark table's ratio cell (`1.23×`) as a number, which must be positive; panics naming
/// the cell and its line otherwise.
pub fn ratio_cell(cell: &str, line: &str) -> f64 {
    let ratio: f64 = cell
        .strip_suffix('×')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{cell:?} is not a ratio (N×): {line}"));
    assert!(ratio > 0.0, "ratio {cell:?} is not positive: {line}");
    ratio
}

/// True when KVM is usable. Without it: panic under CI, skip (false) elsewhere.
pub fn require_kvm() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        if std::env::var_os("CI").is_some() {
            panic!(
                "/dev/kvm is missing or not accessible, and CI is set: end-to-end tests cannot run"
            );
        }
        eprintln!("SKIPPED: /dev/kvm is not available (set CI=1 to make this a failure)");
    }
    ok
}

/// The `dormouse` binary next to this test executable (`target/<profile>/dormouse`).
/// `DORMOUSE_BIN` overrides it.
pub fn dormouse_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("DORMOUSE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let bin = profile_dir.join("dormouse");
    assert!(
        bin.exists(),
        "{} not found: build it first (`cargo build -p dormouse`, which deploy/test.sh does)",
        bin.display()
    );
    bin
}

fn kernel_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(d) = std::env::var_os("DORMOUSE_KERNEL_DIR") {
            return PathBuf::from(d);
        }
        // Warm cache: answers at once. Cold: builds the kernel (minutes).
        let out = Command::new(repo_root().join("guest-kernel/build.sh"))
            .arg("--print-dir")
            .stderr(Stdio::inherit())
            .output()
            .expect("running guest-kernel/build.sh");
        assert!(out.status.success(), "guest-kernel/build.sh failed");
        let text = String::from_utf8_lossy(&out.stdout);
        PathBuf::from(text.lines().last().expect("build.sh printed a path").trim())
    })
}

/// The project's guest kernel (ELF vmlinux).
pub fn vmlinux() -> PathBuf {
    kernel_dir().join("vmlinux")
}

/// The same kernel as an LZ4 bzImage.
pub fn bzimage() -> PathBuf {
    kernel_dir().join("bzImage")
}

/// Builds an initrd whose /init runs `command` and reboots (deploy/build-initrd.sh).
pub fn build_initrd(dir: &Path, name: &str, command: &str) -> PathBuf {
    let out = dir.join(name);
    let status = Command::new(repo_root().join("deploy/build-initrd.sh"))
        .arg("--out")
        .arg(&out)
        .arg("--command")
        .arg(command)
        .stdout(Stdio::null())
        .status()
        .expect("running deploy/build-initrd.sh");
    assert!(status.success(), "deploy/build-initrd.sh failed");
    out
}

/// Builds an initrd with a given /init script.
pub fn build_initrd_with_init(dir: &Path, name: &str, init: &str) -> PathBuf {
    let init_path = dir.join(format!("{name}.init"));
    std::fs::write(&init_path, init).expect("writing init");
    let out = dir.join(name);
    let status = Command::new(repo_root().join("deploy/build-initrd.sh"))
        .arg("--out")
        .arg(&out)
        .arg("--init")
        .arg(&init_path)
        .stdout(Stdio::null())
        .status()
        .expect("running deploy/build-initrd.sh");
    assert!(status.success(), "deploy/build-initrd.sh failed");
    out
}

pub fn linux_boot_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `dormouse` with `args`, stdin closed, killing it after `timeout`.
pub fn run_dormouse(args: &[&str], timeout: Duration) -> Output {
    run_dormouse_with_env(args, &[], timeout)
}

/// [`run_dormouse`] with more environment variables (e.g. a `PATH` with the peer VMMs).
pub fn run_dormouse_with_env(
    args: &[&str],
    env: &[(&str, std::ffi::OsString)],
    timeout: Duration,
) -> Output {
    let child = Command::new(dormouse_bin())
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning dormouse");
    let pid = child.id() as i32;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done2 = done.clone();
    let watchdog = std::thread::spawn(move || {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if done2.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    });
    let out = child.wait_with_output().expect("waiting for dormouse");
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = watchdog.join();
    out
}

/// stdout and stderr as text, for assertions and failure messages.
pub fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Generous: a Linux boot is ~11 s on an emulating PVM host and well under 1 s on hardware KVM.
pub const LINUX_BOOT_TIMEOUT: Duration = Duration::from_secs(240);

/// Builds an ext4 rootfs whose (busybox, agent-less) init runs `command` and reboots
/// (deploy/build-rootfs.sh).
pub fn build_rootfs(dir: &Path, name: &str, command: &str) -> PathBuf {
    let out = dir.join(name);
    let status = Command::new(repo_root().join("deploy/build-rootfs.sh"))
        .args(["--init", "busybox", "--no-agent"])
        .arg("--out")
        .arg(&out)
        .arg("--size")
        .arg("32")
        .arg("--command")
        .arg(command)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("running deploy/build-rootfs.sh");
    assert!(status.success(), "deploy/build-rootfs.sh failed");
    out
}

/// True when running as root (network namespaces, TAP devices). Panics under CI otherwise.
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        if std::env::var_os("CI").is_some() {
            panic!("this end-to-end test needs root, and CI is set");
        }
        eprintln!("SKIPPED: needs root");
    }
    root
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A network namespace for one test, deleted on drop. Nothing in it reaches outside addresses.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(tag: &str) -> Self {
        let name = format!("dm-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip netns add")
            .success();
        assert!(ok, "cannot create network namespace {name}");
        let ns = Self { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs a command in the namespace and asserts it succeeds.
    pub fn exec(&self, args: &[&str]) {
        let status = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .status()
            .expect("ip netns exec");
        assert!(status.success(), "in netns {}: {args:?} failed", self.name);
    }

    /// A command that will run inside the namespace.
    pub fn command(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Like [`build_initrd`], also copying host files into the initrd: `(source, absolute dest)`.
pub fn build_initrd_adding(
    dir: &Path,
    name: &str,
    command: &str,
    adds: &[(&Path, &str)],
) -> PathBuf {
    let out = dir.join(name);
    let mut cmd = Command::new(repo_root().join("deploy/build-initrd.sh"));
    cmd.arg("--out").arg(&out).arg("--command").arg(command);
    for (src, dest) in adds {
        let mut spec = src.as_os_str().to_owned();
        spec.push(":");
        spec.push(dest);
        cmd.arg("--add").arg(spec);
    }
    let status = cmd
        .stdout(Stdio::null())
        .status()
        .expect("running deploy/build-initrd.sh");
    assert!(status.success(), "deploy/build-initrd.sh failed");
    out
}

/// Builds a workspace binary as a static x86_64 executable to run inside guests, into its own
/// target dir (`<target>/guest-tools`) so the nested cargo never waits on the outer one's lock.
/// Returns its path. `DORMOUSE_GUEST_TOOLS_DIR` overrides that target dir.
pub fn static_guest_binary(package: &str, bin: &str) -> PathBuf {
    const TRIPLE: &str = "x86_64-unknown-linux-gnu";
    let target_dir = match std::env::var_os("DORMOUSE_GUEST_TOOLS_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let exe = std::env::current_exe().expect("current_exe");
            // <target>/<profile>/deps/<test binary>
            exe.ancestors()
                .nth(3)
                .expect("test binary lives in <target>/<profile>/deps")
                .join("guest-tools")
        }
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let start = Instant::now();
    let status = Command::new(cargo)
        .current_dir(repo_root())
        .args([
            "build",
            "--release",
            "--target",
            TRIPLE,
            "-p",
            package,
            "--bin",
            bin,
        ])
        .env("CARGO_TARGET_DIR", &target_dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        // Whatever the outer build was told must not leak into the guest build.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .stdout(Stdio::null())
        .status()
        .expect("running cargo for a guest binary");
    assert!(
        status.success(),
        "building static guest binary {bin} failed"
    );
    eprintln!("built static guest binary {bin} in {:.1?}", start.elapsed());
    target_dir.join(TRIPLE).join("release").join(bin)
}

/// A spawned process (normally dormouse) whose stdout lines arrive on a channel. Killed on drop:
/// a failing test must not leave a guest running (it would eat a core and slow every later test).
pub struct Running {
    child: Child,
    console_input: Option<ChildStdin>,
    lines: Receiver<String>,
    /// Lines received so far, with when they arrived, for failure messages.
    seen: RefCell<Vec<String>>,
    started: Instant,
}

impl Running {
    /// Spawns `cmd` with stdin closed, stdout read line by line, stderr inherited.
    pub fn spawn(cmd: Command) -> Self {
        Self::spawn_with_stdin(cmd, Stdio::null())
    }

    /// Like [`Running::spawn`], with stdin a pipe ([`Running::take_console_input`]).
    pub fn spawn_with_console_input(cmd: Command) -> Self {
        Self::spawn_with_stdin(cmd, Stdio::piped())
    }

    fn spawn_with_stdin(mut cmd: Command, stdin: Stdio) -> Self {
        let mut child = cmd
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn dormouse");
        let out = child.stdout.take().expect("stdout");
        let console_input = child.stdin.take();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running {
            child,
            console_input,
            lines: rx,
            seen: Default::default(),
            started: Instant::now(),
        }
    }

    fn record(&self, line: String) -> String {
        let at = self.started.elapsed().as_secs_f64();
        self.seen.borrow_mut().push(format!("[{at:8.3}] {line}"));
        line
    }

    /// The next line, waiting up to `timeout`; None on timeout or when the process has ended.
    pub fn recv(&self, timeout: Duration) -> Option<String> {
        let line = self.lines.recv_timeout(timeout).ok()?;
        Some(self.record(line))
    }

    /// The next line if one has already arrived.
    pub fn try_recv(&self) -> Option<String> {
        let line = self.lines.try_recv().ok()?;
        Some(self.record(line))
    }

    /// Waits for a line containing `needle` and returns it; panics with the console's tail if
    /// none comes within `timeout`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left) {
                Some(line) if line.contains(needle) => return line,
                Some(_) => {}
                None => panic!(
                    "no console line containing {needle:?} within {timeout:?}; console:\n{}",
                    self.console_tail()
                ),
            }
        }
    }

    /// The last 40 lines received, with their arrival times.
    pub fn console_tail(&self) -> String {
        let seen = self.seen.borrow();
        seen[seen.len().saturating_sub(40)..].join("\n")
    }

    /// The process's stdin, when spawned with [`Running::spawn_with_console_input`] (once).
    pub fn take_console_input(&mut self) -> Option<ChildStdin> {
        self.console_input.take()
    }

    /// The exit status if the process has ended.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process and waits for it.
    pub fn kill(self) {
        drop(self);
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const RUN_DIR_PREFIX: &str = "dormouse-tests-";
static RUN_DIR: OnceLock<PathBuf> = OnceLock::new();

/// This test process's directory for files that live as long as the process, such as the
/// template snapshots kept in `static`s (a `TempDir` in a `static` is never dropped, and each run
/// would leave ~150 MB in /tmp): `<tmp>/dormouse-tests-<pid>`.
///
/// Removed when the process exits through `exit` (libtest's `main` returning, or calling
/// `exit` after a failure), by an `atexit` handler: no extra crate, nothing for each test to
/// remember. A run that was killed cannot clean up, so creating the directory first removes
/// those of earlier runs whose process no longer exists.
pub fn run_dir() -> &'static Path {
    RUN_DIR.get_or_init(|| {
        remove_stale_run_dirs();
        let dir = std::env::temp_dir().join(format!("{RUN_DIR_PREFIX}{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("creating the test run directory");
        // SAFETY: registers a handler that takes no arguments and never unwinds.
        let rc = unsafe { libc::atexit(remove_run_dir) };
        if rc != 0 {
            eprintln!(
                "cannot register atexit: {} stays until the next run",
                dir.display()
            );
        }
        dir
    })
}

/// A fresh temporary directory inside [`run_dir`]: use it for a `static` test fixture.
pub fn run_tempdir() -> tempfile::TempDir {
    tempfile::tempdir_in(run_dir()).expect("creating a temporary directory")
}

extern "C" fn remove_run_dir() {
    if let Some(dir) = RUN_DIR.get() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Removes the run directories of test processes that no longer exist.
fn remove_stale_run_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(RUN_DIR_PREFIX))
            .and_then(|p| p.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        if pid > 0 && pid != std::process::id() as libc::pid_t && !process_exists(pid) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn process_exists(pid: libc::pid_t) -> bool {
    // SAFETY: signal 0 only checks that the process exists; nothing is sent.
    let rc = unsafe { libc::kill(pid, 0) };
    // EPERM: it exists but belongs to someone else.
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Waits for a child that is expected to exit within `bound` and returns its status and
/// stderr; a child still running then is killed and the test fails (a hang is a failure, not a
/// stall).
pub fn wait_child_within(child: Child, bound: Duration) -> (ExitStatus, String) {
    let pid = child.id() as libc::pid_t;
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(bound) {
        Ok(out) => {
            let out = out.expect("waiting for the child");
            (
                out.status,
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
        Err(_) => {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("the child did not exit within {bound:?}");
        }
    }
}

/// One raw HTTP request on a control socket, read to the end; returns the status line and the
/// body (both empty when the VMM closed the connection first). Raw, unlike `ApiClient`, so tests
/// can send what the client would not and see a VMM die mid-request.
pub fn api_request(sock: &Path, method: &str, path: &str, body: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut stream =
        std::os::unix::net::UnixStream::connect(sock).expect("connecting to the API socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Connection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    let status = answer.lines().next().unwrap_or_default().to_string();
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Waits until a Unix socket at `sock` accepts connections (at most 10 s).
pub fn wait_for_socket(sock: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(
            Instant::now() < deadline,
            "no API socket at {}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run by `run_dir_is_removed_when_the_process_exits` in a child process.
    #[test]
    #[ignore = "helper: run by another test in its own process"]
    fn run_dir_child() {
        let dir = run_dir();
        let fixture = run_tempdir();
        std::fs::write(fixture.path().join("data"), b"x").unwrap();
        // Like a `static` fixture: never dropped.
        std::mem::forget(fixture);
        println!("RUN_DIR={}", dir.display());
    }

    #[test]
    fn run_dir_is_removed_when_the_process_exits() {
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "tests::run_dir_child",
                "--nocapture",
            ])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}");
        let dir = stdout
            .lines()
            .find_map(|l| l.strip_prefix("RUN_DIR="))
            .unwrap_or_else(|| panic!("no RUN_DIR line in {stdout}"));
        assert!(dir.contains(RUN_DIR_PREFIX), "{dir}");
        assert!(!Path::new(dir).exists(), "{dir} is still there");
    }

    #[test]
    fn run_dirs_of_dead_processes_are_removed() {
        let mut child = Command::new("true").spawn().unwrap();
        let dead_pid = child.id();
        child.wait().unwrap();
        let stale = std::env::temp_dir().join(format!("{RUN_DIR_PREFIX}{dead_pid}"));
        std::fs::create_dir_all(stale.join("template")).unwrap();
        let live = std::env::temp_dir().join(format!("{RUN_DIR_PREFIX}{}", std::process::id()));
        std::fs::create_dir_all(&live).unwrap();
        remove_stale_run_dirs();
        assert!(!stale.exists(), "{} was left", stale.display());
        assert!(live.exists(), "a live process's directory was removed");
        let _ = std::fs::remove_dir(&live);
    }

    #[test]
    fn the_writer_markers_are_the_tiny_guests() {
        use vmm::tiny_guest::{TINY_GUEST_BAD, TINY_GUEST_PASS};
        assert_eq!(format!("{WRITER_PASS}\n").as_bytes(), TINY_GUEST_PASS);
        assert_eq!(format!("{WRITER_BAD}\n").as_bytes(), TINY_GUEST_BAD);
    }

    #[test]
    fn a_ratio_cell_is_a_positive_number_followed_by_times() {
        assert_eq!(ratio_cell("1.25×", "| a | 1.25× |"), 1.25);
        for bad in ["1.25", "x×", "0.00×", "-1×"] {
            let caught = std::panic::catch_unwind(|| ratio_cell(bad, "| a |"));
            assert!(caught.is_err(), "{bad:?} was taken for a ratio");
        }
    }
}
