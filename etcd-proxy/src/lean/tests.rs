//! Protocol tests of the lean connection over an in-memory pipe: an h2 client against it, and
//! hand-written frames for what it must refuse or handle.
use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::body::{Aborted, RecvBody};
use super::conn::{Conn, Timing};
use super::frame::{self, Head, Reason};
use super::tasks::ConnTasks;

const TIMING: Timing = Timing {
    preface: Duration::from_secs(10),
    keepalive: Duration::from_secs(30),
    keepalive_timeout: Duration::from_secs(10),
};

/// Bodies of the test service.
#[derive(Debug)]
enum TestBody {
    /// The request body back, then `grpc-status: 0` trailers.
    Echo(RecvBody, bool),
    /// `left` chunks of 1,000 bytes; counts the chunks taken.
    Counted {
        left: usize,
        taken: Arc<AtomicUsize>,
    },
    /// What work handed to the connection queued, taken without a waker:
    /// the work runs in the connection's rounds before the body is polled.
    Local(Arc<Mutex<VecDeque<Bytes>>>),
}

impl http_body::Body for TestBody {
    type Data = Bytes;
    type Error = Aborted;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Aborted>>> {
        match self.get_mut() {
            TestBody::Echo(b, trailers_sent) => match Pin::new(b).poll_frame(cx) {
                Poll::Ready(None) if !*trailers_sent => {
                    *trailers_sent = true;
                    let mut t = HeaderMap::new();
                    t.insert("grpc-status", HeaderValue::from_static("0"));
                    Poll::Ready(Some(Ok(http_body::Frame::trailers(t))))
                }
                other => other,
            },
            TestBody::Counted { left, taken } => {
                if *left == 0 {
                    return Poll::Ready(None);
                }
                *left -= 1;
                taken.fetch_add(1, Ordering::SeqCst);
                Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from(vec![
                    7u8;
                    1000
                ])))))
            }
            TestBody::Local(queue) => match queue.lock().unwrap().pop_front() {
                Some(b) => Poll::Ready(Some(Ok(http_body::Frame::data(b)))),
                None => Poll::Pending,
            },
        }
    }
}

/// `/echo` answers with the request body; `/many` with 100 chunks of
/// 1,000 bytes, counted in `taken`; `/local` with what work it hands to
/// the connection produces (three chunks, 10 ms apart, then it waits
/// forever), setting `gone` when that work is dropped.
#[derive(Debug, Clone, Default)]
struct TestService {
    taken: Arc<AtomicUsize>,
    gone: Arc<AtomicBool>,
}

/// Sets its flag when dropped.
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl tonic::codegen::Service<http::Request<RecvBody>> for TestService {
    type Response = http::Response<TestBody>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<RecvBody>) -> Self::Future {
        let body = match req.uri().path() {
            "/many" => TestBody::Counted {
                left: 100,
                taken: self.taken.clone(),
            },
            "/local" => {
                let tasks = req
                    .extensions()
                    .get::<ConnTasks>()
                    .expect("every request carries its connection's tasks")
                    .clone();
                let queue = Arc::new(Mutex::new(VecDeque::new()));
                let (q, gone) = (queue.clone(), SetOnDrop(self.gone.clone()));
                tasks.spawn(async move {
                    let _gone = gone;
                    for i in 0..3u8 {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        q.lock().unwrap().push_back(Bytes::from(vec![i; 100]));
                    }
                    std::future::pending::<()>().await;
                });
                TestBody::Local(queue)
            }
            _ => TestBody::Echo(req.into_body(), false),
        };
        let mut res = http::Response::new(body);
        res.headers_mut()
            .insert("content-type", HeaderValue::from_static("application/grpc"));
        std::future::ready(Ok(res))
    }
}

fn start() -> (
    DuplexStream,
    Arc<AtomicUsize>,
    tokio::task::JoinHandle<(usize, usize)>,
) {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let taken = Arc::new(AtomicUsize::new(0));
    let mut conn = Conn::new(
        server,
        TestService {
            taken: taken.clone(),
            ..Default::default()
        },
        TIMING,
    );
    let task = tokio::spawn(async move {
        (&mut conn).await;
        conn.buffer_capacity()
    });
    (client, taken, task)
}

