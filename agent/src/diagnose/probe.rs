//! The tunnel probe: an ICMP echo from an address of this node's Pod CIDR
//! to the first address of a remote node's Pod CIDR (the CNI's gateway
//! address on that node: bridge, ptp and host-local give it to the node).
//! Both addresses are pod addresses, so the request is routed into the
//! tunnel here and the reply into the tunnel there: an answer proves the
//! encapsulated path in both directions, including the firewalls between
//! the two nodes and the remote node's route back. Needs CAP_NET_RAW, or a
//! group in `net.ipv4.ping_group_range` (the kernel's ping socket).
use std::{
    io::Read,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    time::{Duration, Instant},
};

use ipnet::IpNet;
use socket2::{Domain, Protocol, Socket, Type};

/// An address of this node inside one of `cidrs` (IPv4), if any is assigned.
pub fn local_pod_address(cidrs: &[IpNet]) -> Option<Ipv4Addr> {
    let addrs = nix::ifaddrs::getifaddrs().ok()?;
    for a in addrs {
        let Some(ip) = a
            .address
            .as_ref()
            .and_then(|s| s.as_sockaddr_in())
            .map(|s| s.ip())
        else {
            continue;
        };
        if cidrs.iter().any(|c| c.contains(&IpAddr::V4(ip))) {
            return Some(ip);
        }
    }
    None
}

/// The address the probe sends to in a remote node's Pod CIDR: its first host address.
pub fn target(cidr: &IpNet) -> Option<Ipv4Addr> {
    match cidr {
        IpNet::V4(n) if n.prefix_len() < 31 => Some(Ipv4Addr::from(u32::from(n.network()) + 1)),
        _ => None,
    }
}

fn checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Why a probe gave no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeError {
    /// This process may not send ICMP (neither CAP_NET_RAW nor a group in
    /// net.ipv4.ping_group_range): the probe cannot run here.
    NotPermitted(String),
    /// Sent, and no reply came (or sending failed).
    Failed(String),
}

/// An ICMP socket: raw (CAP_NET_RAW), else the kernel's unprivileged ping
/// socket (a group in `net.ipv4.ping_group_range`); `true` for raw.
fn icmp_socket() -> Result<(Socket, bool), ProbeError> {
    match Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4)) {
        Ok(s) => Ok((s, true)),
        Err(raw) => Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::ICMPV4))
            .map(|s| (s, false))
            .map_err(|dgram| {
                ProbeError::NotPermitted(format!(
                    "cannot open an ICMP socket: raw: {raw} (needs CAP_NET_RAW), ping socket: {dgram} (needs a group in net.ipv4.ping_group_range)"
                ))
            }),
    }
}

/// Sends one echo request from `src` to `dst` and waits `wait` for its
/// reply; the round trip when it came.
pub fn echo(src: Ipv4Addr, dst: Ipv4Addr, wait: Duration) -> Result<Duration, ProbeError> {
    let failed = ProbeError::Failed;
    let (sock, raw) = icmp_socket()?;
    sock.bind(&SocketAddr::V4(SocketAddrV4::new(src, 0)).into())
        .map_err(|e| failed(format!("cannot send from {src}: {e}")))?;
    // Connected: a raw socket then receives only what `dst` sends.
    sock.connect(&SocketAddr::V4(SocketAddrV4::new(dst, 0)).into())
        .map_err(|e| failed(format!("{dst}: {e}")))?;
    // A ping socket's identifier is its own (the kernel sets it); the
    // sequence number tells the reply apart.
    let id = (std::process::id() & 0xffff) as u16;
    let seq: u16 = 0x5044; // "PD"
    let mut pkt = vec![8u8, 0, 0, 0];
    pkt.extend(id.to_be_bytes());
    pkt.extend(seq.to_be_bytes());
    pkt.extend(b"podmesh diagnose");
    let c = checksum(&pkt);
    pkt[2..4].copy_from_slice(&c.to_be_bytes());
    let started = Instant::now();
    sock.send(&pkt)
        .map_err(|e| failed(format!("sending to {dst}: {e}")))?;
    let mut buf = [0u8; 1500];
    loop {
        let left = wait.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Err(failed(format!(
                "no echo reply from {dst} to {src} within {}s",
                wait.as_secs_f64()
            )));
        }
        sock.set_read_timeout(Some(left))
            .map_err(|e| failed(e.to_string()))?;
        let n = match (&sock).read(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) => return Err(failed(format!("receiving from {dst}: {e}"))),
        };
        let p = &buf[..n];
        // A raw socket reads the IP header too; a ping socket only the ICMP message.
        let icmp = if raw {
            let ihl = usize::from(p.first().copied().unwrap_or(0) & 0x0f) * 4;
            match p.get(ihl..) {
                Some(i) if p.len() >= 20 && p[12..16] == dst.octets() => i,
                _ => continue,
            }
        } else {
            p
        };
        if icmp.len() >= 8
            && icmp[0] == 0
            && (!raw || icmp[4..6] == id.to_be_bytes())
            && icmp[6..8] == seq.to_be_bytes()
        {
            return Ok(started.elapsed());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_and_checksums() {
        assert_eq!(
            target(&"10.2.3.0/24".parse().unwrap()),
            Some(Ipv4Addr::new(10, 2, 3, 1))
        );
        assert_eq!(target(&"fd00::/64".parse().unwrap()), None);
        // RFC 1071's example.
        assert_eq!(
            checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            !0xddf2
        );
    }
}
