//! The classifier against real TLS handshakes on loopback (rustls on both
//! sides, certificates from rcgen), and the hints it leads to.
use std::{io, net::SocketAddr, sync::Arc};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    crypto::ring::default_provider,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName},
    server::WebPkiClientVerifier,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use super::*;

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().unwrap();
    let cert = p.self_signed(&key).unwrap();
    Ca {
        cert: cert.der().clone(),
        pem: cert.pem(),
        issuer: Issuer::new(p, key),
    }
}

struct Leaf {
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

fn leaf(ca: &Ca, sans: &[&str], expired: bool) -> Leaf {
    let mut p =
        CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    if expired {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    Leaf {
        cert: cert.der().clone(),
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    }
}

fn roots(ca: &Ca) -> Arc<RootCertStore> {
    let mut r = RootCertStore::empty();
    r.add(ca.cert.clone()).unwrap();
    Arc::new(r)
}

/// A TLS server on loopback presenting `leaf`, requiring client
/// certificates of `clients` when given; it answers each request with "ok".
async fn tls_server(leaf: Leaf, clients: Option<&Ca>) -> SocketAddr {
    let provider = Arc::new(default_provider());
    let b = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let b = match clients {
        Some(ca) => b.with_client_cert_verifier(
            WebPkiClientVerifier::builder_with_provider(roots(ca), provider)
                .build()
                .unwrap(),
        ),
        None => b.with_no_client_auth(),
    };
    let cfg = b.with_single_cert(vec![leaf.cert], leaf.key).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut s) = acceptor.accept(tcp).await {
                    let mut buf = [0u8; 16];
                    let _ = s.read(&mut buf).await;
                    let _ = s.write_all(b"ok").await;
                }
            });
        }
    });
    addr
}

/// Connects to `addr` as `name`, trusting `ca`, with `identity`; after the
/// handshake, sends a request and reads the answer (under TLS 1.3 a refused
/// client certificate only shows then). The error, if any.
async fn connect(
    addr: SocketAddr,
    name: &str,
    ca: &Ca,
    identity: Option<Leaf>,
) -> Option<io::Error> {
    let b = ClientConfig::builder_with_provider(Arc::new(default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(ca));
    let cfg = match identity {
        Some(l) => b.with_client_auth_cert(vec![l.cert], l.key).unwrap(),
        None => b.with_no_client_auth(),
    };
    let tcp = match TcpStream::connect(addr).await {
        Ok(t) => t,
        Err(e) => return Some(e),
    };
    let name = ServerName::try_from(name.to_string()).unwrap();
    let mut s = match tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
    {
        Ok(s) => s,
        Err(e) => return Some(e),
    };
    if let Err(e) = s.write_all(b"hello").await {
        return Some(e);
    }
    let mut buf = [0u8; 2];
    s.read_exact(&mut buf).await.err()
}

/// `e` as the remote connection reports it (a list at an https:// endpoint).
fn listing(e: io::Error) -> KvError {
    KvError::Unavailable {
        op: "list",
        endpoints: "https://127.0.0.1:2379".into(),
        source: Box::new(e),
    }
}

async fn failure(addr: SocketAddr, name: &str, ca: &Ca, identity: Option<Leaf>) -> KvError {
    listing(
        connect(addr, name, ca, identity)
            .await
            .expect("the connection must fail"),
    )
}

#[tokio::test]
async fn a_server_certificate_from_another_ca_is_untrusted() {
    let (trusted, other) = (ca("trusted"), ca("other"));
    let addr = tls_server(leaf(&other, &["127.0.0.1"], false), None).await;
    let e = failure(addr, "127.0.0.1", &trusted, None).await;
    assert_eq!(cause(&e), Some(Cause::ServerCertUntrusted), "{e}");
    assert_eq!(hint(&e), SERVER_UNTRUSTED);
}

#[tokio::test]
async fn an_expired_server_certificate_is_told_apart() {
    let ca = ca("trusted");
    let addr = tls_server(leaf(&ca, &["127.0.0.1"], true), None).await;
    let e = failure(addr, "127.0.0.1", &ca, None).await;
    assert_eq!(cause(&e), Some(Cause::ServerCertExpired), "{e}");
    assert_eq!(hint(&e), SERVER_EXPIRED);
}

#[tokio::test]
async fn a_server_certificate_for_another_name_does_not_match() {
    let ca = ca("trusted");
    let addr = tls_server(leaf(&ca, &["proxy.example.com"], false), None).await;
    let e = failure(addr, "east-mesh.example.com", &ca, None).await;
    assert_eq!(cause(&e), Some(Cause::ServerNameMismatch), "{e}");
    assert_eq!(hint(&e), SERVER_UNTRUSTED);
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_is_refused() {
    let (ca, stranger) = (ca("trusted"), ca("stranger"));
    let addr = tls_server(leaf(&ca, &["127.0.0.1"], false), Some(&ca)).await;
    let e = failure(addr, "127.0.0.1", &ca, Some(leaf(&stranger, &[], false))).await;
    // TLS 1.3: the alert arrives after the client's handshake, or the
    // connection is closed first; both are the client certificate's refusal.
    assert!(
        matches!(
            cause(&e),
            Some(Cause::ClientCertRefused | Cause::ConnectionLost)
        ),
        "{e}: {:?}",
        cause(&e)
    );
    assert_eq!(hint(&e), CLIENT_CERT_REFUSED);
    // A good one passes.
    assert!(
        connect(addr, "127.0.0.1", &ca, Some(leaf(&ca, &[], false)))
            .await
            .is_none()
    );
}

#[tokio::test]
async fn a_plaintext_server_does_not_speak_tls() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let mut buf = [0u8; 512];
            let _ = tcp.read(&mut buf).await;
            let _ = tcp
                .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                .await;
        }
    });
    let e = failure(addr, "127.0.0.1", &ca("any"), None).await;
    assert_eq!(cause(&e), Some(Cause::NotTls), "{e}");
    assert_eq!(hint(&e), NOT_TLS);
}

