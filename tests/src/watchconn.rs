//! A lean watch client: one TLS connection per watch, as remote agents hold them, cheap enough that 10,000 of them and the proxy share two cores.
//!
//! etcd-client builds a tonic channel (a buffer task, a tower stack, a
//! reconnecting connector) per client, and even a bare h2 client runs its
//! connection as a task of its own, woken before the reader that takes the
//! message: at thousands of connections the load client would then measure
//! itself. Here a connection is a minimal HTTP/2 client written for one
//! Watch stream, over tokio-rustls, read and written only by the task that
//! reads its messages (one read buffer, no task, no channel), bound to one
//! of several loopback source addresses (127.0.0.x) so that neither
//! ephemeral ports nor per-address limits are what a benchmark runs into.
//!
//! What it does of HTTP/2 (RFC 9113): the preface and SETTINGS (push off,
//! the stream's receive window), one request (HEADERS as HPACK literals
//! without indexing, then one DATA frame), large receive windows given back
//! with WINDOW_UPDATE once half is read, SETTINGS and PING acknowledged,
//! CONTINUATION joined to its header block; a reset, a GOAWAY or the
//! stream's end ends the reading with the reason. Header blocks the server
//! sends are decoded in full (`loona-hpack`: other servers index and use
//! Huffman codes), which is rare: a head and trailers per connection.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    sync::Arc,
};

use anyhow::Context;
use bytes::{Buf, Bytes, BytesMut};
use etcd_client::proto::PbWatchResponse;
use prost::Message;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};
use tokio_rustls::client::TlsStream;

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

/// The stream and connection receive windows of [`WatchConn::open`]: large
/// enough that WINDOW_UPDATE is rare (once per 8 MiB read).
pub const WINDOW: u32 = 16 << 20;

/// The client's connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The one stream of a connection.
const STREAM: u32 = 1;
/// SETTINGS_MAX_FRAME_SIZE, left at its default.
const MAX_FRAME: usize = 16_384;
/// The connection window before any WINDOW_UPDATE.
const DEFAULT_WINDOW: u32 = 65_535;
/// What a read asks the TLS stream for at least.
const READ_SIZE: usize = 4096;

// Frame types and flags.
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PUSH_PROMISE: u8 = 0x5;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// One frame as read: its payload split off the read buffer, no copy.
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: BytesMut,
}

/// One connection with one Watch stream.
pub struct WatchConn {
    io: TlsStream<TcpStream>,
    /// Bytes read from the TLS stream and not yet taken as frames.
    rbuf: BytesMut,
    /// The stream's received bytes not yet returned as messages: usually one
    /// DATA frame's payload, held without a copy.
    buf: Bytes,
    /// The server's header blocks' decoder (its dynamic table lives as long
    /// as the connection).
    hpack: Box<loona_hpack::Decoder<'static>>,
    /// The stream's and the connection's receive windows.
    window: (u32, u32),
    /// DATA received and not yet given back, on the stream and the connection.
    unacked: (u32, u32),
    /// The server ended the stream (the trailers, if any, said nothing wrong).
    ended: bool,
}

impl std::fmt::Debug for WatchConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchConn")
            .field("buffered", &self.rbuf.len())
            .field("unread", &self.buf.len())
            .field("window", &self.window)
            .field("ended", &self.ended)
            .finish_non_exhaustive()
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

/// Appends a frame header.
fn frame_head(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
}

/// Appends an HPACK integer of `prefix` bits (RFC 7541 5.1), the byte's
/// other bits zero.
fn hpack_int(out: &mut Vec<u8>, prefix: u32, v: usize) {
    let max = (1usize << prefix) - 1;
    if v < max {
        out.push(v as u8);
        return;
    }
    out.push(max as u8);
    let mut v = v - max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// Appends a header field as a literal without indexing, with a new name
/// and no Huffman code (RFC 7541 6.2.2).
fn hpack_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0);
    hpack_int(out, 7, name.len());
    out.extend_from_slice(name);
    hpack_int(out, 7, value.len());
    out.extend_from_slice(value);
}

/// Appends WINDOW_UPDATE of `n` bytes on `stream`.
fn window_update(out: &mut Vec<u8>, stream: u32, n: u32) {
    frame_head(out, 4, WINDOW_UPDATE, 0, stream);
    out.extend_from_slice(&n.to_be_bytes());
}

