//! PID 1's network duties from the kernel command line: eth0's address, prefix and default
//! route (`dormouse.ip=ADDR/PREFIX[,GATEWAY]`) and the resolver (`dormouse.dns=IP[,IP…]`).
//! Done by the agent itself with a few ioctls, so every image has a network whether or not it
//! ships `ip` or a shell (a container image often has neither), and without the fork + exec a
//! boot script would cost (~0.5 s in an emulated guest kernel).

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::str::FromStr;

/// The interface `dormouse.ip` configures: the first virtio-net device.
pub const INTERFACE: &str = "eth0";

/// The file `dormouse.dns` writes.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// At most this many `nameserver` lines: the C library reads no more (MAXNS).
pub const MAX_NAMESERVERS: usize = 3;

/// `ADDR/PREFIX[,GATEWAY]` (IPv4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Setup {
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
}

impl Ipv4Setup {
    /// The netmask of `prefix` (e.g. 30 → 255.255.255.252).
    pub fn netmask(&self) -> Ipv4Addr {
        let bits = u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0);
        Ipv4Addr::from(bits)
    }
}

impl FromStr for Ipv4Setup {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let (interface, gateway) = match value.split_once(',') {
            Some((interface, gateway)) => (interface, Some(gateway)),
            None => (value, None),
        };
        let (address, prefix) = interface
            .split_once('/')
            .ok_or_else(|| format!("`{interface}` has no /PREFIX"))?;
        let address: Ipv4Addr = address
            .parse()
            .map_err(|_| format!("`{address}` is not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|prefix| (1..=32).contains(prefix))
            .ok_or_else(|| format!("prefix `{prefix}` is not 1-32"))?;
        let gateway = gateway
            .map(|gateway| {
                gateway
                    .parse::<Ipv4Addr>()
                    .map_err(|_| format!("gateway `{gateway}` is not an IPv4 address"))
            })
            .transpose()?;
        Ok(Self {
            address,
            prefix,
            gateway,
        })
    }
}

/// `IP[,IP…]`: at most [`MAX_NAMESERVERS`] addresses, IPv4 or IPv6.
pub fn parse_nameservers(value: &str) -> Result<Vec<IpAddr>, String> {
    let servers = value
        .split(',')
        .map(|server| {
            server
                .parse::<IpAddr>()
                .map_err(|_| format!("`{server}` is not an IP address"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if servers.len() > MAX_NAMESERVERS {
        return Err(format!("more than {MAX_NAMESERVERS} name servers"));
    }
    Ok(servers)
}

/// The text of a resolv.conf naming `servers`.
pub fn resolv_conf_text(servers: &[IpAddr]) -> String {
    let mut text = String::from("# written by dormouse-agent from dormouse.dns=\n");
    for server in servers {
        text.push_str(&format!("nameserver {server}\n"));
    }
    text
}

/// Replaces `path` (a symlink to a resolver daemon's file included: there is no daemon here)
/// with a resolv.conf naming `servers`, through a temporary file and a rename.
pub fn write_resolv_conf(path: &Path, servers: &[IpAddr]) -> io::Result<()> {
    let temporary = path.with_extension("dormouse-tmp");
    std::fs::write(&temporary, resolv_conf_text(servers))?;
    std::fs::rename(&temporary, path)
}

/// Gives `interface` its address and netmask, brings it up, and adds the default route via the
/// gateway, if any.
pub fn configure(interface: &str, setup: &Ipv4Setup) -> io::Result<()> {
    let socket = Socket::new()?;
    let mut request = interface_request(interface)?;
    request.ifr_ifru.ifru_addr = sockaddr_of(setup.address);
    socket.ioctl(libc::SIOCSIFADDR, &mut request, "set address")?;
    request.ifr_ifru.ifru_netmask = sockaddr_of(setup.netmask());
    socket.ioctl(libc::SIOCSIFNETMASK, &mut request, "set netmask")?;
    let mut request = interface_request(interface)?;
    socket.ioctl(libc::SIOCGIFFLAGS, &mut request, "read flags")?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    socket.ioctl(libc::SIOCSIFFLAGS, &mut request, "bring up")?;
    if let Some(gateway) = setup.gateway {
        // SAFETY: an all-zero rtentry is valid: no device, zero destination and mask.
        let mut route: libc::rtentry = unsafe { std::mem::zeroed() };
        route.rt_dst = sockaddr_of(Ipv4Addr::UNSPECIFIED);
        route.rt_genmask = sockaddr_of(Ipv4Addr::UNSPECIFIED);
        route.rt_gateway = sockaddr_of(gateway);
        route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        socket.ioctl(libc::SIOCADDRT, &mut route, "add the default route")?;
    }
    Ok(())
}

fn interface_request(interface: &str) -> io::Result<libc::ifreq> {
    // SAFETY: an all-zero ifreq is valid; the name is copied in below.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    if interface.len() >= request.ifr_name.len() || interface.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name `{interface}`"),
        ));
    }
    for (slot, byte) in request.ifr_name.iter_mut().zip(interface.bytes()) {
        *slot = byte as libc::c_char;
    }
    Ok(request)
}

fn sockaddr_of(address: Ipv4Addr) -> libc::sockaddr {
    // SAFETY: an all-zero sockaddr_in is valid.
    let mut inet: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    inet.sin_family = libc::AF_INET as libc::sa_family_t;
    inet.sin_addr.s_addr = u32::from(address).to_be();
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes); the kernel reads the
    // address family to know which it is.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(inet) }
}

/// An AF_INET datagram socket for the configuration ioctls, closed on drop.
struct Socket(std::os::fd::OwnedFd);

impl Socket {
    fn new() -> io::Result<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket creation.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd == -1 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        Ok(Self(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }))
    }

    fn ioctl<T>(&self, request: libc::c_ulong, argument: &mut T, what: &str) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: each caller passes the structure its request reads or writes (ifreq or
        // rtentry), owned for the duration of the call.
        let rc = unsafe { libc::ioctl(self.0.as_raw_fd(), request, argument as *mut T) };
        if rc == -1 {
            let err = io::Error::last_os_error();
            return Err(io::Error::new(err.kind(), format!("{what}: {err}")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_address_prefix_and_gateway() {
        let setup: Ipv4Setup = "172.30.0.2/30,172.30.0.1".parse().unwrap();
        assert_eq!(setup.address, Ipv4Addr::new(172, 30, 0, 2));
        assert_eq!(setup.prefix, 30);
        assert_eq!(setup.gateway, Some(Ipv4Addr::new(172, 30, 0, 1)));
        assert_eq!(setup.netmask(), Ipv4Addr::new(255, 255, 255, 252));
        let setup: Ipv4Setup = "10.0.0.5/8".parse().unwrap();
        assert_eq!(setup.gateway, None);
        assert_eq!(setup.netmask(), Ipv4Addr::new(255, 0, 0, 0));
        let host: Ipv4Setup = "10.0.0.5/32".parse().unwrap();
        assert_eq!(host.netmask(), Ipv4Addr::BROADCAST);
    }

    #[test]
    fn rejects_malformed_settings() {
        for bad in [
            "172.30.0.2",
            "172.30.0.2/0",
            "172.30.0.2/33",
            "172.30.0.2/x",
            "300.1.1.1/24",
            "10.0.0.2/24,gw",
            "::1/64",
            "",
        ] {
            assert!(bad.parse::<Ipv4Setup>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn nameservers() {
        let servers = parse_nameservers("172.30.0.1,2001:db8::1").unwrap();
        assert_eq!(servers.len(), 2);
        assert_eq!(
            resolv_conf_text(&servers),
            "# written by dormouse-agent from dormouse.dns=\n\
             nameserver 172.30.0.1\nnameserver 2001:db8::1\n"
        );
        assert!(parse_nameservers("1.1.1.1,x").is_err());
        assert!(parse_nameservers("").is_err());
        assert!(parse_nameservers("1.1.1.1,1.1.1.2,1.1.1.3,1.1.1.4").is_err());
    }

    #[test]
    fn resolv_conf_replaces_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("stub-resolv.conf");
        std::fs::write(&target, "nameserver 127.0.0.53\n").unwrap();
        let path = dir.path().join("resolv.conf");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        write_resolv_conf(&path, &["10.0.0.1".parse().unwrap()]).unwrap();
        assert!(!path.is_symlink());
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .contains("nameserver 10.0.0.1\n"));
        // The file it pointed to is left alone.
        assert_eq!(
            std::fs::read_to_string(&target).unwrap(),
            "nameserver 127.0.0.53\n"
        );
    }

    #[test]
    fn interface_names_are_bounded() {
        assert!(interface_request("eth0").is_ok());
        assert!(interface_request("a-very-long-interface-name").is_err());
    }
}
