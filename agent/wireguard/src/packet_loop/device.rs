//! The device the packet loop serves: its key, port and peers, each peer with
//! its WireGuard sessions (gotatun's [`Tunn`]), the routes by allowed IPs and
//! the peers by session index. Changed by [`Device::set`] (UAPI `set=1`),
//! read by [`Device::get`] (`get=1`).
//!
//! A new private key does not end the sessions made with the old one: each
//! peer's tunnel is kept as `retired` and still seals and opens packets until
//! the peer has made a session with the new key (or [`RETIRE_AFTER`] passes),
//! so traffic does not wait for the handshake that the new key needs. New
//! handshakes use the new key only.
use std::{
    cmp::Reverse,
    collections::{BTreeMap, HashMap, HashSet},
    fmt::Write as _,
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU16, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use gotatun::{
    device::uapi::command::{Set, SetPeer, SetUnset},
    noise::{
        Tunn, TunnResult, errors::WireGuardError, index_table::IndexTable,
        rate_limiter::RateLimiter,
    },
    packet::{Packet, WgKind},
    x25519::{PublicKey, StaticSecret},
};
use ipnetwork::IpNetwork;

use super::{datapath::Scratch, socket::Socket};

/// Handshakes per second from all peers before the device asks for cookies
/// (the figure gotatun's own device uses).
const HANDSHAKE_RATE_LIMIT: u64 = 100;

/// The longest a tunnel of a replaced private key keeps carrying traffic.
pub const RETIRE_AFTER: Duration = Duration::from_secs(60);

/// How long a retired tunnel still opens late packets once the new key's
/// session is up.
pub const RETIRE_GRACE: Duration = Duration::from_secs(5);

/// The device's private key.
pub struct Key {
    pub secret: StaticSecret,
    pub public: PublicKey,
    /// Checks handshake MACs and answers with cookies under load.
    pub limiter: Arc<RateLimiter>,
}

impl Key {
    fn new(secret: [u8; 32]) -> Self {
        let secret = StaticSecret::from(secret);
        let public = PublicKey::from(&secret);
        let limiter = Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT));
        Self {
            secret,
            public,
            limiter,
        }
    }
}

/// What `set=1` configures.
#[derive(Default)]
pub struct Config {
    pub key: Option<Key>,
    /// The port asked for (0: any).
    pub port: u16,
    pub fwmark: Option<u32>,
    pub peers: BTreeMap<[u8; 32], Arc<Peer>>,
    /// Every allowed IP with its peer, longest prefix first.
    pub routes: Vec<(IpNetwork, Arc<Peer>)>,
    /// Bound once there is a key or a port.
    pub socket: Option<Arc<Socket>>,
}

impl Config {
    /// The peer that `ip` is routed to (longest prefix).
    pub fn route(&self, ip: IpAddr) -> Option<&Arc<Peer>> {
        self.routes
            .iter()
            .find(|(net, _)| net.contains(ip))
            .map(|(_, p)| p)
    }
}

/// A peer and its sessions.
pub struct Peer {
    pub public_key: [u8; 32],
    pub state: Mutex<PeerState>,
}

/// A peer's mutable part, locked per packet run.
#[derive(Default)]
pub struct PeerState {
    /// Its sessions with the device's key (none while the device has no key).
    pub tunn: Option<Tunn>,
    /// Its sessions with the key before the latest change, and since when.
    pub retired: Option<(Tunn, Instant)>,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNetwork>,
    pub keepalive: u16,
    pub psk: Option<[u8; 32]>,
    /// Bytes counted by tunnels that are gone (a key change replaces the tunnel).
    past_tx: u64,
    past_rx: u64,
}

/// What sealing one packet for a peer gave.
pub enum Sealed {
    /// A data packet to send.
    Data(Packet),
    /// No session: the packet waits in the tunnel's queue, and this
    /// handshake initiation is to be sent.
    Handshake(WgKind),
    /// Dropped, or queued while a handshake is under way.
    Nothing,
}

impl PeerState {
    /// Seals `packet` (an IP packet, padded) with the current session, else
    /// with the retired key's session, else starts a handshake.
    pub fn seal(&mut self, packet: Packet) -> Sealed {
        let Some(tunn) = self.tunn.as_mut() else {
            return Sealed::Nothing;
        };
        let packet = match tunn.encapsulate_with_session(packet) {
            Ok(p) => return Sealed::Data(p.into_bytes()),
            Err(p) => p,
        };
        let packet = match self.retired.as_mut() {
            Some((old, _)) => match old.encapsulate_with_session(packet) {
                Ok(p) => return Sealed::Data(p.into_bytes()),
                Err(p) => p,
            },
            None => packet,
        };
        match tunn.handle_outgoing_packet(packet, None) {
            Some(p) => Sealed::Handshake(p),
            None => Sealed::Nothing,
        }
    }

