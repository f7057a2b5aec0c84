//! The two directions of the packet loop.
//!
//! Out: one TUN read (a TCP send of up to 64 KiB, cut into MTU-sized packets
//! by tun-rs) → the peer by destination (longest allowed-IP prefix, once per
//! run of packets to one address) → each packet sealed under one lock of the
//! peer → one GSO send per run.
//!
//! In: one `recvmsg` with UDP GRO (up to 64 KiB of datagrams from one
//! sender), more while there are some and room is left → the session by
//! receiver index → each opened under the peer's lock straight into a TUN
//! write buffer → coalesced into large segments (tun-rs GRO) → written.
//!
//! No channel, no task switch, no per-packet lock of the device; the only
//! allocations per packet are the ones gotatun's session makes.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::Range,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::BytesMut;
use gotatun::{
    noise::{TunnResult, handshake::parse_handshake_anon},
    packet::{Packet, WgKind},
    tun::MtuWatcher,
};
use tun_rs::{GROTable, IDEAL_BATCH_SIZE, SyncDevice, VIRTIO_NET_HDR_LEN};

use super::{
    device::{Device, Peer, Sealed, lock},
    socket::{MAX_SEGMENTS, Socket},
};

/// Largest IP packet a TUN read hands over (the device's MTU bounds segments).
const SEGMENT_BUF: usize = 4096;
/// Bytes one UDP GRO receive may hand over.
const RECV_BUF: usize = 65_535;

/// The destination address of an IP packet.
pub fn destination(ip: &[u8]) -> Option<IpAddr> {
    address(ip, 16, 24)
}

/// The source address of an IP packet.
pub fn source(ip: &[u8]) -> Option<IpAddr> {
    address(ip, 12, 8)
}

fn address(ip: &[u8], v4_at: usize, v6_at: usize) -> Option<IpAddr> {
    match ip.first()? >> 4 {
        4 => {
            let b: [u8; 4] = ip.get(v4_at..v4_at + 4)?.try_into().ok()?;
            Some(Ipv4Addr::from(b).into())
        }
        6 => {
            let b: [u8; 16] = ip.get(v6_at..v6_at + 16)?.try_into().ok()?;
            Some(Ipv6Addr::from(b).into())
        }
        _ => None,
    }
}

/// Packet buffers carved out of one allocation: a copy into it is a view of a
/// shared buffer instead of an allocation of its own, and the buffer is used
/// again once every view of it is gone (gotatun's sessions take and give
/// packets as `BytesMut`).
#[derive(Debug)]
pub struct Scratch(BytesMut);

impl Scratch {
    const SIZE: usize = 256 * 1024;

    pub fn new() -> Self {
        Self(BytesMut::with_capacity(Self::SIZE))
    }

    /// `data` zero-padded to `len` bytes.
    pub fn copy(&mut self, data: &[u8], len: usize) -> Packet {
        if self.0.capacity() < len {
            self.0.reserve(Self::SIZE);
        }
        self.0.extend_from_slice(data);
        self.0.resize(len.max(data.len()), 0);
        Packet::from_bytes(self.0.split())
    }

    /// `ip` zero-padded to a multiple of 16 bytes but not past the MTU (the
    /// padding WireGuard's whitepaper asks for).
    pub fn padded(&mut self, ip: &[u8], mtu: usize) -> Packet {
        self.copy(ip, ip.len().next_multiple_of(16).min(mtu.max(ip.len())))
    }
}

/// Whether `e` only says "nothing now" (a non-blocking or timed-out call).
pub fn would_block(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// TUN → UDP.
pub struct Outbound {
    dev: Arc<Device>,
    tun: Arc<SyncDevice>,
    raw: Vec<u8>,
    segs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    batch: Vec<Packet>,
    handshakes: Vec<WgKind>,
    scratch: Scratch,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound").finish_non_exhaustive()
    }
}

