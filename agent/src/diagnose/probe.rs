//! The tunnel probe: an ICMP echo (ICMPv6 for an IPv6 Pod CIDR) from an
//! address of this node's Pod CIDRs of the same family to the first address
//! of a remote node's Pod CIDR (the CNI's gateway address on that node:
//! bridge, ptp and host-local give it to the node, in both families). Both
//! addresses are pod addresses, so the request is routed into the tunnel
//! (or WireGuard) here and the reply into it there: an answer proves the
//! encapsulated path in both directions, including the firewalls between
//! the two nodes and the remote node's route back. Needs CAP_NET_RAW, or a
//! group in `net.ipv4.ping_group_range` (the kernel's ping socket, for both
//! families). [`checks`] probes every Pod CIDR of a remote cluster.
use std::{
    collections::BTreeMap,
    io::Read,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use ipnet::IpNet;
use socket2::{Domain, Protocol, Socket, Type};

use super::{Check, Layer, check, wireguard};
use crate::{
    datapath::wireguard::uapi::DeviceState,
    status::{RouteStatus, StatusReport, agent_info::AgentInfo},
};

const L: Layer = Layer::Datapath;

/// Probes sent at once.
const PROBES_AT_ONCE: usize = 64;

/// An address of this node inside one of `cidrs` of `dst`'s family, if any
/// is assigned.
pub fn local_pod_address(cidrs: &[IpNet], dst: IpAddr) -> Option<IpAddr> {
    let addrs = nix::ifaddrs::getifaddrs().ok()?;
    for a in addrs {
        let Some(s) = a.address.as_ref() else {
            continue;
        };
        let ip = match (s.as_sockaddr_in(), s.as_sockaddr_in6()) {
            (Some(v4), _) => IpAddr::V4(v4.ip()),
            (_, Some(v6)) => IpAddr::V6(v6.ip()),
            _ => continue,
        };
        if ip.is_ipv4() == dst.is_ipv4() && cidrs.iter().any(|c| c.contains(&ip)) {
            return Some(ip);
        }
    }
    None
}

/// The address the probe sends to in a remote node's Pod CIDR: its first
/// host address (none in a CIDR too small to hold a gateway and pods).
pub fn target(cidr: &IpNet) -> Option<IpAddr> {
    match cidr {
        IpNet::V4(n) if n.prefix_len() < 31 => {
            Some(IpAddr::V4(Ipv4Addr::from(u32::from(n.network()) + 1)))
        }
        IpNet::V6(n) if n.prefix_len() < 127 => {
            Some(IpAddr::V6(Ipv6Addr::from(u128::from(n.network()) + 1)))
        }
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

/// An ICMP socket of `dst`'s family: raw (CAP_NET_RAW), else the kernel's
/// unprivileged ping socket (a group in `net.ipv4.ping_group_range`, which
/// governs ICMPv6 ping sockets too); `true` for raw.
fn icmp_socket(dst: IpAddr) -> Result<(Socket, bool), ProbeError> {
    let (domain, proto) = match dst {
        IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4),
        IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6),
    };
    match Socket::new(domain, Type::RAW, Some(proto)) {
        Ok(s) => Ok((s, true)),
        Err(raw) => Socket::new(domain, Type::DGRAM, Some(proto))
            .map(|s| (s, false))
            .map_err(|dgram| {
                ProbeError::NotPermitted(format!(
                    "cannot open an ICMP socket: raw: {raw} (needs CAP_NET_RAW), ping socket: {dgram} (needs a group in net.ipv4.ping_group_range)"
                ))
            }),
    }
}

/// Echo request and reply types: ICMP 8 and 0, ICMPv6 128 and 129.
fn echo_types(dst: IpAddr) -> (u8, u8) {
    match dst {
        IpAddr::V4(_) => (8, 0),
        IpAddr::V6(_) => (128, 129),
    }
}

/// The ICMP message of what a socket read: a raw IPv4 socket reads the IP
/// header too (and anything `dst`'s address family sends this host is
/// checked to come from `dst`); raw ICMPv6 and ping sockets read only the
/// message.
fn icmp_of(p: &[u8], raw: bool, dst: IpAddr) -> Option<&[u8]> {
    match dst {
        IpAddr::V4(d) if raw => {
            let ihl = usize::from(p.first().copied().unwrap_or(0) & 0x0f) * 4;
            (p.len() >= 20 && p[12..16] == d.octets())
                .then(|| p.get(ihl..))
                .flatten()
        }
        _ => Some(p),
    }
}

/// Sends one echo request from `src` to `dst` (both of one family) and
/// waits `wait` for its reply; the round trip when it came.
pub fn echo(src: IpAddr, dst: IpAddr, wait: Duration) -> Result<Duration, ProbeError> {
    let failed = ProbeError::Failed;
    let (sock, raw) = icmp_socket(dst)?;
    sock.bind(&SocketAddr::new(src, 0).into())
        .map_err(|e| failed(format!("cannot send from {src}: {e}")))?;
    // Connected: a raw socket then receives only what `dst` sends.
    sock.connect(&SocketAddr::new(dst, 0).into())
        .map_err(|e| failed(format!("{dst}: {e}")))?;
    // A ping socket's identifier is its own (the kernel sets it); the
    // sequence number tells the reply apart.
    let id = (std::process::id() & 0xffff) as u16;
    let seq: u16 = 0x5044; // "PD"
    let (request, reply) = echo_types(dst);
    let mut pkt = vec![request, 0, 0, 0];
    pkt.extend(id.to_be_bytes());
    pkt.extend(seq.to_be_bytes());
    pkt.extend(b"podmesh diagnose");
    // ICMPv6's checksum covers a pseudo-header the kernel fills in: it
    // computes it for ICMPv6 sockets of both kinds (RFC 3542, 3.1).
    if dst.is_ipv4() {
        let c = checksum(&pkt);
        pkt[2..4].copy_from_slice(&c.to_be_bytes());
    }
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
        let Some(icmp) = icmp_of(&buf[..n], raw, dst) else {
            continue;
        };
        if icmp.len() >= 8
            && icmp[0] == reply
            && (!raw || icmp[4..6] == id.to_be_bytes())
            && icmp[6..8] == seq.to_be_bytes()
        {
            return Ok(started.elapsed());
        }
    }
}

