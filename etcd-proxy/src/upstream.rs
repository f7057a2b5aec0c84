//! The one upstream list+watch of the prefix: connection lifecycle, backoff, resume and re-list on compaction.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions, WatchOptions,
};
use rand::Rng;
use serde::Deserialize;

use crate::hub::Hub;
use crate::metrics::UpstreamState;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read upstream config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("upstream config {path} is not a valid etcd client YAML: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("upstream config {path}: {why}")]
    Invalid { path: PathBuf, why: String },
}

/// The etcd client YAML (the format Cilium and etcd use).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct File {
    endpoints: Vec<String>,
    trusted_ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
}

/// Parsed upstream configuration; relative file paths are resolved against
/// the YAML's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    pub endpoints: Vec<String>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl UpstreamConfig {
    pub fn load(path: &Path) -> Result<UpstreamConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<UpstreamConfig, ConfigError> {
        let f: File = serde_yaml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        let invalid = |why: String| ConfigError::Invalid {
            path: path.to_owned(),
            why,
        };
        if f.endpoints.is_empty() {
            return Err(invalid("endpoints is empty".into()));
        }
        for e in &f.endpoints {
            if !(e.starts_with("https://") || e.starts_with("http://")) {
                return Err(invalid(format!(
                    "endpoint {e:?} must start with https:// or http://"
                )));
            }
        }
        if f.cert_file.is_some() != f.key_file.is_some() {
            return Err(invalid(
                "cert-file and key-file must be given together".into(),
            ));
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        let abs = |p: Option<PathBuf>| p.map(|p| if p.is_relative() { dir.join(p) } else { p });
        let cfg = UpstreamConfig {
            endpoints: f.endpoints,
            ca: abs(f.trusted_ca_file),
            cert: abs(f.cert_file),
            key: abs(f.key_file),
        };
        for p in [&cfg.ca, &cfg.cert, &cfg.key].into_iter().flatten() {
            if !p.is_file() {
                return Err(invalid(format!("file {} does not exist", p.display())));
            }
        }
        Ok(cfg)
    }

    /// Connect options; the files are read at every connect so rotated
    /// upstream credentials are used from the next reconnect on.
    fn options(&self) -> Result<ConnectOptions, std::io::Error> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        if self.endpoints.iter().any(|e| e.starts_with("https://")) {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &self.ca {
                tls = tls.ca_certificate(Certificate::from_pem(std::fs::read(ca)?));
            }
            if let (Some(c), Some(k)) = (&self.cert, &self.key) {
                tls = tls.identity(Identity::from_pem(std::fs::read(c)?, std::fs::read(k)?));
            }
            opts = opts.with_tls(tls);
        }
        Ok(opts)
    }
}

/// Capped exponential backoff with jitter (each delay drawn from the upper
/// half of the current step, so many proxies do not retry in lockstep).
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff {
            base,
            cap,
            attempt: 0,
        }
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn next(&mut self, rng: &mut impl Rng) -> Duration {
        let step = self
            .base
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        step.mul_f64(rng.random_range(0.5..=1.0))
    }
}

/// Why one upstream session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cannot read upstream credentials: {0}")]
    Credentials(#[source] std::io::Error),
    #[error("{op}: {source}")]
    Etcd {
        op: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    #[error("upstream watch stream ended")]
    Closed,
    #[error("upstream watch cancelled: {0}")]
    Cancelled(String),
    #[error("upstream compacted to revision {0} past the proxy's revision; re-listing")]
    Compacted(i64),
    #[error(
        "upstream revision {upstream} is behind the proxy's {ours} (etcd restored or replaced); re-listing"
    )]
    Rewound { upstream: i64, ours: i64 },
    #[error("{0} (an etcd that answers progress requests early, etcd-io/etcd#15220); re-listing")]
    Overtaken(#[from] crate::cache::Overtaken),
    #[error(
        "upstream etcd cluster ID changed from {was:x} to {now:x} (etcd replaced or restored); re-listing"
    )]
    Replaced { was: u64, now: u64 },
}

