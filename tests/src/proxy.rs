//! podmesh-etcd-proxy run as a real process in front of a harness etcd, killed on drop.
use std::{
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::Arc,
    time::Duration,
};

use anyhow::Context;

use crate::{
    daemon,
    etcd::{Etcd, http_get},
    pki::{CertFiles, Pki},
};

/// A running proxy: its own CA signs its server certificate and the client
/// certificates it accepts.
#[derive(Debug)]
pub struct Proxy {
    pki: Arc<Pki>,
    server: CertFiles,
    client: CertFiles,
    upstream_config: PathBuf,
    _tmp: tempfile::TempDir,
    port: u16,
    metrics_port: u16,
    extra: Vec<String>,
    child: Option<Child>,
    log: PathBuf,
    /// The soft open-files limit the proxy is started with (`prlimit`), as
    /// a container runtime may set it.
    soft_nofile: Option<u64>,
}

/// The proxy binary of this workspace, built once per test process with the
/// profile the tests run in.
pub fn binary() -> anyhow::Result<PathBuf> {
    crate::mesh::workspace_binary("podmesh-etcd-proxy", "podmesh-etcd-proxy")
}

impl Proxy {
    /// Starts a proxy in front of `etcd` (with etcd's root client
    /// certificate upstream), allowing `podmesh/v1/`, plus `extra` flags.
    pub fn start(etcd: &Etcd, extra: &[&str]) -> anyhow::Result<Self> {
        let mut p = Self::start_unready(etcd, extra)?;
        p.wait_ready(Duration::from_secs(30))?;
        Ok(p)
    }

    /// Like [`Proxy::start`], but waits only until the process answers
    /// /healthz, not until it has listed its upstream (which may be down).
    pub fn start_unready(etcd: &Etcd, extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_unready_at(etcd, &[etcd.endpoint()], extra)
    }

    /// Like [`Proxy::start_unready`], with `endpoints` as the upstream's
    /// endpoints (etcd's CA and root client certificate), e.g. something
    /// between the proxy and `etcd`.
    pub fn start_unready_at(
        etcd: &Etcd,
        endpoints: &[String],
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let pki = Arc::new(Pki::new("proxy")?);
        let tmp = tempfile::Builder::new()
            .prefix("podmesh-proxy-")
            .tempdir()?;
        let server = pki.server("proxy-server", &["127.0.0.1", "localhost"])?;
        let client = pki.client("remote-agent")?;
        let upstream_config = crate::etcd::write_client_config(
            &tmp.path().join("upstream.yaml"),
            endpoints,
            etcd.pki().ca(),
            etcd.root_client(),
        )?;
        let mut p = Self {
            pki,
            server,
            client,
            upstream_config,
            log: tmp.path().join("proxy.log"),
            _tmp: tmp,
            port: crate::free_port(),
            metrics_port: crate::free_port(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
            soft_nofile: None,
        };
        p.spawn()?;
        Ok(p)
    }

    /// The command line the proxy runs with (without spawning it).
    pub fn command(&self) -> anyhow::Result<Command> {
        let mut cmd = match self.soft_nofile {
            // prlimit sets the soft limit and execs the proxy (same pid).
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:")).arg(binary()?);
                c
            }
            None => Command::new(binary()?),
        };
        cmd.arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{}", self.metrics_port))
            .arg("--upstream-config")
            .arg(&self.upstream_config)
            .arg("--tls-cert")
            .arg(&self.server.cert)
            .arg("--tls-key")
            .arg(&self.server.key)
            .arg("--client-ca")
            .arg(self.pki.ca())
            .args(["--tls-reload-interval", "200ms", "--max-backoff", "2s"])
            .args(&self.extra);
        Ok(cmd)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = self
            .command()?
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting podmesh-etcd-proxy")?;
        self.child = Some(child);
        let port = self.metrics_port;
        daemon::wait_until(
            "proxy",
            &mut self.child,
            &self.log,
            Duration::from_secs(30),
            || http_get(port, "/healthz").is_ok_and(|b| http_status(&b) == Some(200)),
        )
    }

