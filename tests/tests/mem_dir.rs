//! File-backed guest RAM (`dormouse run --mem-dir`): a full snapshot links the VM's memory file
//! instead of copying it, the VM keeps running copy-on-write over the now-frozen file, and every
//! snapshot of it (the linked one, a later full one, a diff) restores.
//!
//! The guest is a few bytes of 64-bit code built here: it counts passes over its memory, and in
//! every pass checks that each page holds the pass number before incrementing it, printing
//! "pass" after each pass and "BAD" (then halting) on the first page that does not. So a guest
//! that keeps printing "pass" after a snapshot or a restore has seen all of its memory intact.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use tests::*;

const MEM_MIB: u64 = 32;
/// The checked pages: from 2 MiB (past the image at 1 MiB) to the end of RAM.
const CHECK_START: u64 = 2 << 20;
const CHECK_END: u64 = MEM_MIB << 20;
const READY: &str = "dormouse-mem-dir-guest";
const TIMEOUT: Duration = Duration::from_secs(120);

fn print(code: &mut Vec<u8>, text: &[u8]) {
    code.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    for &b in text {
        code.extend_from_slice(&[0xb0, b, 0xee]); // mov al, b; out dx, al
    }
}

fn mov_imm64(code: &mut Vec<u8>, reg_opcode: u8, value: u64) {
    code.extend_from_slice(&[0x48, reg_opcode]);
    code.extend_from_slice(&value.to_le_bytes());
}

/// The counting guest's code; dormouse enters it in 64-bit mode with the first GiB mapped.
fn counting_code() -> Vec<u8> {
    let mut c = Vec::new();
    print(&mut c, format!("{READY}\n").as_bytes());
    c.extend_from_slice(&[0x31, 0xdb]); // xor ebx, ebx: bl = expected byte (pass mod 256)
    let outer = c.len();
    mov_imm64(&mut c, 0xb8, CHECK_START); // mov rax, start
    mov_imm64(&mut c, 0xba, CHECK_END); // mov rdx, end
    let inner = c.len();
    c.extend_from_slice(&[0x8a, 0x08]); // mov cl, [rax]
    c.extend_from_slice(&[0x38, 0xd9]); // cmp cl, bl
    c.extend_from_slice(&[0x0f, 0x85]); // jne bad (rel32 patched below)
    let jne_rel = c.len();
    c.extend_from_slice(&[0; 4]);
    c.extend_from_slice(&[0xfe, 0x00]); // inc byte [rax]
    c.extend_from_slice(&[0x48, 0x05, 0x00, 0x10, 0x00, 0x00]); // add rax, 0x1000
    c.extend_from_slice(&[0x48, 0x39, 0xd0]); // cmp rax, rdx
    let back = i8::try_from(inner as i64 - (c.len() as i64 + 2)).unwrap();
    c.extend_from_slice(&[0x72, back as u8]); // jb inner
    c.extend_from_slice(&[0xfe, 0xc3]); // inc bl
    print(&mut c, b"pass\n");
    let back = i32::try_from(outer as i64 - (c.len() as i64 + 5)).unwrap();
    c.push(0xe9); // jmp outer
    c.extend_from_slice(&back.to_le_bytes());
    let bad = c.len();
    let rel = i32::try_from(bad as i64 - (jne_rel as i64 + 4)).unwrap();
    c[jne_rel..jne_rel + 4].copy_from_slice(&rel.to_le_bytes());
    print(&mut c, b"BAD\n");
    c.extend_from_slice(&[0xfa, 0xf4, 0xeb, 0xfd]); // cli; hlt; jmp hlt
    c
}

/// An ELF64 executable of one PT_LOAD segment at 1 MiB holding `code`.
fn elf(code: &[u8]) -> Vec<u8> {
    const LOAD: u64 = 0x10_0000;
    const HEADERS: u64 = 64 + 56;
    let len = HEADERS + code.len() as u64;
    let mut f = Vec::new();
    f.extend_from_slice(b"\x7fELF\x02\x01\x01\x00");
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&(LOAD + HEADERS).to_le_bytes()); // entry
    f.extend_from_slice(&64u64.to_le_bytes()); // phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // flags
    for half in [64u16, 56, 1, 64, 0, 0] {
        f.extend_from_slice(&half.to_le_bytes()); // ehsize phentsize phnum shentsize shnum shstrndx
    }
    f.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    f.extend_from_slice(&5u32.to_le_bytes()); // R+X
    for word in [0, LOAD, LOAD, len, len, 0x1000] {
        f.extend_from_slice(&word.to_le_bytes()); // offset vaddr paddr filesz memsz align
    }
    f.extend_from_slice(code);
    f
}

