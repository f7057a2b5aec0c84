//! A raw gRPC client over HTTP/2 and mTLS that sends what it is told and reads only what it is told: the misbehaving client of the hardening tests.
//!
//! Real clients (etcd-client, etcd's Go client) always read their answers; a
//! client that pipelines requests and never reads them, or never even sends
//! the HTTP/2 preface, has to be written by hand.
use std::{net::SocketAddr, path::Path, sync::Arc};

use anyhow::Context;
use bytes::Bytes;
use tokio::net::TcpStream;

use crate::pki::CertFiles;

/// One HTTP/2 connection with a client certificate; its answers are only
/// read when the caller reads them (flow-control capacity is never given
/// back otherwise, so the server's sending stalls after 64 KiB).
#[derive(Debug)]
pub struct RawGrpc {
    send: h2::client::SendRequest<Bytes>,
    conn: tokio::task::JoinHandle<()>,
}

/// A TLS client config trusting `ca` and presenting `client`.
pub fn tls_config(ca: &Path, client: &CertFiles) -> anyhow::Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut std::io::BufReader::new(std::fs::File::open(ca)?)) {
        roots.add(c?)?;
    }
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(std::fs::File::open(
        &client.cert,
    )?))
    .collect::<Result<Vec<_>, _>>()?;
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(std::fs::File::open(
        &client.key,
    )?))?
    .context("no private key")?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// A TLS connection to `addr` (handshake done, nothing sent after it).
pub async fn tls_connect(
    addr: SocketAddr,
    ca: &Path,
    client: &CertFiles,
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    Ok(
        tokio_rustls::TlsConnector::from(Arc::new(tls_config(ca, client)?))
            .connect(name, tcp)
            .await?,
    )
}

impl RawGrpc {
    /// Connects to `addr` with `client`, trusting `ca`.
    pub async fn connect(addr: SocketAddr, ca: &Path, client: &CertFiles) -> anyhow::Result<Self> {
        let tls = tls_connect(addr, ca, client).await?;
        let (send, conn) = h2::client::handshake(tls).await?;
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Self { send, conn })
    }

    /// Sends one unary call to `path` (e.g. `/etcdserverpb.KV/Range`) with the
    /// protobuf `message`; the future gives the response head, whose body is
    /// left unread unless the caller reads it.
    pub async fn call(
        &mut self,
        path: &str,
        message: &[u8],
    ) -> anyhow::Result<h2::client::ResponseFuture> {
        let (answer, mut body) = self.open(path).await?;
        body.send_data(frame(message), true)?;
        Ok(answer)
    }

    /// Opens a streaming call to `path` (e.g. `/etcdserverpb.Watch/Watch`)
    /// and sends `messages` on it without ending it; the stream stays open
    /// while the returned sender lives, and its answers are never read
    /// unless the caller reads them.
    pub async fn stream(
        &mut self,
        path: &str,
        messages: &[Vec<u8>],
    ) -> anyhow::Result<(h2::client::ResponseFuture, h2::SendStream<Bytes>)> {
        let (answer, mut body) = self.open(path).await?;
        for m in messages {
            body.send_data(frame(m), false)?;
        }
        Ok((answer, body))
    }

    /// A gRPC request to `path` whose body the caller sends.
    async fn open(
        &mut self,
        path: &str,
    ) -> anyhow::Result<(h2::client::ResponseFuture, h2::SendStream<Bytes>)> {
        self.send = self.send.clone().ready().await?;
        let req = http::Request::post(path)
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())?;
        Ok(self.send.send_request(req, false)?)
    }
}

impl Drop for RawGrpc {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

/// A gRPC length-prefixed message.
pub fn frame(message: &[u8]) -> Bytes {
    let mut b = Vec::with_capacity(message.len() + 5);
    b.push(0);
    b.extend_from_slice(
        &u32::try_from(message.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    b.extend_from_slice(message);
    b.into()
}

/// The `grpc-status` of a trailers-only answer (an error before any message),
/// `None` when the answer has a body coming.
pub fn grpc_status(head: &http::HeaderMap) -> Option<(i32, String)> {
    let code = head.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    let message = head
        .get("grpc-message")
        .map(|m| percent_decode(m.as_bytes()))
        .unwrap_or_default();
    Some((code, message))
}

/// gRPC's percent-encoding of `grpc-message`, undone.
fn percent_decode(b: &[u8]) -> String {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Peak resident memory of a process (`VmHWM`), in bytes.
pub fn peak_rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .context("no VmHWM")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kb * 1024)
}
