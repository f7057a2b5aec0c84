//! The lean connection: reads frames straight from the (TLS) stream into a buffer that holds only
//! an incomplete frame, answers SETTINGS, PING and WINDOW_UPDATE, hands each request to the
//! service, and writes the answers' frames through one buffer that is released once written.
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tonic::codegen::Service;

use super::body::{RecvBody, Sender};
use super::frame::{self, Head, Reason};
use super::header::{self, HeaderError};
use super::stream::{Out, Reply, Stream, WRITE_HIGH};
use super::tasks::{ConnTasks, LocalFuture};

/// Streams a client may have open at once (hyper's default too).
pub const MAX_STREAMS: usize = 200;

/// Bytes read from the socket at once, into the stack; only what is left
/// of an incomplete frame is kept on the heap.
const READ_CHUNK: usize = 8 * 1024;

/// A buffer left empty keeps at most this much capacity; larger ones are
/// released, so an idle connection holds (almost) no buffer.
const KEEP: usize = 256;

/// The largest header block (HEADERS plus CONTINUATIONs, still compressed)
/// buffered before the connection is closed.
const MAX_HEADER_BLOCK: usize = header::MAX_HEADER_LIST + frame::MAX_FRAME;

/// Output queued beyond which the connection stops reading: a client that
/// sends PINGs or requests without reading the answers is not buffered for.
const READ_PAUSE: usize = 4 * WRITE_HIGH;

/// Times of a connection.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long a client has to send the connection preface.
    pub preface: Duration,
    /// Interval of keepalive PINGs.
    pub keepalive: Duration,
    /// How long a PING may go unanswered before the connection is closed.
    pub keepalive_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Clock {
    Preface,
    Idle,
    AwaitingPong,
}

/// A header block waiting for its CONTINUATION frames.
#[derive(Debug)]
struct Partial {
    stream: u32,
    end_stream: bool,
    block: Vec<u8>,
}

/// One HTTP/2 server connection; resolves when the connection is over.
pub struct Conn<IO, S, B>
where
    S: Service<http::Request<RecvBody>, Response = http::Response<B>>,
{
    io: IO,
    svc: S,
    timing: Timing,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    /// Bytes of `wbuf` already written.
    wpos: usize,
    need_flush: bool,
    decoder: loona_hpack::Decoder<'static>,
    streams: Vec<Stream<S::Future, B>>,
    /// Work the service handed over (a watch stream's), given to every
    /// request, and the work taken: polled in every round, before the
    /// streams, so that what it produces is written in the same round.
    tasks: ConnTasks,
    local: Vec<LocalFuture>,
    partial: Option<Partial>,
    preface: bool,
    settings_seen: bool,
    last_stream: u32,
    conn_send: i64,
    conn_recv: i64,
    conn_unacked: usize,
    peer_initial: i64,
    peer_max_frame: usize,
    turn: usize,
    /// GOAWAY sent: no new streams; the connection ends when the open ones do.
    draining: bool,
    /// The client sent GOAWAY.
    peer_away: bool,
    /// A connection error: the GOAWAY is written, then the connection ends.
    failed: bool,
    clock: Clock,
    timer: Pin<Box<Sleep>>,
}

