//! One request stream of a lean connection: the request body the client is still sending, the
//! service's answer being awaited, then its body sent as DATA within both flow-control windows.
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::Body;

use super::body::Sender;
use super::frame::{self, Reason};
use super::header;

/// Encoded output a connection holds before it stops taking more from
/// response bodies: a body that produces faster than the client reads
/// waits in the service (where the watch backlog bound applies), not here.
pub const WRITE_HIGH: usize = 16 * 1024;

/// Where a stream's answer is.
pub enum Reply<F, B> {
    /// The service has not answered yet.
    Waiting(F),
    /// Headers are sent; `pending` is the part of the body's last chunk the
    /// windows have not let through yet.
    Body { body: B, pending: Bytes },
    /// The answer ended (or the stream was reset); the stream can go.
    Done,
}

impl<F, B> std::fmt::Debug for Reply<F, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reply::Waiting(_) => f.write_str("Waiting"),
            Reply::Body { pending, .. } => write!(f, "Body({} pending)", pending.len()),
            Reply::Done => f.write_str("Done"),
        }
    }
}

/// One stream.
#[derive(Debug)]
pub struct Stream<F, B> {
    pub id: u32,
    /// The request body's sender, until the stream goes.
    pub body: Option<Sender>,
    /// The client ended its side (END_STREAM).
    pub recv_end: bool,
    /// What the client may still send on this stream.
    pub recv_window: i64,
    /// Bytes taken by the service and not yet returned as window.
    pub unacked: usize,
    /// What this side may still send on this stream.
    pub send_window: i64,
    pub reply: Reply<F, B>,
}

impl<F, B> Drop for Stream<F, B> {
    fn drop(&mut self) {
        if let Some(s) = &self.body {
            s.abort();
        }
    }
}

/// What sending may use of the connection.
#[derive(Debug)]
pub struct Out<'a> {
    pub buf: &'a mut Vec<u8>,
    /// Bytes of `buf` not yet written to the socket.
    pub queued: usize,
    pub conn_window: &'a mut i64,
    pub max_frame: usize,
    /// A stream stopped taking from its body because `WRITE_HIGH` was
    /// reached (not because the body had nothing): once the output is
    /// written, the streams are to be polled again.
    pub full: bool,
}

impl<F, B> Stream<F, B>
where
    F: Future<Output = Result<http::Response<B>, std::convert::Infallible>> + Unpin,
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    /// Moves the answer on as far as the windows and `WRITE_HIGH` allow;
    /// true when something was written.
    pub fn poll_send(&mut self, cx: &mut Context<'_>, out: &mut Out<'_>) -> bool {
        let mut progress = false;
        loop {
            match &mut self.reply {
                Reply::Done => return progress,
                Reply::Waiting(f) => {
                    let Poll::Ready(Ok(res)) = Pin::new(f).poll(cx) else {
                        return progress;
                    };
                    let (parts, body) = res.into_parts();
                    let end = body.is_end_stream();
                    let block = header::encode_response(parts.status, &parts.headers);
                    let before = out.buf.len();
                    frame::put_header_block(out.buf, self.id, &block, end, out.max_frame);
                    out.queued += out.buf.len() - before;
                    self.reply = if end {
                        Reply::Done
                    } else {
                        Reply::Body {
                            body,
                            pending: Bytes::new(),
                        }
                    };
                    progress = true;
                }
                Reply::Body { body, pending } => {
                    if !pending.is_empty() {
                        let n = (pending.len() as i64)
                            .min(self.send_window)
                            .min(*out.conn_window)
                            .min(out.max_frame as i64);
                        if n <= 0 {
                            return progress;
                        }
                        let n = n as usize;
                        frame::put_data(out.buf, self.id, &pending[..n], false);
                        out.queued += frame::HEAD_LEN + n;
                        pending.advance(n);
                        self.send_window -= n as i64;
                        *out.conn_window -= n as i64;
                        progress = true;
                        continue;
                    }
                    if out.queued >= WRITE_HIGH {
                        out.full = true;
                        return progress;
                    }
                    let before = out.buf.len();
                    match Pin::new(body).poll_frame(cx) {
                        Poll::Pending => return progress,
                        Poll::Ready(Some(Ok(f))) => match f.into_data() {
                            Ok(data) => {
                                *pending = data;
                                continue;
                            }
                            Err(f) => {
                                let trailers = f.into_trailers().unwrap_or_default();
                                let block = header::encode_trailers(&trailers);
                                frame::put_header_block(
                                    out.buf,
                                    self.id,
                                    &block,
                                    true,
                                    out.max_frame,
                                );
                                self.reply = Reply::Done;
                            }
                        },
                        Poll::Ready(None) => {
                            frame::put_data(out.buf, self.id, &[], true);
                            self.reply = Reply::Done;
                        }
                        Poll::Ready(Some(Err(e))) => {
                            tracing::debug!(stream = self.id, error = %e, "response body failed; resetting the stream");
                            frame::put_rst(out.buf, self.id, Reason::Internal);
                            self.reply = Reply::Done;
                        }
                    }
                    out.queued += out.buf.len() - before;
                    progress = true;
                }
            }
        }
    }
}
