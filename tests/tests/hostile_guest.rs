//! The hostile guest (tests/hostile-guest/, docs/hostile-guest.md): a freestanding program that
//! drives dormouse's virtio-mmio devices with invalid input. The VMM must stay up, keep serving
//! its API and the console, mark broken devices DEVICE_NEEDS_RESET, and exit 0 when the guest
//! resets at the end.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tests::*;

const NEEDS_RESET: u32 = 0x40;

/// Cases the guest runs against every device it finds (tests/hostile-guest/hostile.c,
/// `run_device_cases`), and whether the device must end them in DEVICE_NEEDS_RESET.
const DEVICE_CASES: &[(&str, Option<bool>)] = &[
    ("queue-size-0", Some(true)),
    ("queue-size-not-power-of-two", Some(true)),
    ("queue-size-above-max", Some(true)),
    ("descriptor-loop", Some(true)),
    ("chain-longer-than-queue", Some(true)),
    ("next-index-out-of-range", Some(true)),
    ("head-index-out-of-range", Some(true)),
    ("avail-index-too-far-ahead", Some(true)),
    ("lengths-overflow-u32", Some(true)),
    ("buffers-outside-memory", Some(false)),
    ("buffers-straddle-memory-end", Some(false)),
    ("length-u32-max", Some(false)),
    ("wrong-direction", Some(false)),
    ("notify-storm", Some(false)),
    ("reset-mid-request", Some(false)),
    // Random values in every register: any status is fine, recovery is what counts.
    ("register-sweep", None),
];
const VMM_CASES: &[&str] = &["mmio-unmapped", "random-port-io", "console-input"];

/// Compiles the guest with the machine's gcc into `dir`.
fn build_hostile_guest(dir: &Path) -> PathBuf {
    // This file's own crate directory (not `repo_root()`, which a target dir copied from another
    // checkout may have baked in).
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("hostile-guest");
    let out = dir.join("hostile.elf");
    let status = Command::new("gcc")
        .args([
            "-ffreestanding",
            "-nostdlib",
            "-static",
            "-fno-pic",
            "-fno-pie",
            "-no-pie",
            "-mno-red-zone",
            "-mgeneral-regs-only",
            "-mcmodel=small",
            "-O2",
            "-fno-stack-protector",
            "-fno-asynchronous-unwind-tables",
            "-fcf-protection=none",
            "-fno-builtin",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-Wl,--build-id=none",
            "-Wl,-z,noexecstack",
            "-Wl,--no-warn-rwx-segments",
        ])
        .arg(format!("-Wl,-T,{}", src.join("link.ld").display()))
        .arg("-o")
        .arg(&out)
        .arg(src.join("hostile.c"))
        .status()
        .expect("running gcc (the hostile guest is built with the machine's C compiler)");
    assert!(status.success(), "building the hostile guest failed");
    out
}

struct CaseLine {
    number: usize,
    name: String,
    ok: bool,
    status: u32,
    line: String,
}

fn parse_case(line: &str) -> Option<CaseLine> {
    let rest = line.split("HOSTILE case ").nth(1)?;
    let mut words = rest.split_whitespace();
    let number = words.next()?.parse().ok()?;
    let name = words.next()?.to_string();
    let ok = words.next()? == "ok";
    let status = words
        .next()?
        .strip_prefix("status=0x")
        .and_then(|h| u32::from_str_radix(h, 16).ok())?;
    Some(CaseLine {
        number,
        name,
        ok,
        status,
        line: line.to_string(),
    })
}

fn ctl_info(sock: &Path) -> String {
    let out = run_dormouse(
        &["ctl", "--sock", sock.to_str().unwrap(), "info"],
        Duration::from_secs(20),
    );
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success() && !stdout.trim().is_empty(),
        "the API did not answer while the hostile guest ran: {stdout}\n{stderr}"
    );
    stdout
}