impl<IO, S, B> std::fmt::Debug for Conn<IO, S, B>
where
    S: Service<http::Request<RecvBody>, Response = http::Response<B>>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("streams", &self.streams.len())
            .field("last_stream", &self.last_stream)
            .field("draining", &self.draining)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl<IO, S, B> Conn<IO, S, B>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    S: Service<http::Request<RecvBody>, Response = http::Response<B>, Error = Infallible>,
    S::Future: Unpin,
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    /// A connection on `io` (after the TLS handshake); this side's SETTINGS
    /// are queued at once.
    pub fn new(io: IO, svc: S, timing: Timing) -> Self {
        let mut wbuf = Vec::with_capacity(32);
        frame::put_settings(
            &mut wbuf,
            &[
                (frame::SETTINGS_MAX_CONCURRENT_STREAMS, MAX_STREAMS as u32),
                (
                    frame::SETTINGS_MAX_HEADER_LIST_SIZE,
                    header::MAX_HEADER_LIST as u32,
                ),
            ],
        );
        Conn {
            io,
            svc,
            timing,
            rbuf: Vec::new(),
            wbuf,
            wpos: 0,
            need_flush: false,
            decoder: loona_hpack::Decoder::new(),
            streams: Vec::new(),
            tasks: ConnTasks::default(),
            local: Vec::new(),
            partial: None,
            preface: false,
            settings_seen: false,
            last_stream: 0,
            conn_send: i64::from(frame::DEFAULT_WINDOW),
            conn_recv: i64::from(frame::DEFAULT_WINDOW),
            conn_unacked: 0,
            peer_initial: i64::from(frame::DEFAULT_WINDOW),
            peer_max_frame: frame::MAX_FRAME,
            turn: 0,
            draining: false,
            peer_away: false,
            failed: false,
            clock: Clock::Preface,
            timer: Box::pin(tokio::time::sleep(timing.preface)),
        }
    }

    /// Starts a graceful close: GOAWAY naming the last stream taken; the
    /// connection ends once the open streams have.
    pub fn shutdown(&mut self) {
        if !self.draining && !self.failed {
            self.draining = true;
            frame::put_goaway(&mut self.wbuf, self.last_stream, Reason::NoError);
        }
    }

    /// Capacities of the read and write buffers.
    #[cfg(test)]
    pub fn buffer_capacity(&self) -> (usize, usize) {
        (self.rbuf.capacity(), self.wbuf.capacity())
    }

    fn fail(&mut self, reason: Reason) {
        if self.failed {
            return;
        }
        tracing::debug!(
            ?reason,
            last_stream = self.last_stream,
            "closing a connection on a protocol error"
        );
        self.failed = true;
        self.streams.clear();
        self.local.clear();
        // A client that does not read the GOAWAY does not keep the
        // connection: it is closed at the keepalive timeout at the latest.
        self.clock = Clock::AwaitingPong;
        self.reset_timer(self.timing.keepalive_timeout);
        self.partial = None;
        frame::put_goaway(&mut self.wbuf, self.last_stream, reason);
    }

    fn queued(&self) -> usize {
        self.wbuf.len() - self.wpos
    }

    /// Reads and handles frames; `Ready(false)` at the end of the client's
    /// stream.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Result<bool, Reason>> {
        // Uninitialised: tokio-rustls copies into it without zeroing it
        // first, so a read costs what it reads.
        let mut stack = [std::mem::MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let mut rb = ReadBuf::uninit(&mut stack);
        match Pin::new(&mut self.io).poll_read(cx, &mut rb) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => {
                tracing::debug!(error = %e, "connection read failed");
                return Poll::Ready(Ok(false));
            }
            Poll::Ready(Ok(())) => {}
        }
        let got = rb.filled();
        if got.is_empty() {
            return Poll::Ready(Ok(false));
        }
        if self.rbuf.is_empty() {
            let used = self.process(got, cx)?;
            self.rbuf.extend_from_slice(&got[used..]);
        } else {
            let mut buf = std::mem::take(&mut self.rbuf);
            buf.extend_from_slice(got);
            let used = self.process(&buf, cx)?;
            buf.drain(..used);
            self.rbuf = buf;
        }
        if self.rbuf.is_empty() && self.rbuf.capacity() > KEEP {
            self.rbuf = Vec::new();
        }
        Poll::Ready(Ok(true))
    }

    /// Handles the complete frames at the start of `buf`; returns the bytes
    /// they took.
    fn process(&mut self, buf: &[u8], cx: &mut Context<'_>) -> Result<usize, Reason> {
        let mut at = 0;
        if !self.preface {
            let n = buf.len().min(frame::PREFACE.len());
            if buf[..n] != frame::PREFACE[..n] {
                return Err(Reason::Protocol);
            }
            if n < frame::PREFACE.len() {
                return Ok(0);
            }
            self.preface = true;
            self.clock = Clock::Idle;
            self.reset_timer(self.timing.keepalive);
            at = n;
        }
        while buf.len() - at >= frame::HEAD_LEN {
            let head = Head::parse(&buf[at..]);
            if head.len > frame::MAX_FRAME {
                return Err(Reason::FrameSize);
            }
            let end = at + frame::HEAD_LEN + head.len;
            if buf.len() < end {
                break;
            }
            self.on_frame(head, &buf[at + frame::HEAD_LEN..end], cx)?;
            at = end;
            if self.failed {
                break;
            }
        }
        Ok(at)
    }

    fn on_frame(&mut self, head: Head, payload: &[u8], cx: &mut Context<'_>) -> Result<(), Reason> {
        if !self.settings_seen && head.kind != frame::SETTINGS {
            return Err(Reason::Protocol);
        }
        if let Some(p) = &self.partial
            && (head.kind != frame::CONTINUATION || head.stream != p.stream)
        {
            return Err(Reason::Protocol);
        }
        match head.kind {
            frame::DATA => self.on_data(head, payload),
            frame::HEADERS => {
                if head.stream == 0 {
                    return Err(Reason::Protocol);
                }
                let block = frame::unpad(&head, payload).ok_or(Reason::Protocol)?;
                let end_stream = head.flags & frame::END_STREAM != 0;
                if head.flags & frame::END_HEADERS != 0 {
                    self.on_header_block(head.stream, end_stream, &block, cx)
                } else {
                    self.partial = Some(Partial {
                        stream: head.stream,
                        end_stream,
                        block: block.to_vec(),
                    });
                    Ok(())
                }
            }
            frame::CONTINUATION => {
                let Some(p) = &mut self.partial else {
                    return Err(Reason::Protocol);
                };
                p.block.extend_from_slice(payload);
                if p.block.len() > MAX_HEADER_BLOCK {
                    return Err(Reason::EnhanceYourCalm);
                }
                if head.flags & frame::END_HEADERS != 0 {
                    let p = self.partial.take().unwrap();
                    self.on_header_block(p.stream, p.end_stream, &p.block, cx)?;
                }
                Ok(())
            }
            frame::PRIORITY => {
                if head.stream == 0 {
                    return Err(Reason::Protocol);
                }
                if head.len != 5 {
                    frame::put_rst(&mut self.wbuf, head.stream, Reason::FrameSize);
                }
                Ok(())
            }
            frame::RST_STREAM => {
                if head.stream == 0 {
                    return Err(Reason::Protocol);
                }
                if head.len != 4 {
                    return Err(Reason::FrameSize);
                }
                if head.stream > self.last_stream {
                    return Err(Reason::Protocol);
                }
                if let Some(i) = self.streams.iter().position(|s| s.id == head.stream) {
                    let s = self.streams.swap_remove(i);
                    self.release(s, false);
                }
                Ok(())
            }
            frame::SETTINGS => self.on_settings(head, payload),
            frame::PUSH_PROMISE => Err(Reason::Protocol),
            frame::PING => {
                if head.stream != 0 {
                    return Err(Reason::Protocol);
                }
                let payload: [u8; 8] = payload.try_into().map_err(|_| Reason::FrameSize)?;
                if head.flags & frame::ACK != 0 {
                    if self.clock == Clock::AwaitingPong {
                        self.clock = Clock::Idle;
                        self.reset_timer(self.timing.keepalive);
                    }
                } else {
                    frame::put_ping(&mut self.wbuf, frame::ACK, payload);
                }
                Ok(())
            }
            frame::GOAWAY => {
                if head.stream != 0 {
                    return Err(Reason::Protocol);
                }
                self.peer_away = true;
                Ok(())
            }
            frame::WINDOW_UPDATE => self.on_window_update(head, payload),
            _ => Ok(()),
        }
    }

    fn on_data(&mut self, head: Head, payload: &[u8]) -> Result<(), Reason> {
        if head.stream == 0 {
            return Err(Reason::Protocol);
        }
        let len = head.len as i64;
        if len > self.conn_recv {
            return Err(Reason::FlowControl);
        }
        self.conn_recv -= len;
        let data = frame::unpad(&head, payload).ok_or(Reason::Protocol)?;
        let end = head.flags & frame::END_STREAM != 0;
        let padding = head.len - data.len();
        let Some(i) = self
            .streams
            .iter()
            .position(|s| s.id == head.stream && !s.recv_end)
        else {
            if head.stream > self.last_stream {
                return Err(Reason::Protocol);
            }
            // A stream this side has finished or reset: its data is dropped,
            // and its window given back.
            self.conn_unacked += head.len;
            return Ok(());
        };
        let s = &mut self.streams[i];
        if len > s.recv_window {
            frame::put_rst(&mut self.wbuf, s.id, Reason::FlowControl);
            let s = self.streams.swap_remove(i);
            self.conn_unacked += head.len;
            self.release(s, false);
            return Ok(());
        }
        s.recv_window -= len;
        s.unacked += padding;
        self.conn_unacked += padding;
        s.recv_end = end;
        if let Some(tx) = &s.body {
            tx.push(data, end);
        }
        Ok(())
    }

    fn on_header_block(
        &mut self,
        id: u32,
        end_stream: bool,
        block: &[u8],
        cx: &mut Context<'_>,
    ) -> Result<(), Reason> {
        let decoded = header::decode(&mut self.decoder, block);
        if let Err(HeaderError::Compression(e)) = &decoded {
            tracing::debug!(error = %e, "closing a connection whose header block does not decode");
            return Err(Reason::Compression);
        }
        if let Some(s) = self.streams.iter_mut().find(|s| s.id == id) {
            // Trailers: they end the request; gRPC carries nothing in them.
            if !end_stream || s.recv_end {
                return Err(Reason::Protocol);
            }
            s.recv_end = true;
            if let Some(tx) = &s.body {
                tx.push(Bytes::new(), true);
            }
            return Ok(());
        }
        if id.is_multiple_of(2) {
            return Err(Reason::Protocol);
        }
        if id <= self.last_stream {
            // A stream this side has finished or reset (its client may not
            // have seen that yet): the block was decoded, nothing else to do.
            return Ok(());
        }
        self.last_stream = id;
        let head = match decoded {
            Ok(h) => h,
            Err(e) => {
                tracing::debug!(stream = id, error = %e, "resetting a request stream");
                frame::put_rst(&mut self.wbuf, id, Reason::Protocol);
                return Ok(());
            }
        };
        if self.draining || self.peer_away || self.streams.len() >= MAX_STREAMS {
            frame::put_rst(&mut self.wbuf, id, Reason::RefusedStream);
            return Ok(());
        }
        if !matches!(self.svc.poll_ready(cx), Poll::Ready(Ok(()))) {
            frame::put_rst(&mut self.wbuf, id, Reason::RefusedStream);
            return Ok(());
        }
        let (tx, body) = Sender::pair();
        if end_stream {
            tx.push(Bytes::new(), true);
        }
        let mut req = http::Request::new(body);
        *req.method_mut() = head.method;
        *req.uri_mut() = head.uri;
        *req.headers_mut() = head.headers;
        *req.version_mut() = http::Version::HTTP_2;
        req.extensions_mut().insert(self.tasks.clone());
        let fut = self.svc.call(req);
        if self.streams.is_empty() {
            // Most connections hold one stream (an agent's watch).
            self.streams.reserve_exact(1);
        }
        self.streams.push(Stream {
            id,
            body: Some(tx),
            recv_end: end_stream,
            recv_window: i64::from(frame::DEFAULT_WINDOW),
            unacked: 0,
            send_window: self.peer_initial,
            reply: Reply::Waiting(fut),
        });
        Ok(())
    }

    fn on_settings(&mut self, head: Head, payload: &[u8]) -> Result<(), Reason> {
        if head.stream != 0 {
            return Err(Reason::Protocol);
        }
        if head.flags & frame::ACK != 0 {
            return if head.len == 0 {
                Ok(())
            } else {
                Err(Reason::FrameSize)
            };
        }
        if !head.len.is_multiple_of(6) {
            return Err(Reason::FrameSize);
        }
        for s in payload.chunks_exact(6) {
            let id = u16::from_be_bytes([s[0], s[1]]);
            let v = u32::from_be_bytes([s[2], s[3], s[4], s[5]]);
            match id {
                frame::SETTINGS_ENABLE_PUSH if v > 1 => return Err(Reason::Protocol),
                frame::SETTINGS_INITIAL_WINDOW_SIZE => {
                    let v = i64::from(v);
                    if v > frame::MAX_WINDOW {
                        return Err(Reason::FlowControl);
                    }
                    let delta = v - self.peer_initial;
                    for s in &mut self.streams {
                        s.send_window += delta;
                        if s.send_window > frame::MAX_WINDOW {
                            return Err(Reason::FlowControl);
                        }
                    }
                    self.peer_initial = v;
                }
                frame::SETTINGS_MAX_FRAME_SIZE => {
                    if !(frame::MAX_FRAME as u32..=0x00ff_ffff).contains(&v) {
                        return Err(Reason::Protocol);
                    }
                    // Frames written stay at the default size whatever the
                    // client allows: no buffer needs more.
                    self.peer_max_frame = frame::MAX_FRAME;
                }
                // The header table size bounds an encoder table this side
                // does not keep; the others are advisory for a server, and
                // unknown ones are ignored (RFC 9113 §6.5.2).
                _ => {}
            }
        }
        self.settings_seen = true;
        frame::put_settings_ack(&mut self.wbuf);
        Ok(())
    }

    fn on_window_update(&mut self, head: Head, payload: &[u8]) -> Result<(), Reason> {
        let p: [u8; 4] = payload.try_into().map_err(|_| Reason::FrameSize)?;
        let inc = i64::from(u32::from_be_bytes(p) & 0x7fff_ffff);
        if head.stream == 0 {
            if inc == 0 {
                return Err(Reason::Protocol);
            }
            self.conn_send += inc;
            if self.conn_send > frame::MAX_WINDOW {
                return Err(Reason::FlowControl);
            }
            return Ok(());
        }
        let Some(i) = self.streams.iter().position(|s| s.id == head.stream) else {
            return if head.stream > self.last_stream {
                Err(Reason::Protocol)
            } else {
                Ok(())
            };
        };
        let s = &mut self.streams[i];
        s.send_window += inc;
        if inc == 0 || s.send_window > frame::MAX_WINDOW {
            let reason = if inc == 0 {
                Reason::Protocol
            } else {
                Reason::FlowControl
            };
            frame::put_rst(&mut self.wbuf, s.id, reason);
            let s = self.streams.swap_remove(i);
            self.release(s, false);
        }
        Ok(())
    }

    /// A stream goes: what its body still held is returned as connection
    /// window; a stream whose client is still sending is reset (NO_ERROR)
    /// when its answer is complete.
    fn release(&mut self, mut s: Stream<S::Future, B>, answered: bool) {
        if answered && !s.recv_end {
            frame::put_rst(&mut self.wbuf, s.id, Reason::NoError);
        }
        if let Some(tx) = s.body.take() {
            self.conn_unacked += tx.abort();
        }
    }

    /// Moves every stream's answer on, removes finished streams and returns
    /// the window of what the services have taken; true when a stream
    /// stopped at `WRITE_HIGH` (it has more once the output is written).
    fn poll_streams(&mut self, cx: &mut Context<'_>) -> bool {
        let n = self.streams.len();
        if n > 0 {
            self.turn = (self.turn + 1) % n;
        }
        let mut out = Out {
            queued: self.wbuf.len() - self.wpos,
            buf: &mut self.wbuf,
            conn_window: &mut self.conn_send,
            max_frame: self.peer_max_frame,
            full: false,
        };
        for k in 0..n {
            let s = &mut self.streams[(self.turn + k) % n];
            s.poll_send(cx, &mut out);
        }
        let full = out.full;
        let mut i = 0;
        while i < self.streams.len() {
            if matches!(self.streams[i].reply, Reply::Done) {
                let s = self.streams.swap_remove(i);
                self.release(s, true);
                continue;
            }
            let s = &mut self.streams[i];
            if let Some(tx) = &s.body {
                let taken = tx.take_consumed(cx);
                s.unacked += taken;
                self.conn_unacked += taken;
                if !s.recv_end && s.unacked >= frame::DEFAULT_WINDOW as usize / 2 {
                    frame::put_window_update(&mut self.wbuf, s.id, s.unacked as u32);
                    s.recv_window += s.unacked as i64;
                    s.unacked = 0;
                }
            }
            i += 1;
        }
        if self.streams.is_empty() && self.streams.capacity() > 1 {
            self.streams = Vec::new();
        }
        if self.conn_unacked >= frame::DEFAULT_WINDOW as usize / 2 {
            frame::put_window_update(&mut self.wbuf, 0, self.conn_unacked as u32);
            self.conn_recv += self.conn_unacked as i64;
            self.conn_unacked = 0;
        }
        full
    }

    /// Polls the work the service handed over, dropping what has ended.
    fn poll_local(&mut self, cx: &mut Context<'_>) {
        self.tasks.take_new(&mut self.local);
        if self.local.is_empty() {
            return;
        }
        self.local.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if self.local.is_empty() {
            self.local = Vec::new();
        }
    }

    /// Writes what is queued; `Err` when the socket failed.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Result<bool, ()> {
        let mut wrote = false;
        while self.wpos < self.wbuf.len() {
            match Pin::new(&mut self.io).poll_write(cx, &self.wbuf[self.wpos..]) {
                Poll::Ready(Ok(0)) => return Err(()),
                Poll::Ready(Ok(n)) => {
                    self.wpos += n;
                    self.need_flush = true;
                    wrote = true;
                }
                Poll::Ready(Err(e)) => {
                    tracing::debug!(error = %e, "connection write failed");
                    return Err(());
                }
                Poll::Pending => break,
            }
        }
        if self.wpos == self.wbuf.len() {
            self.wbuf.clear();
            self.wpos = 0;
            if self.wbuf.capacity() > KEEP {
                self.wbuf = Vec::new();
            }
        }
        if self.need_flush {
            match Pin::new(&mut self.io).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.need_flush = false,
                Poll::Ready(Err(_)) => return Err(()),
                Poll::Pending => {}
            }
        }
        Ok(wrote)
    }

    fn reset_timer(&mut self, after: Duration) {
        self.timer.as_mut().reset(Instant::now() + after);
    }

    /// The preface deadline and keepalive; `false` when the connection is to
    /// be closed.
    fn poll_timer(&mut self, cx: &mut Context<'_>) -> bool {
        if self.timer.as_mut().poll(cx).is_pending() {
            return true;
        }
        match self.clock {
            Clock::Preface => {
                tracing::debug!(deadline = ?self.timing.preface, "closing a connection whose client sent no HTTP/2 preface");
                false
            }
            Clock::Idle => {
                frame::put_ping(&mut self.wbuf, 0, *b"podmesh\0");
                self.clock = Clock::AwaitingPong;
                self.reset_timer(self.timing.keepalive_timeout);
                let _ = self.timer.as_mut().poll(cx);
                true
            }
            Clock::AwaitingPong => {
                tracing::debug!(timeout = ?self.timing.keepalive_timeout, "closing a connection whose client does not answer keepalive pings");
                false
            }
        }
    }
}

