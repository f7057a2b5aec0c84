//! `podmesh secret render`: the clustermesh Secret entry for one remote cluster,
//! with its etcd client YAML and certificate files inlined as data keys.
use std::path::PathBuf;

use crate::{kvstore::client_config::EtcdClientConfig, model::ClusterName};

/// `podmesh secret render` arguments.
#[derive(Debug, clap::Args)]
pub struct RenderArgs {
    /// The remote cluster's name (the Secret key of its client config).
    #[arg(long)]
    pub cluster: String,
    /// The remote cluster's etcd proxy endpoint (repeatable), e.g. https://east-mesh.example.com:2379.
    #[arg(long = "endpoint", required = true)]
    pub endpoints: Vec<String>,
    /// CA certificate (PEM) that signed the proxy's server certificate.
    #[arg(long)]
    pub ca: PathBuf,
    /// Client certificate (PEM) the proxy accepts.
    #[arg(long)]
    pub cert: PathBuf,
    /// Client key (PEM).
    #[arg(long)]
    pub key: PathBuf,
    /// Secret name.
    #[arg(long, default_value = "podmesh-clustermesh")]
    pub name: String,
    /// Secret namespace.
    #[arg(long, default_value = "podmesh")]
    pub namespace: String,
    /// Where the agent mounts the Secret (its --clustermesh-config).
    #[arg(long, default_value = "/var/lib/podmesh/clustermesh")]
    pub mount_path: String,
}

/// Why the Secret cannot be rendered.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// Bad cluster name.
    #[error("--cluster: {0}")]
    Cluster(#[from] crate::model::InvalidClusterName),
    /// A file cannot be read.
    #[error("--{flag} {path}: {source}")]
    Read {
        /// The flag.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file is not PEM.
    #[error("--{flag} {path}: not a PEM file (expected -----BEGIN ...)")]
    NotPem {
        /// The flag.
        flag: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// The resulting client config would be refused by the agent.
    #[error("{0}")]
    Config(#[from] crate::kvstore::client_config::ClientConfigError),
}

/// Standard base64 with padding.
pub fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The Secret YAML.
pub fn render(a: &RenderArgs) -> Result<String, RenderError> {
    let cluster = ClusterName::new(a.cluster.clone())?;
    let read = |flag: &'static str, path: &PathBuf| -> Result<Vec<u8>, RenderError> {
        let b = std::fs::read(path).map_err(|source| RenderError::Read {
            flag,
            path: path.clone(),
            source,
        })?;
        if !String::from_utf8_lossy(&b).contains("-----BEGIN ") {
            return Err(RenderError::NotPem {
                flag,
                path: path.clone(),
            });
        }
        Ok(b)
    };
    let ca = read("ca", &a.ca)?;
    let cert = read("cert", &a.cert)?;
    let key = read("key", &a.key)?;
    let mount = a.mount_path.trim_end_matches('/');
    let (kca, kcert, kkey) = (
        format!("{cluster}.ca.crt"),
        format!("{cluster}.client.crt"),
        format!("{cluster}.client.key"),
    );
    let mut client = String::from("endpoints:\n");
    for e in &a.endpoints {
        client.push_str(&format!("- {e}\n"));
    }
    client.push_str(&format!(
        "trusted-ca-file: {mount}/{kca}\ncert-file: {mount}/{kcert}\nkey-file: {mount}/{kkey}\n"
    ));
    // Refuse to render what the agent would refuse to read.
    EtcdClientConfig::parse(
        client.as_bytes(),
        std::path::Path::new(&format!("{mount}/{cluster}")),
    )?;
    let mut out = format!(
        "# clustermesh Secret entry for remote cluster {cluster}; merge the data keys of several\n# remote clusters into one Secret mounted at {mount} (--clustermesh-config).\napiVersion: v1\nkind: Secret\nmetadata:\n  name: {}\n  namespace: {}\ntype: Opaque\ndata:\n",
        a.name, a.namespace
    );
    for (k, v) in [
        (cluster.to_string(), client.as_bytes()),
        (kca, ca.as_slice()),
        (kcert, cert.as_slice()),
        (kkey, key.as_slice()),
    ] {
        out.push_str(&format!("  {k}: {}\n", base64(v)));
    }
    Ok(out)
}

/// Runs `podmesh secret render`; returns the exit code.
pub fn run(a: &RenderArgs) -> u8 {
    match render(a) {
        Ok(y) => {
            print!("{y}");
            0
        }
        Err(e) => {
            eprintln!("podmesh secret render: {e}");
            64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    #[test]
    fn renders_secret_with_inlined_files() {
        let d = tempfile::tempdir().unwrap();
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        for f in ["ca", "crt", "key"] {
            std::fs::write(d.path().join(f), pem).unwrap();
        }
        let a = RenderArgs {
            cluster: "east".into(),
            endpoints: vec!["https://east-mesh.example.com:2379".into()],
            ca: d.path().join("ca"),
            cert: d.path().join("crt"),
            key: d.path().join("key"),
            name: "podmesh-clustermesh".into(),
            namespace: "podmesh".into(),
            mount_path: "/var/lib/podmesh/clustermesh".into(),
        };
        let y = render(&a).unwrap();
        let v: serde_json::Value = podmesh_plumbing::yaml::from_str(&y).unwrap();
        assert_eq!(v["kind"], "Secret");
        for k in ["east", "east.ca.crt", "east.client.crt", "east.client.key"] {
            assert!(v["data"][k].is_string(), "{k}");
        }
        assert_eq!(
            v["data"]["east.ca.crt"].as_str().unwrap(),
            base64(pem.as_bytes())
        );
    }
}