    /// Opens one data datagram: the IP packet inside (empty for a keepalive).
    pub fn open(&mut self, datagram: &[u8], scratch: &mut Scratch) -> Option<Packet> {
        let tunn = self.tunn.as_mut()?;
        let packet = scratch.copy(datagram, datagram.len()).try_into_wg().ok()?;
        match tunn.handle_incoming_packet(packet) {
            TunnResult::WriteToTunnel(p) => Some(p),
            TunnResult::Err(WireGuardError::NoCurrentSession) => {
                let (old, _) = self.retired.as_mut()?;
                let packet = scratch.copy(datagram, datagram.len()).try_into_wg().ok()?;
                match old.handle_incoming_packet(packet) {
                    TunnResult::WriteToTunnel(p) => Some(p),
                    _ => None,
                }
            }
            _ => None,
        }
    }

    fn retire(&mut self, fresh: Tunn, now: Instant) {
        if let Some(old) = self.tunn.replace(fresh) {
            let previous = self.retired.replace((old, now));
            self.forget(previous.map(|(t, _)| t));
        }
    }

    fn forget(&mut self, tunn: Option<Tunn>) {
        if let Some(t) = tunn {
            let (_, tx, rx, ..) = t.stats();
            self.past_tx += tx as u64;
            self.past_rx += rx as u64;
        }
    }

    /// Drops the retired tunnel once it is no longer needed.
    pub fn expire_retired(&mut self, now: Instant) {
        let Some((_, since)) = &self.retired else {
            return;
        };
        let age = now.saturating_duration_since(*since);
        let replaced = self
            .tunn
            .as_ref()
            .and_then(Tunn::time_since_last_handshake)
            .is_some_and(|d| d < age);
        if age >= RETIRE_AFTER || (replaced && age >= RETIRE_GRACE) {
            let old = self.retired.take().map(|(t, _)| t);
            self.forget(old);
        }
    }

    /// (tx, rx) bytes over all of the peer's tunnels.
    fn bytes(&self) -> (u64, u64) {
        let mut tx = self.past_tx;
        let mut rx = self.past_rx;
        for t in self.tunn.iter().chain(self.retired.iter().map(|(t, _)| t)) {
            let (_, t_tx, t_rx, ..) = t.stats();
            tx += t_tx as u64;
            rx += t_rx as u64;
        }
        (tx, rx)
    }
}

/// The device: configuration, sessions by index, and the TUN device's MTU.
pub struct Device {
    pub cfg: RwLock<Config>,
    /// Our session indices (handshakes we sent) and whose they are.
    pub by_index: Mutex<HashMap<u32, Arc<Peer>>>,
    index_table: IndexTable,
    /// Bumped by every change, so that the loops drop what they cached.
    pub generation: AtomicU64,
    pub mtu: AtomicU16,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// A UAPI errno.
pub type Errno = i32;

impl Device {
    pub fn new(mtu: u16) -> Self {
        Self {
            cfg: RwLock::default(),
            by_index: Mutex::default(),
            index_table: IndexTable::from_os_rng(),
            generation: AtomicU64::new(0),
            mtu: AtomicU16::new(mtu),
        }
    }

    /// Notes the session index of a handshake message we send for `peer`.
    pub fn register(&self, packet: &WgKind, peer: &Arc<Peer>) {
        let index = match packet {
            WgKind::HandshakeInit(p) => p.sender_idx.get(),
            WgKind::HandshakeResp(p) => p.sender_idx.get(),
            _ => return,
        };
        lock(&self.by_index).insert(index, Arc::clone(peer));
    }

    /// Forgets indices whose sessions and handshakes are gone.
    pub fn prune_indices(&self) {
        lock(&self.by_index).retain(|i, _| self.index_table.in_use(*i));
    }

    fn new_tunn(&self, key: &Key, public_key: [u8; 32], st: &PeerState) -> Tunn {
        Tunn::new(
            key.secret.clone(),
            PublicKey::from(public_key),
            st.psk,
            (st.keepalive > 0).then_some(st.keepalive),
            self.index_table.clone(),
            Arc::clone(&key.limiter),
        )
    }

