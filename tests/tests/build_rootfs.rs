//! deploy/build-rootfs.sh without `--out`: each set of inputs gets its own image in the cache
//! (a second run with other inputs used to overwrite the first's shared `rootfs.ext4`), and
//! the script says where the image went.

use std::path::PathBuf;
use std::process::Command;

use tests::repo_root;

/// Runs the script with the cache in `cache` (no agent: quick) and returns the image path it
/// printed last, with its stderr.
fn build(cache: &std::path::Path, command: &str) -> (PathBuf, String) {
    let out = Command::new(repo_root().join("deploy/build-rootfs.sh"))
        .args([
            "--init",
            "busybox",
            "--no-agent",
            "--size",
            "16",
            "--command",
            command,
        ])
        .env("XDG_CACHE_HOME", cache)
        .output()
        .expect("running deploy/build-rootfs.sh");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "build-rootfs.sh failed: {stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().expect("a path on the last line");
    (PathBuf::from(last), stderr)
}

#[test]
fn default_images_are_keyed_by_their_inputs() {
    let cache = tempfile::tempdir().unwrap();
    let (first, stderr) = build(cache.path(), "echo first");
    assert!(
        stderr.contains(&format!("image at {}", first.display())),
        "{stderr}"
    );
    let first_bytes = std::fs::read(&first).unwrap();
    let (second, _) = build(cache.path(), "echo second");
    assert_ne!(first, second, "different inputs, one image path");
    assert!(
        first.starts_with(cache.path().join("dormouse")),
        "{first:?}"
    );
    assert_eq!(
        std::fs::read(&first).unwrap(),
        first_bytes,
        "the second run touched the first image"
    );
    // The same inputs name the same image.
    assert_eq!(build(cache.path(), "echo first").0, first);
}
