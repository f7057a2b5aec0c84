//! The WireGuard UDP socket of the packet loop: dual-stack (IPv4 peers are
//! reached through mapped addresses), sending a run of equal-sized datagrams
//! to one peer with one `sendmsg` and `UDP_SEGMENT` (GSO), receiving with
//! `UDP_GRO` (one `recvmsg` hands over up to 64 KiB of datagrams of one size
//! from one sender).
//!
//! Where the kernel or the route refuses GSO (`EIO`: no checksum offload on
//! the route's device), the socket sends datagram by datagram from then on.
use std::{
    io::{self, IoSlice, IoSliceMut},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket},
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg, sendmsg, setsockopt,
    sockopt,
};
use socket2::{Domain, Protocol, Socket as RawSocket, Type};

/// Datagrams per GSO send (the kernel's UDP_MAX_SEGMENTS is 64 or more).
pub const MAX_SEGMENTS: usize = 64;
/// Bytes of datagrams per GSO send: they travel as one IP packet until cut.
const MAX_BYTES: usize = 65_000;
/// Bytes of the socket's buffers (the kernel doubles it for overhead), past
/// net.core.rmem_max/wmem_max (the process holds CAP_NET_ADMIN): a burst
/// the receiver cannot take at once waits instead of being dropped.
pub const SOCKET_BUFFER: usize = 4 << 20;
/// How long a blocking receive waits before the loop looks at the
/// configuration again (a new port means a new socket).
const RECV_TIMEOUT: Duration = Duration::from_millis(200);

/// The device's UDP socket.
#[derive(Debug)]
pub struct Socket {
    sock: UdpSocket,
    v6: bool,
    port: u16,
    /// Cleared when the kernel refuses GSO on this socket.
    gso: AtomicBool,
}

impl AsFd for Socket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

impl Socket {
    /// Binds `port` (0: any) on all addresses, IPv6 and IPv4 where the
    /// namespace has IPv6, else IPv4 only.
    pub fn bind(port: u16) -> io::Result<Self> {
        let dual = || -> io::Result<RawSocket> {
            let s = RawSocket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
            s.set_only_v6(false)?;
            s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
            Ok(s)
        };
        let (s, v6) = match dual() {
            Ok(s) => (s, true),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => return Err(e),
            Err(_) => {
                let s = RawSocket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
                s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())?;
                (s, false)
            }
        };
        let sock: UdpSocket = s.into();
        let _ = setsockopt(&sock, sockopt::RcvBufForce, &SOCKET_BUFFER);
        let _ = setsockopt(&sock, sockopt::SndBufForce, &SOCKET_BUFFER);
        // Without GRO each datagram is a receive of its own; not fatal.
        let _ = setsockopt(&sock, sockopt::UdpGroSegment, &true);
        sock.set_read_timeout(Some(RECV_TIMEOUT))?;
        let port = sock.local_addr()?.port();
        Ok(Self {
            sock,
            v6,
            port,
            gso: AtomicBool::new(true),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        self.sock.set_nonblocking(on)
    }

    pub fn set_fwmark(&self, mark: Option<u32>) -> io::Result<()> {
        setsockopt(&self.sock, sockopt::Mark, &mark.unwrap_or(0)).map_err(io::Error::from)
    }

    /// `dst` as this socket addresses it (IPv4 as mapped IPv6 on a dual-stack socket).
    fn target(&self, dst: SocketAddr) -> SocketAddr {
        match dst {
            SocketAddr::V4(a) if self.v6 => {
                SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0).into()
            }
            a => a,
        }
    }

    pub fn send_to(&self, buf: &[u8], dst: SocketAddr) -> io::Result<()> {
        self.sock.send_to(buf, self.target(dst)).map(drop)
    }