    /// Applies a `set=1` request; returns its errno (0: done).
    pub fn set(&self, set: Set) -> Errno {
        if let Some(v) = &set.protocol_version
            && v != "1"
        {
            return libc::EINVAL;
        }
        let mut seen = HashSet::new();
        if !set.peers.iter().all(|p| seen.insert(p.peer.public_key.0)) {
            return libc::EINVAL;
        }
        let now = Instant::now();
        let mut cfg = self.cfg.write().unwrap_or_else(|e| e.into_inner());
        if set.replace_peers {
            cfg.peers.clear();
            lock(&self.by_index).clear();
        }
        if let Some(k) = set.private_key {
            self.set_key(&mut cfg, k.0, now);
        }
        let port_given = set.listen_port.is_some();
        if let Some(p) = set.listen_port {
            cfg.port = p;
        }
        if let Some(m) = set.fwmark {
            cfg.fwmark = match m {
                SetUnset::Set(v) => Some(v.get()),
                SetUnset::Unset => None,
            };
        }
        for p in set.peers {
            self.set_peer(&mut cfg, p);
        }
        let mut routes: Vec<(IpNetwork, Arc<Peer>)> = Vec::new();
        for peer in cfg.peers.values() {
            for net in &lock(&peer.state).allowed_ips {
                routes.push((*net, Arc::clone(peer)));
            }
        }
        routes.sort_by_key(|(net, _)| Reverse(net.prefix()));
        cfg.routes = routes;
        let errno = match self.bind(&mut cfg, port_given) {
            Ok(()) => 0,
            Err(e) => {
                tracing::warn!(port = cfg.port, error = %e, "cannot bind the WireGuard port");
                e.raw_os_error().unwrap_or(libc::EADDRINUSE)
            }
        };
        self.generation.fetch_add(1, Ordering::Release);
        errno
    }

    fn set_key(&self, cfg: &mut Config, secret: [u8; 32], now: Instant) {
        if secret == [0; 32] {
            cfg.key = None;
            for peer in cfg.peers.values() {
                let mut st = lock(&peer.state);
                let gone = st.tunn.take();
                st.forget(gone);
            }
            return;
        }
        let key = Key::new(secret);
        if cfg.key.as_ref().is_some_and(|k| k.public == key.public) {
            return;
        }
        for peer in cfg.peers.values() {
            let mut st = lock(&peer.state);
            let fresh = self.new_tunn(&key, peer.public_key, &st);
            if st.tunn.is_some() {
                st.retire(fresh, now);
            } else {
                st.tunn = Some(fresh);
            }
        }
        cfg.key = Some(key);
    }

    fn set_peer(&self, cfg: &mut Config, p: SetPeer) {
        let public_key = p.peer.public_key.0;
        if p.remove {
            if let Some(peer) = cfg.peers.remove(&public_key) {
                lock(&self.by_index).retain(|_, q| !Arc::ptr_eq(q, &peer));
            }
            return;
        }
        let peer = match cfg.peers.get(&public_key) {
            Some(peer) => Arc::clone(peer),
            None if p.update_only => return,
            None => {
                let peer = Arc::new(Peer {
                    public_key,
                    state: Mutex::default(),
                });
                cfg.peers.insert(public_key, Arc::clone(&peer));
                peer
            }
        };
        // An allowed IP belongs to one peer: the last one given it.
        for net in &p.peer.allowed_ip {
            for other in cfg.peers.values().filter(|o| !Arc::ptr_eq(o, &peer)) {
                lock(&other.state).allowed_ips.retain(|n| n != net);
            }
        }
        let mut st = lock(&peer.state);
        if let Some(e) = p.peer.endpoint {
            st.endpoint = Some(e);
        }
        if let Some(k) = p.peer.persistent_keepalive_interval {
            st.keepalive = k;
            if let Some(t) = st.tunn.as_mut() {
                t.set_persistent_keepalive(Some(k));
            }
        }
        if let Some(psk) = p.peer.preshared_key {
            st.psk = match psk {
                SetUnset::Set(k) => Some(k.0),
                SetUnset::Unset => None,
            };
            let psk = st.psk;
            if let Some(t) = st.tunn.as_mut() {
                t.set_preshared_key(psk);
            }
        }
        if p.replace_allowed_ips {
            st.allowed_ips.clear();
        }
        for net in p.peer.allowed_ip {
            if !st.allowed_ips.contains(&net) {
                st.allowed_ips.push(net);
            }
        }
        if st.tunn.is_none()
            && let Some(key) = &cfg.key
        {
            st.tunn = Some(self.new_tunn(key, public_key, &st));
        }
    }

