//! Shared harness for dormouse's end-to-end tests.
//!
//! Tests that need KVM call [`require_kvm`]: without /dev/kvm they skip on a developer machine but
//! fail loudly when `CI` is set. Linux boots are serialised with [`linux_boot_lock`] because a
//! guest whose kernel runs under emulation is CPU-bound and two at once on a 2-core host slow each
//! other into RCU stall warnings.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// The repository root (this crate lives in `<root>/tests`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
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
        "{} not found: build it first (`cargo build -p vmm`, which deploy/test.sh does)",
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
    let child = Command::new(dormouse_bin())
        .args(args)
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
