//! End-to-end tests for virtio-blk and virtio-net with the guest's stock Linux drivers.

use std::io::Read;
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::Duration;

use tests::*;

/// Reads a file out of an ext4 image with debugfs (no mount needed).
fn debugfs_cat(image: &std::path::Path, path: &str) -> Vec<u8> {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(image)
        .stderr(Stdio::null())
        .output()
        .expect("debugfs");
    assert!(out.status.success());
    out.stdout
}

#[test]
fn rootfs_on_virtio_blk_persists_writes_and_read_only_disk_refuses_them() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rootfs = build_rootfs(
        dir.path(),
        "root.ext4",
        "seq 1 3000 > /root/data.txt; sync; echo \"GUEST-SHA $(sha256sum /root/data.txt)\"; \
         if echo x | dd of=/dev/vdb bs=512 count=1 conv=fsync 2>/dev/null; then echo RO-WRITE-ACCEPTED; \
         else echo RO-WRITE-REFUSED; fi; \
         echo \"RO-READ $(dd if=/dev/vdb bs=4096 count=1 2>/dev/null | sha256sum)\"; \
         echo \"SERIAL $(cat /sys/block/vdb/serial 2>/dev/null)\"; echo GUEST-ALIVE",
    );
    let ro_disk = dir.path().join("ro.img");
    let ro_content: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    std::fs::write(&ro_disk, &ro_content).unwrap();
    let kernel = vmlinux();
    let _serial = linux_boot_lock();
    let out = run_dormouse(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--rootfs",
            rootfs.to_str().unwrap(),
            "--disk",
            &format!("path={},ro,id=ro-disk-7", ro_disk.display()),
        ],
        LINUX_BOOT_TIMEOUT,
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(
        stdout.contains("[vda]") && stdout.contains("[vdb]"),
        "{stdout}"
    );

    // The host reads back what the guest wrote, with the same checksum.
    let expected: String = (1..=3000).map(|i| format!("{i}\n")).collect();
    let data = debugfs_cat(&rootfs, "/root/data.txt");
    assert_eq!(data, expected.as_bytes());
    let sha = sha256_hex(&data);
    assert!(stdout.contains(&format!("GUEST-SHA {sha}")), "{stdout}");

    // The read-only disk: writes refused, reads correct, the guest lives on, the file unchanged.
    assert!(stdout.contains("RO-WRITE-REFUSED"), "{stdout}");
    let first_block = sha256_hex(&ro_content[..4096]);
    assert!(
        stdout.contains(&format!("RO-READ {first_block}")),
        "{stdout}"
    );
    assert!(stdout.contains("SERIAL ro-disk-7"), "{stdout}");
    assert!(stdout.contains("GUEST-ALIVE"), "{stdout}");
    assert_eq!(std::fs::read(&ro_disk).unwrap(), ro_content);
}

#[test]
fn virtio_net_on_tap_pings_and_transfers_over_tcp_in_a_netns() {
    if !require_kvm() || !require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // 20,000 lines ≈ 108 KiB, sent to the host side of the TAP.
    let rootfs = build_rootfs(
        dir.path(),
        "net.ext4",
        "ping -c 2 -W 5 172.30.0.1 >/dev/null && echo PING-OK || echo PING-FAILED; \
         seq 1 20000 > /tmp/f; echo \"GUEST-SHA $(sha256sum /tmp/f)\"; \
         nc 172.30.0.1 5555 < /tmp/f; echo NC-DONE",
    );
    let ns = NetNs::new("net");
    ns.exec(&[
        "ip", "tuntap", "add", "dev", "dmtap0", "mode", "tap", "vnet_hdr",
    ]);
    ns.exec(&["ip", "addr", "add", "172.30.0.1/30", "dev", "dmtap0"]);
    ns.exec(&["ip", "link", "set", "dmtap0", "up"]);

    // The receiver runs inside the namespace: this test process enters it on a helper thread.
    let expected: String = (1..=20000).map(|i| format!("{i}\n")).collect();
    let expected_len = expected.len();
    let ns_name = ns.name.clone();
    let receiver = std::thread::spawn(move || -> Vec<u8> {
        let f = std::fs::File::open(format!("/var/run/netns/{ns_name}")).expect("netns file");
        // SAFETY: setns on this thread only, with a namespace fd we own.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns");
        let listener = TcpListener::bind("172.30.0.1:5555").expect("bind in netns");
        let (mut conn, _) = listener.accept().expect("guest connects");
        conn.set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 65536];
        while got.len() < expected_len {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        got
    });

    let kernel = vmlinux();
    let _serial = linux_boot_lock();
    let bin = dormouse_bin();
    let mut cmd = ns.command(&bin);
    cmd.args(["run", "--kernel", kernel.to_str().unwrap(), "--rootfs"])
        .arg(&rootfs)
        .args(["--net", "tap=dmtap0,mac=02:00:00:00:00:07"])
        .args([
            "--cmdline",
            "console=ttyS0 reboot=k panic=-1 dormouse.ip=172.30.0.2/30,172.30.0.1",
        ])
        .stdin(Stdio::null());
    let out = cmd.output().expect("dormouse in netns");
    let (stdout, stderr) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(stdout.contains("PING-OK"), "{stdout}");
    let got = receiver.join().expect("receiver thread");
    assert_eq!(got.len(), expected_len);
    let sha = sha256_hex(expected.as_bytes());
    assert_eq!(sha256_hex(&got), sha);
    assert!(stdout.contains(&format!("GUEST-SHA {sha}")), "{stdout}");
    assert!(stdout.contains("NC-DONE"), "{stdout}");
}