/// Rounds of reading, answering and writing per wake-up before the task
/// yields to others.
const ROUNDS: usize = 16;

impl<IO, S, B> Future for Conn<IO, S, B>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    S: Service<http::Request<RecvBody>, Response = http::Response<B>, Error = Infallible> + Unpin,
    S::Future: Unpin,
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        for _ in 0..ROUNDS {
            // Another round is due only when this one may have left work
            // that no waker will report: frames read (the socket is read
            // until it has nothing), or a stream held back by the queued
            // output once that output is written. Everything else that
            // returned Pending has registered the task: a round that only
            // wrote what the streams gave is the last one.
            let mut again = false;
            if !this.poll_timer(cx) {
                return Poll::Ready(());
            }
            let mut full = false;
            if !this.failed {
                if this.queued() < READ_PAUSE {
                    match this.poll_read(cx) {
                        Poll::Ready(Ok(true)) => again = true,
                        Poll::Ready(Ok(false)) => return Poll::Ready(()),
                        Poll::Ready(Err(reason)) => this.fail(reason),
                        Poll::Pending => {}
                    }
                } else {
                    // Reading resumes once the output is written.
                    full = true;
                }
                if !this.failed {
                    this.poll_local(cx);
                    full |= this.poll_streams(cx);
                    // A stream's service answered by handing work over:
                    // it runs in the next round.
                    again |= this.tasks.take_new(&mut this.local);
                }
            }
            if this.poll_write(cx).is_err() {
                return Poll::Ready(());
            }
            let quiet = this.wbuf.is_empty() && !this.need_flush;
            if quiet
                && (this.failed || ((this.draining || this.peer_away) && this.streams.is_empty()))
            {
                return Poll::Ready(());
            }
            // Written in full (else the socket's waker is registered).
            again |= full && this.queued() == 0;
            if !again {
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}
