//! The etcd client YAML that Cilium and etcd use (the agent's `--kvstore-config`, each remote
//! cluster's Secret entry, the proxy's `--upstream-config`).
//!
//! ```yaml
//! endpoints:
//! - https://east-mesh.example.com:2379
//! trusted-ca-file: /var/lib/podmesh/clustermesh/east.ca.crt
//! cert-file: /var/lib/podmesh/clustermesh/east.client.crt
//! key-file: /var/lib/podmesh/clustermesh/east.client.key
//! ```
//!
//! Relative file paths are resolved against the directory of the YAML file, so
//! a Secret mounted anywhere can name its own keys (`east.ca.crt`). Unknown
//! keys are ignored (the same file may carry settings for other clients).
//! `endpoints` is a list or, as etcd accepts, one URL.
use std::{
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
};

use std::time::Duration;

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};
use serde::Deserialize;

/// Interval of HTTP/2 keepalive PINGs to etcd.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a PING may go unanswered before the connection is closed.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle time before the kernel's TCP keepalive probes start.
pub const TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// Largest client YAML accepted, in bytes; anything larger is not a client config.
pub const MAX_CONFIG_LEN: usize = 64 * 1024;

/// The PEM contents of a config's TLS files.
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    /// The CA bundle.
    pub ca: Option<Vec<u8>>,
    /// Client certificate and key.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// A parsed etcd client configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdClientConfig {
    /// `https://host:port` (or `http://` without TLS files) endpoints.
    pub endpoints: Vec<String>,
    /// CA bundle that signs the servers' certificates.
    pub trusted_ca_file: Option<PathBuf>,
    /// Client certificate (PEM).
    pub cert_file: Option<PathBuf>,
    /// Client key (PEM).
    pub key_file: Option<PathBuf>,
}

#[derive(Deserialize)]
struct Raw {
    #[serde(default)]
    endpoints: Option<serde_json::Value>,
    #[serde(rename = "trusted-ca-file", default)]
    trusted_ca_file: Option<String>,
    #[serde(rename = "cert-file", default)]
    cert_file: Option<String>,
    #[serde(rename = "key-file", default)]
    key_file: Option<String>,
}

