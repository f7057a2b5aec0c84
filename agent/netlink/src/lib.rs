//! A small synchronous netlink client: batched requests with one ack each, and dumps.
//!
//! Why not the `rtnetlink` crate: programming 100k entries needs many
//! requests per datagram (one `sendmsg`, the kernel acks each message),
//! which is what `ip -batch` effectively achieves and what keeps install
//! time linear; rtnetlink sends each request in a datagram of its own. The
//! agent's rtnetlink messages themselves are netlink-packet-route's (its
//! `datapath::rtnl`); this socket only frames them (`nlmsghdr`) and matches
//! the acks. The attribute helpers below serve the messages the crate has no
//! type for (nexthop objects, nf_tables, generic netlink), and [`link`] the
//! link requests that podmesh-agent and podmesh-wireguard both make.
//!
//! A crate of its own so that podmesh-wireguard (whose
//! `--defer-to-kernel-wireguard` probes for the kernel's WireGuard the way
//! the agent's `--wireguard-backend auto` does) shares it without the agent.
use std::{
    fs::File,
    io,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use netlink_sys::{
    Socket, SocketAddr,
    protocols::{NETLINK_GENERIC, NETLINK_NETFILTER, NETLINK_ROUTE},
};

pub mod link;

/// Netlink message types and flags used by podmesh.
pub mod consts {
    pub const NLMSG_ERROR: u16 = 2;
    pub const NLMSG_DONE: u16 = 3;
    pub const RTM_NEWLINK: u16 = 16;
    pub const RTM_DELLINK: u16 = 17;
    pub const RTM_GETLINK: u16 = 18;
    pub const RTM_NEWROUTE: u16 = 24;
    pub const RTM_DELROUTE: u16 = 25;
    pub const RTM_GETROUTE: u16 = 26;
    pub const RTM_NEWNEIGH: u16 = 28;
    pub const RTM_DELNEIGH: u16 = 29;
    pub const RTM_GETNEIGH: u16 = 30;
    pub const RTM_NEWNEXTHOP: u16 = 104;
    pub const RTM_DELNEXTHOP: u16 = 105;
    pub const RTM_GETNEXTHOP: u16 = 106;

    pub const NLM_F_REQUEST: u16 = 0x1;
    pub const NLM_F_ACK: u16 = 0x4;
    pub const NLM_F_DUMP: u16 = 0x300;
    pub const NLM_F_REPLACE: u16 = 0x100;
    pub const NLM_F_EXCL: u16 = 0x200;
    pub const NLM_F_CREATE: u16 = 0x400;

    pub const AF_INET: u8 = 2;
    pub const AF_BRIDGE: u8 = 7;
    pub const AF_INET6: u8 = 10;
}
use consts::*;

/// A netlink failure, with the errno the kernel returned when there is one.
#[derive(Debug, thiserror::Error)]
pub enum NlError {
    /// The socket itself failed.
    #[error("netlink socket: {0}")]
    Io(#[from] io::Error),
    /// The kernel refused a request.
    #[error("{}", io::Error::from_raw_os_error(*errno))]
    Kernel {
        /// Positive errno.
        errno: i32,
    },
    /// Entering the target network namespace failed.
    #[error("entering netns {path}: {source}")]
    Netns {
        /// The namespace file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The kernel sent something this client does not understand.
    #[error("malformed netlink reply: {0}")]
    Malformed(&'static str),
}

impl NlError {
    /// The errno of a kernel refusal.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Kernel { errno } => Some(*errno),
            _ => None,
        }
    }
}

/// One request: type, flags (REQUEST and ACK are added) and body (fixed header + attributes).
#[derive(Clone, Debug)]
pub struct Msg {
    /// RTM_* type.
    pub ty: u16,
    /// NLM_F_* flags besides REQUEST/ACK.
    pub flags: u16,
    /// Fixed header followed by attributes.
    pub body: Vec<u8>,
}

/// A reply message of a dump: its type and body.
#[derive(Clone, Debug)]
pub struct Reply {
    /// RTM_* type.
    pub ty: u16,
    /// Fixed header followed by attributes.
    pub body: Vec<u8>,
}

/// Bytes per request datagram; well under the default socket send buffer.
const BATCH_BYTES: usize = 48 * 1024;

/// A NETLINK_ROUTE socket bound to one network namespace.
#[derive(Debug)]
pub struct Netlink {
    sock: Socket,
    seq: u32,
}

impl Netlink {
    /// Opens a socket in the network namespace at `netns` (a file such as
    /// `/run/netns/NAME`), or in the caller's own when `None`. A netlink socket
    /// stays bound to the namespace it was created in, so the namespace is
    /// entered only by a short-lived thread that creates it.
    pub fn open(netns: Option<&Path>) -> Result<Self, NlError> {
        match netns {
            None => Self::open_here(NETLINK_ROUTE),
            Some(path) => in_netns(path, || Self::open_here(NETLINK_ROUTE)),
        }
    }

    /// Like [`Netlink::open`], a NETLINK_NETFILTER socket (nf_tables).
    pub fn open_netfilter(netns: Option<&Path>) -> Result<Self, NlError> {
        match netns {
            None => Self::open_here(NETLINK_NETFILTER),
            Some(path) => in_netns(path, || Self::open_here(NETLINK_NETFILTER)),
        }
    }

    /// Like [`Netlink::open`], a NETLINK_GENERIC socket (kernel WireGuard).
    pub fn open_generic(netns: Option<&Path>) -> Result<Self, NlError> {
        match netns {
            None => Self::open_here(NETLINK_GENERIC),
            Some(path) => in_netns(path, || Self::open_here(NETLINK_GENERIC)),
        }
    }

    fn open_here(protocol: isize) -> Result<Self, NlError> {
        let mut sock = Socket::new(protocol)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        // Failure acks then carry only the header, not the whole request.
        sock.set_cap_ack(true)?;
        let _ = sock.set_rx_buf_sz(4 * 1024 * 1024);
        Ok(Self { sock, seq: 1 })
    }

    /// Sends one request and waits for its ack.
    pub fn request(&mut self, msg: Msg) -> Result<(), NlError> {
        match self.batch(std::iter::once(msg))?.into_iter().next() {
            Some((_, errno)) => Err(NlError::Kernel { errno }),
            None => Ok(()),
        }
    }

    /// Sends many requests, several per datagram, and collects the failures as
    /// (index in `msgs`, errno). Later requests still run when one fails.
    pub fn batch(
        &mut self,
        msgs: impl IntoIterator<Item = Msg>,
    ) -> Result<Vec<(usize, i32)>, NlError> {
        let mut failures = Vec::new();
        let mut buf = Vec::with_capacity(BATCH_BYTES + 4096);
        let mut first_seq = self.seq;
        let mut index_base = 0usize;
        let mut count = 0usize;
        for msg in msgs {
            self.push(&mut buf, &msg);
            count += 1;
            if buf.len() >= BATCH_BYTES {
                self.flush(&mut buf, first_seq, index_base, count, &mut failures)?;
                index_base += count;
                count = 0;
                first_seq = self.seq;
            }
        }
        if count > 0 {
            self.flush(&mut buf, first_seq, index_base, count, &mut failures)?;
        }
        Ok(failures)
    }

    /// Sends a dump request and returns every reply message.
    pub fn dump(&mut self, ty: u16, body: Vec<u8>) -> Result<Vec<Reply>, NlError> {
        let mut buf = Vec::new();
        let seq = self.next_seq();
        put_header(&mut buf, ty, NLM_F_REQUEST | NLM_F_DUMP, seq, body.len());
        buf.extend_from_slice(&body);
        self.sock.send(&buf, 0)?;
        let mut out = Vec::new();
        loop {
            let data = self.recv_full()?;
            for m in split(&data)? {
                if m.seq != seq {
                    continue;
                }
                match m.ty {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let errno = error_code(m.body)?;
                        if errno != 0 {
                            return Err(NlError::Kernel { errno });
                        }
                    }
                    ty => out.push(Reply {
                        ty,
                        body: m.body.to_vec(),
                    }),
                }
            }
        }
    }

    /// Sends a plain (non-dump) GET with an ack request and returns the
    /// replies that come before the ack.
    pub fn get(&mut self, ty: u16, body: Vec<u8>) -> Result<Vec<Reply>, NlError> {
        let mut buf = Vec::new();
        let seq = self.next_seq();
        put_header(&mut buf, ty, NLM_F_REQUEST | NLM_F_ACK, seq, body.len());
        buf.extend_from_slice(&body);
        self.sock.send(&buf, 0)?;
        let mut out = Vec::new();
        loop {
            let data = self.recv_full()?;
            for m in split(&data)? {
                if m.seq != seq {
                    continue;
                }
                if m.ty == NLMSG_ERROR {
                    let errno = error_code(m.body)?;
                    return if errno == 0 {
                        Ok(out)
                    } else {
                        Err(NlError::Kernel { errno })
                    };
                }
                out.push(Reply {
                    ty: m.ty,
                    body: m.body.to_vec(),
                });
            }
        }
    }

    /// Sends one nfnetlink transaction: `begin`, the messages (each acked),
    /// `end`, all in one datagram, as nf_tables wants a batch. Returns the
    /// failures as (index in `msgs`, errno); any failure aborts the whole
    /// transaction in the kernel.
    pub fn transaction(
        &mut self,
        begin: Msg,
        msgs: &[Msg],
        end: Msg,
    ) -> Result<Vec<(usize, i32)>, NlError> {
        let mut buf = Vec::new();
        let begin_seq = self.next_seq();
        put_header(
            &mut buf,
            begin.ty,
            NLM_F_REQUEST,
            begin_seq,
            begin.body.len(),
        );
        buf.extend_from_slice(&begin.body);
        pad(&mut buf);
        let first_seq = self.seq;
        for m in msgs {
            self.push(&mut buf, m);
        }
        let seq = self.next_seq();
        put_header(&mut buf, end.ty, NLM_F_REQUEST, seq, end.body.len());
        buf.extend_from_slice(&end.body);
        pad(&mut buf);
        let mut failures = Vec::new();
        self.sock.send(&buf, 0)?;
        let mut acked = 0usize;
        while acked < msgs.len() {
            let data = self.recv_full()?;
            for m in split(&data)? {
                if m.ty == NLMSG_ERROR && m.seq == begin_seq {
                    // The batch itself was refused (no nf_tables, no
                    // privilege): nothing else will be acked.
                    let errno = error_code(m.body)?;
                    if errno != 0 {
                        return Err(NlError::Kernel { errno });
                    }
                }
                let offset = m.seq.wrapping_sub(first_seq) as usize;
                if m.ty != NLMSG_ERROR || offset >= msgs.len() {
                    continue;
                }
                acked += 1;
                let errno = error_code(m.body)?;
                if errno != 0 {
                    failures.push((offset, errno));
                }
            }
        }
        Ok(failures)
    }

    /// Receives one datagram whole. The peek offers a 64 KiB buffer: the
    /// kernel sizes the skbs of a dump by the largest buffer the reader
    /// offered (up to 32 KiB), and dumps whose continuation re-walks the
    /// table (nf_tables sets) get four times fewer continuations than with
    /// the default 8 KiB ones.
    fn recv_full(&self) -> Result<Vec<u8>, NlError> {
        let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
        let len = self.sock.recv(&mut buf, libc::MSG_PEEK | libc::MSG_TRUNC)?;
        buf.clear();
        buf.reserve(len);
        let got = self.sock.recv(&mut buf, 0)?;
        if got != len {
            return Err(NlError::Malformed("datagram changed between peek and read"));
        }
        Ok(buf)
    }

    fn next_seq(&mut self) -> u32 {
        let s = self.seq;
        self.seq = self.seq.wrapping_add(1).max(1);
        s
    }

    fn push(&mut self, buf: &mut Vec<u8>, msg: &Msg) {
        let seq = self.next_seq();
        put_header(
            buf,
            msg.ty,
            msg.flags | NLM_F_REQUEST | NLM_F_ACK,
            seq,
            msg.body.len(),
        );
        buf.extend_from_slice(&msg.body);
        pad(buf);
    }

    fn flush(
        &mut self,
        buf: &mut Vec<u8>,
        first_seq: u32,
        index_base: usize,
        count: usize,
        failures: &mut Vec<(usize, i32)>,
    ) -> Result<(), NlError> {
        self.sock.send(buf, 0)?;
        buf.clear();
        let mut acked = 0usize;
        while acked < count {
            let data = self.recv_full()?;
            for m in split(&data)? {
                let offset = m.seq.wrapping_sub(first_seq) as usize;
                if m.ty != NLMSG_ERROR || offset >= count {
                    continue;
                }
                acked += 1;
                let errno = error_code(m.body)?;
                if errno != 0 {
                    failures.push((index_base + offset, errno));
                }
            }
        }
        Ok(())
    }
}

/// Runs `f` on a thread that entered the network namespace at `path`.
///
/// Needed for whatever resolves interface names in the caller's namespace
/// (aya's tc attach and query, `if_nametoindex`).
pub fn in_netns<T: Send, E: From<NlError> + Send>(
    path: &Path,
    f: impl FnOnce() -> Result<T, E> + Send,
) -> Result<T, E> {
    let file = File::open(path).map_err(|source| NlError::Netns {
        path: path.to_path_buf(),
        source,
    })?;
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                NlError::Netns {
                    path: path.to_path_buf(),
                    source: io::Error::from(e),
                }
            })?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(NlError::Malformed("netns worker thread panicked").into()))
    })
}

