//! HTTP/2 serving of the gRPC routes on accepted TLS connections, by the lean server
//! (`crate::lean`) or by hyper's, with a small per-stream send buffer.
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
use crate::hub::{Hub, stopped};
use crate::lean;

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

/// Interval of keepalive PINGs, and how long one may go unanswered.
const KEEPALIVE: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The lean connection's times, the same as hyper's connection is given.
const LEAN_TIMING: lean::Timing = lean::Timing {
    preface: PREFACE_DEADLINE,
    keepalive: KEEPALIVE,
    keepalive_timeout: KEEPALIVE_TIMEOUT,
};

/// The HTTP/2 server of client connections (`--http2-server`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Http2Server {
    /// The proxy's own connection (`crate::lean`): buffers sized by the
    /// traffic, no task per stream.
    Lean,
    /// hyper's (h2) connection, with its fixed per-connection buffers.
    Hyper,
}

/// How long a refused connection is kept to answer its first requests with
/// the reason before it is closed.
const REFUSAL_LINGER: Duration = Duration::from_secs(2);

/// Refused connections answered at once; more are closed without an answer
/// (and still counted), so that a flood of them costs nothing lasting.
const REFUSING_AT_ONCE: usize = 64;

/// Serves every connection from `incoming` until shutdown, then closes them
/// gracefully (watch streams end on the same signal). At most
/// `max_connections` are served at once: a connection beyond them is
/// answered UNAVAILABLE with the reason (gRPC clients, etcd's among them,
/// try another endpoint on UNAVAILABLE) and closed, instead of the proxy
/// growing until it is killed for its memory.
pub async fn serve(
    mut incoming: mpsc::Receiver<Result<TlsStream<TcpStream>, std::io::Error>>,
    routes: Routes,
    mut shutdown: watch::Receiver<bool>,
    hub: Arc<Hub>,
    max_connections: usize,
    server: Http2Server,
) {
    hub.metrics.max_connections.set(max_connections as i64);
    let reason: Arc<str> = Arc::from(format!(
        "podmesh-etcd-proxy: all {max_connections} connections (--max-connections) are in use; try another replica, or add replicas (docs/walkthrough.md, sizing the etcd proxy)"
    ));
    let mut conns = tokio::task::JoinSet::new();
    let mut refusing = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = stopped(&mut shutdown) => break,
            next = incoming.recv() => match next {
                Some(Ok(io)) if conns.len() < max_connections => {
                    let (routes, shutdown) = (routes.clone(), shutdown.clone());
                    match server {
                        Http2Server::Lean => conns.spawn(lean_connection(io, routes, shutdown)),
                        Http2Server::Hyper => conns.spawn(connection(io, routes, shutdown)),
                    };
                    hub.metrics.connections.set(conns.len() as i64);
                }
                Some(Ok(io)) => {
                    hub.metrics.connections_refused.inc();
                    if refusing.len() < REFUSING_AT_ONCE {
                        match server {
                            Http2Server::Lean => refusing.spawn(lean_refuse(io, reason.clone())),
                            Http2Server::Hyper => refusing.spawn(refuse(io, reason.clone())),
                        };
                    }
                    if let Some(suppressed) = hub.refusals.admit("max_connections") {
                        tracing::warn!(
                            max_connections,
                            suppressed,
                            "refusing a connection: all --max-connections are in use; hint: add proxy replicas (each serves --max-connections) or raise --max-connections with the memory limit"
                        );
                    }
                }
                Some(Err(_)) => {}
                None => break,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {
                hub.metrics.connections.set(conns.len() as i64);
            }
            Some(_) = refusing.join_next(), if !refusing.is_empty() => {}
        }
    }
    refusing.abort_all();
    while conns.join_next().await.is_some() {
        hub.metrics.connections.set(conns.len() as i64);
    }
}

/// Answers the requests of a connection beyond `--max-connections` with
/// UNAVAILABLE and `reason`, for a moment, then closes it.
async fn refuse(io: TlsStream<TcpStream>, reason: Arc<str>) {
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_concurrent_streams(8)
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(Refusing(reason)));
    tokio::pin!(conn);
    if tokio::time::timeout(REFUSAL_LINGER, conn.as_mut())
        .await
        .is_err()
    {
        conn.as_mut().graceful_shutdown();
        let _ = tokio::time::timeout(REFUSAL_LINGER, conn).await;
    }
}

/// [`refuse`] by the lean server.
async fn lean_refuse(io: TlsStream<TcpStream>, reason: Arc<str>) {
    let mut conn = lean::Conn::new(io, Refusing(reason), LEAN_TIMING);
    if tokio::time::timeout(REFUSAL_LINGER, &mut conn)
        .await
        .is_err()
    {
        conn.shutdown();
        let _ = tokio::time::timeout(REFUSAL_LINGER, conn).await;
    }
}

/// Every request answered UNAVAILABLE with the reason.
#[derive(Debug, Clone)]
struct Refusing(Arc<str>);

impl<B> tonic::codegen::Service<http::Request<B>> for Refusing {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: http::Request<B>) -> Self::Future {
        std::future::ready(Ok(tonic::Status::unavailable(&*self.0).into_http()))
    }
}

/// Serves one client connection with the lean server until it ends, or
/// until shutdown and then until its streams have ended.
async fn lean_connection(
    io: TlsStream<TcpStream>,
    routes: Routes,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conn = lean::Conn::new(
        io,
        Budgeted {
            routes,
            budget: ConnectionBudget::new(CONNECTION_BYTES),
        },
        LEAN_TIMING,
    );
    tokio::select! {
        () = &mut conn => return,
        _ = stopped(&mut shutdown) => {}
    }
    conn.shutdown();
    conn.await;
}

async fn connection(io: TlsStream<TcpStream>, routes: Routes, mut shutdown: watch::Receiver<bool>) {
    let io = Counted::new(io);
    let received = io.received.clone();
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(KEEPALIVE))
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
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
