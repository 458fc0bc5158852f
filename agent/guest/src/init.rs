//! Duties of the agent when it runs as PID 1: mount the pseudo file
//! systems, make sure stdio exists, set the hostname, bring up loopback,
//! and read its options from the kernel command line.
//!
//! Syscalls are slow in the guest (~0.28 ms each), so the common path does
//! the minimum: one `mount` per file system, with `mkdir` only on ENOENT.

use std::ffi::CStr;
use std::io;
use std::path::PathBuf;

use crate::listen::ListenAddr;
use crate::network::{parse_nameservers, Ipv4Setup};
use crate::proto::ShutdownAction;
use crate::ready::ReadyTarget;

/// A file system PID 1 mounts.
struct Mount {
    source: &'static CStr,
    target: &'static CStr,
    fstype: &'static CStr,
    flags: libc::c_ulong,
    data: &'static CStr,
}

const NOSUID_NODEV_NOEXEC: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;

/// In order: later targets live inside earlier ones (/dev/pts in /dev).
const MOUNTS: &[Mount] = &[
    Mount {
        source: c"proc",
        target: c"/proc",
        fstype: c"proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: c"",
    },
    Mount {
        source: c"sysfs",
        target: c"/sys",
        fstype: c"sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: c"",
    },
    Mount {
        source: c"devtmpfs",
        target: c"/dev",
        fstype: c"devtmpfs",
        flags: libc::MS_NOSUID,
        data: c"mode=0755",
    },
    Mount {
        source: c"devpts",
        target: c"/dev/pts",
        fstype: c"devpts",
        flags: libc::MS_NOSUID | libc::MS_NOEXEC,
        data: c"mode=0620,ptmxmode=0666",
    },
    Mount {
        source: c"tmpfs",
        target: c"/dev/shm",
        fstype: c"tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: c"mode=1777",
    },
    Mount {
        source: c"tmpfs",
        target: c"/tmp",
        fstype: c"tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: c"mode=1777",
    },
    Mount {
        source: c"tmpfs",
        target: c"/run",
        fstype: c"tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: c"mode=0755",
    },
];

/// Mounts /proc, /sys, /dev, /dev/pts, /dev/shm, /tmp and /run. Already
/// mounted (EBUSY) is fine; other failures are skipped and returned as
/// messages (this runs before logging is set up).
/// What the agent as PID 1 does when a signal reaches it, by busybox init's convention, so the
/// busybox applets in the rootfs work from a shell: `reboot` sends SIGTERM, `halt` SIGUSR1,
/// `poweroff` SIGUSR2. Other signals are only forwarded to the agent's children.
pub fn power_action_for_signal(signal: i32) -> Option<ShutdownAction> {
    match signal {
        libc::SIGTERM => Some(ShutdownAction::Reboot),
        libc::SIGUSR1 | libc::SIGUSR2 => Some(ShutdownAction::PowerOff),
        _ => None,
    }
}

pub fn mount_pseudo_filesystems() -> Vec<String> {
    let mut failures = Vec::new();
    for mount in MOUNTS {
        let mut result = mount_one(mount);
        if matches!(&result, Err(err) if err.raw_os_error() == Some(libc::ENOENT)) {
            // SAFETY: mkdir reads a NUL-terminated path.
            unsafe { libc::mkdir(mount.target.as_ptr(), 0o755) };
            result = mount_one(mount);
        }
        match result {
            Ok(()) => {}
            Err(err) if err.raw_os_error() == Some(libc::EBUSY) => {}
            Err(err) => failures.push(format!("mount {:?}: {err}", mount.target)),
        }
    }
    failures
}

