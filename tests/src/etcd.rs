//! A real etcd (Debian `etcd-server`) with mTLS on random loopback ports, killed on drop.
use std::{
    io::{Read, Write},
    net::{IpAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::Arc,
    time::Duration,
};

use anyhow::Context;

use crate::{
    daemon,
    pki::{CertFiles, Pki},
};

/// A running etcd server with client-certificate authentication.
#[derive(Debug)]
pub struct Etcd {
    name: String,
    pki: Arc<Pki>,
    server: CertFiles,
    root_client: CertFiles,
    data_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    client_port: u16,
    peer_port: u16,
    metrics_port: u16,
    child: Option<Child>,
    log: PathBuf,
    /// Clients are also served on this address (same port), besides loopback.
    extra_ip: Option<IpAddr>,
    /// Part of `--initial-cluster-token`: a new one makes a new cluster ID.
    generation: u32,
}

impl Etcd {
    /// Starts an etcd with its own CA.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(Arc::new(Pki::new("etcd")?), "etcd")
    }

    /// Starts an etcd named `name` whose certificates come from `pki`.
    pub fn start_with(pki: Arc<Pki>, name: &str) -> anyhow::Result<Self> {
        Self::start_in(pki, name, None, None)
    }

    /// Like [`Etcd::start_with`], and also serves clients on `ip` (same
    /// port; the server certificate covers it), so that other network
    /// namespaces reach it. Call it from a thread inside the namespace that
    /// owns `ip` ([`crate::netns::NetNs::enter`]): etcd inherits it.
    pub fn start_listening(pki: Arc<Pki>, name: &str, ip: IpAddr) -> anyhow::Result<Self> {
        Self::start_in(pki, name, Some(ip), None)
    }

    /// Like [`Etcd::start_listening`], with its data and log in a new
    /// directory inside `parent` rather than in the system's temp dir, so
    /// that whoever owns `parent` (a long-lived mesh) owns them too.
    pub fn start_listening_in(
        pki: Arc<Pki>,
        name: &str,
        ip: IpAddr,
        parent: &Path,
    ) -> anyhow::Result<Self> {
        Self::start_in(pki, name, Some(ip), Some(parent))
    }

    fn start_in(
        pki: Arc<Pki>,
        name: &str,
        extra_ip: Option<IpAddr>,
        parent: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let prefix = format!("podmesh-etcd-{name}-");
        let mut b = tempfile::Builder::new();
        b.prefix(&prefix);
        let tmp = match parent {
            Some(p) => b.tempdir_in(p)?,
            None => b.tempdir()?,
        };
        let (server, root_client) = certificates(&pki, name, extra_ip)?;
        let mut etcd = Self {
            name: name.to_string(),
            pki,
            server,
            root_client,
            data_dir: tmp.path().join("data"),
            log: tmp.path().join("etcd.log"),
            _tmp: Some(tmp),
            client_port: crate::free_port(),
            peer_port: crate::free_port(),
            metrics_port: crate::free_port(),
            child: None,
            extra_ip,
            generation: 0,
        };
        etcd.spawn()?;
        Ok(etcd)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let mut client = format!("https://127.0.0.1:{}", self.client_port);
        if let Some(ip) = self.extra_ip {
            let ip = match ip {
                IpAddr::V4(v4) => v4.to_string(),
                IpAddr::V6(v6) => format!("[{v6}]"),
            };
            client = format!("{client},https://{ip}:{}", self.client_port);
        }
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = Command::new("etcd");
        daemon::without_etcd_env(&mut cmd)
            .arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("{}={peer}", self.name))
            .arg("--initial-cluster-token")
            .arg(format!("podmesh-{}-{}", self.name, self.generation))
            .arg("--listen-metrics-urls")
            .arg(format!("http://127.0.0.1:{}", self.metrics_port))
            .arg("--cert-file")
            .arg(&self.server.cert)
            .arg("--key-file")
            .arg(&self.server.key)
            .arg("--trusted-ca-file")
            .arg(self.pki.ca())
            .arg("--client-cert-auth")
            .args([
                "--logger",
                "zap",
                "--log-level",
                "warn",
                "--quota-backend-bytes",
                "4294967296",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd
            .spawn()
            .context("starting etcd (install etcd-server: cargo xtask setup)")?;
        self.child = Some(child);
        self.wait_healthy(Duration::from_secs(20))
    }

    fn wait_healthy(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let port = self.metrics_port;
        daemon::wait_until("etcd", &mut self.child, &self.log, timeout, || {
            http_get(port, "/health").is_ok_and(|b| b.contains("\"true\""))
        })
    }

    /// The last lines of etcd's log.
    pub fn log_tail(&self) -> String {
        daemon::log_tail(&self.log, 30)
    }

    /// `https://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        daemon::loopback_endpoint(self.client_port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.client_port
    }

    /// The CA that signed the server and client certificates.
    pub fn pki(&self) -> &Arc<Pki> {
        &self.pki
    }

    /// A client certificate with full access (etcd has no auth enabled).
    pub fn root_client(&self) -> &CertFiles {
        &self.root_client
    }

    /// `http://127.0.0.1:<port>/metrics`.
    pub fn metrics_url(&self) -> String {
        format!("http://127.0.0.1:{}/metrics", self.metrics_port)
    }

    /// GETs `/metrics` and returns the value of the first sample of `name`.
    pub fn metric(&self, name: &str) -> anyhow::Result<f64> {
        let body = http_get(self.metrics_port, "/metrics")?;
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("metric {name} not found"))
    }

    /// Writes an etcd client YAML (DESIGN.md Secret format) for this etcd
    /// with the root client certificate, and returns its path.
    pub fn client_config(&self, path: &Path) -> anyhow::Result<PathBuf> {
        write_client_config(path, &[self.endpoint()], self.pki.ca(), &self.root_client)
    }

    /// Runs `etcdctl` (v3 API) against this etcd with the root client certificate.
    pub fn etcdctl(&self, args: &[&str]) -> anyhow::Result<Output> {
        daemon::etcdctl_command(&self.endpoint(), self.pki.ca(), Some(&self.root_client))
            .args(args)
            .output()
            .context("running etcdctl (install etcd-client)")
    }

    /// An `etcd-client` connected with the root client certificate.
    #[cfg(feature = "etcd-client")]
    pub async fn connect(&self) -> anyhow::Result<etcd_client::Client> {
        connect(&[self.endpoint()], self.pki.ca(), Some(&self.root_client)).await
    }

    /// The process ID of the running etcd.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Leaves etcd running after this value is gone (no kill on drop, the
    /// temp dir with its data and log is kept); returns its process ID and
    /// that directory, which the caller removes when done.
    pub fn detach(mut self) -> (Option<u32>, PathBuf) {
        let pid = self.child.take().map(|c| c.id());
        let dir = match self._tmp.take() {
            Some(tmp) => tmp.keep(),
            None => self
                .log
                .parent()
                .expect("log is in the temp dir")
                .to_path_buf(),
        };
        (pid, dir)
    }

    /// Kills etcd (SIGKILL) and waits for it; the data dir stays.
    pub fn kill(&mut self) {
        daemon::kill(&mut self.child);
    }

    /// Starts etcd again on the same ports with the same data dir.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()
    }

    /// Kills etcd and starts it again (same ports, same data) with a server
    /// certificate, trusted client CA and root client certificate from
    /// `pki`: a CA rotation, after which clients with the old CA's
    /// certificates are refused.
    pub fn restart_with_pki(&mut self, pki: Arc<Pki>) -> anyhow::Result<()> {
        self.kill();
        (self.server, self.root_client) = certificates(&pki, &self.name, self.extra_ip)?;
        self.pki = pki;
        self.spawn()
    }

    /// Kills etcd, deletes its data and starts it empty on the same ports.
    pub fn restart_empty(&mut self) -> anyhow::Result<()> {
        self.kill();
        if self.data_dir.exists() {
            std::fs::remove_dir_all(&self.data_dir)?;
        }
        self.spawn()
    }

    /// Kills etcd and starts another etcd cluster (new data, new cluster ID,
    /// revisions from 1) on the same ports: an etcd replaced or restored
    /// behind the same endpoints. (`restart_empty` keeps the cluster ID:
    /// etcd derives it from the name, peer URLs and cluster token.)
    pub fn replace_with_new_cluster(&mut self) -> anyhow::Result<()> {
        self.generation += 1;
        self.restart_empty()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The server certificate (for loopback and `extra_ip`) and the root client
/// certificate of an etcd named `name`, issued by `pki`.
fn certificates(
    pki: &Pki,
    name: &str,
    extra_ip: Option<IpAddr>,
) -> anyhow::Result<(CertFiles, CertFiles)> {
    let server = pki.issue(&crate::pki::CertSpec {
        name: &format!("{name}-server"),
        file: None,
        sans: ["127.0.0.1".to_string(), "localhost".to_string()]
            .into_iter()
            .chain(extra_ip.map(|ip| ip.to_string()))
            .collect(),
        server: true,
        client: true,
        expired: false,
    })?;
    Ok((server, pki.client(&format!("{name}-root"))?))
}

/// Writes an etcd client YAML (`endpoints`, `trusted-ca-file`, `cert-file`, `key-file`).
pub fn write_client_config(
    path: &Path,
    endpoints: &[String],
    ca: &Path,
    client: &CertFiles,
) -> anyhow::Result<PathBuf> {
    let mut y = String::from("endpoints:\n");
    for e in endpoints {
        y.push_str(&format!("- {e}\n"));
    }
    y.push_str(&format!(
        "trusted-ca-file: {}\ncert-file: {}\nkey-file: {}\n",
        ca.display(),
        client.cert.display(),
        client.key.display()
    ));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, y)?;
    Ok(path.to_path_buf())
}

/// An `etcd-client` over TLS; `client` is the identity (None: no client certificate).
#[cfg(feature = "etcd-client")]
pub async fn connect(
    endpoints: &[String],
    ca: &Path,
    client: Option<&CertFiles>,
) -> anyhow::Result<etcd_client::Client> {
    let mut tls = etcd_client::TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(std::fs::read(ca)?));
    if let Some(c) = client {
        tls = tls.identity(etcd_client::Identity::from_pem(
            std::fs::read(&c.cert)?,
            std::fs::read(&c.key)?,
        ));
    }
    let opts = etcd_client::ConnectOptions::new()
        .with_tls(tls)
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(5));
    Ok(etcd_client::Client::connect(endpoints, Some(opts)).await?)
}

/// A minimal HTTP/1.0 GET on 127.0.0.1 (health and metrics endpoints).
pub fn http_get(port: u16, path: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}
