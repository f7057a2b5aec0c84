//! A lean watch client: one TLS connection per watch, as remote agents hold them, cheap enough that 10,000 of them and the proxy share two cores.
//!
//! etcd-client builds a tonic channel (a buffer task, a tower stack, a
//! reconnecting connector) per client; at thousands of connections the load
//! client would then measure itself. Here a connection is an h2 client over
//! tokio-rustls, bound to one of several loopback source addresses
//! (127.0.0.x) so that neither ephemeral ports nor per-address limits are
//! what a benchmark runs into, with one Watch stream decoded by hand.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    sync::Arc,
};

use anyhow::Context;
use bytes::{Buf, Bytes, BytesMut};
use etcd_client::proto::PbWatchResponse;
use prost::Message;
use tokio::net::TcpSocket;

use crate::{pki::CertFiles, rawgrpc};

/// Loopback source addresses the connections are spread over.
pub const SOURCES: u8 = 8;

/// The `i`-th connection's source address: 127.0.0.2 … 127.0.0.(1+[`SOURCES`]).
pub fn source(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % SOURCES as usize) as u8))
}

/// The client TLS config shared by every connection.
pub fn tls(ca: &Path, client: &CertFiles) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    Ok(Arc::new(rawgrpc::tls_config(ca, client)?))
}

/// One connection with one Watch stream.
#[derive(Debug)]
pub struct WatchConn {
    body: h2::RecvStream,
    /// Received bytes not yet returned as messages: usually one DATA
    /// frame's payload, held without a copy.
    buf: Bytes,
    /// The request side: dropping it would end the stream.
    requests: h2::SendStream<Bytes>,
    conn: tokio::task::JoinHandle<()>,
}

impl Drop for WatchConn {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

/// etcdserverpb.WatchCreateRequest, the fields used here (etcd-client
/// exports the request types only with its server feature).
#[derive(Clone, PartialEq, prost::Message)]
pub struct WatchCreate {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub range_end: Vec<u8>,
    #[prost(int64, tag = "3")]
    pub start_revision: i64,
    #[prost(bool, tag = "6")]
    pub prev_kv: bool,
    #[prost(int64, tag = "7")]
    pub watch_id: i64,
}

/// etcdserverpb.WatchRequest with its create_request.
#[derive(Clone, PartialEq, prost::Message)]
struct WatchRequest {
    #[prost(message, optional, tag = "1")]
    create: Option<WatchCreate>,
}

/// A prefix watch request of `prefix` from `start_revision` (0: now).
pub fn prefix_watch(prefix: &str, start_revision: i64) -> WatchCreate {
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    WatchCreate {
        key: prefix.as_bytes().to_vec(),
        range_end: end,
        start_revision,
        ..Default::default()
    }
}

/// What opening a watch connection can end in besides success: the server
/// refused the Watch call itself (gRPC status and message), or the
/// connection failed.
#[derive(Debug)]
pub enum Refused {
    Status(i32, String),
    Other(anyhow::Error),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Status(code, msg) => write!(f, "gRPC status {code}: {msg}"),
            Refused::Other(e) => write!(f, "{e:#}"),
        }
    }
}

impl<E: Into<anyhow::Error>> From<E> for Refused {
    fn from(e: E) -> Self {
        Refused::Other(e.into())
    }
}

impl WatchConn {
    /// Connects from `source` to `addr` and sends `create`; returns once the
    /// response head has arrived (the created message follows on the stream).
    pub async fn open(
        addr: SocketAddr,
        source: IpAddr,
        tls: Arc<rustls::ClientConfig>,
        create: WatchCreate,
    ) -> Result<WatchConn, Refused> {
        Self::open_with_window(addr, source, tls, create, 65_535).await
    }