impl Outbound {
    pub fn new(dev: Arc<Device>, tun: Arc<SyncDevice>) -> Self {
        Self {
            dev,
            tun,
            raw: vec![0; VIRTIO_NET_HDR_LEN + 65_535],
            segs: vec![vec![0; SEGMENT_BUF]; IDEAL_BATCH_SIZE],
            sizes: vec![0; IDEAL_BATCH_SIZE],
            batch: Vec::with_capacity(IDEAL_BATCH_SIZE),
            handshakes: Vec::new(),
            scratch: Scratch::new(),
        }
    }

    /// One TUN read, sealed and sent.
    pub fn step(&mut self) -> io::Result<()> {
        let n = self
            .tun
            .recv_multiple(&mut self.raw, &mut self.segs, &mut self.sizes, 0)?;
        let mtu = usize::from(self.dev.mtu.load(Ordering::Relaxed));
        let mut i = 0;
        while i < n {
            let Some(dst) = destination(&self.segs[i][..self.sizes[i]]) else {
                i += 1;
                continue;
            };
            let mut j = i + 1;
            while j < n && destination(&self.segs[j][..self.sizes[j]]) == Some(dst) {
                j += 1;
            }
            self.send_run(dst, i..j, mtu);
            i = j;
        }
        Ok(())
    }

    fn send_run(&mut self, dst: IpAddr, run: Range<usize>, mtu: usize) {
        let (peer, socket) = {
            let cfg = self.dev.cfg.read().unwrap_or_else(|e| e.into_inner());
            let (Some(peer), Some(socket)) = (cfg.route(dst), cfg.socket.as_ref()) else {
                return;
            };
            (Arc::clone(peer), Arc::clone(socket))
        };
        let endpoint = {
            let mut st = lock(&peer.state);
            let Some(endpoint) = st.endpoint else {
                return;
            };
            for k in run {
                match st.seal(self.scratch.padded(&self.segs[k][..self.sizes[k]], mtu)) {
                    Sealed::Data(p) => self.batch.push(p),
                    Sealed::Handshake(h) => {
                        self.dev.register(&h, &peer);
                        self.handshakes.push(h);
                    }
                    Sealed::Nothing => {}
                }
            }
            endpoint
        };
        if let Err(e) = socket.send_batch(&self.batch, endpoint) {
            tracing::debug!(error = %e, %endpoint, "sending to a peer failed");
        }
        self.batch.clear();
        for h in self.handshakes.drain(..) {
            let _ = socket.send_to(&Packet::from(h), endpoint);
        }
    }
}

/// UDP → TUN.
pub struct Inbound {
    dev: Arc<Device>,
    tun: Arc<SyncDevice>,
    nonblocking: bool,
    rx: Vec<u8>,
    bufs: Vec<Vec<u8>>,
    count: usize,
    gro: GROTable,
    generation: u64,
    socket: Option<Arc<Socket>>,
    /// The session index and peer of the latest datagram.
    last_peer: Option<(u32, Arc<Peer>)>,
    /// The latest inner source address found allowed, and for which peer
    /// (its address, only compared).
    last_allowed: Option<(IpAddr, usize)>,
    scratch: Scratch,
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound").finish_non_exhaustive()
    }
}

impl Inbound {
    pub fn new(dev: Arc<Device>, tun: Arc<SyncDevice>, nonblocking: bool) -> Self {
        Self {
            dev,
            tun,
            nonblocking,
            rx: vec![0; RECV_BUF],
            // Each may become the head that the packets after it are
            // appended to, and tun-rs coalesces only into the capacity there is.
            bufs: (0..IDEAL_BATCH_SIZE)
                .map(|_| Vec::with_capacity(2 * VIRTIO_NET_HDR_LEN + 65_535))
                .collect(),
            count: 0,
            gro: GROTable::default(),
            generation: u64::MAX,
            socket: None,
            last_peer: None,
            last_allowed: None,
            scratch: Scratch::new(),
        }
    }

