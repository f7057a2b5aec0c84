//! The upstream etcd client YAML and the credentials it names, read as one set and re-read when any of them changes.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::ConnectOptions;
use podmesh_plumbing::etcd_config::{ClientConfigError, EtcdClientConfig, TlsFiles};
use tokio::sync::watch;

use crate::hub::Hub;
use crate::tls::{pem_certs, pem_key};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read upstream config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not a usable etcd client YAML (the message names the file).
    #[error("upstream config {0}")]
    Parse(#[from] ClientConfigError),
    #[error("upstream config {path}: cannot read {field} {file}: {source}")]
    File {
        path: PathBuf,
        field: &'static str,
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("upstream config {path}: {field} {file} holds no PEM {expected}")]
    Pem {
        path: PathBuf,
        field: &'static str,
        file: PathBuf,
        expected: &'static str,
    },
    #[error(
        "upstream config {path}: cert-file {cert} and key-file {key} do not form a pair: {source}"
    )]
    Pair {
        path: PathBuf,
        cert: PathBuf,
        key: PathBuf,
        /// Boxed: rustls' error is large and this one is rare.
        #[source]
        source: Box<rustls::Error>,
    },
}

/// The upstream YAML as parsed and the contents of the files it names, read
/// together: a connection is made from exactly what was checked, and a change
/// of any of them (a rotated certificate, a YAML naming new files or
/// endpoints) is one new value to reconnect with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub config: EtcdClientConfig,
    ca: Option<Vec<u8>>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl Settings {
    /// Reads the YAML and every file it names, and checks that the CA holds
    /// a certificate and that the client certificate and key form a pair, so
    /// that a half-written rotation is told apart from a usable one.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        let bytes = std::fs::read(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config = EtcdClientConfig::parse(&bytes, path)?;
        let read = |field: &'static str, file: &Path| {
            std::fs::read(file).map_err(|source| ConfigError::File {
                path: path.to_owned(),
                field,
                file: file.to_owned(),
                source,
            })
        };
        let no_pem = |field: &'static str, file: &Path, expected: &'static str| ConfigError::Pem {
            path: path.to_owned(),
            field,
            file: file.to_owned(),
            expected,
        };
        let ca = match &config.trusted_ca_file {
            Some(file) => {
                let pem = read("trusted-ca-file", file)?;
                if pem_certs(&pem).is_empty() {
                    return Err(no_pem("trusted-ca-file", file, "CERTIFICATE"));
                }
                Some(pem)
            }
            None => None,
        };
        let identity = match (&config.cert_file, &config.key_file) {
            (Some(cert), Some(key)) => {
                let (cert_pem, key_pem) = (read("cert-file", cert)?, read("key-file", key)?);
                let chain = pem_certs(&cert_pem);
                if chain.is_empty() {
                    return Err(no_pem("cert-file", cert, "CERTIFICATE"));
                }
                let der =
                    pem_key(&key_pem).ok_or_else(|| no_pem("key-file", key, "PRIVATE KEY"))?;
                let provider = rustls::crypto::ring::default_provider();
                rustls::sign::CertifiedKey::from_der(chain, der, &provider).map_err(|source| {
                    ConfigError::Pair {
                        path: path.to_owned(),
                        cert: cert.clone(),
                        key: key.clone(),
                        source: Box::new(source),
                    }
                })?;
                Some((cert_pem, key_pem))
            }
            _ => None,
        };
        Ok(Settings {
            config,
            ca,
            identity,
        })
    }

    /// Connect options made of the contents read by [`Settings::load`]
    /// (with TCP and HTTP/2 keepalives).
    pub fn options(&self) -> ConnectOptions {
        let https = self
            .config
            .endpoints
            .iter()
            .any(|e| e.starts_with("https://"));
        EtcdClientConfig::connect_options(if https {
            TlsFiles {
                ca: self.ca.clone(),
                identity: self.identity.clone(),
            }
        } else {
            TlsFiles::default()
        })
    }
}

/// Polls the upstream YAML and the files it names, like the server's TLS
/// files (`hub::poll`), and publishes a new complete, consistent set on
/// `tx`; the upstream loop reconnects with it. An unreadable or inconsistent
/// set keeps the previous one.
pub async fn watch_files(
    path: PathBuf,
    tx: watch::Sender<Arc<Settings>>,
    hub: Arc<Hub>,
    every: Duration,
) {
    let check = || {
        let new = Settings::load(&path)?;
        if **tx.borrow() != new {
            hub.metrics.upstream_config_reloads.inc();
            tracing::info!(config = %path.display(), endpoints = ?new.config.endpoints, "upstream config or credentials changed; reconnecting with them");
            tx.send_replace(Arc::new(new));
        }
        Ok(())
    };
    crate::hub::poll(&hub, every, check, |e: ConfigError| {
        tracing::warn!(error = %e, "upstream config or credentials unreadable or invalid; keeping the previous ones; hint: write the YAML, CA, certificate and key as one consistent set");
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_resolves_relative_paths_and_refuses_a_bad_yaml() {
        let dir = std::env::temp_dir().join(format!("podmesh-proxy-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("up.yaml");
        std::fs::write(&path, "endpoints: []\n").unwrap();
        let e = Settings::load(&path).unwrap_err().to_string();
        assert!(e.contains("endpoints") && e.contains("up.yaml"), "{e}");
        std::fs::write(&path, ": :").unwrap();
        assert!(Settings::load(&path).is_err());
        std::fs::write(&path, "endpoints: https://a:1\ntrusted-ca-file: nope.crt\n").unwrap();
        let e = Settings::load(&path).unwrap_err().to_string();
        assert!(
            e.contains(&dir.join("nope.crt").display().to_string()),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn load_names_the_file_that_is_missing_or_not_pem() {
        let dir = std::env::temp_dir().join(format!("podmesh-proxy-load-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("up.yaml");
        std::fs::write(
            &path,
            "endpoints:\n- https://a:1\ntrusted-ca-file: nope.crt\n",
        )
        .unwrap();
        let e = Settings::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("trusted-ca-file") && e.contains("nope.crt"),
            "{e}"
        );
        std::fs::write(dir.join("ca.crt"), "not a certificate\n").unwrap();
        std::fs::write(
            &path,
            "endpoints:\n- https://a:1\ntrusted-ca-file: ca.crt\n",
        )
        .unwrap();
        let e = Settings::load(&path).unwrap_err().to_string();
        assert!(e.contains("holds no PEM CERTIFICATE"), "{e}");
        // Without TLS files: plaintext endpoints load as they are.
        std::fs::write(&path, "endpoints:\n- http://a:1\n").unwrap();
        let s = Settings::load(&path).unwrap();
        assert_eq!(s.config.endpoints, vec!["http://a:1"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
