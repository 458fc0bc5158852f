//! A Linux TAP interface opened through `/dev/net/tun`, in the mode virtio-net needs: Ethernet
//! frames, no packet-info prefix, each frame preceded by a 12-byte `virtio_net_hdr_v1`.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::rxtx::TapIo;
use super::VNET_HDR_LEN;

const TUN_PATH: &str = "/dev/net/tun";

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("invalid TAP name {0:?}: must be 1 to 15 bytes without NUL")]
    InvalidName(String),
    #[error("opening {TUN_PATH}: {0}")]
    OpenTun(#[source] io::Error),
    #[error("attaching to or creating TAP {name}: {source}")]
    SetIff {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("descriptor {fd} is not a usable TAP: {why}")]
    NotTap { fd: RawFd, why: String },
    #[error("setting the virtio-net header size on TAP {name}: {source}")]
    VnetHdrSize {
        name: String,
        #[source]
        source: io::Error,
    },
}

#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to TAP `name`, creating it if missing (needs CAP_NET_ADMIN). The fd is
    /// non-blocking. The interface's addresses and link state are the host's business.
    pub fn open(name: &str) -> Result<Self, TapError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(TapError::InvalidName(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(TapError::OpenTun)?;
        // SAFETY: ifreq is plain old data; all-zeroes is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags =
            (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one `ifreq`, which `ifr` is and outlives the call;
        // the fd is a valid, owned /dev/net/tun fd.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
        if ret < 0 {
            return Err(TapError::SetIff {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        // The kernel writes back the name it used (the same, unless a pattern like tap%d).
        // SAFETY: ifr_name is NUL-terminated: the kernel keeps it shorter than IFNAMSIZ, and we
        // wrote fewer than IFNAMSIZ bytes into a zeroed array.
        let name = unsafe { CStr::from_ptr(ifr.ifr_name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        let tap = Self { file, name };
        tap.set_vnet_hdr_size(VNET_HDR_LEN as libc::c_int)
            .map_err(|source| TapError::VnetHdrSize {
                name: tap.name.clone(),
                source,
            })?;
        Ok(tap)
    }

    /// Takes an already-open TAP descriptor (`--net fd=N`: a jail opens the TAP as root and
    /// hands it to the unprivileged VMM). The device works on a duplicate, so the caller's
    /// descriptor stays its own. The descriptor must be a TAP opened in virtio-net's mode
    /// (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, as [`Tap::open`] does) and, when `expected_name` is
    /// not empty, attached to that interface; anything else (a file, a socket, a TUN, stdio) is
    /// refused, so the option gives nothing an already-open descriptor did not.
    pub fn from_fd(fd: RawFd, expected_name: &str) -> Result<Self, TapError> {
        let not_tap = |why: String| TapError::NotTap { fd, why };
        if fd < 3 {
            return Err(not_tap(
                "standard input, output and error are not TAPs".into(),
            ));
        }
        // SAFETY: F_DUPFD_CLOEXEC takes a descriptor and a lowest number; a bad descriptor is
        // an error return.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
        if dup < 0 {
            return Err(not_tap(io::Error::last_os_error().to_string()));
        }
        // SAFETY: `dup` is a fresh descriptor that nothing else owns.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(dup) };
        // SAFETY: ifreq is plain old data; all-zeroes is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        // SAFETY: TUNGETIFF writes one `ifreq`, which `ifr` is and outlives the call; a
        // descriptor of another kind answers with an error.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNGETIFF, &mut ifr) } < 0 {
            return Err(not_tap(format!(
                "not a TUN/TAP descriptor ({})",
                io::Error::last_os_error()
            )));
        }
        // SAFETY: the kernel wrote a NUL-terminated name shorter than IFNAMSIZ.
        let name = unsafe { CStr::from_ptr(ifr.ifr_name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: TUNGETIFF filled the flags member of the union.
        let flags = i32::from(unsafe { ifr.ifr_ifru.ifru_flags });
        let wanted = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if flags & wanted != wanted {
            return Err(not_tap(format!(
                "{name} was not opened as a TAP with IFF_NO_PI and IFF_VNET_HDR"
            )));
        }
        if !expected_name.is_empty() && expected_name != name {
            return Err(not_tap(format!("it is {name}, not {expected_name}")));
        }
        // SAFETY: F_GETFL/F_SETFL on our own descriptor.
        unsafe {
            let fl = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
            if fl < 0 || libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
                return Err(not_tap(io::Error::last_os_error().to_string()));
            }
        }
        let tap = Self { file, name };
        tap.set_vnet_hdr_size(VNET_HDR_LEN as libc::c_int)
            .map_err(|source| TapError::VnetHdrSize {
                name: tap.name.clone(),
                source,
            })?;
        Ok(tap)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Size of the virtio-net header the kernel prepends/expects on every frame.
    pub fn set_vnet_hdr_size(&self, size: libc::c_int) -> io::Result<()> {
        // SAFETY: TUNSETVNETHDRSZ reads one c_int through the pointer, valid for the call.
        let ret = unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// What the TAP may hand us: what the guest said it can receive (TUN_F_* flags).
pub trait TapOffload {
    fn set_offload(&self, flags: libc::c_uint) -> io::Result<()>;
}

impl TapOffload for Tap {
    fn set_offload(&self, flags: libc::c_uint) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned int) and touches no
        // memory of ours.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl TapIo for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.file.write(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Offload flags for the TAP from the guest's acked virtio-net features.
pub fn offload_flags(acked_features: u64) -> libc::c_uint {
    use virtio_bindings::virtio_net::{
        VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    };
    let has = |bit: u32| acked_features & (1u64 << bit) != 0;
    // The kernel rejects TSO without checksum offload, and so does the virtio spec.
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if has(VIRTIO_NET_F_GUEST_TSO4) {
        flags |= libc::TUN_F_TSO4;
    }
    if has(VIRTIO_NET_F_GUEST_TSO6) {
        flags |= libc::TUN_F_TSO6;
    }
    flags
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_net::*;

    #[test]
    fn offloads_follow_guest_features() {
        assert_eq!(offload_flags(0), 0);
        assert_eq!(
            offload_flags(1 << VIRTIO_NET_F_GUEST_TSO4),
            0,
            "TSO needs CSUM"
        );
        assert_eq!(
            offload_flags(1 << VIRTIO_NET_F_GUEST_CSUM),
            libc::TUN_F_CSUM
        );
        assert_eq!(
            offload_flags(
                (1 << VIRTIO_NET_F_GUEST_CSUM)
                    | (1 << VIRTIO_NET_F_GUEST_TSO4)
                    | (1 << VIRTIO_NET_F_GUEST_TSO6)
                    | (1 << VIRTIO_NET_F_HOST_TSO4)
            ),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
        );
    }

    #[test]
    fn invalid_names_are_rejected_before_any_syscall() {
        for name in ["", "a-name-that-is-too-long", "nul\0"] {
            assert!(matches!(Tap::open(name), Err(TapError::InvalidName(_))));
        }
    }

    #[test]
    fn descriptors_that_are_not_taps_are_refused() {
        let file = File::open("/proc/self/status").unwrap();
        for (fd, name) in [(0, ""), (2, ""), (file.as_raw_fd(), ""), (9999, "")] {
            assert!(
                matches!(Tap::from_fd(fd, name), Err(TapError::NotTap { .. })),
                "{fd}"
            );
        }
    }

    /// Needs CAP_NET_ADMIN and /dev/net/tun; reports and returns when they are missing.
    #[test]
    fn an_open_tap_is_taken_over_by_descriptor() {
        let name = format!("dmf{}", std::process::id() % 100_000);
        let tap = match Tap::open(&name) {
            Ok(tap) => tap,
            Err(e) => {
                eprintln!("skipping TAP test: {e}");
                return;
            }
        };
        let taken = Tap::from_fd(tap.as_raw_fd(), &name).unwrap();
        assert_eq!(taken.name(), name);
        assert_ne!(taken.as_raw_fd(), tap.as_raw_fd(), "a duplicate");
        assert_eq!(Tap::from_fd(tap.as_raw_fd(), "").unwrap().name(), name);
        assert!(matches!(
            Tap::from_fd(tap.as_raw_fd(), "other0"),
            Err(TapError::NotTap { .. })
        ));
        taken.set_offload(libc::TUN_F_CSUM).unwrap();
        drop(tap);
        // The duplicate outlives the original.
        taken.set_offload(0).unwrap();
    }

    /// Needs CAP_NET_ADMIN and /dev/net/tun; reports and returns when they are missing.
    #[test]
    fn creates_a_tap_with_vnet_header_and_offloads() {
        let name = format!("dmt{}", std::process::id() % 100_000);
        let tap = match Tap::open(&name) {
            Ok(tap) => tap,
            Err(e) => {
                eprintln!("skipping TAP test: {e}");
                return;
            }
        };
        assert_eq!(tap.name(), name);
        tap.set_offload(libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6)
            .unwrap();
        tap.set_offload(0).unwrap();
        // Non-blocking: nothing to read yet.
        let mut tap = tap;
        let err = tap.read_frame(&mut [0u8; 128]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }
}