#[tokio::test]
async fn nothing_listening_is_unreachable() {
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let e = failure(addr, "127.0.0.1", &ca("any"), None).await;
    assert_eq!(cause(&e), Some(Cause::Unreachable), "{e}");
    assert_eq!(hint(&e), UNREACHABLE);
}

/// Through the etcd client (tonic, hyper, the TLS connector): the
/// certificate error is still found by type under the client's own errors.
#[tokio::test]
async fn the_etcd_clients_chain_keeps_the_tls_error() {
    use crate::kvstore::{KvStore, client_config::EtcdClientConfig, etcd::EtcdStore};
    let (trusted, other) = (ca("trusted"), ca("other"));
    let addr = tls_server(leaf(&other, &["127.0.0.1"], false), None).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.crt"), &trusted.pem).unwrap();
    let path = dir.path().join("east");
    std::fs::write(
        &path,
        format!(
            "endpoints:\n- https://{addr}\ntrusted-ca-file: {}\n",
            dir.path().join("ca.crt").display()
        ),
    )
    .unwrap();
    let cfg = EtcdClientConfig::load(&path).unwrap();
    let e = match EtcdStore::connect(&cfg, &path).await {
        Err(e) => e,
        Ok(store) => match store.list_and_watch(crate::model::PREFIX).await {
            Err(e) => e,
            Ok(_) => panic!("listing through an untrusted server certificate succeeded"),
        },
    };
    assert_eq!(cause(&e), Some(Cause::ServerCertUntrusted), "{e}");
}

#[test]
fn broken_connections_on_the_first_request_are_a_refused_client_certificate() {
    for kind in [io::ErrorKind::ConnectionReset, io::ErrorKind::BrokenPipe] {
        let e = listing(io::Error::from(kind));
        assert_eq!(hint(&e), CLIENT_CERT_REFUSED, "{kind:?}");
        let watch = KvError::Unavailable {
            op: "watch",
            endpoints: "https://127.0.0.1:2379".into(),
            source: Box::new(io::Error::from(kind)),
        };
        assert_eq!(hint(&watch), WATCH_BROKE, "{kind:?}");
    }
    let refused = listing(io::Error::from(io::ErrorKind::ConnectionRefused));
    assert_eq!(hint(&refused), UNREACHABLE);
    let closed = KvError::WatchClosed {
        reason: "server shutting down".to_string(),
    };
    assert!(hint(&closed).contains("ended the watch"));
}

#[test]
fn auth_refusals_are_told_by_the_grpc_code() {
    let e = KvError::Unavailable {
        op: "list",
        endpoints: "https://127.0.0.1:2379".into(),
        source: Box::new(tonic::Status::permission_denied("not allowed")),
    };
    assert_eq!(cause(&e), Some(Cause::Auth));
    assert!(hint(&e).contains("credentials"));
}

/// The shape seen through the etcd client when the refusal of a client
/// certificate surfaces at the first request: the transport's io::Error
/// around the alert's text only.
#[test]
fn an_alert_rewrapped_as_text_is_still_a_refused_client_certificate() {
    let io = std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        "received fatal alert: BadCertificate",
    );
    let e = KvError::Unavailable {
        op: "list",
        endpoints: "https://127.0.0.1:2379".into(),
        source: Box::new(io),
    };
    assert_eq!(cause(&e), Some(Cause::ClientCertRefused), "{e}");
    let other = std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        "received fatal alert: DecodeError",
    );
    assert_ne!(classify(&other), Some(Cause::ClientCertRefused));
}
