//! The WireGuard configuration protocol (UAPI) over a unix socket, as `wg(8)` speaks it to
//! wireguard-go and gotatun: <https://www.wireguard.com/xplatform/#configuration-protocol>.
//!
//! One request per connection: `get=1` reads the device (keys in hex, one
//! `public_key=` line starting each peer), `set=1` changes it; both end with
//! an empty line and are answered with `errno=N` and an empty line.
use std::{
    collections::BTreeSet,
    io::{self, BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use ipnet::IpNet;

/// How long one exchange may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// A peer as the device reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerState {
    /// Its public key.
    pub public_key: [u8; 32],
    /// Where the device sends to.
    pub endpoint: Option<SocketAddr>,
    /// The ranges routed to it (and accepted from it).
    pub allowed_ips: BTreeSet<IpNet>,
    /// Seconds since the epoch of the latest handshake (0: none yet).
    pub last_handshake_sec: u64,
    /// Bytes received from it.
    pub rx_bytes: u64,
    /// Bytes sent to it.
    pub tx_bytes: u64,
}

/// The device as `get=1` reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceState {
    /// Its private key, when set.
    pub private_key: Option<[u8; 32]>,
    /// Its UDP port.
    pub listen_port: u16,
    /// Its peers.
    pub peers: Vec<PeerState>,
}

/// A change of a peer, for [`set`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerChange {
    /// Add the peer, or replace its endpoint and allowed IPs.
    Upsert {
        /// Its public key.
        public_key: [u8; 32],
        /// Where to send.
        endpoint: SocketAddr,
        /// What it may send and receive.
        allowed_ips: BTreeSet<IpNet>,
    },
    /// Remove the peer.
    Remove([u8; 32]),
}

/// Lower-case hex of a key, as the protocol writes keys.
pub fn hex(key: &[u8; 32]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn exchange(sock: &Path, request: &str) -> io::Result<Vec<(String, String)>> {
    let mut s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    s.write_all(request.as_bytes())?;
    let mut lines = Vec::new();
    for line in BufReader::new(s).lines() {
        let line = line?;
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once('=') {
            lines.push((k.to_string(), v.to_string()));
        }
    }
    match lines.iter().rev().find(|(k, _)| k == "errno") {
        Some((_, v)) if v == "0" => Ok(lines),
        Some((_, v)) => Err(io::Error::from_raw_os_error(v.parse().unwrap_or(libc::EIO))),
        None => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the UAPI answer ended without errno",
        )),
    }
}

/// Reads the device behind `sock`.
pub fn get(sock: &Path) -> io::Result<DeviceState> {
    parse_get(exchange(sock, "get=1\n\n")?)
}

fn parse_get(lines: Vec<(String, String)>) -> io::Result<DeviceState> {
    let bad = |what: &str, v: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("UAPI answered {what}={v}"),
        )
    };
    let mut d = DeviceState::default();
    for (k, v) in lines {
        match k.as_str() {
            "private_key" => d.private_key = unhex(&v).filter(|k| *k != [0; 32]),
            "listen_port" => d.listen_port = v.parse().map_err(|_| bad(&k, &v))?,
            "public_key" => d.peers.push(PeerState {
                public_key: unhex(&v).ok_or_else(|| bad(&k, &v))?,
                ..PeerState::default()
            }),
            _ => {
                let Some(p) = d.peers.last_mut() else {
                    continue;
                };
                match k.as_str() {
                    "endpoint" => p.endpoint = v.parse().ok(),
                    "allowed_ip" => {
                        p.allowed_ips.insert(v.parse().map_err(|_| bad(&k, &v))?);
                    }
                    "last_handshake_time_sec" => p.last_handshake_sec = v.parse().unwrap_or(0),
                    "rx_bytes" => p.rx_bytes = v.parse().unwrap_or(0),
                    "tx_bytes" => p.tx_bytes = v.parse().unwrap_or(0),
                    _ => {}
                }
            }
        }
    }
    Ok(d)
}

/// The `set=1` request that sets the private key and port (when given) and
/// applies `changes`.
pub fn set_request(
    private_key: Option<&[u8; 32]>,
    listen_port: Option<u16>,
    changes: &[PeerChange],
) -> String {
    let mut r = String::from("set=1\n");
    if let Some(k) = private_key {
        r.push_str(&format!("private_key={}\n", hex(k)));
    }
    if let Some(p) = listen_port {
        r.push_str(&format!("listen_port={p}\n"));
    }
    for c in changes {
        match c {
            PeerChange::Remove(k) => r.push_str(&format!("public_key={}\nremove=true\n", hex(k))),
            PeerChange::Upsert {
                public_key,
                endpoint,
                allowed_ips,
            } => {
                r.push_str(&format!(
                    "public_key={}\nendpoint={endpoint}\nreplace_allowed_ips=true\n",
                    hex(public_key)
                ));
                for a in allowed_ips {
                    r.push_str(&format!("allowed_ip={a}\n"));
                }
            }
        }
    }
    r.push('\n');
    r
}

/// Changes the device behind `sock`.
pub fn set(
    sock: &Path,
    private_key: Option<&[u8; 32]>,
    listen_port: Option<u16>,
    changes: &[PeerChange],
) -> io::Result<()> {
    exchange(sock, &set_request(private_key, listen_port, changes)).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_answers_parse() {
        let text = "private_key=e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a\nlisten_port=51871\npublic_key=b85996fecc9c7f1fc6d2572a76eda11d59bcd20be8e543b15ce4bd85a8e75a33\nendpoint=172.31.0.2:51871\nlast_handshake_time_sec=1700000000\nlast_handshake_time_nsec=5\nrx_bytes=10\ntx_bytes=20\nallowed_ip=10.2.1.0/24\nallowed_ip=fd00:2:0:1::/64\nerrno=0";
        let lines = text
            .lines()
            .map(|l| {
                let (k, v) = l.split_once('=').unwrap();
                (k.to_string(), v.to_string())
            })
            .collect();
        let d = parse_get(lines).unwrap();
        assert_eq!(d.listen_port, 51871);
        assert!(d.private_key.is_some());
        assert_eq!(d.peers.len(), 1);
        let p = &d.peers[0];
        assert_eq!(p.endpoint, Some("172.31.0.2:51871".parse().unwrap()));
        assert_eq!(p.allowed_ips.len(), 2);
        assert_eq!(
            (p.rx_bytes, p.tx_bytes, p.last_handshake_sec),
            (10, 20, 1_700_000_000)
        );
        assert_eq!(
            hex(&p.public_key),
            "b85996fecc9c7f1fc6d2572a76eda11d59bcd20be8e543b15ce4bd85a8e75a33"
        );
    }

    #[test]
    fn set_requests_are_the_protocol() {
        let k = [0xab; 32];
        let r = set_request(
            None,
            Some(51871),
            &[
                PeerChange::Upsert {
                    public_key: k,
                    endpoint: "172.31.0.2:51871".parse().unwrap(),
                    allowed_ips: ["10.2.1.0/24".parse().unwrap()].into(),
                },
                PeerChange::Remove([1; 32]),
            ],
        );
        assert!(r.starts_with("set=1\nlisten_port=51871\npublic_key=abab"));
        assert!(r.contains(
            "endpoint=172.31.0.2:51871\nreplace_allowed_ips=true\nallowed_ip=10.2.1.0/24\n"
        ));
        assert!(r.ends_with("remove=true\n\n"));
    }
}