fn request(path: &str) -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri(format!("https://proxy.test{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

#[tokio::test]
async fn an_h2_client_gets_its_request_body_back_with_trailers() {
    let (io, _, _task) = start();
    let (mut client, conn) = h2::client::handshake(io).await.unwrap();
    tokio::spawn(conn);
    // Larger than a window and a frame: the body crosses flow control.
    let sent: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let (res, mut tx) = client.send_request(request("/echo"), false).unwrap();
    let sent2 = sent.clone();
    let writer = tokio::spawn(async move {
        for chunk in sent2.chunks(10_000) {
            tx.reserve_capacity(chunk.len());
            while tx.capacity() < chunk.len() {
                std::future::poll_fn(|cx| tx.poll_capacity(cx))
                    .await
                    .unwrap()
                    .unwrap();
            }
            tx.send_data(Bytes::copy_from_slice(chunk), false).unwrap();
        }
        tx.send_data(Bytes::new(), true).unwrap();
    });
    let res = res.await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "application/grpc");
    let mut body = res.into_body();
    let mut got = Vec::new();
    while let Some(d) = body.data().await {
        let d = d.unwrap();
        body.flow_control().release_capacity(d.len()).unwrap();
        got.extend_from_slice(&d);
    }
    assert_eq!(got.len(), sent.len());
    assert!(got == sent);
    let trailers = body.trailers().await.unwrap().unwrap();
    assert_eq!(trailers["grpc-status"], "0");
    writer.await.unwrap();

    // Many requests on the connection, decoded with the client's HPACK
    // table in use.
    for _ in 0..20 {
        let (res, mut tx) = client.send_request(request("/echo"), false).unwrap();
        tx.send_data(Bytes::from_static(b"hello"), true).unwrap();
        let mut body = res.await.unwrap().into_body();
        assert_eq!(body.data().await.unwrap().unwrap(), &b"hello"[..]);
    }
}

/// Work a service hands to the connection is polled on the connection's
/// task: its own timers wake it, what it queues reaches the body (which
/// registers no waker) and the client, and it is dropped with the
/// connection.
#[tokio::test]
async fn work_handed_to_the_connection_runs_on_it_and_goes_with_it() {
    let (io, server) = tokio::io::duplex(64 * 1024);
    let svc = TestService::default();
    let gone = svc.gone.clone();
    let task = tokio::spawn(Conn::new(server, svc, TIMING));
    let (mut client, h2conn) = h2::client::handshake(io).await.unwrap();
    let h2conn = tokio::spawn(h2conn);
    let (res, _tx) = client.send_request(request("/local"), false).unwrap();
    let mut body = res.await.unwrap().into_body();
    let mut got = Vec::new();
    while got.len() < 300 {
        let d = tokio::time::timeout(Duration::from_secs(10), body.data())
            .await
            .expect("what the work queued never came")
            .unwrap()
            .unwrap();
        body.flow_control().release_capacity(d.len()).unwrap();
        got.extend_from_slice(&d);
    }
    let want: Vec<u8> = (0..3u8).flat_map(|i| [i; 100]).collect();
    assert_eq!(got, want);
    assert!(!gone.load(Ordering::SeqCst), "the work is still running");
    drop((client, body, _tx));
    h2conn.await.unwrap().unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the connection did not end")
        .unwrap();
    assert!(
        gone.load(Ordering::SeqCst),
        "the work went with its connection"
    );
}

#[tokio::test]
async fn buffers_are_released_when_the_connection_is_idle() {
    let (io, _, task) = start();
    let (mut client, conn) = h2::client::handshake(io).await.unwrap();
    let conn = tokio::spawn(conn);
    let (res, mut tx) = client.send_request(request("/echo"), false).unwrap();
    tx.send_data(Bytes::from(vec![1u8; 40_000]), true).unwrap();
    let mut body = res.await.unwrap().into_body();
    let mut n = 0;
    while let Some(d) = body.data().await {
        let d = d.unwrap();
        body.flow_control().release_capacity(d.len()).unwrap();
        n += d.len();
    }
    assert_eq!(n, 40_000);
    drop((client, body, tx));
    conn.await.unwrap().unwrap();
    let (read, write) = task.await.unwrap();
    assert!(read <= 256 && write <= 256, "read {read} write {write}");
}

#[tokio::test]
async fn a_slow_reader_stops_the_body_at_its_window() {
    let (io, taken, _task) = start();
    let (mut client, conn) = h2::client::Builder::new()
        .initial_window_size(5_000)
        .handshake::<_, Bytes>(io)
        .await
        .unwrap();
    tokio::spawn(conn);
    let (res, _tx) = client.send_request(request("/many"), true).unwrap();
    let mut body = res.await.unwrap().into_body();
    let first = body.data().await.unwrap().unwrap();
    assert!(!first.is_empty());
    // Without window from the client, the server takes from the body what
    // fits in the window plus one chunk, and no more.
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let held = taken.load(Ordering::SeqCst);
    assert!(held <= 6 + 1, "{held} chunks taken");
    // Reading (and so returning window) lets the rest through.
    body.flow_control().release_capacity(first.len()).unwrap();
    let mut n = first.len();
    while let Some(d) = body.data().await {
        let d = d.unwrap();
        body.flow_control().release_capacity(d.len()).unwrap();
        n += d.len();
    }
    assert_eq!(n, 100 * 1000);
    assert_eq!(taken.load(Ordering::SeqCst), 100);
}

/// Reads frames until GOAWAY (returning its error code) or the end.
async fn read_goaway(io: &mut DuplexStream) -> Option<u32> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        while buf.len() >= frame::HEAD_LEN {
            let head = Head::parse(&buf);
            if buf.len() < frame::HEAD_LEN + head.len {
                break;
            }
            let payload = buf[frame::HEAD_LEN..frame::HEAD_LEN + head.len].to_vec();
            buf.drain(..frame::HEAD_LEN + head.len);
            if head.kind == frame::GOAWAY {
                return Some(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
            }
        }
        let n = io.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn a_bad_preface_is_refused() {
    let (mut io, _, task) = start();
    io.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_goaway(&mut io).await, Some(Reason::Protocol as u32));
    task.await.unwrap();
}

fn preface_and_settings() -> Vec<u8> {
    let mut b = frame::PREFACE.to_vec();
    frame::put_settings(&mut b, &[]);
    b
}

#[tokio::test]
async fn an_oversized_frame_is_refused() {
    let (mut io, _, task) = start();
    let mut b = preface_and_settings();
    frame::put_head(&mut b, frame::MAX_FRAME + 1, frame::DATA, 0, 1);
    io.write_all(&b).await.unwrap();
    assert_eq!(read_goaway(&mut io).await, Some(Reason::FrameSize as u32));
    task.await.unwrap();
}

#[tokio::test]
async fn data_beyond_the_window_is_a_flow_control_error() {
    let (io, _, task) = start();
    let mut b = preface_and_settings();
    let block = loona_hpack::Encoder::new().encode([
        (&b":method"[..], &b"POST"[..]),
        (b":scheme", b"https"),
        (b":path", b"/many"),
    ]);
    // `/many` does not read its request body: nothing is given back.
    frame::put_header_block(&mut b, 1, &block, false, frame::MAX_FRAME);
    // 5 frames of 16 KiB: 81,920 bytes against a 65,535-byte window.
    for _ in 0..5 {
        frame::put_data(&mut b, 1, &[0u8; frame::MAX_FRAME], false);
    }
    let (r, mut w) = tokio::io::split(io);
    let writer = tokio::spawn(async move {
        let _ = w.write_all(&b).await;
        w
    });
    let mut io = r.unsplit(writer.await.unwrap());
    let code = read_goaway(&mut io).await;
    assert_eq!(code, Some(Reason::FlowControl as u32));
    task.await.unwrap();
}

#[tokio::test]
async fn headers_in_continuation_pieces_make_one_request() {
    let (mut io, _, _task) = start();
    let mut b = preface_and_settings();
    let block = loona_hpack::Encoder::new().encode([
        (&b":method"[..], &b"POST"[..]),
        (b":scheme", b"https"),
        (b":authority", b"proxy.test"),
        (b":path", b"/echo"),
        (b"content-type", b"application/grpc"),
        (b"x-padding", &[b'p'; 100][..]),
    ]);
    // HEADERS and CONTINUATIONs of 7 bytes each.
    frame::put_header_block(&mut b, 1, &block, false, 7);
    frame::put_data(&mut b, 1, b"piecewise", true);
    io.write_all(&b).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut data = Vec::new();
    let mut status_block = None;
    'read: loop {
        let n = io.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed before the answer");
        buf.extend_from_slice(&chunk[..n]);
        while buf.len() >= frame::HEAD_LEN {
            let head = Head::parse(&buf);
            if buf.len() < frame::HEAD_LEN + head.len {
                break;
            }
            let p = buf[frame::HEAD_LEN..frame::HEAD_LEN + head.len].to_vec();
            buf.drain(..frame::HEAD_LEN + head.len);
            assert_ne!(head.kind, frame::GOAWAY);
            assert_ne!(head.kind, frame::RST_STREAM);
            if head.kind == frame::HEADERS && head.stream == 1 && status_block.is_none() {
                status_block = Some(p);
            } else if head.kind == frame::DATA && head.stream == 1 {
                data.extend_from_slice(&p);
            } else if head.kind == frame::HEADERS && head.flags & frame::END_STREAM != 0 {
                break 'read;
            }
        }
    }
    let fields = loona_hpack::Decoder::new()
        .decode(&status_block.unwrap())
        .unwrap();
    assert_eq!(fields[0], (b":status".to_vec(), b"200".to_vec()));
    assert_eq!(data, b"piecewise");
}