/// Removes a frame's padding (its PADDED flag: a length byte first, that
/// many bytes last).
fn unpad(p: &mut BytesMut, flags: u8) -> anyhow::Result<()> {
    if flags & PADDED != 0 {
        let pad = *p.first().context("a PADDED frame without its pad length")? as usize;
        p.advance(1);
        anyhow::ensure!(pad <= p.len(), "padding longer than its frame");
        p.truncate(p.len() - pad);
    }
    Ok(())
}

/// The header `name` of a decoded block.
fn header<'h>(headers: &'h [(Vec<u8>, Vec<u8>)], name: &str) -> Option<&'h [u8]> {
    headers
        .iter()
        .find(|(n, _)| n == name.as_bytes())
        .map(|(_, v)| &v[..])
}

/// The gRPC status (and message) of a decoded block, if it has one.
fn grpc_status(headers: &[(Vec<u8>, Vec<u8>)]) -> Option<(i32, String)> {
    let map: http::HeaderMap = headers
        .iter()
        .filter(|(n, _)| n.starts_with(b"grpc-"))
        .filter_map(|(n, v)| {
            Some((
                http::HeaderName::from_bytes(n).ok()?,
                http::HeaderValue::from_bytes(v).ok()?,
            ))
        })
        .collect();
    rawgrpc::grpc_status(&map)
}

impl WatchConn {
    /// Connects from `source` to `addr` and sends `create`; returns once the
    /// response head has arrived (the created message follows on the stream).
    /// The receive windows are [`WINDOW`].
    pub async fn open(
        addr: SocketAddr,
        source: IpAddr,
        tls: Arc<rustls::ClientConfig>,
        create: WatchCreate,
    ) -> Result<WatchConn, Refused> {
        Self::open_with_window(addr, source, tls, create, WINDOW).await
    }