fn mount_one(mount: &Mount) -> io::Result<()> {
    // SAFETY: every pointer is a NUL-terminated static string.
    let rc = unsafe {
        libc::mount(
            mount.source.as_ptr(),
            mount.target.as_ptr(),
            mount.fstype.as_ptr(),
            mount.flags,
            mount.data.as_ptr().cast(),
        )
    };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Points any closed fd among 0, 1, 2 at /dev/console (or /dev/null), so
/// logs never land in a socket that happened to get fd 2.
pub fn ensure_stdio() {
    for fd in 0..=2 {
        // SAFETY: F_GETFD only queries the descriptor table.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1 {
            continue;
        }
        // open() returns the lowest free descriptor, i.e. this one.
        // SAFETY: static NUL-terminated paths.
        let opened = unsafe { libc::open(c"/dev/console".as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
        if opened == -1 {
            // SAFETY: as above.
            unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
        }
    }
}

/// sethostname(2).
pub fn set_hostname(name: &str) -> io::Result<()> {
    // SAFETY: sethostname reads `len` bytes from the pointer.
    let rc = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets IFF_UP on `lo` so guest programs can use 127.0.0.1.
pub fn bring_up_loopback() -> io::Result<()> {
    // SAFETY: plain socket creation.
    let socket = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if socket == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: an all-zero ifreq is valid; the name is copied in below.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: the ioctls read/write the ifreq we own; the socket is ours.
    let result = unsafe {
        if libc::ioctl(socket, libc::SIOCGIFFLAGS, &mut request) == -1 {
            Err(io::Error::last_os_error())
        } else {
            request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(socket, libc::SIOCSIFFLAGS, &request) == -1 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        }
    };
    // SAFETY: closing the socket created above.
    unsafe { libc::close(socket) };
    result
}

/// Agent options, from the kernel command line and/or argv.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentOptions {
    pub listen: ListenAddr,
    /// `None` disables the readiness notification.
    pub ready: Option<ReadyTarget>,
    pub hostname: String,
    /// tracing filter directive, e.g. `info` or `agent=debug`.
    pub log: String,
    /// A boot script started once the agent listens (network set-up, a console shell, a
    /// one-shot command). PID 1 defaults to [`DEFAULT_RC`] when that file exists.
    pub rc: Option<PathBuf>,
    /// eth0's address and default route (`dormouse.ip=ADDR/PREFIX[,GATEWAY]`).
    pub ip: Option<Ipv4Setup>,
    /// Name servers for /etc/resolv.conf (`dormouse.dns=IP[,IP…]`); empty: the file is left alone.
    pub dns: Vec<std::net::IpAddr>,
}

/// The boot script PID 1 starts when it exists (`dormouse.rc=none` turns it off).
pub const DEFAULT_RC: &str = "/etc/dormouse/rc";

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            listen: ListenAddr::default(),
            ready: Some(ReadyTarget::default()),
            hostname: "dormouse".to_owned(),
            log: "info".to_owned(),
            rc: None,
            ip: None,
            dns: Vec::new(),
        }
    }
}

impl AgentOptions {
    /// Applies `dormouse.*` keys from a kernel command line:
    /// `dormouse.port=N` (vsock listen port), `dormouse.ready_port=N`,
    /// `dormouse.ready_cid=N`, `dormouse.ready=0` (disable),
    /// `dormouse.hostname=NAME`, `dormouse.log=FILTER`, `dormouse.rc=PATH|none`,
    /// `dormouse.ip=ADDR/PREFIX[,GATEWAY]`, `dormouse.dns=IP[,IP…]`. Unknown or malformed
    /// values are ignored (logged by the caller via the returned list).
    pub fn apply_kernel_cmdline(&mut self, cmdline: &str) -> Vec<String> {
        let mut ignored = Vec::new();
        for word in cmdline.split_whitespace() {
            let Some(setting) = word.strip_prefix("dormouse.") else {
                continue;
            };
            let Some((key, value)) = setting.split_once('=') else {
                ignored.push(word.to_owned());
                continue;
            };
            if !self.apply(key, value) {
                ignored.push(word.to_owned());
            }
        }
        ignored
    }

