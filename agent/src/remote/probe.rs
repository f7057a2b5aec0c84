//! Whether an endpoint is a plaintext HTTP/2 (gRPC) server: the question a
//! closed or reset TLS handshake leaves open. A TLS 1.3 server that refuses
//! the client certificate and a plaintext etcd that drops a ClientHello both
//! end the connection; only the plaintext one answers an HTTP/2 preface with
//! a SETTINGS frame (or an HTTP/1 error).
use std::time::Duration;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::timeout,
};

/// The HTTP/2 client connection preface and an empty SETTINGS frame.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// How long one endpoint may take to connect, and then to answer.
const WAIT: Duration = Duration::from_secs(1);

/// `host:port` of an `https://host:port[/…]` endpoint.
fn authority(endpoint: &str) -> Option<&str> {
    let rest = endpoint.split_once("://").map_or(endpoint, |(_, r)| r);
    let authority = rest.split('/').next()?;
    (!authority.is_empty()).then_some(authority)
}

/// Whether `reply` (the first bytes a server sent after the preface) is a
/// plaintext HTTP/2 or HTTP/1 answer.
fn is_plaintext_reply(reply: &[u8]) -> bool {
    // An HTTP/2 frame header: 24-bit length, then the type (4 = SETTINGS).
    reply.starts_with(b"HTTP/") || (reply.len() >= 9 && reply[3] == 4)
}

async fn speaks_plaintext(authority: &str) -> bool {
    let Ok(Ok(mut conn)) = timeout(WAIT, TcpStream::connect(authority)).await else {
        return false;
    };
    if conn.write_all(PREFACE).await.is_err() {
        return false;
    }
    let mut reply = [0u8; 16];
    let mut got = 0;
    while got < 9 {
        match timeout(WAIT, conn.read(&mut reply[got..])).await {
            Ok(Ok(n)) if n > 0 => got += n,
            _ => break,
        }
    }
    is_plaintext_reply(&reply[..got])
}

/// Whether any of the endpoints answers plaintext HTTP.
pub async fn any_speaks_plaintext(endpoints: &[String]) -> bool {
    for e in endpoints.iter().filter_map(|e| authority(e)) {
        if speaks_plaintext(e).await {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_of_endpoints() {
        assert_eq!(authority("https://127.0.0.1:2379"), Some("127.0.0.1:2379"));
        assert_eq!(authority("https://east-mesh:2379/"), Some("east-mesh:2379"));
        assert_eq!(authority("[::1]:2379"), Some("[::1]:2379"));
        assert_eq!(authority("https://"), None);
    }

    #[test]
    fn replies() {
        assert!(is_plaintext_reply(b"\x00\x00\x06\x04\x00\x00\x00\x00\x00"));
        assert!(is_plaintext_reply(b"HTTP/1.1 400 Bad Request"));
        // A TLS alert record, or nothing at all.
        assert!(!is_plaintext_reply(b"\x15\x03\x03\x00\x02\x02\x32"));
        assert!(!is_plaintext_reply(b""));
    }

    #[tokio::test]
    async fn a_plaintext_http2_server_is_recognised_and_a_closing_one_is_not() {
        let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closing = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let plain_at = format!("https://{}", plain.local_addr().unwrap());
        let closing_at = format!("https://{}", closing.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut c, _) = plain.accept().await.unwrap();
            let mut buf = [0u8; PREFACE.len()];
            c.read_exact(&mut buf).await.unwrap();
            c.write_all(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
                .await
                .unwrap();
            let _ = c.read(&mut buf).await;
        });
        tokio::spawn(async move {
            while let Ok((c, _)) = closing.accept().await {
                drop(c);
            }
        });
        assert!(!any_speaks_plaintext(std::slice::from_ref(&closing_at)).await);
        assert!(any_speaks_plaintext(&[closing_at.clone(), plain_at]).await);
    }
}