    /// Binds the UDP socket when there is a key or a port and none is bound
    /// on that port yet; applies the fwmark.
    fn bind(&self, cfg: &mut Config, port_given: bool) -> io::Result<()> {
        let wanted = cfg.key.is_some() || port_given;
        let rebind = match &cfg.socket {
            None => wanted,
            Some(s) => cfg.port != 0 && s.port() != cfg.port,
        };
        if rebind {
            cfg.socket = Some(Arc::new(Socket::bind(cfg.port)?));
        }
        if let Some(s) = &cfg.socket {
            s.set_fwmark(cfg.fwmark)?;
        }
        Ok(())
    }

    /// The `get=1` answer, errno line included.
    pub fn get(&self) -> String {
        let cfg = self.cfg.read().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        if let Some(k) = &cfg.key {
            let _ = writeln!(out, "private_key={}", hex(&k.secret.to_bytes()));
        }
        let port = cfg.socket.as_ref().map_or(cfg.port, |s| s.port());
        let _ = writeln!(out, "listen_port={port}");
        if let Some(m) = cfg.fwmark {
            let _ = writeln!(out, "fwmark={m}");
        }
        for peer in cfg.peers.values() {
            let st = lock(&peer.state);
            let _ = writeln!(out, "public_key={}", hex(&peer.public_key));
            if let Some(psk) = &st.psk {
                let _ = writeln!(out, "preshared_key={}", hex(psk));
            }
            let _ = writeln!(out, "protocol_version=1");
            if let Some(e) = st.endpoint {
                let _ = writeln!(out, "endpoint={}", canonical(e));
            }
            let since = st
                .tunn
                .as_ref()
                .and_then(Tunn::time_since_last_handshake)
                .or_else(|| {
                    st.retired
                        .as_ref()
                        .and_then(|(t, _)| t.time_since_last_handshake())
                })
                .and_then(|d| SystemTime::now().checked_sub(d))
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .unwrap_or_default();
            let _ = writeln!(out, "last_handshake_time_sec={}", since.as_secs());
            let _ = writeln!(out, "last_handshake_time_nsec={}", since.subsec_nanos());
            let (tx, rx) = st.bytes();
            let _ = writeln!(out, "tx_bytes={tx}");
            let _ = writeln!(out, "rx_bytes={rx}");
            let _ = writeln!(out, "persistent_keepalive_interval={}", st.keepalive);
            for net in &st.allowed_ips {
                let _ = writeln!(out, "allowed_ip={}/{}", net.ip(), net.prefix());
            }
        }
        out.push_str("errno=0\n");
        out
    }