    /// Like [`WatchConn::open`], with an HTTP/2 receive window of `window`
    /// bytes (the server stops sending once that much is unread).
    pub async fn open_with_window(
        addr: SocketAddr,
        source: IpAddr,
        tls: Arc<rustls::ClientConfig>,
        create: WatchCreate,
        window: u32,
    ) -> Result<WatchConn, Refused> {
        let sock = TcpSocket::new_v4()?;
        sock.bind(SocketAddr::new(source, 0))?;
        let tcp = sock.connect(addr).await?;
        tcp.set_nodelay(true)?;
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        let io = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await?;
        let (mut send, conn) = h2::client::Builder::new()
            .initial_window_size(window)
            .initial_connection_window_size(window.max(65_535))
            .handshake(io)
            .await?;
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        send = send.ready().await?;
        let req = http::Request::post("/etcdserverpb.Watch/Watch")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())?;
        let (answer, mut requests) = send.send_request(req, false)?;
        let msg = WatchRequest {
            create: Some(create),
        };
        // A server that refuses the call may have answered (and closed the
        // stream) already: its answer says why.
        let sent = requests.send_data(rawgrpc::frame(&msg.encode_to_vec()), false);
        let head = answer.await?;
        if let Some((code, msg)) = rawgrpc::grpc_status(head.headers()) {
            return Err(Refused::Status(code, msg));
        }
        sent?;
        Ok(WatchConn {
            body: head.into_body(),
            buf: Bytes::new(),
            requests,
            conn,
        })
    }

    /// The next response; `None` when the stream ended. The flow-control
    /// capacity of what was read is given back (a reader that stops calling
    /// this stops the server's sending once the window is full).
    pub async fn next(&mut self) -> anyhow::Result<Option<PbWatchResponse>> {
        match self.next_raw().await? {
            Some(m) => Ok(Some(PbWatchResponse::decode(m)?)),
            None => Ok(None),
        }
    }

    /// The next response, still encoded (a WatchResponse message without its
    /// gRPC prefix): a reader that needs a field or two (see
    /// [`event_values`]) skips decoding the rest.
    pub async fn next_raw(&mut self) -> anyhow::Result<Option<Bytes>> {
        loop {
            if self.buf.len() >= 5 {
                let len =
                    u32::from_be_bytes(self.buf[1..5].try_into().unwrap_or_default()) as usize;
                if self.buf.len() >= 5 + len {
                    self.buf.advance(5);
                    return Ok(Some(self.buf.split_to(len)));
                }
            }
            match self.body.data().await {
                Some(d) => {
                    let d = d?;
                    let _ = self.body.flow_control().release_capacity(d.len());
                    if self.buf.is_empty() {
                        // A DATA frame holds whole messages as a rule: no copy.
                        self.buf = d;
                    } else {
                        let mut joined = BytesMut::with_capacity(self.buf.len() + d.len());
                        joined.extend_from_slice(&self.buf);
                        joined.extend_from_slice(&d);
                        self.buf = joined.freeze();
                    }
                }
                None => {
                    // The trailers say why a stream ended.
                    let trailers = self.body.trailers().await.ok().flatten();
                    if let Some((code, msg)) = trailers.as_ref().and_then(rawgrpc::grpc_status)
                        && code != 0
                    {
                        anyhow::bail!("watch stream ended with gRPC status {code}: {msg}");
                    }
                    return Ok(None);
                }
            }
        }
    }

    /// The next response, which must be the watch's creation.
    pub async fn created(&mut self) -> anyhow::Result<PbWatchResponse> {
        let r = self
            .next()
            .await?
            .context("watch stream ended before created")?;
        anyhow::ensure!(
            r.created && !r.canceled,
            "expected a created response, got {r:?}"
        );
        Ok(r)
    }

    /// Ends the request side of the stream.
    pub fn close(&mut self) {
        let _ = self.requests.send_data(Bytes::new(), true);
    }
}

/// Reads a protobuf varint at the start of `b`; `None` when `b` ends first.
fn varint(b: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&x, rest) = b.split_first()?;
        *b = rest;
        v |= u64::from(x & 0x7f) << shift;
        if x & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// The fields of an encoded message as (field number, length-delimited
/// payload); other wire types are skipped. Stops at the first malformed
/// field.
fn len_fields(mut b: &[u8]) -> impl Iterator<Item = (u64, &[u8])> {
    std::iter::from_fn(move || {
        while !b.is_empty() {
            let key = varint(&mut b)?;
            match key & 7 {
                0 => {
                    varint(&mut b)?;
                }
                1 => b = b.get(8..)?,
                5 => b = b.get(4..)?,
                2 => {
                    let len = usize::try_from(varint(&mut b)?).ok()?;
                    let (field, rest) = (b.get(..len)?, &b[len..]);
                    b = rest;
                    return Some((key >> 3, field));
                }
                _ => return None,
            }
        }
        None
    })
}

/// The values of the events of an encoded WatchResponse (`events` = 11,
/// `Event.kv` = 2, `KeyValue.value` = 5), in order, without decoding the
/// rest: what a load client needs of each message, at a fraction of what
/// decoding all of it (and allocating every key and value) costs.
pub fn event_values(resp: &[u8]) -> impl Iterator<Item = &[u8]> {
    len_fields(resp)
        .filter(|(f, _)| *f == 11)
        .filter_map(|(_, event)| len_fields(event).find(|(f, _)| *f == 2))
        .map(|(_, kv)| {
            len_fields(kv)
                .find(|(f, _)| *f == 5)
                .map_or(&[][..], |v| v.1)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_client::proto::{PbEvent, PbKeyValue, PbResponseHeader};

    #[test]
    fn event_values_reads_what_a_full_decode_does() {
        let ev = |k: &str, v: &str| PbEvent {
            r#type: 0,
            kv: Some(PbKeyValue {
                key: k.into(),
                value: v.into(),
                create_revision: 300,
                mod_revision: 1 << 40,
                version: 2,
                lease: -1,
            }),
            prev_kv: Some(PbKeyValue {
                key: k.into(),
                value: b"old".to_vec(),
                ..Default::default()
            }),
        };
        let resp = PbWatchResponse {
            header: Some(PbResponseHeader {
                cluster_id: u64::MAX,
                member_id: 2,
                revision: 1 << 40,
                raft_term: 3,
            }),
            watch_id: 7,
            events: vec![ev("p/a", "17"), ev("p/b", ""), ev("p/c", &"x".repeat(300))],
            ..Default::default()
        };
        let encoded = resp.encode_to_vec();
        let got: Vec<&[u8]> = event_values(&encoded).collect();
        let long = "x".repeat(300);
        assert_eq!(got, vec![&b"17"[..], b"", long.as_bytes()]);
        let none = PbWatchResponse {
            created: true,
            ..Default::default()
        };
        assert_eq!(event_values(&none.encode_to_vec()).count(), 0);
    }
}
