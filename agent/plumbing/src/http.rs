//! Serving the plain-HTTP endpoints (`/metrics`, `/healthz`, `/readyz`,
//! `/status`) with bounds: at most [`HttpLimits::max_connections`] at once
//! (more are closed as soon as they are accepted, so a crowd of idle clients
//! cannot take every file descriptor of the process), a deadline on each
//! request's headers, and idle connections closed.
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;

/// Bounds of one HTTP endpoint.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Connections served at once; those beyond are closed at accept.
    pub max_connections: usize,
    /// A connection with no byte read or written for this long is closed.
    pub idle: Duration,
    /// A request's headers must arrive within this.
    pub header_read: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: 64,
            idle: Duration::from_secs(30),
            header_read: Duration::from_secs(10),
        }
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets the
/// requests in flight finish.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let open = Arc::new(AtomicUsize::new(0));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors, mostly: back off a little
                        // instead of spinning on the error.
                        tracing::debug!(error = %e, "accepting an HTTP connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if open.load(Ordering::Relaxed) >= limits.max_connections {
                    tracing::debug!(%peer, max = limits.max_connections, "closing an HTTP connection over the limit");
                    drop(tcp);
                    continue;
                }
                open.fetch_add(1, Ordering::Relaxed);
                let guard = Open(open.clone());
                conns.spawn(connection(tcp, app.clone(), limits, stop_rx.clone(), guard));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    let _ = stop_tx.send(true);
    while conns.join_next().await.is_some() {}
    Ok(())
}

/// Counts one open connection while it lives.
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn connection(
    tcp: tokio::net::TcpStream,
    app: axum::Router,
    limits: HttpLimits,
    mut stop: tokio::sync::watch::Receiver<bool>,
    _open: Open,
) {
    let io = Active::new(tcp);
    let last = io.last.clone();
    let born = io.born;
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read)
        .keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(app));
    tokio::pin!(conn);
    loop {
        let quiet = Duration::from_millis(last.load(Ordering::Relaxed));
        let deadline = born + quiet + limits.idle;
        tokio::select! {
            _ = conn.as_mut() => return,
            () = tokio::time::sleep_until(deadline.into()) => {
                let quiet = Duration::from_millis(last.load(Ordering::Relaxed));
                if born + quiet + limits.idle <= Instant::now() {
                    tracing::debug!(idle = ?limits.idle, "closing an idle HTTP connection");
                    return;
                }
            }
            _ = stop.changed() => break,
        }
    }
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(limits.idle, conn).await;
}

/// A stream that notes when it last moved bytes (milliseconds after `born`).
struct Active<IO> {
    io: IO,
    born: Instant,
    last: Arc<AtomicU64>,
}

impl<IO> Active<IO> {
    fn new(io: IO) -> Self {
        Active {
            io,
            born: Instant::now(),
            last: Arc::new(AtomicU64::new(0)),
        }
    }

    fn touch(&self) {
        self.last
            .store(self.born.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Active<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Active<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn closed(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 512];
        matches!(
            tokio::time::timeout(within, async {
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            })
            .await,
            Ok(())
        )
    }

    #[tokio::test]
    async fn connections_over_the_cap_and_idle_ones_are_closed_and_requests_served() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route("/healthz", axum::routing::get(|| async { "ok\n" }));
        let limits = HttpLimits {
            max_connections: 2,
            idle: Duration::from_millis(500),
            header_read: Duration::from_millis(300),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, app, limits, async {
            let _ = stopped.await;
        }));
        let mut a = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut b = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Over the cap: closed at once.
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(
            closed(&mut c, Duration::from_millis(200)).await,
            "the third connection was kept"
        );
        // A request on a held connection is served.
        a.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let n = a.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).contains("200 OK"));
        // Both are closed once idle (b never sent its headers).
        assert!(
            closed(&mut b, Duration::from_secs(2)).await,
            "a connection without headers was kept"
        );
        assert!(
            closed(&mut a, Duration::from_secs(2)).await,
            "an idle keep-alive connection was kept"
        );
        // Room again.
        let mut d = tokio::net::TcpStream::connect(addr).await.unwrap();
        d.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        d.read_to_string(&mut out).await.unwrap();
        assert!(out.contains("ok"), "{out}");
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }
}
