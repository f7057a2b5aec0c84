//! HTTP/2 serving of the gRPC routes on accepted TLS connections, with a small per-stream send buffer.
//!
//! tonic's own server leaves hyper's per-stream send buffer at its default
//! (400 KiB): with thousands of watchers on a few hundred streams, a client
//! that reads a little slowly makes every stream hold that much encoded
//! responses. Capped here, a stream that is behind stops taking responses
//! early; the backlog stays in the shared update ring, and the stream then
//! catches up with one response per watcher for many updates.
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_rustls::server::TlsStream;
use tonic::service::Routes;

use crate::budget::{CONNECTION_BYTES, ConnectionBudget, Held, Reservation};
use crate::hub::stopped;

/// How long an authenticated client may take to send the HTTP/2 connection
/// preface after its handshake: a client that never sends it would otherwise
/// hold its connection (and a descriptor) forever, since HTTP/2 keepalive
/// pings only start once the connection is established.
pub const PREFACE_DEADLINE: Duration = Duration::from_secs(10);

/// The client connection preface of RFC 9113 §3.4.
const PREFACE_LEN: u64 = 24;

/// Encoded responses hyper may hold per stream beyond what the client's
/// flow-control window lets through.
const SEND_BUFFER: usize = 32 * 1024;

/// Serves every connection from `incoming` until shutdown, then closes them
/// gracefully (watch streams end on the same signal).
pub async fn serve(
    mut incoming: mpsc::Receiver<Result<TlsStream<TcpStream>, std::io::Error>>,
    routes: Routes,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = stopped(&mut shutdown) => break,
            next = incoming.recv() => match next {
                Some(Ok(io)) => {
                    conns.spawn(connection(io, routes.clone(), shutdown.clone()));
                }
                Some(Err(_)) => {}
                None => break,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    while conns.join_next().await.is_some() {}
}

async fn connection(io: TlsStream<TcpStream>, routes: Routes, mut shutdown: watch::Receiver<bool>) {
    let io = Counted::new(io);
    let received = io.received.clone();
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10))
        .max_send_buf_size(SEND_BUFFER)
        .serve_connection(
            TokioIo::new(io),
            TowerToHyperService::new(Budgeted {
                routes,
                budget: ConnectionBudget::new(CONNECTION_BYTES),
            }),
        );
    tokio::pin!(conn);
    let preface = tokio::time::sleep(PREFACE_DEADLINE);
    tokio::pin!(preface);
    let mut waiting_for_preface = true;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended");
                }
                return;
            }
            () = preface.as_mut(), if waiting_for_preface => {
                if received.load(Ordering::Relaxed) < PREFACE_LEN {
                    tracing::debug!(
                        deadline = ?PREFACE_DEADLINE,
                        "closing a connection whose client sent no HTTP/2 preface"
                    );
                    return;
                }
                waiting_for_preface = false;
            }
            _ = stopped(&mut shutdown) => break,
        }
    }
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

/// A connection's stream that counts the bytes its client has sent.
#[derive(Debug)]
struct Counted<IO> {
    io: IO,
    received: Arc<AtomicU64>,
}

impl<IO> Counted<IO> {
    fn new(io: IO) -> Self {
        Counted {
            io,
            received: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Counted<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.received.fetch_add(n, Ordering::Relaxed);
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Counted<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The routes of one connection: every request carries the connection's
/// budget, and an answer that reserved bytes keeps them in its body until
/// the body is sent ([`Held`]), so what a client has not read counts
/// against it.
#[derive(Debug, Clone)]
struct Budgeted {
    routes: Routes,
    budget: ConnectionBudget,
}

impl<B> tonic::codegen::Service<http::Request<B>> for Budgeted
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        tonic::codegen::Service::<http::Request<B>>::poll_ready(&mut self.routes, cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        req.extensions_mut().insert(self.budget.clone());
        let answer = self.routes.call(req);
        Box::pin(async move {
            let mut res = answer.await?;
            Ok(match res.extensions_mut().remove::<Reservation>() {
                Some(r) if !r.is_empty() => {
                    res.map(|body| tonic::body::Body::new(Held::new(body, r)))
                }
                _ => res,
            })
        })
    }
}
