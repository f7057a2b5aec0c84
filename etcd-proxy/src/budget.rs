//! Bounds on what one request, one connection and the whole proxy may hold in built, unsent responses.
//!
//! A Range or Txn answer is built from the cache under its lock and then
//! waits, encoded, until the client reads it. Without bounds one client could
//! make the proxy build gigabytes (a Txn of 20 full-prefix ranges; 20 ranges
//! pipelined on one connection and never read). Every answer is therefore
//! sized before it is cloned out of the cache, and its bytes are reserved
//! from its connection's budget and from the proxy's, until the last byte is
//! handed to the connection or the client goes away ([`Held`]). An answer
//! over the limit, or one that would exceed a budget, is refused with
//! `RESOURCE_EXHAUSTED` and a reason, never queued.
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Operations (compares and requests, nested Txns counted in) in one Txn:
/// etcd's own default `--max-txn-ops`.
pub const MAX_TXN_OPS: usize = 128;
/// Bytes of a key or range end. Every key the proxy serves is under one
/// short prefix (`podmesh/v1/…`, `cilium/state/…`): a longer one is abuse.
pub const MAX_KEY_BYTES: usize = 4096;
/// Bytes of one Range or Txn answer (keys and values, plus a little per key
/// for the revisions). A client reads more in pages (`limit`).
pub const MAX_RESPONSE_BYTES: usize = 16 << 20;
/// Bytes of built, unsent answers one connection may hold.
pub const CONNECTION_BYTES: usize = 32 << 20;
/// Bytes of built, unsent answers the whole proxy may hold (the deploy limit
/// is 512 MiB; the encoded copy doubles an answer for a moment).
pub const PROXY_BYTES: usize = 160 << 20;
/// Protobuf framing and revisions per key-value, roughly.
pub const PER_KV_OVERHEAD: usize = 32;

/// Watchers one Watch stream may hold (etcd has no such limit; a prefix-
/// confined reader needs a handful, the agent one).
pub const MAX_WATCHERS_PER_STREAM: usize = 1000;
/// A replay of past events (a watch created at a past revision) is sent in
/// responses of about this many bytes, split between revisions, each
/// reserved from the stream's, the connection's and the proxy's budget until
/// it is sent.
pub const REPLAY_CHUNK_BYTES: usize = 256 << 10;
/// Replay bytes one Watch stream may have built and not yet sent; the
/// replay waits for its reader beyond that.
pub const STREAM_REPLAY_BYTES: usize = 4 << 20;

/// Budgets are counted in KiB so that they fit a semaphore's `u32` grants.
fn kib(bytes: usize) -> u32 {
    u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX)
}

/// Why an answer is not built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Exhausted {
    #[error(
        "the answer would exceed {limit} bytes; read the range in pages (a limit, then a start key after the last key read)"
    )]
    TooLarge { limit: usize },
    #[error(
        "this connection already holds {limit} bytes of answers it has not read; read them first"
    )]
    Connection { limit: usize },
    #[error(
        "the proxy holds {limit} bytes of answers not yet read by their clients; retry shortly"
    )]
    Proxy { limit: usize },
}

impl Exhausted {
    /// Label for the refused-requests metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Exhausted::TooLarge { .. } => "response_too_large",
            Exhausted::Connection { .. } => "connection_budget",
            Exhausted::Proxy { .. } => "proxy_budget",
        }
    }
}

/// One connection's budget; `serve` puts a clone into every request's
/// extensions.
#[derive(Debug, Clone)]
pub struct ConnectionBudget(Arc<Semaphore>);

impl ConnectionBudget {
    pub fn new(bytes: usize) -> ConnectionBudget {
        ConnectionBudget(Arc::new(Semaphore::new(kib(bytes) as usize)))
    }
}

/// One Watch stream's budget of replay bytes built and not yet sent.
#[derive(Debug, Clone)]
pub struct StreamBudget(Arc<Semaphore>);

impl StreamBudget {
    pub fn new(bytes: usize) -> StreamBudget {
        StreamBudget(Arc::new(Semaphore::new(kib(bytes) as usize)))
    }
}

/// Waits for `kib` from `sem`, at most what it holds in all (`total`), so
/// that one oversized answer waits for everything to be free instead of
/// forever.
async fn wait_for(sem: &Arc<Semaphore>, kib_needed: u32, total: usize) -> OwnedSemaphorePermit {
    let n = kib_needed.min(self::kib(total)).max(1);
    Arc::clone(sem)
        .acquire_many_owned(n)
        .await
        .expect("budget semaphores are never closed")
}

/// The proxy-wide budget.
#[derive(Debug)]
pub struct ProxyBudget {
    sem: Arc<Semaphore>,
    bytes: usize,
}

impl ProxyBudget {
    pub fn new(bytes: usize) -> ProxyBudget {
        ProxyBudget {
            sem: Arc::new(Semaphore::new(kib(bytes) as usize)),
            bytes,
        }
    }

    /// Reserves `bytes` from `stream`, `conn` and the proxy, waiting until
    /// they are free: for answers that can wait for their reader (a watch
    /// replay) instead of being refused.
    pub async fn reserve(
        &self,
        stream: &StreamBudget,
        conn: Option<&ConnectionBudget>,
        bytes: usize,
    ) -> Reservation {
        let need = kib(bytes);
        let stream = wait_for(&stream.0, need, STREAM_REPLAY_BYTES).await;
        let conn = match conn {
            Some(c) => Some(wait_for(&c.0, need, CONNECTION_BYTES).await),
            None => None,
        };
        let proxy = wait_for(&self.sem, need, self.bytes).await;
        Reservation {
            conn,
            proxy: Some(proxy),
            _stream: Some(stream),
        }
    }