    /// Sends `packets` to `dst`: each run of equal-sized ones (see
    /// [`run_len`]) with one GSO send where the kernel takes it.
    pub fn send_batch<T: AsRef<[u8]>>(&self, packets: &[T], dst: SocketAddr) -> io::Result<()> {
        let dst = self.target(dst);
        let addr = SockaddrStorage::from(dst);
        let mut result = Ok(());
        let mut start = 0;
        let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(MAX_SEGMENTS);
        while start < packets.len() {
            let n = run_len(packets[start..].iter().map(|p| p.as_ref().len()));
            let run = &packets[start..start + n];
            start += n;
            if n > 1 && self.gso.load(Ordering::Relaxed) {
                iov.clear();
                iov.extend(run.iter().map(|p| IoSlice::new(p.as_ref())));
                let Ok(segment) = u16::try_from(run[0].as_ref().len()) else {
                    continue;
                };
                match sendmsg(
                    self.sock.as_raw_fd(),
                    &iov,
                    &[ControlMessage::UdpGsoSegments(&segment)],
                    MsgFlags::empty(),
                    Some(&addr),
                ) {
                    Ok(_) => continue,
                    Err(e) => {
                        if gso_refused(e as i32) {
                            tracing::info!(error = %e, "UDP GSO refused; sending datagram by datagram");
                            self.gso.store(false, Ordering::Relaxed);
                        } else {
                            result = Err(e.into());
                            continue;
                        }
                    }
                }
            }
            for p in run {
                if let Err(e) = self.sock.send_to(p.as_ref(), dst) {
                    result = Err(e);
                }
            }
        }
        result
    }

    /// One receive into `buf`: (bytes, datagram size, sender). The bytes are
    /// datagrams of that size back to back, the last one possibly shorter.
    pub fn recv(&self, buf: &mut [u8], dontwait: bool) -> io::Result<(usize, usize, SocketAddr)> {
        let mut iov = [IoSliceMut::new(buf)];
        let mut cmsg = nix::cmsg_space!(i32);
        let flags = if dontwait {
            MsgFlags::MSG_DONTWAIT
        } else {
            MsgFlags::empty()
        };
        let msg =
            recvmsg::<SockaddrStorage>(self.sock.as_raw_fd(), &mut iov, Some(&mut cmsg), flags)
                .map_err(io::Error::from)?;
        let n = msg.bytes;
        let mut segment = n;
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::UdpGroSegments(s) = c
                && s > 0
            {
                segment = s as usize;
            }
        }
        let from = msg.address.and_then(|a| socket_addr(&a)).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "a datagram without a sender")
        })?;
        Ok((n, segment.max(1), from))
    }
}

fn socket_addr(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddrV4::from(*v4).into());
    }
    let v6 = a.as_sockaddr_in6()?;
    let a = SocketAddr::from(SocketAddrV6::from(*v6));
    Some(SocketAddr::new(a.ip().to_canonical(), a.port()))
}

/// Whether a GSO send's error `errno` means the kernel will not take GSO
/// on this socket at all (`EIO`: no checksum offload on the route's device;
/// the others: a kernel without `UDP_SEGMENT`), rather than a failed send.
pub fn gso_refused(errno: i32) -> bool {
    matches!(errno, libc::EIO | libc::ENOPROTOOPT | libc::EOPNOTSUPP)
}

/// How many datagrams, of the sizes `lens` in sending order, one GSO send
/// takes: the same size as the first (the last may be shorter), within the
/// GSO limits. At least one: `lens` is not empty.
pub fn run_len(lens: impl IntoIterator<Item = usize>) -> usize {
    let mut lens = lens.into_iter();
    let size = lens.next().unwrap_or(0);
    let mut total = size;
    let mut n = 1;
    for len in lens {
        if n == MAX_SEGMENTS || len > size || total + len > MAX_BYTES {
            break;
        }
        total += len;
        n += 1;
        if len < size {
            break;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_end_at_a_larger_or_shorter_datagram_and_at_the_limits() {
        assert_eq!(run_len([100, 100, 100]), 3);
        assert_eq!(run_len([100, 100, 60, 100]), 3, "a shorter one ends it");
        assert_eq!(run_len([100, 120]), 1, "a larger one starts the next");
        assert_eq!(run_len([100; 100]), MAX_SEGMENTS);
        assert_eq!(run_len([1500; 60]), MAX_BYTES / 1500);
        assert_eq!(run_len([40]), 1);
    }

    #[test]
    fn gso_and_gro_carry_a_run_over_loopback() {
        let a = Socket::bind(0).expect("bind");
        let b = Socket::bind(0).expect("bind");
        let dst: SocketAddr = (Ipv4Addr::LOCALHOST, b.port()).into();
        let packets: Vec<Vec<u8>> = [1000, 1000, 1000, 400].map(|n| vec![0; n]).into();
        a.send_batch(&packets, dst).expect("send");
        let mut buf = vec![0u8; 65536];
        let mut got = 0;
        while got < 3400 {
            let (n, seg, from) = b.recv(&mut buf, false).expect("receive");
            assert_eq!(from, SocketAddr::from((Ipv4Addr::LOCALHOST, a.port())));
            assert!(seg == 1000 || n == 400, "datagram size {seg}, {n} bytes");
            got += n;
        }
        assert_eq!(got, 3400);
    }
}
