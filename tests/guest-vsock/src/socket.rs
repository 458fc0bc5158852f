//! Raw AF_VSOCK stream sockets over libc: the guest uses them for everything, the host tests
//! for the vhost-vsock datapath (where the host side is the kernel's vsock, not a Unix socket).

use std::io::{self, Read, Write};
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

pub const VMADDR_CID_HOST: u32 = libc::VMADDR_CID_HOST;
/// `_IO(7, 0xb9)` from <linux/vm_sockets.h>.
const IOCTL_VM_SOCKETS_GET_LOCAL_CID: libc::c_ulong = 0x7b9;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn new_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd =
        cvt(unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sockaddr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

/// (cid, port) of a socket's local or remote end.
fn name_of(fd: RawFd, peer: bool) -> io::Result<(u32, u32)> {
    let mut a = sockaddr(0, 0);
    let mut len = size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    let p = (&mut a as *mut libc::sockaddr_vm).cast::<libc::sockaddr>();
    // SAFETY: `p` points to a sockaddr_vm of `len` bytes that outlives the call.
    cvt(unsafe {
        if peer {
            libc::getpeername(fd, p, &mut len)
        } else {
            libc::getsockname(fd, p, &mut len)
        }
    })?;
    Ok((a.svm_cid, a.svm_port))
}

/// The CID this machine has (`/dev/vsock`'s ioctl).
pub fn local_cid() -> io::Result<u32> {
    let dev = std::fs::File::open("/dev/vsock")?;
    let mut cid: u32 = 0;
    // SAFETY: the ioctl writes one u32 through the pointer, which is valid for the call.
    cvt(unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            IOCTL_VM_SOCKETS_GET_LOCAL_CID as _,
            &mut cid as *mut u32,
        )
    })?;
    Ok(cid)
}

/// A connected AF_VSOCK stream.
#[derive(Debug)]
pub struct VsockStream {
    fd: OwnedFd,
}

impl VsockStream {
    pub fn connect(cid: u32, port: u32) -> io::Result<Self> {
        let fd = new_socket()?;
        let a = sockaddr(cid, port);
        // SAFETY: `a` is a valid sockaddr_vm for the duration of the call.
        cvt(unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&a as *const libc::sockaddr_vm).cast(),
                size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        })?;
        Ok(Self { fd })
    }

    /// Our (cid, port).
    pub fn local_addr(&self) -> io::Result<(u32, u32)> {
        name_of(self.fd.as_raw_fd(), false)
    }

    /// The peer's (cid, port).
    pub fn peer_addr(&self) -> io::Result<(u32, u32)> {
        name_of(self.fd.as_raw_fd(), true)
    }

    /// No more data from us; the peer reads EOF, we can still read.
    pub fn shutdown_write(&self) -> io::Result<()> {
        // SAFETY: shutdown(2) on a socket we own.
        cvt(unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_WR) }).map(drop)
    }

    /// Both directions: a blocked reader or writer on another clone wakes up.
    pub fn shutdown_both(&self) -> io::Result<()> {
        // SAFETY: shutdown(2) on a socket we own.
        cvt(unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR) }).map(drop)
    }

    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            fd: self.fd.try_clone()?,
        })
    }

    /// `None` blocks forever.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        let t = timeout.unwrap_or_default();
        let tv = libc::timeval {
            tv_sec: t.as_secs().try_into().unwrap_or(libc::time_t::MAX),
            tv_usec: t.subsec_micros().into(),
        };
        // SAFETY: `tv` is a valid timeval for the duration of the call.
        cvt(unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        })
        .map(drop)
    }
}

impl Read for &VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

impl Write for &VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            // MSG_NOSIGNAL: a peer that went away is an error to handle, not a SIGPIPE.
            // SAFETY: `buf` is valid for reads of `buf.len()` bytes.
            let n = unsafe {
                libc::send(
                    self.fd.as_raw_fd(),
                    buf.as_ptr().cast(),
                    buf.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for VsockStream {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// A listening AF_VSOCK socket on every local CID.
#[derive(Debug)]
pub struct VsockListener {
    fd: OwnedFd,
}

impl VsockListener {
    pub fn bind(port: u32, backlog: i32) -> io::Result<Self> {
        let fd = new_socket()?;
        let a = sockaddr(libc::VMADDR_CID_ANY, port);
        // SAFETY: `a` is a valid sockaddr_vm for the duration of the call.
        cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&a as *const libc::sockaddr_vm).cast(),
                size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        })?;
        // SAFETY: listen(2) on a socket we own.
        cvt(unsafe { libc::listen(fd.as_raw_fd(), backlog) })?;
        Ok(Self { fd })
    }

    /// The next connection and the peer's (cid, port).
    pub fn accept(&self) -> io::Result<(VsockStream, (u32, u32))> {
        let mut a = sockaddr(0, 0);
        let mut len = size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        loop {
            // SAFETY: `a` is a sockaddr_vm of `len` bytes that outlives the call.
            let r = unsafe {
                libc::accept4(
                    self.fd.as_raw_fd(),
                    (&mut a as *mut libc::sockaddr_vm).cast(),
                    &mut len,
                    libc::SOCK_CLOEXEC,
                )
            };
            match cvt(r) {
                Ok(fd) => {
                    // SAFETY: accept4 returned a new fd that nothing else owns.
                    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                    return Ok((VsockStream { fd }, (a.svm_cid, a.svm_port)));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl AsRawFd for VsockListener {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
