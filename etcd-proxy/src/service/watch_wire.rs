//! The Watch RPC on the wire: events encoded once per upstream event and shared by every watcher's response.
//!
//! etcd sends every watcher its own WatchResponse (its watch ID, the events it
//! selected). With thousands of watchers on one prefix, encoding (and first
//! cloning) the same events once per watcher is most of the proxy's work and
//! memory; here each event is encoded once (with and without `prev_kv`) and a
//! watcher's response is its small head followed by those shared bytes.
//!
//! This module is the codec and its types only; the service that uses it is
//! [`super::watch`], so dependencies point one way: watch -> watch_wire.
use std::sync::Arc;

use etcd_client::proto::{PbEvent, PbResponseHeader, PbWatchRequest, PbWatchResponse};
use prost::Message;
use prost::bytes::{BufMut, Bytes, BytesMut};
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use crate::budget::Reservation;

/// `WatchResponse.events` is field 11.
const EVENTS_FIELD: u32 = 11;

/// One event as a complete `events` field of a WatchResponse, with and
/// without its previous key-value.
#[derive(Debug, Clone)]
pub struct EncodedEvent {
    pub with_prev: Bytes,
    pub without_prev: Bytes,
}

impl EncodedEvent {
    pub fn new(e: &PbEvent) -> EncodedEvent {
        let field = |e: &PbEvent| {
            let mut b = BytesMut::with_capacity(e.encoded_len() + 4);
            prost::encoding::message::encode(EVENTS_FIELD, e, &mut b);
            b.freeze()
        };
        let with_prev = field(e);
        let without_prev = if e.prev_kv.is_some() {
            field(&PbEvent {
                prev_kv: None,
                ..e.clone()
            })
        } else {
            with_prev.clone()
        };
        EncodedEvent {
            with_prev,
            without_prev,
        }
    }
}

/// One message towards a watch client. Every variant is one pointer: a
/// stream's queue of them is allocated in blocks of 32 whether or not it is
/// used, so their size is paid by every idle connection.
#[derive(Debug)]
pub enum Out {
    /// A message built in full: created, cancelled, progress.
    Msg(Box<PbWatchResponse>),
    /// Part of a replay, with its bytes reserved from the connection's and
    /// the proxy's budget until it is encoded.
    Replay(Box<(PbWatchResponse, Reservation)>),
    /// Live events of one watcher.
    Events(Box<Events>),
}

/// Live events of one watcher: the head is encoded per watcher, the events
/// were encoded once for all; `pick` says which of the batch's.
#[derive(Debug)]
pub struct Events {
    pub header: PbResponseHeader,
    pub watch_id: i64,
    pub prev_kv: bool,
    /// The encoded events of the updates in this response, in order.
    pub batch: Batch,
    pub pick: Pick,
    /// The token of the stream's pass this response belongs to, held until
    /// the response is taken for encoding (held for its drop only).
    pub _pass: Arc<()>,
}

/// The encoded events of the updates a pass of a stream took: as a rule
/// one update, whose shared encodings are referenced as they are (nothing
/// is allocated for it); the list of several when the stream was behind.
#[derive(Debug, Clone)]
pub enum Batch {
    One(Arc<[EncodedEvent]>),
    Many(Arc<[Arc<[EncodedEvent]>]>),
}

impl Batch {
    /// Every event of the batch, in order.
    pub fn iter(&self) -> impl Iterator<Item = &EncodedEvent> {
        let (one, many): (&[EncodedEvent], &[Arc<[EncodedEvent]>]) = match self {
            Batch::One(u) => (u, &[]),
            Batch::Many(m) => (&[], m),
        };
        one.iter().chain(many.iter().flat_map(|u| u.iter()))
    }
}

/// Which events of a batch one watcher gets: usually all of them, which
/// costs nothing per watcher.
#[derive(Debug)]
pub enum Pick {
    All,
    Some(Vec<u32>),
}

/// Bytes tonic sets aside per Watch stream for encoding responses and for
/// decoding requests (its default is 8 KiB each). A stream with one watcher
/// answers a few hundred bytes at a time and reads requests of a few dozen:
/// at thousands of connections with one stream each, the default buffers
/// were a large part of the proxy's memory. A larger response grows the
/// buffer as it needs.
const STREAM_BUFFER: usize = 512;
/// Encoded responses tonic gathers before handing them to HTTP/2 (its
/// default): one catching-up stream still sends large writes.
const YIELD_THRESHOLD: usize = 32 * 1024;

fn buffer_settings() -> BufferSettings {
    BufferSettings::new(STREAM_BUFFER, YIELD_THRESHOLD)
}

/// Encodes [`Out`], decodes WatchRequest with prost.
#[derive(Debug, Clone, Copy, Default)]
pub struct WatchCodec;

#[derive(Debug)]
pub struct OutEncoder;

#[derive(Debug)]
pub struct RequestDecoder;

impl Codec for WatchCodec {
    type Encode = Out;
    type Decode = PbWatchRequest;
    type Encoder = OutEncoder;
    type Decoder = RequestDecoder;

    fn encoder(&mut self) -> OutEncoder {
        OutEncoder
    }

    fn decoder(&mut self) -> RequestDecoder {
        RequestDecoder
    }
}

impl Encoder for OutEncoder {
    type Item = Out;
    type Error = Status;