#[tokio::test]
async fn a_frame_between_headers_and_continuation_is_refused() {
    let (mut io, _, task) = start();
    let mut b = preface_and_settings();
    let block =
        loona_hpack::Encoder::new().encode([(&b":method"[..], &b"POST"[..]), (b":path", b"/echo")]);
    frame::put_head(&mut b, 3, frame::HEADERS, 0, 1);
    b.extend_from_slice(&block[..3]);
    frame::put_ping(&mut b, 0, [0; 8]);
    io.write_all(&b).await.unwrap();
    assert_eq!(read_goaway(&mut io).await, Some(Reason::Protocol as u32));
    task.await.unwrap();
}

#[tokio::test]
async fn a_ping_is_answered_and_keepalive_closes_a_silent_client() {
    tokio::time::pause();
    let (mut io, _, task) = start();
    let mut b = preface_and_settings();
    frame::put_ping(&mut b, 0, *b"12345678");
    io.write_all(&b).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let mut acked = false;
    let mut pinged = false;
    while !(acked && pinged) {
        let n = io.read(&mut chunk).await.unwrap();
        assert!(n > 0);
        buf.extend_from_slice(&chunk[..n]);
        while buf.len() >= frame::HEAD_LEN {
            let head = Head::parse(&buf);
            if buf.len() < frame::HEAD_LEN + head.len {
                break;
            }
            let p = buf[frame::HEAD_LEN..frame::HEAD_LEN + head.len].to_vec();
            buf.drain(..frame::HEAD_LEN + head.len);
            if head.kind == frame::PING && head.flags & frame::ACK != 0 {
                assert_eq!(p, b"12345678");
                acked = true;
            } else if head.kind == frame::PING {
                // The server's keepalive ping, after 30 s of paused time.
                pinged = true;
            }
        }
    }
    // Not answered: the connection ends at the keepalive timeout.
    task.await.unwrap();
}

#[tokio::test]
async fn no_preface_closes_at_the_deadline() {
    tokio::time::pause();
    let (_io, _, task) = start();
    task.await.unwrap();
}