    /// Applies one `key=value`; false when not understood.
    fn apply(&mut self, key: &str, value: &str) -> bool {
        match key {
            "port" => value
                .parse()
                .map(|port| self.listen = ListenAddr::Vsock(port))
                .is_ok(),
            "ready_port" => match (value.parse(), self.ready.as_mut()) {
                (Ok(port), Some(target)) => {
                    target.port = port;
                    true
                }
                (Ok(_), None) => true,
                (Err(_), _) => false,
            },
            "ready_cid" => match (value.parse(), self.ready.as_mut()) {
                (Ok(cid), Some(target)) => {
                    target.cid = cid;
                    true
                }
                (Ok(_), None) => true,
                (Err(_), _) => false,
            },
            "ready" if value == "0" || value == "off" => {
                self.ready = None;
                true
            }
            "hostname" if !value.is_empty() => {
                self.hostname = value.to_owned();
                true
            }
            "log" if !value.is_empty() => {
                self.log = value.to_owned();
                true
            }
            "rc" if value == "none" || value == "0" => {
                self.rc = None;
                true
            }
            "ip" => value.parse().map(|ip| self.ip = Some(ip)).is_ok(),
            "dns" => parse_nameservers(value)
                .map(|servers| self.dns = servers)
                .is_ok(),
            "rc" if value.starts_with('/') => {
                self.rc = Some(PathBuf::from(value));
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busybox_power_signals_map_to_actions() {
        assert_eq!(
            power_action_for_signal(libc::SIGTERM),
            Some(ShutdownAction::Reboot)
        );
        assert_eq!(
            power_action_for_signal(libc::SIGUSR1),
            Some(ShutdownAction::PowerOff)
        );
        assert_eq!(
            power_action_for_signal(libc::SIGUSR2),
            Some(ShutdownAction::PowerOff)
        );
        assert_eq!(power_action_for_signal(libc::SIGINT), None);
        assert_eq!(power_action_for_signal(libc::SIGHUP), None);
    }

    #[test]
    fn kernel_cmdline_options() {
        let mut options = AgentOptions::default();
        let ignored = options.apply_kernel_cmdline(
            "console=ttyS0 root=/dev/vda dormouse.ready_port=2000 dormouse.ready_cid=3 \
             dormouse.port=5000 dormouse.hostname=box dormouse.log=debug dormouse.bogus=1 dormouse.flag \
             dormouse.rc=/etc/boot dormouse.rc=relative",
        );
        assert_eq!(options.listen, ListenAddr::Vsock(5000));
        assert_eq!(options.ready, Some(ReadyTarget { cid: 3, port: 2000 }));
        assert_eq!(options.hostname, "box");
        assert_eq!(options.log, "debug");
        assert_eq!(options.rc, Some(PathBuf::from("/etc/boot")));
        assert_eq!(
            ignored,
            ["dormouse.bogus=1", "dormouse.flag", "dormouse.rc=relative"]
        );
        options.apply_kernel_cmdline("dormouse.rc=none");
        assert_eq!(options.rc, None);
    }

    #[test]
    fn network_options() {
        let mut options = AgentOptions::default();
        let ignored = options.apply_kernel_cmdline(
            "dormouse.ip=172.30.0.2/30,172.30.0.1 dormouse.dns=172.30.0.1 dormouse.dns=x",
        );
        let ip = options.ip.unwrap();
        assert_eq!(ip.address, std::net::Ipv4Addr::new(172, 30, 0, 2));
        assert_eq!(ip.gateway, Some(std::net::Ipv4Addr::new(172, 30, 0, 1)));
        assert_eq!(
            options.dns,
            ["172.30.0.1".parse::<std::net::IpAddr>().unwrap()]
        );
        // A malformed value is reported and leaves the earlier one in place.
        assert_eq!(ignored, ["dormouse.dns=x"]);
        assert_eq!(
            options.apply_kernel_cmdline("dormouse.ip=172.30.0.2"),
            ["dormouse.ip=172.30.0.2"]
        );
    }

    #[test]
    fn readiness_can_be_disabled() {
        let mut options = AgentOptions::default();
        options.apply_kernel_cmdline("dormouse.ready=0 dormouse.ready_port=7");
        assert_eq!(options.ready, None);
    }
}