    /// Runs every peer's timers (about every 250 ms): handshake retries,
    /// rekeying, keepalives, session expiry; retires replaced tunnels.
    pub fn tick(&self) {
        let now = Instant::now();
        let cfg = self.cfg.read().unwrap_or_else(|e| e.into_inner());
        // Also without peers (whose timers reset it too): handshakes from
        // unknown senders must not leave the device "under load" for good.
        if let Some(k) = &cfg.key {
            k.limiter.try_reset_count();
        }
        for peer in cfg.peers.values() {
            let mut st = lock(&peer.state);
            st.expire_retired(now);
            let Some(endpoint) = st.endpoint else {
                continue;
            };
            let Some(tunn) = st.tunn.as_mut() else {
                continue;
            };
            match tunn.update_timers() {
                Ok(Some(packet)) => {
                    self.register(&packet, peer);
                    drop(st);
                    if let Some(s) = &cfg.socket {
                        let _ = s.send_to(&Packet::from(packet), endpoint);
                    }
                }
                Ok(None) | Err(WireGuardError::ConnectionExpired) => {}
                Err(e) => tracing::debug!(error = ?e, "WireGuard timer"),
            }
        }
        drop(cfg);
        self.prune_indices();
    }
}

/// A lock whose holder panicked is still the state to go on with.
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Lower-case hex, as the protocol writes keys.
pub fn hex(key: &[u8; 32]) -> String {
    key.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// An IPv4 peer seen through the dual-stack socket, as IPv4.
pub fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use std::str::FromStr;

    fn set(text: &str) -> Set {
        Set::from_str(text).expect("a valid set request")
    }

    fn key(b: u8) -> [u8; 32] {
        [b; 32]
    }

    fn public(secret: [u8; 32]) -> [u8; 32] {
        *PublicKey::from(&StaticSecret::from(secret)).as_bytes()
    }

    #[test]
    fn set_then_get_reports_the_configuration() {
        let d = Device::new(1420);
        let peer = public(key(2));
        let req = format!(
            "set=1\nprivate_key={}\nfwmark=7\npublic_key={}\nendpoint=192.0.2.1:51871\npersistent_keepalive_interval=25\nallowed_ip=10.2.0.0/16\nallowed_ip=fd00:2::/64\n",
            hex(&key(1)),
            hex(&peer)
        );
        assert_eq!(d.set(set(&req)), 0);
        let got = d.get();
        assert!(got.starts_with(&format!("private_key={}\nlisten_port=", hex(&key(1)))));
        assert!(got.contains("\nfwmark=7\n"), "{got}");
        assert!(got.contains(&format!("public_key={}\nprotocol_version=1\nendpoint=192.0.2.1:51871\nlast_handshake_time_sec=0\n", hex(&peer))), "{got}");
        assert!(got.contains("persistent_keepalive_interval=25\nallowed_ip=10.2.0.0/16\nallowed_ip=fd00:2::/64\nerrno=0\n"), "{got}");
        let cfg = d.cfg.read().unwrap();
        assert!(
            cfg.socket.as_ref().is_some_and(|s| s.port() != 0),
            "a key binds the port"
        );
        assert_eq!(
            cfg.route("10.2.3.4".parse().unwrap()).map(|p| p.public_key),
            Some(peer)
        );
        assert!(cfg.route("10.3.0.1".parse().unwrap()).is_none());
    }

    #[test]
    fn replace_allowed_ips_update_only_remove_and_moves() {
        let d = Device::new(1420);
        let (a, b) = (public(key(2)), public(key(3)));
        assert_eq!(
            d.set(set(&format!(
                "set=1\nprivate_key={}\npublic_key={}\nallowed_ip=10.1.0.0/16\nallowed_ip=10.9.0.0/24\npublic_key={}\nallowed_ip=10.2.0.0/16\n",
                hex(&key(1)), hex(&a), hex(&b)
            ))),
            0
        );
        // 10.9.0.0/24 moves to b; a keeps 10.1.0.0/16.
        d.set(set(&format!(
            "set=1\npublic_key={}\nallowed_ip=10.9.0.0/24\n",
            hex(&b)
        )));
        {
            let cfg = d.cfg.read().unwrap();
            assert_eq!(
                cfg.route("10.9.0.1".parse().unwrap()).map(|p| p.public_key),
                Some(b)
            );
            assert_eq!(
                cfg.route("10.1.0.1".parse().unwrap()).map(|p| p.public_key),
                Some(a)
            );
        }
        // More specific wins.
        d.set(set(&format!(
            "set=1\npublic_key={}\nreplace_allowed_ips=true\nallowed_ip=10.0.0.0/8\nallowed_ip=10.1.2.0/24\n",
            hex(&a)
        )));
        {
            let cfg = d.cfg.read().unwrap();
            assert_eq!(
                cfg.route("10.2.0.1".parse().unwrap()).map(|p| p.public_key),
                Some(b)
            );
            assert_eq!(
                cfg.route("10.1.2.1".parse().unwrap()).map(|p| p.public_key),
                Some(a)
            );
            assert_eq!(
                cfg.route("10.1.3.1".parse().unwrap()).map(|p| p.public_key),
                Some(a)
            );
        }
        let c = public(key(4));
        d.set(set(&format!(
            "set=1\npublic_key={}\nupdate_only=true\nallowed_ip=10.7.0.0/16\n",
            hex(&c)
        )));
        assert!(
            !d.cfg.read().unwrap().peers.contains_key(&c),
            "update_only adds nothing"
        );
        d.set(set(&format!(
            "set=1\npublic_key={}\nremove=true\n",
            hex(&b)
        )));
        let cfg = d.cfg.read().unwrap();
        assert_eq!(cfg.peers.len(), 1);
        assert_eq!(
            cfg.route("10.2.0.1".parse().unwrap()).map(|p| p.public_key),
            Some(a),
            "a's /8"
        );
    }

    #[test]
    fn a_new_key_keeps_the_port_and_retires_the_tunnels() {
        let d = Device::new(1420);
        let p = public(key(2));
        d.set(set(&format!(
            "set=1\nprivate_key={}\nlisten_port=0\npublic_key={}\nallowed_ip=10.1.0.0/16\n",
            hex(&key(1)),
            hex(&p)
        )));
        let port = d.cfg.read().unwrap().socket.as_ref().unwrap().port();
        d.set(set(&format!("set=1\nprivate_key={}\n", hex(&key(5)))));
        let cfg = d.cfg.read().unwrap();
        assert_eq!(cfg.socket.as_ref().unwrap().port(), port);
        assert_eq!(cfg.key.as_ref().unwrap().public.as_bytes(), &public(key(5)));
        let st = lock(&cfg.peers[&p].state);
        assert!(st.tunn.is_some() && st.retired.is_some());
    }

    #[test]
    fn bad_requests_are_refused() {
        let d = Device::new(1420);
        let p = hex(&public(key(2)));
        assert_eq!(d.set(set("set=1\nprotocol_version=2\n")), libc::EINVAL);
        assert_eq!(
            d.set(set(&format!("set=1\npublic_key={p}\npublic_key={p}\n"))),
            libc::EINVAL
        );
    }

    #[test]
    fn sessions_carry_packets_both_ways_and_survive_a_key_change() {
        // Two devices' peers, wired by hand: a handshake, data both ways,
        // then a's key changes and a's old session still carries data.
        let a = Device::new(1420);
        let b = Device::new(1420);
        let mut sc = Scratch::new();
        let (ka, kb) = (key(1), key(2));
        a.set(set(&format!(
            "set=1\nprivate_key={}\npublic_key={}\nendpoint=127.0.0.1:9\nallowed_ip=10.2.0.0/16\n",
            hex(&ka),
            hex(&public(kb))
        )));
        b.set(set(&format!(
            "set=1\nprivate_key={}\npublic_key={}\nendpoint=127.0.0.1:9\nallowed_ip=10.1.0.0/16\n",
            hex(&kb),
            hex(&public(ka))
        )));
        let pa = Arc::clone(&a.cfg.read().unwrap().peers[&public(kb)]);
        let pb = Arc::clone(&b.cfg.read().unwrap().peers[&public(ka)]);
        let ip = |len: usize| {
            let mut p = vec![0u8; len];
            p[0] = 0x45;
            Packet::from_bytes(BytesMut::from(&p[..]))
        };
        // a → b: no session, so a handshake initiation.
        let Sealed::Handshake(init) = lock(&pa.state).seal(ip(64)) else {
            panic!("expected a handshake");
        };
        let kb_key = Key::new(kb);
        let WgKind::HandshakeInit(init) = kb_key
            .limiter
            .verify_packet("127.0.0.1:1".parse().unwrap(), Packet::from(init))
            .ok()
            .unwrap()
        else {
            panic!("an initiation")
        };
        let TunnResult::WriteToNetwork(resp) = lock(&pb.state)
            .tunn
            .as_mut()
            .unwrap()
            .handle_incoming_packet(WgKind::HandshakeInit(init))
        else {
            panic!("a response")
        };
        let resp = Packet::from(resp).try_into_wg().unwrap();
        let TunnResult::WriteToNetwork(keepalive) = lock(&pa.state)
            .tunn
            .as_mut()
            .unwrap()
            .handle_incoming_packet(resp)
        else {
            panic!("a keepalive")
        };
        let opened = lock(&pb.state)
            .open(&Packet::from(keepalive), &mut sc)
            .expect("opens");
        assert!(opened.is_empty(), "a keepalive");
        let Sealed::Data(data) = lock(&pa.state).seal(ip(64)) else {
            panic!("sealed with the session")
        };
        assert_eq!(
            lock(&pb.state).open(&data, &mut sc).expect("opens").len(),
            64
        );
        // a's key changes: the old session still seals and b still opens it.
        a.set(set(&format!("set=1\nprivate_key={}\n", hex(&key(9)))));
        let Sealed::Data(data) = lock(&pa.state).seal(ip(80)) else {
            panic!("sealed with the retired session")
        };
        assert_eq!(
            lock(&pb.state).open(&data, &mut sc).expect("opens").len(),
            80
        );
        let Sealed::Data(back) = lock(&pb.state).seal(ip(96)) else {
            panic!("b seals")
        };
        assert_eq!(
            lock(&pa.state)
                .open(&back, &mut sc)
                .expect("the retired session opens")
                .len(),
            96
        );
    }
}