fn put_header(buf: &mut Vec<u8>, ty: u16, flags: u16, seq: u32, body_len: usize) {
    buf.extend_from_slice(&((16 + body_len) as u32).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
}

fn pad(buf: &mut Vec<u8>) {
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

struct Raw<'a> {
    ty: u16,
    seq: u32,
    body: &'a [u8],
}

fn split(mut data: &[u8]) -> Result<Vec<Raw<'_>>, NlError> {
    let mut out = Vec::new();
    while data.len() >= 16 {
        let len = u32::from_ne_bytes(data[0..4].try_into().expect("4 bytes")) as usize;
        if len < 16 || len > data.len() {
            return Err(NlError::Malformed("message length"));
        }
        out.push(Raw {
            ty: u16::from_ne_bytes([data[4], data[5]]),
            seq: u32::from_ne_bytes(data[8..12].try_into().expect("4 bytes")),
            body: &data[16..len],
        });
        data = &data[align(len).min(data.len())..];
    }
    Ok(out)
}

fn error_code(body: &[u8]) -> Result<i32, NlError> {
    let code = body
        .get(0..4)
        .ok_or(NlError::Malformed("short error message"))?;
    Ok(-i32::from_ne_bytes(code.try_into().expect("4 bytes")))
}

const fn align(n: usize) -> usize {
    (n + 3) & !3
}

