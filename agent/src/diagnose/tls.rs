//! A TLS handshake that keeps its evidence: the server's certificate chain
//! and why it was or was not trusted, the protocol version, the CAs the
//! server accepts client certificates from (its CertificateRequest), and
//! whether the server refused this client's certificate (under TLS 1.3 the
//! refusal comes after the handshake, at the first read).
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::{
        ResolvesClientCert, WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    sign::CertifiedKey,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::timeout,
};

/// The HTTP/2 client preface and an empty SETTINGS frame: a gRPC server
/// answers it with its SETTINGS.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// What the handshake showed.
#[derive(Debug, Default)]
pub struct Handshake {
    /// `TLSv1_3`, `TLSv1_2`, when it completed.
    pub version: Option<String>,
    /// The server's certificates, leaf first (empty if it sent none).
    pub server_chain: Vec<CertificateDer<'static>>,
    /// Why the server's certificate was not accepted, if it was not.
    pub server_error: Option<rustls::Error>,
    /// The distinguished names of the CAs the server accepts client
    /// certificates from; `None` when it asked for no certificate.
    pub acceptable_cas: Option<Vec<String>>,
    /// The handshake or the first exchange after it failed: the error.
    pub failure: Option<std::io::Error>,
    /// The server answered the HTTP/2 preface (it accepted this client).
    pub answered: bool,
}

#[derive(Debug)]
struct Recording {
    inner: Arc<WebPkiServerVerifier>,
    seen: Arc<Mutex<(Vec<CertificateDer<'static>>, Option<rustls::Error>)>>,
}

impl ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let res = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        let mut g = self.seen.lock().expect("recording lock");
        g.0 = std::iter::once(end_entity)
            .chain(intermediates)
            .map(|c| c.clone().into_owned())
            .collect();
        g.1 = res.as_ref().err().cloned();
        res
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[derive(Debug)]
struct Resolver {
    key: Option<Arc<CertifiedKey>>,
    hints: Arc<Mutex<Option<Vec<String>>>>,
}

/// A distinguished name of a CertificateRequest, as text. On the wire it
/// is the DER of the Name (a SEQUENCE); a writer that left the outer
/// SEQUENCE off is read too.
fn dn_text(der: &[u8]) -> String {
    use x509_parser::prelude::FromDer;
    let parse = |b: &[u8]| {
        x509_parser::x509::X509Name::from_der(b)
            .ok()
            .filter(|(rest, n)| rest.is_empty() && n.iter().next().is_some())
            .map(|(_, n)| n.to_string())
    };
    if let Some(t) = parse(der) {
        return t;
    }
    let mut wrapped = vec![0x30];
    let n = der.len();
    if n < 0x80 {
        wrapped.push(n as u8);
    } else if n < 0x100 {
        wrapped.extend([0x81, n as u8]);
    } else {
        wrapped.extend([0x82, (n >> 8) as u8, n as u8]);
    }
    wrapped.extend_from_slice(der);
    parse(&wrapped).unwrap_or_else(|| "(unparsable name)".into())
}

impl ResolvesClientCert for Resolver {
    fn resolve(
        &self,
        root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        *self.hints.lock().expect("hints lock") =
            Some(root_hint_subjects.iter().map(|s| dn_text(s)).collect());
        self.key.clone()
    }

    fn has_certs(&self) -> bool {
        self.key.is_some()
    }
}

/// Handshakes with `addr` as `name`, trusting `cas`, presenting `identity`.
pub async fn handshake(
    addr: SocketAddr,
    name: ServerName<'static>,
    cas: &[CertificateDer<'static>],
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    wait: Duration,
) -> Result<Handshake, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in cas {
        roots
            .add(c.clone())
            .map_err(|e| format!("trusted-ca-file: {e}"))?;
    }
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| format!("trusted-ca-file: {e}"))?;
    let seen = Arc::new(Mutex::new((Vec::new(), None)));
    let hints = Arc::new(Mutex::new(None));
    let key = match identity {
        Some((chain, key)) => {
            let k = provider
                .key_provider
                .load_private_key(key)
                .map_err(|e| format!("key-file: {e}"))?;
            Some(Arc::new(CertifiedKey::new(chain, k)))
        }
        None => None,
    };
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Recording {
            inner,
            seen: seen.clone(),
        }))
        .with_client_cert_resolver(Arc::new(Resolver {
            key,
            hints: hints.clone(),
        }));
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let mut out = Handshake::default();
    let tcp = match timeout(wait, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err(format!("no TCP connection within {}s", wait.as_secs_f64())),
    };
    let io_timeout = || std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in time");
    match timeout(wait, connector.connect(name, tcp)).await {
        Err(_) => out.failure = Some(io_timeout()),
        Ok(Err(e)) => out.failure = Some(e),
        Ok(Ok(mut tls)) => {
            out.version = tls.get_ref().1.protocol_version().map(|v| format!("{v:?}"));
            let exchange = async {
                tls.write_all(PREFACE).await?;
                tls.flush().await?;
                let mut buf = [0u8; 9];
                let n = tls.read(&mut buf).await?;
                if n == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the server closed the connection after the handshake",
                    ));
                }
                Ok(())
            };
            match timeout(wait, exchange).await {
                Ok(Ok(())) => out.answered = true,
                Ok(Err(e)) => out.failure = Some(e),
                Err(_) => out.failure = Some(io_timeout()),
            }
        }
    }
    let (chain, err) = std::mem::take(&mut *seen.lock().expect("recording lock"));
    out.server_chain = chain;
    out.server_error = err;
    out.acceptable_cas = hints.lock().expect("hints lock").take();
    Ok(out)
}
