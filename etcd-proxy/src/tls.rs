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
            .with_client_cert_verifier(Arc::new(crate::purpose::ClientAuthOnly(verifier)))
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

/// TLS handshakes in progress at once.
const HANDSHAKES_AT_ONCE: usize = 256;

/// Accepts TCP connections and completes the TLS handshake of each in its own
/// task, so that a slow or failing client never holds up the others.
pub fn accept_loop(
    listener: TcpListener,
    tls: Arc<Reloading>,
    hub: Arc<Hub>,
) -> mpsc::Receiver<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let throttle = Arc::new(Throttle::default());
    let handshakes = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_AT_ONCE));
    tokio::spawn(async move {
        let mut shutdown = hub.shutdown();
        loop {
            // A reconnecting fleet (a proxy restart puts every agent's
            // connection back at once) handshakes a few hundred at a time;
            // the others wait in the listen backlog instead of each holding
            // a handshake's memory and CPU.
            let permit = tokio::select! {
                _ = crate::hub::stopped(&mut shutdown) => return,
                p = handshakes.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
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
            let throttle = throttle.clone();
            tokio::spawn(async move {
                let handshake =
                    tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await;
                drop(permit);
                match handshake {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => {
                        hub.metrics.refuse("tls_handshake");
                        let error = describe(&e);
                        if let Some(suppressed) = throttle.admit(&error) {
                            tracing::info!(%peer, %error, suppressed, "TLS handshake refused; hint: clients need a certificate issued by --client-ca for client authentication and must speak TLS");
                        }
                    }
                    Err(_) => {
                        hub.metrics.refuse("tls_handshake_timeout");
                        if let Some(suppressed) = throttle.admit("timeout") {
                            tracing::info!(%peer, suppressed, "TLS handshake timed out");
                        }
                    }
                }
            });
        }
    });
    rx
}

/// A refused handshake in words: rustls shows a certificate refusal of our
/// own ([`crate::purpose`]) with its Debug form, so its Display is taken.
fn describe(e: &std::io::Error) -> String {
    let refusal = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match refusal {
        Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o))) => {
            format!("invalid peer certificate: {}", o.0)
        }
        _ => e.to_string(),
    }
}

/// Lines about refused handshakes per [`Throttle::WINDOW`] and cause: a
/// flood of strangers is counted in the metric, and the log says how many
/// lines it left out instead of growing by megabytes, while a cause not seen
/// before is still logged at once.
#[derive(Debug, Default)]
pub struct Throttle(std::sync::Mutex<std::collections::HashMap<String, ThrottleState>>);

#[derive(Debug, Default)]
struct ThrottleState {
    window: Option<tokio::time::Instant>,
    logged: u32,
    suppressed: u64,
}

impl Throttle {
    const WINDOW: Duration = Duration::from_secs(10);
    const LINES: u32 = 5;
    /// Causes tracked apart; any more share one count.
    const CAUSES: usize = 64;

    /// Whether to log this refusal; `Some(n)` with the lines of the same
    /// cause left out since the last one logged.
    pub fn admit(&self, cause: &str) -> Option<u64> {
        let now = tokio::time::Instant::now();
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let key = if m.len() < Self::CAUSES || m.contains_key(cause) {
            cause
        } else {
            "other"
        };
        let s = m.entry(key.to_string()).or_default();
        if s.window
            .is_none_or(|w| now.duration_since(w) >= Self::WINDOW)
        {
            s.window = Some(now);
            s.logged = 0;
        }
        if s.logged < Self::LINES {
            s.logged += 1;
            Some(std::mem::take(&mut s.suppressed))
        } else {
            s.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_flood_of_refusals_logs_a_few_lines_and_counts_the_rest() {
        let t = Throttle::default();
        let logged: Vec<_> = (0..1000).filter_map(|_| t.admit("no cert")).collect();
        assert_eq!(logged, vec![0; 5]);
        // Another cause is not held up by the flood.
        assert_eq!(t.admit("unknown issuer"), Some(0));
        tokio::time::advance(Throttle::WINDOW).await;
        assert_eq!(t.admit("no cert"), Some(995));
        assert_eq!(t.admit("no cert"), Some(0));
        // Endless distinct causes share one count past a bound.
        for i in 0..1000 {
            t.admit(&format!("cause {i}"));
        }
        assert!(t.0.lock().unwrap().len() <= Throttle::CAUSES + 1);
    }
}