    /// The socket to read, after a configuration change too.
    pub fn socket(&mut self) -> Option<Arc<Socket>> {
        let generation = self.dev.generation.load(Ordering::Acquire);
        if generation != self.generation {
            self.generation = generation;
            self.last_peer = None;
            self.last_allowed = None;
            let cfg = self.dev.cfg.read().unwrap_or_else(|e| e.into_inner());
            self.socket = cfg.socket.clone();
            if let Some(s) = &self.socket
                && self.nonblocking
            {
                let _ = s.set_nonblocking(true);
            }
        }
        self.socket.clone()
    }

    /// Receives what there is (waiting for the first datagram unless
    /// non-blocking), opens it and writes it to the TUN device.
    pub fn step(&mut self) -> io::Result<()> {
        let Some(sock) = self.socket() else {
            if !self.nonblocking {
                std::thread::sleep(Duration::from_millis(100));
            }
            return Ok(());
        };
        let mut first = !self.nonblocking;
        let mut rx = std::mem::take(&mut self.rx);
        loop {
            let (n, segment, from) = match sock.recv(&mut rx, !first) {
                Ok(r) => r,
                Err(e) if would_block(&e) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "receiving from the WireGuard socket failed");
                    break;
                }
            };
            first = false;
            for start in (0..n).step_by(segment) {
                let d = &rx[start..(start + segment).min(n)];
                self.datagram(d, from, &sock)?;
            }
            if self.count + MAX_SEGMENTS > self.bufs.len() {
                break;
            }
        }
        self.rx = rx;
        self.flush()
    }

    fn datagram(&mut self, d: &[u8], from: SocketAddr, sock: &Socket) -> io::Result<()> {
        if d.len() < 32 || d[..4] != [4, 0, 0, 0] {
            self.control(d, from, sock);
            return Ok(());
        }
        let index = u32::from_le_bytes([d[4], d[5], d[6], d[7]]);
        let peer = match &self.last_peer {
            Some((i, p)) if *i == index => Arc::clone(p),
            _ => {
                let Some(p) = lock(&self.dev.by_index).get(&index).cloned() else {
                    return Ok(());
                };
                self.last_peer = Some((index, Arc::clone(&p)));
                p
            }
        };
        let packet = {
            let mut st = lock(&peer.state);
            let Some(packet) = st.open(d, &mut self.scratch) else {
                return Ok(());
            };
            // Roaming: an authenticated packet says where the peer is now.
            if st.endpoint != Some(from) {
                st.endpoint = Some(from);
            }
            packet
        };
        if packet.is_empty() {
            return Ok(()); // a keepalive
        }
        // Accepted only from an address routed to this very peer.
        let Some(src) = source(&packet) else {
            return Ok(());
        };
        if self.last_allowed != Some((src, Arc::as_ptr(&peer) as usize)) {
            let cfg = self.dev.cfg.read().unwrap_or_else(|e| e.into_inner());
            if !cfg.route(src).is_some_and(|p| Arc::ptr_eq(p, &peer)) {
                return Ok(());
            }
            self.last_allowed = Some((src, Arc::as_ptr(&peer) as usize));
        }
        let buf = &mut self.bufs[self.count];
        buf.clear();
        buf.resize(VIRTIO_NET_HDR_LEN, 0);
        buf.extend_from_slice(&packet);
        self.count += 1;
        if self.count == self.bufs.len() {
            self.flush()?;
        }
        Ok(())
    }

    /// A handshake initiation or response or a cookie reply.
    fn control(&mut self, d: &[u8], from: SocketAddr, sock: &Socket) {
        let cfg = self.dev.cfg.read().unwrap_or_else(|e| e.into_inner());
        let Some(key) = &cfg.key else {
            return;
        };
        let kind = match key
            .limiter
            .verify_packet(from, Packet::from_bytes(BytesMut::from(d)))
        {
            Ok(k) => k,
            // Under load: the sender is to prove its address first.
            Err(TunnResult::WriteToNetwork(cookie)) => {
                let _ = sock.send_to(&Packet::from(cookie), from);
                return;
            }
            Err(_) => return,
        };
        let peer = match &kind {
            WgKind::HandshakeInit(p) => parse_handshake_anon(&key.secret, &key.public, p)
                .ok()
                .and_then(|h| cfg.peers.get(&h.peer_static_public).cloned()),
            WgKind::HandshakeResp(p) => {
                lock(&self.dev.by_index).get(&p.receiver_idx.get()).cloned()
            }
            WgKind::CookieReply(p) => lock(&self.dev.by_index).get(&p.receiver_idx.get()).cloned(),
            WgKind::Data(_) => None,
        };
        let Some(peer) = peer else {
            return;
        };
        let mut st = lock(&peer.state);
        let Some(tunn) = st.tunn.as_mut() else {
            return;
        };
        if let TunnResult::WriteToNetwork(reply) = tunn.handle_incoming_packet(kind) {
            let mut mtu = MtuWatcher::new(self.dev.mtu.load(Ordering::Relaxed));
            let queued: Vec<WgKind> = tunn.get_queued_packets(&mut mtu).collect();
            st.endpoint = Some(from);
            self.dev.register(&reply, &peer);
            drop(st);
            drop(cfg);
            let _ = sock.send_to(&Packet::from(reply), from);
            for q in queued {
                let _ = sock.send_to(&Packet::from(q), from);
            }
        }
    }

    /// Writes what was opened, coalesced.
    pub fn flush(&mut self) -> io::Result<()> {
        if self.count == 0 {
            return Ok(());
        }
        let r = self.tun.send_multiple(
            &mut self.gro,
            &mut self.bufs[..self.count],
            VIRTIO_NET_HDR_LEN,
        );
        self.count = 0;
        match r {
            Err(e) if e.raw_os_error() == Some(libc::EBADFD) => Err(e),
            Err(e) => {
                tracing::debug!(error = %e, "writing to the TUN device failed");
                Ok(())
            }
            Ok(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_of_ipv4_and_ipv6_packets() {
        let mut v4 = vec![0u8; 20];
        v4[0] = 0x45;
        v4[12..16].copy_from_slice(&[10, 1, 0, 5]);
        v4[16..20].copy_from_slice(&[10, 2, 0, 7]);
        assert_eq!(source(&v4), Some("10.1.0.5".parse().unwrap()));
        assert_eq!(destination(&v4), Some("10.2.0.7".parse().unwrap()));
        let mut v6 = vec![0u8; 40];
        v6[0] = 0x60;
        v6[8..24].copy_from_slice(&"fd00::1".parse::<Ipv6Addr>().unwrap().octets());
        v6[24..40].copy_from_slice(&"fd00::2".parse::<Ipv6Addr>().unwrap().octets());
        assert_eq!(source(&v6), Some("fd00::1".parse().unwrap()));
        assert_eq!(destination(&v6), Some("fd00::2".parse().unwrap()));
        assert_eq!(destination(&v4[..10]), None, "too short");
        assert_eq!(destination(&[0x10; 40]), None, "not IP");
    }

    #[test]
    fn padding_stops_at_the_mtu_and_buffers_are_views_of_one() {
        let mut s = Scratch::new();
        assert_eq!(s.padded(&[1; 20], 1420).len(), 32);
        assert_eq!(s.padded(&[1; 32], 1420).len(), 32);
        assert_eq!(s.padded(&[1; 1415], 1420).len(), 1420);
        let p = s.padded(&[1; 17], 1420);
        assert_eq!(&p[..17], &[1; 17]);
        assert_eq!(&p[17..], &[0; 15]);
        // Past the buffer's size: a new one, the old views stay intact.
        let held: Vec<Packet> = (0..400).map(|i| s.copy(&[i as u8; 1000], 1000)).collect();
        assert!(
            held.iter()
                .enumerate()
                .all(|(i, p)| p.iter().all(|&b| b == i as u8))
        );
    }
}
