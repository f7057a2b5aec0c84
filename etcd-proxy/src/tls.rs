//! Server-side mTLS: certificates and client CA loaded from files, re-read when they change, and a TLS accept loop.
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::hub::Hub;

/// The certificates of a PEM file (other blocks and unreadable ones skipped).
pub fn pem_certs(pem: &[u8]) -> Vec<CertificateDer<'static>> {
    rustls_pemfile::certs(&mut &pem[..])
        .filter_map(Result::ok)
        .collect()
}

/// The first private key of a PEM file, if it holds one.
pub fn pem_key(pem: &[u8]) -> Option<PrivateKeyDer<'static>> {
    rustls_pemfile::private_key(&mut &pem[..]).ok().flatten()
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path} holds no PEM {expected}")]
    Empty {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("client CA {path}: {source}")]
    Ca {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("client CA {path}: {source}")]
    Verifier {
        path: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error("server certificate {cert} with key {key}: {source}")]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

/// The three files the server's TLS is made of.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

impl TlsFiles {
    fn contents(&self) -> Result<[Vec<u8>; 3], TlsError> {
        Ok([
            read("TLS certificate", &self.cert)?,
            read("TLS key", &self.key)?,
            read("client CA", &self.client_ca)?,
        ])
    }

    /// Builds a server config that requires a client certificate chaining to
    /// the client CA, and speaks HTTP/2 (gRPC) only.
    pub fn load(&self) -> Result<(Arc<ServerConfig>, [Vec<u8>; 3]), TlsError> {
        let contents = self.contents()?;
        let [cert_pem, key_pem, ca_pem] = &contents;
        let certs = pem_certs(cert_pem);
        if certs.is_empty() {
            return Err(TlsError::Empty {
                what: "TLS certificate",
                path: self.cert.clone(),
                expected: "CERTIFICATE",
            });
        }
        let key = pem_key(key_pem).ok_or_else(|| TlsError::Empty {
            what: "TLS key",
            path: self.key.clone(),
            expected: "PRIVATE KEY",
        })?;
        let mut roots = RootCertStore::empty();
        let mut n = 0;
        for ca in pem_certs(ca_pem) {
            roots.add(ca).map_err(|source| TlsError::Ca {
                path: self.client_ca.clone(),
                source,
            })?;
            n += 1;
        }
        if n == 0 {
            return Err(TlsError::Empty {
                what: "client CA",
                path: self.client_ca.clone(),
                expected: "CERTIFICATE",
            });
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|source| TlsError::Verifier {
                    path: self.client_ca.clone(),
                    source,
                })?;
        let mut cfg = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|source| TlsError::Pair {
                cert: self.cert.clone(),
                key: self.key.clone(),
                source,
            })?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(|source| TlsError::Pair {
                cert: self.cert.clone(),
                key: self.key.clone(),
                source,
            })?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok((Arc::new(cfg), contents))
    }
}

/// The current server config, swapped when the files change.
#[derive(Debug)]
pub struct Reloading {
    files: TlsFiles,
    current: RwLock<(Arc<ServerConfig>, [Vec<u8>; 3])>,
}

impl Reloading {
    pub fn new(files: TlsFiles) -> Result<Reloading, TlsError> {
        let loaded = files.load()?;
        Ok(Reloading {
            files,
            current: RwLock::new(loaded),
        })
    }

    pub fn config(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }

    /// Re-reads the files; swaps the config when their contents changed and
    /// still form a valid set. Returns whether it swapped.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let contents = self.files.contents()?;
        if contents == self.current.read().unwrap_or_else(|e| e.into_inner()).1 {
            return Ok(false);
        }
        let loaded = self.files.load()?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = loaded;
        Ok(true)
    }

    /// Polls the files until shutdown (`hub::poll`).
    pub async fn watch_files(self: Arc<Self>, hub: Arc<Hub>, every: Duration) {
        let check = || {
            if self.reload()? {
                hub.metrics.tls_reloads.inc();
                tracing::info!(cert = %self.files.cert.display(), "TLS certificate files changed; new connections use them");
            }
            Ok(())
        };
        crate::hub::poll(&hub, every, check, |e: TlsError| {
            tracing::warn!(error = %e, "TLS files unreadable or invalid; keeping the previous certificates; hint: write the certificate, key and CA as one consistent set");
        })
        .await;
    }
}

/// Accepts TCP connections and completes the TLS handshake of each in its own
/// task, so that a slow or failing client never holds up the others.
pub fn accept_loop(
    listener: TcpListener,
    tls: Arc<Reloading>,
    hub: Arc<Hub>,
) -> mpsc::Receiver<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut shutdown = hub.shutdown();
        loop {
            let (tcp, peer) = tokio::select! {
                _ = crate::hub::stopped(&mut shutdown) => return,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed; hint: raise the open-files limit if this is EMFILE");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(tls.config());
            let tx = tx.clone();
            let hub = hub.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => {
                        hub.metrics.refuse("tls_handshake");
                        tracing::info!(%peer, error = %e, "TLS handshake refused; hint: clients need a certificate issued by --client-ca and must speak TLS");
                    }
                    Err(_) => {
                        hub.metrics.refuse("tls_handshake_timeout");
                        tracing::info!(%peer, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    rx
}