    /// Waits until /readyz answers 200 (the upstream prefix is listed).
    pub fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let port = self.metrics_port;
        daemon::wait_until("proxy", &mut self.child, &self.log, timeout, || {
            http_get(port, "/readyz").is_ok_and(|b| http_status(&b) == Some(200))
        })
    }

    /// The last lines of the proxy's log.
    pub fn log_tail(&self) -> String {
        daemon::log_tail(&self.log, 40)
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `https://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        daemon::loopback_endpoint(self.port)
    }

    /// The metrics port (/metrics, /healthz, /readyz).
    pub fn metrics_port(&self) -> u16 {
        self.metrics_port
    }

    /// The proxy's CA (server certificate and accepted client certificates).
    pub fn pki(&self) -> &Arc<Pki> {
        &self.pki
    }

    /// A client certificate the proxy accepts.
    pub fn client(&self) -> &CertFiles {
        &self.client
    }

    /// The server certificate files (tests overwrite them to check reloads).
    pub fn server_cert(&self) -> &CertFiles {
        &self.server
    }

    /// The `--upstream-config` file (tests rewrite it to check reloads).
    pub fn upstream_config(&self) -> &std::path::Path {
        &self.upstream_config
    }

    /// The process ID.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// GETs /metrics and sums the samples of `name` whose labels contain `labels`.
    pub fn metric(&self, name: &str, labels: &str) -> anyhow::Result<f64> {
        let body = http_get(self.metrics_port, "/metrics")?;
        Ok(body
            .lines()
            .filter(|l| {
                l.starts_with(name) && l[name.len()..].starts_with([' ', '{']) && l.contains(labels)
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    /// Runs `etcdctl` (v3 API) against the proxy with `client` (None: no
    /// client certificate).
    pub fn etcdctl(&self, client: Option<&CertFiles>, args: &[&str]) -> anyhow::Result<Output> {
        self.etcdctl_command(client, args)?
            .output()
            .context("running etcdctl (install etcd-client)")
    }

    /// The `etcdctl` command of [`Proxy::etcdctl`], to spawn (e.g. `watch`).
    pub fn etcdctl_command(
        &self,
        client: Option<&CertFiles>,
        args: &[&str],
    ) -> anyhow::Result<Command> {
        let mut cmd = daemon::etcdctl_command(&self.endpoint(), self.pki.ca(), client);
        cmd.args(["--dial-timeout", "5s", "--command-timeout", "10s"])
            .args(args);
        Ok(cmd)
    }

    /// An `etcd-client` connected with the accepted client certificate.
    #[cfg(feature = "etcd-client")]
    pub async fn connect(&self) -> anyhow::Result<etcd_client::Client> {
        crate::etcd::connect(&[self.endpoint()], self.pki.ca(), Some(&self.client)).await
    }

    /// A watch of every key under `prefix` through the proxy, on a
    /// connection of its own, once the proxy has confirmed its creation.
    #[cfg(feature = "etcd-client")]
    pub async fn watch_prefix(
        &self,
        prefix: &str,
    ) -> anyhow::Result<(etcd_client::Client, etcd_client::WatchStream)> {
        let mut c = self.connect().await?;
        let mut w = c
            .watch(prefix, Some(etcd_client::WatchOptions::new().with_prefix()))
            .await?;
        let r = w
            .message()
            .await?
            .context("watch stream ended before created")?;
        anyhow::ensure!(r.created(), "expected a created response, got {r:?}");
        Ok((c, w))
    }

    /// The next events of `w` until at least `n` have arrived, as (key, mod
    /// revision); fails on a cancellation, an ended stream or 15 s without a
    /// response.
    #[cfg(feature = "etcd-client")]
    pub async fn next_events(
        w: &mut etcd_client::WatchStream,
        n: usize,
    ) -> anyhow::Result<Vec<(String, i64)>> {
        let mut got = Vec::new();
        while got.len() < n {
            let r = tokio::time::timeout(Duration::from_secs(15), w.message())
                .await
                .map_err(|_| anyhow::anyhow!("no watch response within 15 s; got {got:?}"))??
                .context("watch stream ended")?;
            anyhow::ensure!(!r.canceled(), "watch cancelled: {r:?}");
            for e in r.events() {
                let kv = e.kv().context("event without kv")?;
                got.push((kv.key_str()?.to_owned(), kv.mod_revision()));
            }
        }
        Ok(got)
    }

    /// Sends SIGTERM and waits for the exit status.
    /// Stops the proxy and starts it again with a soft open-files limit of
    /// `n` (the hard one unchanged), waiting until it is ready.
    pub fn restart_with_soft_nofile(&mut self, n: u64) -> anyhow::Result<()> {
        self.terminate()?;
        self.soft_nofile = Some(n);
        self.spawn()?;
        self.wait_ready(Duration::from_secs(30))
    }

    pub fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let mut c = self.child.take().context("proxy not running")?;
        daemon::terminate(&mut c, Duration::from_secs(30))
    }
}

/// The status code of an HTTP response as [`http_get`] returns it.
pub fn http_status(response: &str) -> Option<u16> {
    response.split_whitespace().nth(1)?.parse().ok()
}

impl Drop for Proxy {
    fn drop(&mut self) {
        daemon::kill(&mut self.child);
    }
}
