//! A request's body as the connection receives it: DATA payloads queued for the service, and
//! what the service has taken, which the connection returns to the client as window.
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;

/// What the connection and the service share of one request body.
#[derive(Debug, Default)]
pub struct Inbox {
    chunks: VecDeque<Bytes>,
    /// The client half-closed its side.
    end: bool,
    /// The stream was reset or the connection ended before the end.
    aborted: bool,
    /// Bytes the service has taken since the connection last looked.
    taken: usize,
    /// The service's task, waiting for a chunk.
    reader: Option<Waker>,
    /// The connection's task, told when the service takes bytes.
    conn: Option<Waker>,
}

/// The connection's handle on a request body.
#[derive(Debug, Clone)]
pub struct Sender(Arc<Mutex<Inbox>>);

impl Sender {
    /// A body pair: the connection's sender and the service's body.
    pub fn pair() -> (Sender, RecvBody) {
        let inbox = Arc::new(Mutex::new(Inbox::default()));
        (Sender(inbox.clone()), RecvBody(inbox))
    }

    pub fn push(&self, data: Bytes, end: bool) {
        let mut i = self.0.lock().unwrap();
        if !data.is_empty() {
            i.chunks.push_back(data);
        }
        i.end |= end;
        if let Some(w) = i.reader.take() {
            w.wake();
        }
    }

    /// Ends the body, with an error unless the client had ended it (the
    /// stream goes); returns the bytes received that will not be returned
    /// as window otherwise (dropped unread, or taken since the last look).
    pub fn abort(&self) -> usize {
        let mut i = self.0.lock().unwrap();
        if !i.end {
            i.aborted = true;
        }
        let dropped: usize = i.chunks.drain(..).map(|c| c.len()).sum();
        let taken = std::mem::take(&mut i.taken);
        if let Some(w) = i.reader.take() {
            w.wake();
        }
        dropped + taken
    }

    /// Bytes the service has taken since the last call, to be returned as
    /// window; registers the connection to be woken when it takes more.
    pub fn take_consumed(&self, cx: &Context<'_>) -> usize {
        let mut i = self.0.lock().unwrap();
        if !i.conn.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            i.conn = Some(cx.waker().clone());
        }
        std::mem::take(&mut i.taken)
    }
}

/// The request body handed to the service.
#[derive(Debug)]
pub struct RecvBody(Arc<Mutex<Inbox>>);

/// The stream ended before its body did.
#[derive(Debug, thiserror::Error)]
#[error("the request stream was reset before its body ended")]
pub struct Aborted;

impl http_body::Body for RecvBody {
    type Data = Bytes;
    type Error = Aborted;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Aborted>>> {
        let mut i = self.0.lock().unwrap();
        if let Some(c) = i.chunks.pop_front() {
            i.taken += c.len();
            if let Some(w) = i.conn.take() {
                w.wake();
            }
            return Poll::Ready(Some(Ok(http_body::Frame::data(c))));
        }
        if i.aborted {
            return Poll::Ready(Some(Err(Aborted)));
        }
        if i.end {
            return Poll::Ready(None);
        }
        // Polled again on every pass of its watch stream: the waker is
        // cloned only when it changed.
        if !i.reader.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            i.reader = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        let i = self.0.lock().unwrap();
        i.end && i.chunks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;

    fn poll(b: &mut RecvBody) -> Poll<Option<Result<http_body::Frame<Bytes>, Aborted>>> {
        let waker = Waker::noop();
        Pin::new(b).poll_frame(&mut Context::from_waker(waker))
    }

    #[test]
    fn chunks_arrive_in_order_and_are_counted_as_taken() {
        let (tx, mut rx) = Sender::pair();
        assert!(poll(&mut rx).is_pending());
        tx.push(Bytes::from_static(b"abc"), false);
        tx.push(Bytes::from_static(b"de"), true);
        let Poll::Ready(Some(Ok(f))) = poll(&mut rx) else {
            panic!()
        };
        assert_eq!(f.into_data().unwrap(), &b"abc"[..]);
        let cx = Context::from_waker(Waker::noop());
        assert_eq!(tx.take_consumed(&cx), 3);
        assert!(!rx.is_end_stream());
        assert!(matches!(poll(&mut rx), Poll::Ready(Some(Ok(_)))));
        assert!(matches!(poll(&mut rx), Poll::Ready(None)));
        assert_eq!(tx.take_consumed(&cx), 2);
    }

    #[test]
    fn abort_before_the_end_is_an_error() {
        let (tx, mut rx) = Sender::pair();
        tx.push(Bytes::from_static(b"abc"), false);
        assert_eq!(tx.abort(), 3);
        assert!(matches!(poll(&mut rx), Poll::Ready(Some(Err(Aborted)))));
    }
}