/// A dormouse process whose console lines arrive on a channel; killed on drop.
struct Running {
    child: Child,
    lines: Receiver<String>,
}

impl Running {
    fn spawn(args: &[&str]) -> Self {
        let mut child = Command::new(dormouse_bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn dormouse");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running { child, lines: rx }
    }

    /// Waits for `count` more lines equal to `wanted`; a "BAD" line fails the test.
    fn expect_lines(&self, wanted: &str, count: usize) {
        let deadline = Instant::now() + TIMEOUT;
        let mut seen = 0;
        while seen < count {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line == "BAD" => panic!("the guest found a page with a wrong count"),
                Ok(line) if line == wanted => seen += 1,
                Ok(_) => {}
                Err(_) => panic!("{seen}/{count} {wanted:?} lines within {TIMEOUT:?}"),
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `dormouse ctl snapshot` of the VM at `sock` into `dir`; returns the printed JSON.
fn snapshot(sock: &Path, dir: &Path, diff: bool) -> String {
    let mut cmd = Command::new(dormouse_bin());
    cmd.arg("ctl")
        .arg("--sock")
        .arg(sock)
        .args(["snapshot", "--dir"])
        .arg(dir);
    if diff {
        cmd.arg("--diff");
    }
    let out = cmd.output().expect("dormouse ctl");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "snapshot failed: {stdout}\n{stderr}");
    stdout
}

fn wait_for_socket(sock: &Path) {
    let deadline = Instant::now() + TIMEOUT;
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "no API socket at {}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn linked_snapshot_freezes_and_the_vm_continues() {
    if !require_kvm() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let guest = work.path().join("counting.elf");
    std::fs::write(&guest, elf(&counting_code())).unwrap();
    let mem_dir = work.path().join("mem");
    std::fs::create_dir(&mem_dir).unwrap();
    let sock = work.path().join("vm.sock");
    let snap = |name: &str| -> PathBuf { work.path().join(name) };

    let vm = Running::spawn(&[
        "run",
        "--kernel",
        guest.to_str().unwrap(),
        "--mem-mib",
        &MEM_MIB.to_string(),
        "--mem-dir",
        mem_dir.to_str().unwrap(),
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    vm.expect_lines(READY, 1);
    vm.expect_lines("pass", 3);
    wait_for_socket(&sock);
    // The memory file has no name: nothing to clean up if the VMM dies.
    assert_eq!(std::fs::read_dir(&mem_dir).unwrap().count(), 0);

    let first = snapshot(&sock, &snap("first"), false);
    assert!(first.contains("\"memory\": \"linked\""), "{first}");
    let memory_bin = snap("first").join("memory.bin");
    let frozen = std::fs::read(&memory_bin).unwrap();
    assert_eq!(frozen.len() as u64, MEM_MIB << 20);
    // Sparse: the checked range (30 MiB) plus the image, not the holes below 1 MiB.
    let allocated = std::fs::metadata(&memory_bin).unwrap().blocks() * 512;
    assert!(
        (CHECK_END - CHECK_START..MEM_MIB << 20).contains(&allocated),
        "{allocated} bytes allocated"
    );

    // The VM goes on over its copy-on-write memory and still finds every page as it left it.
    vm.expect_lines("pass", 3);
    let second = snapshot(&sock, &snap("second"), false);
    assert!(second.contains("\"memory\": \"written\""), "{second}");
    vm.expect_lines("pass", 2);
    let diff = snapshot(&sock, &snap("diff"), true);
    assert!(diff.contains("\"parent_id\""), "{diff}");
    vm.expect_lines("pass", 2);
    drop(vm);
    assert_eq!(std::fs::read_dir(&mem_dir).unwrap().count(), 0);
    assert!(
        std::fs::read(&memory_bin).unwrap() == frozen,
        "the linked snapshot's memory file changed after the VM continued"
    );

    for name in ["first", "second", "diff"] {
        let dir = snap(name);
        let restored = Running::spawn(&["restore", "--dir", dir.to_str().unwrap()]);
        restored.expect_lines("pass", 2);
    }
    assert!(std::fs::read(&memory_bin).unwrap() == frozen);
}

#[test]
fn a_memory_dir_that_is_not_a_directory_is_refused() {
    if !require_kvm() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let guest = work.path().join("counting.elf");
    std::fs::write(&guest, elf(&counting_code())).unwrap();
    let missing = work.path().join("missing");
    let out = run_dormouse(
        &[
            "run",
            "--kernel",
            guest.to_str().unwrap(),
            "--mem-mib",
            "16",
            "--mem-dir",
            missing.to_str().unwrap(),
        ],
        TIMEOUT,
    );
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("memory directory") && stderr.contains("does not exist"),
        "{stderr}"
    );
}