#[test]
fn hostile_guest_cannot_crash_the_vmm() {
    if !require_kvm() {
        return;
    }
    // virtio-net needs a TAP, which needs root (a network namespace keeps it private).
    let with_net = require_root();
    if !with_net {
        eprintln!("hostile guest: running without virtio-net (no TAP without root)");
    }
    let dir = tempfile::tempdir().unwrap();
    let guest = build_hostile_guest(dir.path());
    let disk = dir.path().join("scratch.img");
    std::fs::write(&disk, vec![0x5au8; 64 * 1024]).unwrap();
    let sock = dir.path().join("api.sock");
    let stderr_path = dir.path().join("stderr.txt");

    let ns = with_net.then(|| {
        let ns = NetNs::new("hostile");
        ns.exec(&[
            "ip", "tuntap", "add", "dev", "dmhost0", "mode", "tap", "vnet_hdr",
        ]);
        ns.exec(&["ip", "link", "set", "dmhost0", "up"]);
        ns
    });
    let bin = dormouse_bin();
    let mut args: Vec<String> = vec![
        "run".into(),
        "--kernel".into(),
        guest.display().to_string(),
        "--mem-mib".into(),
        "64".into(),
        "--disk".into(),
        format!("path={}", disk.display()),
        "--vsock".into(),
        "cid=3,backend=userspace".into(),
        "--api-sock".into(),
        sock.display().to_string(),
    ];
    if with_net {
        args.extend(["--net".into(), "tap=dmhost0".into()]);
    }
    // stderr to a file, to look for panics afterwards.
    let wrapper = "exec \"$0\" \"$@\" 2>\"$DM_STDERR\"";
    let mut cmd = match &ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &ns.name, "sh", "-c", wrapper]);
            c
        }
        None => {
            let mut c = Command::new("sh");
            c.args(["-c", wrapper]);
            c
        }
    };
    cmd.arg(&bin).args(&args).env("DM_STDERR", &stderr_path);
    let started = Instant::now();
    let mut vm = Running::spawn_with_console_input(cmd);
    let stderr = || std::fs::read_to_string(&stderr_path).unwrap_or_default();

    vm.wait_for("HOSTILE start", Duration::from_secs(60));
    let info = ctl_info(&sock);
    eprintln!("API answered at the start: {}", info.replace('\n', " "));

    let timeout = Duration::from_secs(600);
    let mut cases = Vec::new();
    let mut devices = Vec::new();
    let mut done = None;
    let mut answered_while_waiting = false;
    while done.is_none() {
        let left = timeout.saturating_sub(started.elapsed());
        let Some(line) = vm.recv(left) else {
            panic!(
                "the hostile guest stopped reporting; console:\n{}\nstderr:\n{}",
                vm.console_tail(),
                stderr()
            );
        };
        if let Some(case) = parse_case(&line) {
            cases.push(case);
        } else if let Some(rest) = line.split("HOSTILE device ").nth(1) {
            devices.push(rest.split_whitespace().next().unwrap_or("").to_string());
        } else if line.contains("HOSTILE waiting for console input") {
            // Mid-run, after every device case: the API and the console's input still work.
            ctl_info(&sock);
            answered_while_waiting = true;
            let mut input = vm.take_console_input().expect("console input");
            input.write_all(b"g").unwrap();
            input.flush().unwrap();
        } else if let Some(rest) = line.split("HOSTILE done ").nth(1) {
            done = Some(rest.to_string());
        }
    }
    assert!(answered_while_waiting);

    // The VMM exits by itself with 0 once the guest resets.
    let status = loop {
        if let Some(s) = vm.try_wait() {
            break s;
        }
        assert!(
            started.elapsed() < timeout,
            "dormouse did not exit after the guest's reset"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = stderr();
    assert_eq!(
        status.code(),
        Some(0),
        "dormouse exit: {status:?}\n{stderr}"
    );
    assert!(
        !stderr.contains("panicked"),
        "a panic in dormouse:\n{stderr}"
    );

    // Every case reported, numbered 1..=N, all ok, and the final count agrees.
    let failed: Vec<&str> = cases
        .iter()
        .filter(|c| !c.ok)
        .map(|c| c.line.as_str())
        .collect();
    assert!(failed.is_empty(), "failed cases:\n{}", failed.join("\n"));
    for (i, c) in cases.iter().enumerate() {
        assert_eq!(c.number, i + 1, "case numbering: {}", c.line);
    }
    let done = done.unwrap();
    let mut words = done.split_whitespace();
    let count: usize = words.next().and_then(|n| n.parse().ok()).expect("count");
    assert_eq!(count, cases.len(), "HOSTILE done {done}");
    assert_eq!(words.next(), Some("failures=0"), "HOSTILE done {done}");

    let mut expected_devices = vec!["blk", "vsock"];
    if with_net {
        expected_devices.push("net");
    }
    for dev in &expected_devices {
        assert!(
            devices.iter().any(|d| d == dev),
            "no {dev} device: {devices:?}"
        );
        for (name, needs_reset) in DEVICE_CASES {
            let full = format!("{dev}/{name}");
            let case = cases
                .iter()
                .find(|c| c.name == full)
                .unwrap_or_else(|| panic!("case {full} never ran"));
            if let Some(expected) = needs_reset {
                assert_eq!(
                    case.status & NEEDS_RESET != 0,
                    *expected,
                    "DEVICE_NEEDS_RESET for {}",
                    case.line
                );
            }
        }
    }
    for name in VMM_CASES {
        let full = format!("vmm/{name}");
        assert!(
            cases.iter().any(|c| c.name == full),
            "case {full} never ran"
        );
    }
    assert_eq!(
        cases.len(),
        expected_devices.len() * DEVICE_CASES.len() + VMM_CASES.len()
    );
    eprintln!(
        "hostile guest: {} cases on {} in {:.1?}, VMM survived all of them",
        cases.len(),
        expected_devices.join(", "),
        started.elapsed()
    );
}
