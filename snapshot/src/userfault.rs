//! A minimal `userfaultfd(2)` binding: missing-page faults of anonymous memory, resolved by
//! copying bytes in (`UFFDIO_COPY`) or mapping the zero page (`UFFDIO_ZEROPAGE`), and
//! write-protect faults (`UFFDIO_WRITEPROTECT`, for live snapshots).
//!
//! Written here rather than taken from the `userfaultfd` crate: that crate generates its
//! bindings with bindgen at build time (libclang on every build host), while the handful of
//! ioctls and structs this needs are a stable kernel ABI (`include/uapi/linux/userfaultfd.h`).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const UFFD_API: u64 = 0xAA;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1;
const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1;
const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_EVENT_REMOVE: u8 = 0x15;
/// `_IOWR(0xAA, 0x3F, struct uffdio_api)`.
const UFFDIO_API: u64 = 0xC018_AA3F;
/// `_IOWR(0xAA, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: u64 = 0xC020_AA00;
/// `_IOR(0xAA, 0x01, struct uffdio_range)`.
const UFFDIO_UNREGISTER: u64 = 0x8010_AA01;
/// `_IOWR(0xAA, 0x03, struct uffdio_copy)`.
const UFFDIO_COPY: u64 = 0xC028_AA03;
/// `_IOWR(0xAA, 0x04, struct uffdio_zeropage)`.
const UFFDIO_ZEROPAGE: u64 = 0xC020_AA04;
/// `_IOWR(0xAA, 0x06, struct uffdio_writeprotect)`.
const UFFDIO_WRITEPROTECT: u64 = 0xC018_AA06;

