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

/// `--from oci:` on the test layout (deploy/build-oci-test-image.sh, offline): the layers are
/// unpacked with the whiteout honoured, the image config becomes the agent's exec defaults, and
/// a second run reuses the cached image until someone writes to it.
#[test]
fn oci_images_unpack_layers_and_are_reused_until_written() {
    if !tests::require_root() {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let layout = Command::new(repo_root().join("deploy/build-oci-test-image.sh"))
        .arg(scratch.path().join("layout"))
        .output()
        .expect("running deploy/build-oci-test-image.sh");
    assert!(
        layout.status.success(),
        "{}",
        String::from_utf8_lossy(&layout.stderr)
    );
    let layout = String::from_utf8_lossy(&layout.stdout)
        .lines()
        .last()
        .unwrap()
        .to_owned();
    // Any static binary stands in for the agent: the image is not booted here.
    let agent = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
        .expect("busybox-static (deploy/setup.sh installs it)");
    let cache = scratch.path().join("cache");
    let build = || {
        let out = Command::new(repo_root().join("deploy/build-rootfs.sh"))
            .args(["--from", &format!("oci:{layout}"), "--agent", agent])
            .env("XDG_CACHE_HOME", &cache)
            .output()
            .expect("running deploy/build-rootfs.sh");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "build-rootfs.sh failed: {stderr}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        (PathBuf::from(stdout.lines().last().unwrap()), stderr)
    };
    let debugfs = |image: &PathBuf, request: &str| {
        let out = Command::new("debugfs")
            .args(["-R", request])
            .arg(image)
            .output()
            .expect("debugfs (e2fsprogs)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    let (image, stderr) = build();
    assert!(!stderr.contains("(cached)"), "{stderr}");
    let defaults = debugfs(&image, "cat /etc/dormouse/exec-defaults");
    for line in [
        "env GREETING=hello from oci",
        "env PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "cwd /work",
        "user sandbox",
    ] {
        assert!(defaults.lines().any(|l| l == line), "{line}: {defaults}");
    }
    assert_eq!(
        debugfs(&image, "cat /etc/layer2.txt").trim(),
        "second layer"
    );
    assert!(
        debugfs(&image, "stat /etc/doomed.txt").is_empty(),
        "the whiteout's file is in the image"
    );
    assert!(debugfs(&image, "stat /sbin/init").contains("Type: symlink"));

    let (again, stderr) = build();
    assert_eq!(again, image);
    assert!(stderr.contains("(cached)"), "{stderr}");

    // An image booted writable is not the image the inputs make: the next run rebuilds it.
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap();
    file.write_all_at(b"\0", 1 << 20).unwrap();
    drop(file);
    let (rebuilt, stderr) = build();
    assert_eq!(rebuilt, image);
    assert!(!stderr.contains("(cached)"), "{stderr}");
}