/// Builds netlink attributes (type-length-value, 4-byte aligned).
#[derive(Debug, Default, Clone)]
pub struct Attrs(pub Vec<u8>);

impl Attrs {
    /// Starts a body with a fixed header.
    pub fn with_header(header: &[u8]) -> Self {
        Self(header.to_vec())
    }
    /// Appends an attribute.
    pub fn put(&mut self, ty: u16, data: &[u8]) -> &mut Self {
        self.0
            .extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
        self.0.extend_from_slice(&ty.to_ne_bytes());
        self.0.extend_from_slice(data);
        pad(&mut self.0);
        self
    }
    /// Appends a u32 attribute (host byte order).
    pub fn u32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.put(ty, &v.to_ne_bytes())
    }
    /// Appends a nested attribute (NLA_F_NESTED is set, as the kernel's strict
    /// validation expects for some families).
    pub fn nested(&mut self, ty: u16, inner: &Attrs) -> &mut Self {
        self.put(ty | 0x8000, &inner.0)
    }
    /// The body.
    pub fn build(&self) -> Vec<u8> {
        self.0.clone()
    }
}

/// Iterates over the attributes in `data` as (type without flags, value).
pub fn attrs(mut data: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if data.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([data[0], data[1]]) as usize;
        let ty = u16::from_ne_bytes([data[2], data[3]]) & 0x3fff;
        if len < 4 || len > data.len() {
            return None;
        }
        let value = &data[4..len];
        data = &data[align(len).min(data.len())..];
        Some((ty, value))
    })
}

/// Reads a u32 attribute value.
pub fn as_u32(v: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(v.get(0..4)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip_with_padding() {
        let mut a = Attrs::default();
        a.put(1, &[1, 2, 3]).u32(2, 7);
        let mut inner = Attrs::default();
        inner.u32(9, 1);
        a.nested(3, &inner);
        let got: Vec<(u16, Vec<u8>)> = attrs(&a.0).map(|(t, v)| (t, v.to_vec())).collect();
        assert_eq!(got[0], (1, vec![1, 2, 3]));
        assert_eq!(got[1], (2, 7u32.to_ne_bytes().to_vec()));
        assert_eq!(got[2].0, 3);
        let nested: Vec<_> = attrs(&got[2].1).collect();
        assert_eq!(nested, vec![(9, &1u32.to_ne_bytes()[..])]);
    }

    #[test]
    fn split_rejects_truncated_messages() {
        let mut buf = Vec::new();
        put_header(&mut buf, 2, 0, 5, 20);
        assert!(split(&buf).is_err());
    }
}