/// The ioctl request numbers, for seccomp allowlists.
pub const IOCTLS: [u64; 6] = [
    UFFDIO_API,
    UFFDIO_REGISTER,
    UFFDIO_UNREGISTER,
    UFFDIO_COPY,
    UFFDIO_ZEROPAGE,
    UFFDIO_WRITEPROTECT,
];

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg` (packed, 32 bytes); only page faults are read from it.
const MSG_LEN: usize = 32;

/// A page fault: the faulting address (not page aligned), and whether it was a write to a
/// write-protected page (otherwise the page was missing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageFault {
    pub address: u64,
    pub write_protect: bool,
}

/// A message read from a userfaultfd ([`Userfaultfd::read_events`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UffdEvent {
    Fault(PageFault),
    /// `[start, end)` is being discarded (`MADV_DONTNEED`/`MADV_REMOVE`).
    Remove {
        start: u64,
        end: u64,
    },
}

/// A userfaultfd file descriptor.
#[derive(Debug)]
pub struct Userfaultfd(OwnedFd);

impl Userfaultfd {
    /// A non-blocking, close-on-exec userfaultfd that handles faults from the kernel too (KVM
    /// touches guest memory through `get_user_pages`), which needs `CAP_SYS_PTRACE` or
    /// `vm.unprivileged_userfaultfd = 1`.
    pub fn new() -> io::Result<Self> {
        Self::with_features(0)
    }

    /// As [`Userfaultfd::new`], for write-protect faults, also reporting pages discarded with
    /// `madvise` ([`UffdEvent::Remove`]; the discarding thread waits until it is read): fails
    /// where the kernel cannot (before Linux 5.7, or without `CONFIG_HAVE_ARCH_USERFAULTFD_WP`).
    pub fn new_write_protect() -> io::Result<Self> {
        Self::with_features(UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_EVENT_REMOVE)
    }

    fn with_features(features: u64) -> io::Result<Self> {
        // SAFETY: the syscall takes only flags and returns a new fd or -1.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = RawFd::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
        // SAFETY: the kernel just returned this fd to us; nothing else owns it.
        let uffd = Self(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ..Default::default()
        };
        uffd.ioctl(UFFDIO_API, &mut api)?;
        Ok(uffd)
    }

    fn ioctl<T>(&self, request: u64, arg: &mut T) -> io::Result<()> {
        // SAFETY: `request` is one of this module's ioctls, each taking a pointer to the
        // `#[repr(C)]` struct `T` it is called with; the struct outlives the call.
        let rc = unsafe {
            libc::ioctl(
                self.0.as_raw_fd(),
                request as libc::c_ulong,
                std::ptr::from_mut(arg),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reports missing-page faults in `[start, start + len)` (page aligned, anonymous memory).
    pub fn register_missing(&self, start: u64, len: u64) -> io::Result<()> {
        let mut register = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        self.ioctl(UFFDIO_REGISTER, &mut register)
    }

    /// Reports writes to write-protected pages in `[start, start + len)` (page aligned,
    /// anonymous memory); nothing is protected until [`Userfaultfd::write_protect`].
    pub fn register_write_protect(&self, start: u64, len: u64) -> io::Result<()> {
        let mut register = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        self.ioctl(UFFDIO_REGISTER, &mut register)
    }

    /// Write-protects the present pages of `[start, start + len)` (registered for
    /// write-protect): a write to one blocks its thread and is reported as a fault.
    pub fn write_protect(&self, start: u64, len: u64) -> io::Result<()> {
        self.change_protection(start, len, UFFDIO_WRITEPROTECT_MODE_WP)
    }

    /// Lifts the write protection of `[start, start + len)` and wakes the threads waiting to
    /// write there.
    pub fn unprotect(&self, start: u64, len: u64) -> io::Result<()> {
        self.change_protection(start, len, 0)
    }

    fn change_protection(&self, start: u64, len: u64, mode: u64) -> io::Result<()> {
        let mut protect = UffdioWriteprotect {
            range: UffdioRange { start, len },
            mode,
        };
        loop {
            match self.ioctl(UFFDIO_WRITEPROTECT, &mut protect) {
                // The address space changed under the call (e.g. a fork elsewhere): retry.
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => continue,
                other => return other,
            }
        }
    }

    /// Stops reporting faults in the range: from then on missing pages fill as ordinary memory.
    pub fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        let mut range = UffdioRange { start, len };
        self.ioctl(UFFDIO_UNREGISTER, &mut range)
    }

    /// Copies `src` to the missing pages at `dst` and wakes the threads waiting on them.
    /// `dst` and `src.len()` must be page aligned. Pages already present are an `EEXIST`
    /// error; the bytes before them were copied (the count is returned in the error's place
    /// by [`Userfaultfd::copy_skipping_present`]).
    fn copy_once(&self, dst: u64, src: &[u8]) -> (io::Result<()>, u64) {
        let mut copy = UffdioCopy {
            dst,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            mode: 0,
            copy: 0,
        };
        let result = self.ioctl(UFFDIO_COPY, &mut copy);
        (result, u64::try_from(copy.copy).unwrap_or(0))
    }

    /// Copies `src` into the missing pages at `dst`, leaving pages already present as they
    /// are (a page the guest discarded and faulted again is filled by the caller).
    pub fn copy_skipping_present(&self, dst: u64, src: &[u8], page_size: u64) -> io::Result<()> {
        let len = src.len() as u64;
        let mut done = 0u64;
        while done < len {
            // Both are below `src.len()`, a usize.
            let rest = &src[done as usize..];
            let (result, copied) = self.copy_once(dst + done, rest);
            match result {
                Ok(()) => return Ok(()),
                Err(e) => match e.raw_os_error() {
                    // Interrupted by a change of the address space: what was copied counts.
                    Some(libc::EAGAIN) | Some(libc::EINTR) => done += copied,
                    // The page at `done + copied` is present: skip it.
                    Some(libc::EEXIST) => done += copied + page_size,
                    _ => return Err(e),
                },
            }
        }
        Ok(())
    }

    /// Maps the zero page at the missing pages of `[start, start + len)`; present pages stay.
    pub fn zero(&self, start: u64, len: u64, page_size: u64) -> io::Result<()> {
        let mut done = 0u64;
        while done < len {
            let mut zero = UffdioZeropage {
                range: UffdioRange {
                    start: start + done,
                    len: len - done,
                },
                mode: 0,
                zeropage: 0,
            };
            match self.ioctl(UFFDIO_ZEROPAGE, &mut zero) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    let mapped = u64::try_from(zero.zeropage).unwrap_or(0);
                    match e.raw_os_error() {
                        Some(libc::EAGAIN) | Some(libc::EINTR) => done += mapped,
                        Some(libc::EEXIST) => done += mapped + page_size,
                        _ => return Err(e),
                    }
                }
            }
        }
        Ok(())
    }

    /// Reads pending page faults into `out` (cleared first) without blocking. Other events
    /// (none are requested) are skipped.
    pub fn read_faults(&self, out: &mut Vec<PageFault>) -> io::Result<()> {
        out.clear();
        self.read_messages(|msg| {
            if let Some(fault) = parse_fault(msg) {
                out.push(fault);
            }
        })
    }

    /// Reads pending faults and remove events into `out` (cleared first) without blocking.
    pub fn read_events(&self, out: &mut Vec<UffdEvent>) -> io::Result<()> {
        out.clear();
        self.read_messages(|msg| {
            if let Some(event) = parse_event(msg) {
                out.push(event);
            }
        })
    }

    fn read_messages(&self, mut each: impl FnMut(&[u8])) -> io::Result<()> {
        let mut buf = [0u8; MSG_LEN * 16];
        loop {
            // SAFETY: `buf` is writable for its whole length for the duration of the call.
            let n = unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EAGAIN) => Ok(()),
                    Some(libc::EINTR) => continue,
                    _ => Err(e),
                };
            }
            // Non-negative and at most `buf.len()`.
            let n = n as usize;
            if n == 0 {
                return Ok(());
            }
            buf[..n].chunks_exact(MSG_LEN).for_each(&mut each);
            if n < buf.len() {
                return Ok(());
            }
        }
    }

    /// Waits until faults are pending or `wake` becomes readable, at most `timeout_ms`.
    /// Returns whether `wake` is readable.
    pub fn wait(&self, wake: RawFd, timeout_ms: i32) -> io::Result<bool> {
        let mut fds = [
            libc::pollfd {
                fd: self.0.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wake,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd structs for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                return Ok(false);
            }
            return Err(e);
        }
        Ok(fds[1].revents & libc::POLLIN != 0)
    }
}