    /// A meter for one answer of at most `limit` bytes.
    pub fn meter<'a>(&'a self, conn: Option<&'a ConnectionBudget>, limit: usize) -> Meter<'a> {
        Meter {
            proxy: self,
            conn,
            limit,
            used: 0,
            held: Reservation::default(),
        }
    }
}

/// Counts the bytes of one answer as it is built and reserves them.
#[derive(Debug)]
pub struct Meter<'a> {
    proxy: &'a ProxyBudget,
    conn: Option<&'a ConnectionBudget>,
    limit: usize,
    used: usize,
    held: Reservation,
}

impl Meter<'_> {
    /// Takes `bytes` more for the answer, before they are cloned out of the cache.
    pub fn take(&mut self, bytes: usize) -> Result<(), Exhausted> {
        let used = self.used.saturating_add(bytes);
        if used > self.limit {
            return Err(Exhausted::TooLarge { limit: self.limit });
        }
        // Whole KiB already reserved cover small additions.
        let need = kib(used).saturating_sub(kib(self.used));
        if need > 0 {
            let conn = match self.conn {
                Some(c) => Some(Arc::clone(&c.0).try_acquire_many_owned(need).map_err(|_| {
                    Exhausted::Connection {
                        limit: CONNECTION_BYTES,
                    }
                })?),
                None => None,
            };
            let proxy = Arc::clone(&self.proxy.sem)
                .try_acquire_many_owned(need)
                .map_err(|_| Exhausted::Proxy {
                    limit: self.proxy.bytes,
                })?;
            self.held.add(conn, proxy);
        }
        self.used = used;
        Ok(())
    }

    /// The reservation, to travel with the answer until it is sent.
    pub fn finish(self) -> Reservation {
        self.held
    }
}

/// Bytes reserved for one answer; released when dropped.
#[derive(Debug, Default)]
pub struct Reservation {
    conn: Option<OwnedSemaphorePermit>,
    proxy: Option<OwnedSemaphorePermit>,
    /// Held for its drop only.
    _stream: Option<OwnedSemaphorePermit>,
}

impl Reservation {
    fn add(&mut self, conn: Option<OwnedSemaphorePermit>, proxy: OwnedSemaphorePermit) {
        if let Some(c) = conn {
            match &mut self.conn {
                Some(held) => held.merge(c),
                None => self.conn = Some(c),
            }
        }
        match &mut self.proxy {
            Some(held) => held.merge(proxy),
            None => self.proxy = Some(proxy),
        }
    }

    /// Whether it holds anything.
    pub fn is_empty(&self) -> bool {
        self.proxy.is_none()
    }
}

/// `Reservation` is put into a tonic response's extensions, which must be
/// `Clone`; a clone holds nothing (only the original is moved into [`Held`]).
impl Clone for Reservation {
    fn clone(&self) -> Self {
        Reservation::default()
    }
}

/// A response body that keeps its answer's [`Reservation`] until the body
/// has been read to its end by the connection, or dropped. hyper takes a
/// body's next frame only once the stream has send capacity again, so the
/// reservation lasts until the client has read all but the last window of
/// the answer (measured: of 20 pipelined 8 MiB answers nobody reads, 4 are
/// built against a 32 MiB budget, the first handed whole to the stream).
#[derive(Debug)]
pub struct Held {
    inner: tonic::body::Body,
    reservation: Option<Reservation>,
}

impl Held {
    pub fn new(inner: tonic::body::Body, reservation: Reservation) -> Held {
        Held {
            inner,
            reservation: Some(reservation),
        }
    }
}

impl http_body::Body for Held {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.reservation = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_over_the_limit_is_refused_before_anything_is_held() {
        let proxy = ProxyBudget::new(1 << 20);
        let mut m = proxy.meter(None, 10_000);
        m.take(6_000).unwrap();
        assert_eq!(m.take(6_000), Err(Exhausted::TooLarge { limit: 10_000 }));
        drop(m);
        assert_eq!(proxy.sem.available_permits(), 1024);
    }

    #[test]
    fn budgets_are_held_until_the_reservation_goes() {
        let proxy = ProxyBudget::new(100 << 10);
        let conn = ConnectionBudget::new(40 << 10);
        let mut m = proxy.meter(Some(&conn), 1 << 20);
        m.take(30 << 10).unwrap();
        let r1 = m.finish();
        let mut m = proxy.meter(Some(&conn), 1 << 20);
        assert!(matches!(
            m.take(20 << 10),
            Err(Exhausted::Connection { .. })
        ));
        // Another connection still has room, until the proxy's is used up.
        let other = ConnectionBudget::new(80 << 10);
        let mut m = proxy.meter(Some(&other), 1 << 20);
        m.take(60 << 10).unwrap();
        let r2 = m.finish();
        let mut m = proxy.meter(Some(&other), 1 << 20);
        assert!(matches!(m.take(20 << 10), Err(Exhausted::Proxy { .. })));
        drop((r1, r2));
        let mut m = proxy.meter(Some(&conn), 1 << 20);
        m.take(40 << 10).unwrap();
        assert_eq!(proxy.sem.available_permits(), 60);
        assert!(r_is_clone_empty());
    }

    fn r_is_clone_empty() -> bool {
        let proxy = ProxyBudget::new(1 << 20);
        let mut m = proxy.meter(None, 1 << 20);
        m.take(5000).unwrap();
        let r = m.finish();
        !r.is_empty() && r.clone().is_empty()
    }
}