/// One probe per Pod CIDR of `cluster`'s nodes, in its family: from an
/// address of this node's Pod CIDRs of that family to the remote CIDR's
/// first address. `wg`: the WireGuard device, for the evidence of a probe
/// through it that failed.
pub async fn checks(
    cluster: &str,
    s: &StatusReport,
    info: &AgentInfo,
    wg: Option<&DeviceState>,
    wait: Duration,
) -> Vec<Check> {
    let c = Some(cluster);
    let routes: Vec<RouteStatus> = s
        .routes
        .iter()
        .filter(|r| r.cluster == cluster)
        .cloned()
        .collect();
    if routes.is_empty() || info.dry_run {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut jobs: Vec<(RouteStatus, IpAddr, IpAddr)> = Vec::new();
    let mut unsourced: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for r in routes {
        let Some(dst) = target(&r.cidr) else {
            continue;
        };
        match local_pod_address(&info.node_pod_cidrs, dst) {
            Some(src) => jobs.push((r, src, dst)),
            None => unsourced
                .entry(if dst.is_ipv4() { "IPv4" } else { "IPv6" })
                .or_default()
                .push(r.cidr.to_string()),
        }
    }
    for (family, cidrs) in unsourced {
        out.push(Check::pass(
            L,
            c,
            check::TUNNEL_PROBE,
            format!(
                "skipped for {}: no {family} address of this node's Pod CIDRs ({}) is assigned here to send from",
                cidrs.join(", "),
                info.node_pod_cidrs
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    // A bounded number of probes at once (each waits up to `wait`).
    let mut results = Vec::with_capacity(jobs.len());
    for chunk in jobs.chunks(PROBES_AT_ONCE) {
        let tasks: Vec<_> = chunk
            .iter()
            .cloned()
            .map(|(r, src, dst)| {
                tokio::task::spawn_blocking(move || (r, src, dst, echo(src, dst, wait)))
            })
            .collect();
        for t in tasks {
            if let Ok(res) = t.await {
                results.push(res);
            }
        }
    }
    let port = info.tunnel_port;
    let local = info
        .node_addresses
        .first()
        .map(ToString::to_string)
        .unwrap_or_else(|| "this node".into());
    for (r, src, dst, res) in results {
        // Through WireGuard: the node publishes a key and this agent encrypts.
        let wg_key = s.wireguard.as_ref().and(r.wireguard_public_key.as_deref());
        let path = match (wg_key, info.datapath.as_str()) {
            (Some(_), _) => "WireGuard",
            (None, "direct") => "the direct route",
            (None, _) => "the tunnel",
        };
        out.push(match res {
            Ok(rtt) => Check::pass(L, c, check::TUNNEL_PROBE, format!("node {} ({}): {src} -> {dst} answered in {:.1} ms through {path} to {}", r.node, r.cidr, rtt.as_secs_f64() * 1000.0, r.node_addr)),
            Err(ProbeError::NotPermitted(e)) => Check::pass(
                L,
                c,
                check::TUNNEL_PROBE,
                format!("skipped for node {} ({}): {e}", r.node, r.cidr),
            ),
            Err(ProbeError::Failed(e)) => Check::fail(
                L,
                c,
                check::TUNNEL_PROBE,
                format!(
                    "node {} ({}, {} endpoint {}): {e}{}",
                    r.node,
                    r.cidr,
                    if wg_key.is_some() { "WireGuard" } else { "tunnel" },
                    r.node_addr,
                    match (wg_key, wg) {
                        (Some(k), Some(d)) => wireguard::peer_evidence(d, k),
                        _ => String::new(),
                    }
                ),
                match (wg_key, s.wireguard.as_ref()) {
                    (Some(_), Some(w)) => format!("the WireGuard path between {local} and {} is broken: UDP {} (wireguard-port) must pass both ways between the two nodes (firewalls, security groups, nft/iptables on either node), every cluster must use the same wireguard-port, and the remote node must hold this node's current key and route this node's Pod CIDR back (run podmesh diagnose there); its CNI gives the node the first address of its Pod CIDR, which this probe pings", r.node_addr, w.port),
                    _ if info.datapath == "direct" => format!("packets between {local} and {} are dropped: firewalls and security groups must pass traffic between the two nodes' Pod CIDRs; the remote node must route this node's Pod CIDR back (run podmesh diagnose there)", r.node_addr),
                    _ => format!("the encapsulated path between {local} and {} is broken: UDP {port} (tunnel-port) must pass both ways between the two nodes (firewalls, security groups, nft/iptables on either node), every cluster must use the same tunnel-port and vni; the remote node must route this node's Pod CIDR back (run podmesh diagnose there); its CNI gives the node the first address of its Pod CIDR, which this probe pings", r.node_addr),
                },
            ),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_and_checksums() {
        assert_eq!(
            target(&"10.2.3.0/24".parse().unwrap()),
            Some(IpAddr::V4(Ipv4Addr::new(10, 2, 3, 1)))
        );
        assert_eq!(
            target(&"fd00:2:0:3::/64".parse().unwrap()),
            Some("fd00:2:0:3::1".parse().unwrap())
        );
        assert_eq!(target(&"10.2.3.4/31".parse().unwrap()), None);
        assert_eq!(target(&"fd00::/127".parse().unwrap()), None);
        assert_eq!(echo_types("fd00::1".parse().unwrap()), (128, 129));
        // RFC 1071's example.
        assert_eq!(
            checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            !0xddf2
        );
    }
}