fn parse_event(msg: &[u8]) -> Option<UffdEvent> {
    match *msg.first()? {
        UFFD_EVENT_PAGEFAULT => parse_fault(msg).map(UffdEvent::Fault),
        UFFD_EVENT_REMOVE => {
            // arg.remove: start at byte 8, end at byte 16.
            let start = u64::from_ne_bytes(msg.get(8..16)?.try_into().ok()?);
            let end = u64::from_ne_bytes(msg.get(16..24)?.try_into().ok()?);
            Some(UffdEvent::Remove { start, end })
        }
        _ => None,
    }
}

fn parse_fault(msg: &[u8]) -> Option<PageFault> {
    if msg.first() != Some(&UFFD_EVENT_PAGEFAULT) {
        return None;
    }
    // arg.pagefault: flags at byte 8, address at byte 16.
    let flags = u64::from_ne_bytes(msg.get(8..16)?.try_into().ok()?);
    let address = u64::from_ne_bytes(msg.get(16..24)?.try_into().ok()?);
    Some(PageFault {
        address,
        write_protect: flags & UFFD_PAGEFAULT_FLAG_WP != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_abi() {
        fn iowr(nr: u64, size: usize) -> u64 {
            (3 << 30) | ((size as u64) << 16) | (0xAA << 8) | nr
        }
        assert_eq!(UFFDIO_API, iowr(0x3F, std::mem::size_of::<UffdioApi>()));
        assert_eq!(
            UFFDIO_REGISTER,
            iowr(0x00, std::mem::size_of::<UffdioRegister>())
        );
        assert_eq!(UFFDIO_COPY, iowr(0x03, std::mem::size_of::<UffdioCopy>()));
        assert_eq!(
            UFFDIO_ZEROPAGE,
            iowr(0x04, std::mem::size_of::<UffdioZeropage>())
        );
        assert_eq!(
            UFFDIO_WRITEPROTECT,
            iowr(0x06, std::mem::size_of::<UffdioWriteprotect>())
        );
        assert_eq!(
            UFFDIO_UNREGISTER,
            (2 << 30) | (16 << 16) | (0xAA << 8) | 0x01
        );
    }

    #[test]
    fn a_page_fault_message_is_parsed_and_others_are_skipped() {
        let mut msg = [0u8; MSG_LEN];
        msg[0] = UFFD_EVENT_PAGEFAULT;
        msg[16..24].copy_from_slice(&0x7f00_1234_5678u64.to_ne_bytes());
        assert_eq!(
            parse_fault(&msg),
            Some(PageFault {
                address: 0x7f00_1234_5678,
                write_protect: false,
            })
        );
        msg[8..16].copy_from_slice(&(UFFD_PAGEFAULT_FLAG_WP | 1).to_ne_bytes());
        assert_eq!(
            parse_fault(&msg).map(|f| f.write_protect),
            Some(true),
            "a write to a protected page"
        );
        msg[0] = 0x13;
        assert_eq!(parse_fault(&msg), None);
        assert_eq!(parse_event(&msg), None);
        msg[0] = UFFD_EVENT_REMOVE;
        msg[8..16].copy_from_slice(&0x1000u64.to_ne_bytes());
        msg[16..24].copy_from_slice(&0x5000u64.to_ne_bytes());
        assert_eq!(
            parse_event(&msg),
            Some(UffdEvent::Remove {
                start: 0x1000,
                end: 0x5000
            })
        );
    }
}
