//! The page cache between samples: each timed snapshot starts with the previous samples'
//! writes on disk, so no sample is throttled by another's writeback.

use std::path::Path;

use anyhow::Context;

/// Waits until the file system holding `path` has written back its dirty data (`syncfs`).
pub(crate) fn flush_file_system(path: &Path) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    let dir = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: syncfs on an fd we own.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("syncfs on {}", path.display()));
    }
    Ok(())
}

/// Whether this machine is itself a guest whose virtio-balloon reports free pages to its host
/// (`VIRTIO_BALLOON_F_REPORTING`, feature bit 5, negotiated): page-cache pages taken from
/// reported blocks fault in at that outer host again, so a sample writing into them runs
/// several times slower than one reusing recently freed pages, whatever the VMM. `sysfs` is
/// normally "/sys".
pub(crate) fn host_balloon_reports_free_pages(sysfs: &Path) -> bool {
    const VIRTIO_ID_BALLOON: &str = "0x0005";
    const VIRTIO_BALLOON_F_REPORTING: usize = 5;
    let Ok(devices) = std::fs::read_dir(sysfs.join("bus/virtio/devices")) else {
        return false;
    };
    devices.flatten().any(|device| {
        let read = |name: &str| std::fs::read_to_string(device.path().join(name));
        let is_balloon = read("device").is_ok_and(|id| id.trim() == VIRTIO_ID_BALLOON);
        // `features` is one character per feature bit, bit 0 first.
        is_balloon
            && read("features")
                .is_ok_and(|bits| bits.as_bytes().get(VIRTIO_BALLOON_F_REPORTING) == Some(&b'1'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(sysfs: &Path, name: &str, id: &str, features: &str) {
        let dir = sysfs.join("bus/virtio/devices").join(name);
        std::fs::create_dir_all(&dir).expect("device dir");
        std::fs::write(dir.join("device"), format!("{id}\n")).expect("device id");
        std::fs::write(dir.join("features"), format!("{features}\n")).expect("features");
    }

    #[test]
    fn only_a_balloon_with_free_page_reporting_counts() {
        let sysfs = tempfile::tempdir().expect("tempdir");
        assert!(
            !host_balloon_reports_free_pages(sysfs.path()),
            "no virtio bus"
        );
        device(sysfs.path(), "virtio0", "0x0002", "0000010000");
        assert!(
            !host_balloon_reports_free_pages(sysfs.path()),
            "a disk, not a balloon"
        );
        device(sysfs.path(), "virtio1", "0x0005", "0110100000");
        assert!(
            !host_balloon_reports_free_pages(sysfs.path()),
            "a balloon without reporting"
        );
        device(sysfs.path(), "virtio2", "0x0005", "0110010100");
        assert!(host_balloon_reports_free_pages(sysfs.path()));
    }
}