    fn buffer_settings(&self) -> BufferSettings {
        buffer_settings()
    }

    fn encode(&mut self, item: Out, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        let Events {
            header,
            watch_id,
            prev_kv,
            batch,
            pick,
            _pass: _,
        } = match item {
            Out::Msg(m) => return encode(&m, dst),
            Out::Replay(replay) => {
                let (m, held) = *replay;
                let r = encode(&m, dst);
                drop(held);
                return r;
            }
            Out::Events(e) => *e,
        };
        let head = PbWatchResponse {
            header: Some(header),
            watch_id,
            ..Default::default()
        };
        encode(&head, dst)?;
        put_events(dst, prev_kv, &batch, &pick);
        Ok(())
    }
}

/// Appends the events `pick` selects from `batch` as `events` fields: fields
/// may come in any order, and repeated `events` entries append.
fn put_events(dst: &mut impl BufMut, prev_kv: bool, batch: &Batch, pick: &Pick) {
    let mut put = |x: &EncodedEvent| {
        dst.put_slice(if prev_kv {
            &x.with_prev
        } else {
            &x.without_prev
        });
    };
    let all = batch.iter();
    match pick {
        Pick::All => all.for_each(&mut put),
        Pick::Some(idx) => {
            // `idx` is ascending: one walk over the batch.
            let mut want = idx.iter().copied().peekable();
            for (i, x) in all.enumerate() {
                match want.peek() {
                    Some(&w) if w as usize == i => {
                        want.next();
                        put(x);
                    }
                    Some(_) => {}
                    None => break,
                }
            }
        }
    }
}

fn encode(m: &PbWatchResponse, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
    m.encode(dst)
        .map_err(|e| Status::internal(format!("encoding a watch response: {e}")))
}

impl Decoder for RequestDecoder {
    type Item = PbWatchRequest;
    type Error = Status;

    fn buffer_settings(&self) -> BufferSettings {
        buffer_settings()
    }

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<PbWatchRequest>, Status> {
        PbWatchRequest::decode(src)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("malformed WatchRequest: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_client::proto::PbKeyValue;

    #[test]
    fn head_plus_shared_events_decodes_as_one_watch_response() {
        let kv = |k: &str, v: &str| PbKeyValue {
            key: k.into(),
            value: v.into(),
            mod_revision: 9,
            ..Default::default()
        };
        let e1 = PbEvent {
            r#type: 0,
            kv: Some(kv("p/a", "new")),
            prev_kv: Some(kv("p/a", "old")),
        };
        let e2 = PbEvent {
            r#type: 1,
            kv: Some(kv("p/b", "")),
            prev_kv: None,
        };
        let (x1, x2) = (EncodedEvent::new(&e1), EncodedEvent::new(&e2));
        let header = PbResponseHeader {
            cluster_id: 1,
            member_id: 2,
            revision: 9,
            raft_term: 3,
        };
        let mut buf = BytesMut::new();
        let head = PbWatchResponse {
            header: Some(header),
            watch_id: 7,
            ..Default::default()
        };
        head.encode(&mut buf).unwrap();
        buf.put_slice(&x1.without_prev);
        buf.put_slice(&x2.without_prev);
        let got = PbWatchResponse::decode(buf.freeze()).unwrap();
        assert_eq!(got.watch_id, 7);
        assert_eq!(got.header, Some(header));
        let stripped = PbEvent {
            prev_kv: None,
            ..e1.clone()
        };
        assert_eq!(got.events, vec![stripped, e2.clone()]);
        let mut buf = BytesMut::new();
        head.encode(&mut buf).unwrap();
        buf.put_slice(&x1.with_prev);
        let got = PbWatchResponse::decode(buf.freeze()).unwrap();
        assert_eq!(got.events, vec![e1.clone()]);
    }

    #[test]
    fn events_picked_across_the_updates_of_a_batch_keep_their_order() {
        let ev = |k: &str, rev: i64| PbEvent {
            r#type: 0,
            kv: Some(PbKeyValue {
                key: k.into(),
                mod_revision: rev,
                ..Default::default()
            }),
            prev_kv: None,
        };
        let (a, b, c) = (ev("p/a", 1), ev("p/b", 2), ev("p/c", 3));
        let batch = Batch::Many(
            vec![
                Arc::from(vec![EncodedEvent::new(&a), EncodedEvent::new(&b)]),
                Arc::from(vec![EncodedEvent::new(&c)]),
            ]
            .into(),
        );
        let decode = |pick: Pick| {
            let mut buf = BytesMut::new();
            put_events(&mut buf, false, &batch, &pick);
            PbWatchResponse::decode(buf.freeze()).unwrap().events
        };
        assert_eq!(decode(Pick::All), vec![a.clone(), b.clone(), c.clone()]);
        assert_eq!(decode(Pick::Some(vec![0, 2])), vec![a.clone(), c.clone()]);
        assert_eq!(decode(Pick::Some(vec![2])), vec![c.clone()]);
        let one = Batch::One(vec![EncodedEvent::new(&a), EncodedEvent::new(&c)].into());
        let mut buf = BytesMut::new();
        put_events(&mut buf, false, &one, &Pick::Some(vec![1]));
        assert_eq!(
            PbWatchResponse::decode(buf.freeze()).unwrap().events,
            vec![c]
        );
    }
}