/// Why an etcd client configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ClientConfigError {
    /// The file cannot be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The content is not a usable client config.
    #[error("{path}: {message}")]
    Invalid {
        /// The file (or `<inline>`).
        path: PathBuf,
        /// What is wrong and what is expected.
        message: String,
    },
    /// A referenced certificate or key file cannot be read.
    #[error("{path}: cannot read {what} {file}: {source}")]
    TlsFile {
        /// The config file.
        path: PathBuf,
        /// `trusted-ca-file`, `cert-file` or `key-file`.
        what: &'static str,
        /// The referenced file.
        file: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl EtcdClientConfig {
    /// Reads and parses the YAML file at `path`.
    pub fn load(path: &Path) -> Result<Self, ClientConfigError> {
        let bytes = std::fs::read(path).map_err(|source| ClientConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&bytes, path)
    }

    /// Parses YAML `bytes`; `path` names the file in errors and anchors relative paths.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self, ClientConfigError> {
        let invalid = |message: String| ClientConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        if bytes.len() > MAX_CONFIG_LEN {
            return Err(invalid(format!(
                "{} bytes is larger than an etcd client config can be ({MAX_CONFIG_LEN})",
                bytes.len()
            )));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| invalid("not UTF-8 text".into()))?;
        let raw: Raw = crate::yaml::from_str(text).map_err(|e| {
            invalid(match e.line {
                Some(l) => format!("not an etcd client YAML (line {l}): {}", e.message),
                None => format!("not an etcd client YAML: {}", e.message),
            })
        })?;
        let endpoints = match raw.endpoints {
            Some(serde_json::Value::String(s)) => vec![s],
            Some(serde_json::Value::Array(items)) => items
                .into_iter()
                .map(|v| match v {
                    serde_json::Value::String(s) => Ok(s),
                    other => Err(invalid(format!("endpoints: {other} is not a URL"))),
                })
                .collect::<Result<_, _>>()?,
            None | Some(serde_json::Value::Null) => Vec::new(),
            Some(other) => {
                return Err(invalid(format!("endpoints: expected a list, got {other}")));
            }
        };
        if endpoints.is_empty() {
            return Err(invalid(
                "endpoints: empty; list the remote cluster's etcd (proxy) URLs, e.g. https://east-mesh:2379".into(),
            ));
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |f: Option<String>| -> Option<PathBuf> {
            f.filter(|s| !s.is_empty()).map(|s| {
                let p = PathBuf::from(s);
                if p.is_absolute() { p } else { base.join(p) }
            })
        };
        let cfg = Self {
            endpoints,
            trusted_ca_file: resolve(raw.trusted_ca_file),
            cert_file: resolve(raw.cert_file),
            key_file: resolve(raw.key_file),
        };
        let tls = cfg.trusted_ca_file.is_some() || cfg.cert_file.is_some();
        for e in &cfg.endpoints {
            let rest = if let Some(r) = e.strip_prefix("https://") {
                r
            } else if let Some(r) = e.strip_prefix("http://") {
                if tls {
                    return Err(invalid(format!(
                        "endpoint {e} is plaintext but TLS files are configured; use https://"
                    )));
                }
                r
            } else {
                return Err(invalid(format!(
                    "endpoint {e:?} needs a scheme: https://host:port"
                )));
            };
            if rest.is_empty() || rest.contains(char::is_whitespace) {
                return Err(invalid(format!("endpoint {e:?} has no valid host")));
            }
            // An IPv6 address goes in brackets (RFC 3986): without them its
            // colons cannot be told from the port's.
            let authority = rest.split('/').next().unwrap_or_default();
            let ipv6_ok = match authority.strip_prefix('[') {
                Some(r) => r
                    .split_once(']')
                    .is_some_and(|(a, _)| a.parse::<std::net::Ipv6Addr>().is_ok()),
                None => authority.matches(':').count() <= 1,
            };
            if !ipv6_ok {
                return Err(invalid(format!(
                    "endpoint {e:?}: an IPv6 address goes in brackets, e.g. https://[fd00::1]:2379"
                )));
            }
        }
        if cfg.cert_file.is_some() != cfg.key_file.is_some() {
            return Err(invalid(
                "cert-file and key-file go together: give both for mTLS, or neither".into(),
            ));
        }
        if cfg.endpoints.iter().any(|e| e.starts_with("https://")) && cfg.trusted_ca_file.is_none()
        {
            return Err(invalid(
                "trusted-ca-file is required for https:// endpoints (the CA that signed the etcd server certificate)".into(),
            ));
        }
        Ok(cfg)
    }

    /// Whether the endpoints use TLS.
    pub fn uses_tls(&self) -> bool {
        self.trusted_ca_file.is_some()
    }

    /// The PEM contents of the TLS files, read now.
    pub fn read_tls_files(&self, config_path: &Path) -> Result<TlsFiles, ClientConfigError> {
        let read = |what: &'static str, f: &Path| {
            std::fs::read(f).map_err(|source| ClientConfigError::TlsFile {
                path: config_path.to_path_buf(),
                what,
                file: f.to_path_buf(),
                source,
            })
        };
        let ca = self
            .trusted_ca_file
            .as_deref()
            .map(|f| read("trusted-ca-file", f))
            .transpose()?;
        let id = match (&self.cert_file, &self.key_file) {
            (Some(c), Some(k)) => Some((read("cert-file", c)?, read("key-file", k)?)),
            _ => None,
        };
        Ok(TlsFiles { ca, identity: id })
    }

    /// Connect options for the `etcd-client` crate from TLS files read
    /// with [`EtcdClientConfig::read_tls_files`] (or checked by the caller).
    pub fn connect_options(tls: TlsFiles) -> ConnectOptions {
        let mut opts = ConnectOptions::new()
            // TCP connect alone; the lifecycle's deadline also covers the
            // TLS handshake and the first answer.
            .with_connect_timeout(Duration::from_secs(5))
            // HTTP/2 PINGs, also while no request is open (an idle watch):
            // a peer that stopped answering is found within 15 s.
            .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
            .with_keep_alive_while_idle(true)
            // TCP keepalive under it, for what HTTP/2 does not see (a NAT
            // entry that expires on an idle connection).
            .with_tcp_keepalive(TCP_KEEPALIVE);
        if tls.ca.is_some() || tls.identity.is_some() {
            let mut t = TlsOptions::new();
            if let Some(ca) = tls.ca {
                t = t.ca_certificate(Certificate::from_pem(ca));
            }
            if let Some((cert, key)) = tls.identity {
                t = t.identity(Identity::from_pem(cert, key));
            }
            opts = opts.with_tls(t);
        }
        opts
    }

    /// A fingerprint of this configuration and of the current contents of its
    /// TLS files, so that a rotated certificate counts as a change.
    pub fn fingerprint(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.endpoints.hash(&mut h);
        for f in [&self.trusted_ca_file, &self.cert_file, &self.key_file]
            .into_iter()
            .flatten()
        {
            f.hash(&mut h);
            std::fs::read(f).ok().hash(&mut h);
        }
        h.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<EtcdClientConfig, ClientConfigError> {
        EtcdClientConfig::parse(s.as_bytes(), Path::new("/etc/mesh/east"))
    }

    #[test]
    fn contract_example_and_relative_paths() {
        let c = parse(
            "endpoints:\n- https://east-mesh.example.com:2379\ntrusted-ca-file: east.ca.crt\ncert-file: /abs/east.client.crt\nkey-file: east.client.key\nother: 1\n",
        )
        .unwrap();
        assert_eq!(c.endpoints, vec!["https://east-mesh.example.com:2379"]);
        assert_eq!(
            c.trusted_ca_file.unwrap(),
            Path::new("/etc/mesh/east.ca.crt")
        );
        assert_eq!(c.cert_file.unwrap(), Path::new("/abs/east.client.crt"));
    }

    #[test]
    fn ipv6_endpoints_in_brackets() {
        let c = parse("endpoints: [\"https://[fd00::1]:2379\"]\ntrusted-ca-file: ca\n").unwrap();
        assert_eq!(c.endpoints, vec!["https://[fd00::1]:2379"]);
        for bad in ["https://fd00::1:2379", "https://[fd00::zz]:2379"] {
            let e = parse(&format!("endpoints: [\"{bad}\"]\ntrusted-ca-file: ca\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("in brackets"), "{bad}: {e}");
        }
    }

    #[test]
    fn refusals() {
        for (bad, needle) in [
            ("endpoints: []\n", "endpoints: empty"),
            ("endpoints: [east:2379]\n", "needs a scheme"),
            ("endpoints: [https://e:1]\n", "trusted-ca-file is required"),
            (
                "endpoints: [https://e:1]\ntrusted-ca-file: ca\ncert-file: c\n",
                "go together",
            ),
            (
                "endpoints: [http://e:1]\ntrusted-ca-file: ca\n",
                "plaintext",
            ),
            ("- a\n- b\n", "not an etcd client YAML"),
            ("endpoints: {a: 1}\n", "expected a list"),
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains(needle), "{bad:?}: {e}");
        }
    }
}

#[cfg(test)]
mod properties {
    //! The parser on arbitrary input (the `etcd_client_config` fuzz target runs
    //! the same checks under libFuzzer).
    use proptest::prelude::*;

    use super::*;

    fn check(data: &[u8]) {
        match EtcdClientConfig::parse(data, Path::new("/etc/podmesh/clustermesh/east")) {
            Ok(c) => {
                assert!(!c.endpoints.is_empty());
                for e in &c.endpoints {
                    assert!(e.starts_with("https://") || e.starts_with("http://"), "{e}");
                }
                assert_eq!(c.cert_file.is_some(), c.key_file.is_some());
                if c.endpoints.iter().any(|e| e.starts_with("https://")) {
                    assert!(c.trusted_ca_file.is_some());
                }
                for f in [&c.trusted_ca_file, &c.cert_file, &c.key_file]
                    .into_iter()
                    .flatten()
                {
                    assert!(f.is_absolute(), "{}", f.display());
                }
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes(data in prop::collection::vec(any::<u8>(), 0..256)) {
            check(&data);
        }

        #[test]
        fn yaml_shaped(
            eps in prop::collection::vec("(https?://)?[a-z0-9.:]{0,12}", 0..3),
            ca in prop::option::of("[a-z./]{0,8}"),
            cert in prop::option::of("[a-z./]{0,8}"),
            key in prop::option::of("[a-z./]{0,8}"),
        ) {
            let mut y = String::from("endpoints:\n");
            for e in &eps {
                y.push_str(&format!("- \"{e}\"\n"));
            }
            for (k, v) in [("trusted-ca-file", &ca), ("cert-file", &cert), ("key-file", &key)] {
                if let Some(v) = v {
                    y.push_str(&format!("{k}: \"{v}\"\n"));
                }
            }
            check(y.as_bytes());
        }
    }
}