    /// Like [`WatchConn::open`], with a stream receive window of `window`
    /// bytes (the server stops sending once that much is unread; the
    /// connection's window is the larger of `window` and 64 KiB).
    pub async fn open_with_window(
        addr: SocketAddr,
        source: IpAddr,
        tls: Arc<rustls::ClientConfig>,
        create: WatchCreate,
        window: u32,
    ) -> Result<WatchConn, Refused> {
        let window = window.min(i32::MAX as u32);
        let sock = TcpSocket::new_v4()?;
        sock.bind(SocketAddr::new(source, 0))?;
        let tcp = sock.connect(addr).await?;
        tcp.set_nodelay(true)?;
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        let io = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await?;
        let conn_window = window.max(DEFAULT_WINDOW);
        let mut c = WatchConn {
            io,
            rbuf: BytesMut::new(),
            buf: Bytes::new(),
            hpack: Box::default(),
            window: (window, conn_window),
            unacked: (0, 0),
            ended: false,
        };
        // Preface, SETTINGS, the connection's window, the request's HEADERS
        // and its one message: one write.
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(PREFACE);
        frame_head(&mut out, 12, SETTINGS, 0, 0);
        out.extend_from_slice(&[0, 0x2, 0, 0, 0, 0]); // ENABLE_PUSH 0
        out.extend_from_slice(&[0, 0x4]); // INITIAL_WINDOW_SIZE
        out.extend_from_slice(&window.to_be_bytes());
        if conn_window > DEFAULT_WINDOW {
            window_update(&mut out, 0, conn_window - DEFAULT_WINDOW);
        }
        let mut block = Vec::with_capacity(160);
        let authority = addr.to_string();
        for (n, v) in [
            (":method", "POST"),
            (":scheme", "https"),
            (":path", "/etcdserverpb.Watch/Watch"),
            (":authority", &authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ] {
            hpack_literal(&mut block, n.as_bytes(), v.as_bytes());
        }
        frame_head(&mut out, block.len(), HEADERS, END_HEADERS, STREAM);
        out.extend_from_slice(&block);
        let msg = rawgrpc::frame(
            &WatchRequest {
                create: Some(create),
            }
            .encode_to_vec(),
        );
        frame_head(&mut out, msg.len(), DATA, 0, STREAM);
        out.extend_from_slice(&msg);
        c.write(&out).await?;
        // A server that refuses the call answers with trailers only: the
        // reason is in them.
        loop {
            let f = c.read_frame().await?;
            if f.kind == HEADERS && f.stream == STREAM {
                let (headers, end) = c.header_block(f).await?;
                if let Some((code, msg)) = grpc_status(&headers) {
                    return Err(Refused::Status(code, msg));
                }
                let status = header(&headers, ":status").unwrap_or_default();
                if status != b"200" {
                    return Err(anyhow::anyhow!(
                        "response :status {}",
                        String::from_utf8_lossy(status)
                    )
                    .into());
                }
                if end {
                    return Err(anyhow::anyhow!("the response ended without a gRPC status").into());
                }
                return Ok(c);
            }
            if f.kind == DATA && f.stream == STREAM {
                return Err(anyhow::anyhow!("DATA before the response's HEADERS").into());
            }
            c.control(f).await?;
        }
    }

    /// Writes `out` and flushes it.
    async fn write(&mut self, out: &[u8]) -> anyhow::Result<()> {
        self.io.write_all(out).await?;
        self.io.flush().await?;
        Ok(())
    }

    /// The next frame, reading as much as it needs.
    async fn read_frame(&mut self) -> anyhow::Result<Frame> {
        loop {
            if let Some(head) = self.rbuf.get(..9) {
                let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                anyhow::ensure!(
                    len <= MAX_FRAME,
                    "a frame of {len} bytes, above SETTINGS_MAX_FRAME_SIZE {MAX_FRAME}"
                );
                if self.rbuf.len() >= 9 + len {
                    let (kind, flags) = (head[3], head[4]);
                    let stream =
                        u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                    self.rbuf.advance(9);
                    let payload = self.rbuf.split_to(len);
                    return Ok(Frame {
                        kind,
                        flags,
                        stream,
                        payload,
                    });
                }
            }
            self.rbuf.reserve(READ_SIZE);
            if self.io.read_buf(&mut self.rbuf).await? == 0 {
                anyhow::bail!(
                    "the server closed the connection ({} bytes of a frame unread)",
                    self.rbuf.len()
                );
            }
        }
    }

    /// A header block: `first`'s fragment and its CONTINUATION frames',
    /// decoded; whether it ends the stream.
    async fn header_block(
        &mut self,
        first: Frame,
    ) -> anyhow::Result<(Vec<(Vec<u8>, Vec<u8>)>, bool)> {
        let Frame {
            mut flags,
            stream,
            payload: mut block,
            ..
        } = first;
        let end = flags & END_STREAM != 0;
        unpad(&mut block, flags)?;
        if flags & PRIORITY != 0 {
            anyhow::ensure!(block.len() >= 5, "HEADERS too short for its priority");
            block.advance(5);
        }
        while flags & END_HEADERS == 0 {
            let f = self.read_frame().await?;
            anyhow::ensure!(
                f.kind == CONTINUATION && f.stream == stream,
                "frame type {} on stream {} inside the header block of stream {stream}",
                f.kind,
                f.stream
            );
            block.extend_from_slice(&f.payload);
            flags = f.flags;
        }
        let headers = self
            .hpack
            .decode(&block)
            .map_err(|e| anyhow::anyhow!("HPACK decoding of stream {stream}'s headers: {e}"))?;
        Ok((headers, end))
    }

    /// Handles a frame that is not the stream's DATA or HEADERS: SETTINGS
    /// and PING are acknowledged, a reset of the stream or a GOAWAY ends
    /// with its reason, what concerns nothing here is skipped.
    async fn control(&mut self, f: Frame) -> anyhow::Result<()> {
        let code = |p: &[u8], at: usize| {
            p.get(at..at + 4)
                .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        };
        match f.kind {
            SETTINGS if f.flags & ACK == 0 => {
                let mut out = Vec::with_capacity(9);
                frame_head(&mut out, 0, SETTINGS, ACK, 0);
                self.write(&out).await?;
            }
            PING if f.flags & ACK == 0 => {
                let mut out = Vec::with_capacity(17);
                frame_head(&mut out, f.payload.len(), PING, ACK, 0);
                out.extend_from_slice(&f.payload);
                self.write(&out).await?;
            }
            RST_STREAM if f.stream == STREAM => {
                anyhow::bail!(
                    "the server reset the stream (error code {:#x})",
                    code(&f.payload, 0)
                )
            }
            GOAWAY => anyhow::bail!(
                "GOAWAY from the server (error code {:#x}, last stream {}): {}",
                code(&f.payload, 4),
                code(&f.payload, 0) & 0x7fff_ffff,
                String::from_utf8_lossy(f.payload.get(8..).unwrap_or_default())
            ),
            PUSH_PROMISE => anyhow::bail!("PUSH_PROMISE, with push disabled"),
            CONTINUATION => anyhow::bail!("CONTINUATION outside a header block"),
            HEADERS => {
                // Another stream's: decoded for the dynamic table's sake.
                self.header_block(f).await?;
            }
            DATA => self.received(f.payload.len() as u32, false).await?,
            // WINDOW_UPDATE (nothing more is sent but the stream's end,
            // which needs no window), PRIORITY, acknowledgements, unknown
            // types.
            _ => {}
        }
        Ok(())
    }

    /// Counts `n` bytes of DATA received (on the stream too when
    /// `on_stream`), giving a window back once half of it is used.
    async fn received(&mut self, n: u32, on_stream: bool) -> anyhow::Result<()> {
        let mut out = Vec::new();
        self.unacked.1 += n;
        if self.unacked.1 >= self.window.1 / 2 {
            window_update(&mut out, 0, self.unacked.1);
            self.unacked.1 = 0;
        }
        if on_stream {
            self.unacked.0 += n;
            if self.unacked.0 >= self.window.0 / 2 {
                window_update(&mut out, STREAM, self.unacked.0);
                self.unacked.0 = 0;
            }
        }
        if !out.is_empty() {
            self.write(&out).await?;
        }
        Ok(())
    }

    /// The next response; `None` when the stream ended. The flow-control
    /// window of what was read is given back (a reader that stops calling
    /// this reads nothing more: the server stops sending once the window is
    /// full).
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
            if self.ended {
                anyhow::ensure!(
                    self.buf.is_empty(),
                    "the stream ended inside a message ({} bytes of it)",
                    self.buf.len()
                );
                return Ok(None);
            }
            if self.buf.is_empty() {
                // Let go of the read buffer's block the last frame shared.
                self.buf = Bytes::new();
            }
            let f = self.read_frame().await?;
            match f.kind {
                DATA if f.stream == STREAM => {
                    self.received(f.payload.len() as u32, true).await?;
                    let mut d = f.payload;
                    unpad(&mut d, f.flags)?;
                    if self.buf.is_empty() {
                        // A DATA frame holds whole messages as a rule: no copy.
                        self.buf = d.freeze();
                    } else {
                        let mut joined = BytesMut::with_capacity(self.buf.len() + d.len());
                        joined.extend_from_slice(&self.buf);
                        joined.extend_from_slice(&d);
                        self.buf = joined.freeze();
                    }
                    self.ended = f.flags & END_STREAM != 0;
                }
                HEADERS if f.stream == STREAM => {
                    // Trailers: they say why the stream ended.
                    let (trailers, end) = self.header_block(f).await?;
                    anyhow::ensure!(end, "HEADERS amid the stream without END_STREAM");
                    match grpc_status(&trailers) {
                        Some((0, _)) => {}
                        Some((code, msg)) => {
                            anyhow::bail!("watch stream ended with gRPC status {code}: {msg}")
                        }
                        None => anyhow::bail!("watch stream ended without a gRPC status"),
                    }
                    self.ended = true;
                }
                _ => self.control(f).await?,
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

    /// Ends the request side of the stream (an empty DATA frame with
    /// END_STREAM).
    pub async fn close(&mut self) -> anyhow::Result<()> {
        let mut out = Vec::with_capacity(9);
        frame_head(&mut out, 0, DATA, END_STREAM, STREAM);
        self.write(&out).await
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
    fn request_headers_decode_as_sent_and_padding_is_removed() {
        let long = "v".repeat(300);
        let sent = [
            (":method", "POST"),
            (":path", "/etcdserverpb.Watch/Watch"),
            ("x-long", long.as_str()),
            ("te", "trailers"),
        ];
        let mut block = Vec::new();
        for (n, v) in sent {
            hpack_literal(&mut block, n.as_bytes(), v.as_bytes());
        }
        let got = loona_hpack::Decoder::new().decode(&block).unwrap();
        let want: Vec<(Vec<u8>, Vec<u8>)> = sent
            .iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect();
        assert_eq!(got, want);

        let mut p = BytesMut::from(&[3, b'a', b'b', 0, 0, 0][..]);
        unpad(&mut p, PADDED).unwrap();
        assert_eq!(&p[..], b"ab");
        let mut bad = BytesMut::from(&[9, b'a'][..]);
        assert!(unpad(&mut bad, PADDED).is_err(), "padding past the frame");
        let mut plain = BytesMut::from(&b"ab"[..]);
        unpad(&mut plain, 0).unwrap();
        assert_eq!(&plain[..], b"ab");
    }

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