/// Interval of progress requests on the upstream watch: they move the cache
/// revision forward while nothing under the prefix changes.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Runs until shutdown: connect, list if needed, watch, and on any failure
/// back off and resume from the last revision.
pub async fn run(
    cfg: UpstreamConfig,
    prefix: Vec<u8>,
    hub: Arc<Hub>,
    base: Duration,
    cap: Duration,
) {
    let mut backoff = Backoff::new(base, cap);
    let mut shutdown = hub.shutdown();
    let mut need_list = true;
    let mut compact_revision = 0;
    let mut first = true;
    loop {
        if !first {
            hub.metrics.upstream_reconnects.inc();
        }
        first = false;
        hub.set_upstream_state(UpstreamState::Connecting);
        let session = Session {
            cfg: &cfg,
            prefix: &prefix,
            hub: &hub,
        };
        let result = tokio::select! {
            _ = crate::hub::stopped(&mut shutdown) => return,
            r = session.run(&mut need_list, &mut compact_revision, &mut backoff) => r,
        };
        hub.set_upstream_state(UpstreamState::Disconnected);
        if let Err(e) = result {
            hub.set_upstream_error(e.to_string());
            match e {
                SessionError::Compacted(_)
                | SessionError::Rewound { .. }
                | SessionError::Replaced { .. }
                | SessionError::Overtaken(_) => {
                    tracing::warn!(error = %e, "upstream history lost; downstream watchers will be cancelled to re-list")
                }
                _ => tracing::warn!(
                    error = %e,
                    endpoints = ?cfg.endpoints,
                    "upstream etcd unavailable; serving the last known state and retrying; hint: check the upstream endpoints and credentials in --upstream-config"
                ),
            }
        }
        let delay = backoff.next(&mut rand::rng());
        tokio::select! {
            _ = crate::hub::stopped(&mut shutdown) => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

struct Session<'a> {
    cfg: &'a UpstreamConfig,
    prefix: &'a [u8],
    hub: &'a Hub,
}

impl Session<'_> {
    async fn run(
        &self,
        need_list: &mut bool,
        compact_revision: &mut i64,
        backoff: &mut Backoff,
    ) -> Result<(), SessionError> {
        let etcd = |op| move |source| SessionError::Etcd { op, source };
        let opts = self.cfg.options().map_err(SessionError::Credentials)?;
        let mut client = Client::connect(&self.cfg.endpoints, Some(opts))
            .await
            .map_err(etcd("connect"))?;
        let status = client.status().await.map_err(etcd("status"))?;
        let hdr = status
            .header()
            .map(|h| (h.cluster_id(), h.raft_term(), h.revision()));
        let (cluster_id, raft_term, upstream_rev) = hdr.unwrap_or((0, 0, 0));
        let known = self.hub.upstream_cluster_id();
        self.hub
            .set_upstream_identity(cluster_id, raft_term, status.version());
        let ours = self.hub.with_cache(|c| c.revision());
        // Another etcd cluster behind the same endpoints (replaced, or
        // restored from a snapshot): its revisions do not continue ours even
        // when they are higher, so watching from ours+1 would keep keys it
        // never had. Either way: re-list, and let downstream watchers re-list too.
        let lost = if known != 0 && cluster_id != 0 && cluster_id != known {
            Some(SessionError::Replaced {
                was: known,
                now: cluster_id,
            })
        } else if upstream_rev < ours {
            Some(SessionError::Rewound {
                upstream: upstream_rev,
                ours,
            })
        } else {
            None
        };
        if !*need_list && let Some(e) = lost {
            *need_list = true;
            *compact_revision = upstream_rev;
            return Err(e);
        }
        if *need_list {
            let resp = client
                .get(self.prefix, Some(GetOptions::new().with_prefix()))
                .await
                .map_err(etcd("list"))?;
            let revision = resp.header().map_or(0, |h| h.revision());
            let kvs = resp.0.kvs;
            tracing::info!(keys = kvs.len(), revision, "listed the upstream prefix");
            self.hub
                .reset(kvs, revision, (*compact_revision).max(revision));
            *need_list = false;
        }
        let start = self.hub.with_cache(|c| c.revision()) + 1;
        let mut stream = client
            .watch(
                self.prefix,
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(start)
                        .with_progress_notify(),
                ),
            )
            .await
            .map_err(etcd("watch"))?;
        // Not at once: a watch that starts in the past replays older events
        // first, and an etcd without the fix of etcd-io/etcd#15220 answers a
        // progress request with its current revision ahead of them
        // (`cache::Overtaken` catches what this delay does not prevent).
        let mut progress =
            tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
        progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = stream.message() => {
                    let Some(resp) = msg.map_err(etcd("watch stream"))? else {
                        return Err(SessionError::Closed);
                    };
                    let resp = resp.0;
                    if resp.compact_revision != 0 {
                        *need_list = true;
                        *compact_revision = resp.compact_revision;
                        return Err(SessionError::Compacted(resp.compact_revision));
                    }
                    if resp.canceled {
                        return Err(SessionError::Cancelled(resp.cancel_reason));
                    }
                    if resp.created {
                        tracing::info!(start, "watching the upstream prefix");
                        self.hub.set_upstream_state(UpstreamState::Watching);
                        backoff.reset();
                        continue;
                    }
                    if !resp.events.is_empty() {
                        if let Err(e) = self.hub.apply(resp.events) {
                            *need_list = true;
                            return Err(e.into());
                        }
                    } else if let Some(h) = resp.header {
                        self.hub.progress(h.revision);
                    }
                }
                _ = progress.tick() => {
                    stream.request_progress().await.map_err(etcd("progress request"))?;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let d: Vec<Duration> = (0..8).map(|_| b.next(&mut rng)).collect();
        assert!(d[0] >= Duration::from_millis(50) && d[0] <= Duration::from_millis(100));
        assert!(d[3] >= Duration::from_millis(400) && d[3] <= Duration::from_millis(800));
        assert!(d.iter().all(|x| *x <= Duration::from_secs(2)));
        assert!(d[7] >= Duration::from_secs(1));
        b.reset();
        assert!(b.next(&mut rng) <= Duration::from_millis(100));
    }

    #[test]
    fn parses_the_etcd_client_yaml() {
        let dir = std::env::temp_dir().join(format!("podmesh-proxy-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["ca.crt", "c.crt", "c.key"] {
            std::fs::write(dir.join(f), "x").unwrap();
        }
        let path = dir.join("up.yaml");
        let ok = "endpoints:\n- https://127.0.0.1:2379\ntrusted-ca-file: ca.crt\ncert-file: c.crt\nkey-file: c.key\n";
        let cfg = UpstreamConfig::parse(ok, &path).unwrap();
        assert_eq!(cfg.endpoints, vec!["https://127.0.0.1:2379"]);
        assert_eq!(cfg.ca, Some(dir.join("ca.crt")));
        assert!(UpstreamConfig::parse("endpoints: []\n", &path).is_err());
        assert!(UpstreamConfig::parse("endpoints:\n- 127.0.0.1:2379\n", &path).is_err());
        assert!(
            UpstreamConfig::parse("endpoints:\n- https://a:1\ncert-file: c.crt\n", &path).is_err()
        );
        assert!(
            UpstreamConfig::parse(
                "endpoints:\n- https://a:1\ntrusted-ca-file: nope.crt\n",
                &path
            )
            .is_err()
        );
        assert!(UpstreamConfig::parse(": :", &path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
