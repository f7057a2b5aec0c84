//! Shared proxy state: the cache behind one lock, and the broadcast that carries its changes to every watch stream.
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use etcd_client::proto::{PbEvent, PbKeyValue, PbResponseHeader};
use tokio::sync::{broadcast, watch};

use crate::budget::{PROXY_BYTES, ProxyBudget};
use crate::cache::{Cache, Overtaken};
use crate::metrics::{Metrics, UpstreamState};
use crate::prefix::Prefix;
use crate::service::watch_wire::EncodedEvent;

/// One change of the cache as seen by watch streams, in upstream order.
#[derive(Debug, Clone)]
pub enum Update {
    /// Events up to and including `revision`, with `prev_kv` filled in.
    Events {
        revision: i64,
        events: Arc<Vec<PbEvent>>,
        /// `events`, each encoded once for every watcher that selects it.
        encoded: Arc<[EncodedEvent]>,
    },
    /// Every event up to `revision` has been published.
    Progress(i64),
    /// The cache was re-listed (upstream compaction or rewind): events were
    /// lost in between, so every watcher must be cancelled and re-list.
    Reset { compact_revision: i64 },
}

/// Identity the proxy reports in response headers, Status and MemberList.
#[derive(Debug)]
pub struct Identity {
    pub member_id: u64,
    pub name: String,
    pub advertise_url: String,
    cluster_id: AtomicU64,
    raft_term: AtomicU64,
    version: Mutex<String>,
}

#[derive(Debug)]
pub struct Hub {
    cache: Mutex<Cache>,
    tx: broadcast::Sender<Update>,
    /// The revision of the last update published: a stream that has just
    /// received an older one knows that more are queued for it, without
    /// asking the broadcast (which takes its lock).
    published: AtomicI64,
    pub prefix: Prefix,
    pub metrics: Metrics,
    /// Bytes of built, unsent Range and Txn answers, proxy-wide.
    pub budget: ProxyBudget,
    pub identity: Identity,
    state: AtomicI64,
    /// The last upstream failure and when the current outage began; the
    /// text stays in the proxy's log and never reaches a client.
    last_error: Mutex<Option<(String, std::time::Instant)>>,
    shutdown: watch::Receiver<bool>,
    /// Log lines about refused connections, throttled per cause.
    pub refusals: crate::tls::Throttle,
}

/// Stable member ID derived from the advertised URL (FNV-1a), so that
/// restarts of the same proxy report the same member.
fn member_id(url: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in url.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h.max(1)
}

impl Hub {
    pub fn new(
        prefix: Prefix,
        history: usize,
        broadcast_capacity: usize,
        advertise_url: String,
        shutdown: watch::Receiver<bool>,
    ) -> Hub {
        let (tx, _) = broadcast::channel(broadcast_capacity.max(16));
        Hub {
            cache: Mutex::new(Cache::new(history)),
            tx,
            published: AtomicI64::new(0),
            prefix,
            metrics: Metrics::new(),
            budget: ProxyBudget::new(PROXY_BYTES),
            identity: Identity {
                member_id: member_id(&advertise_url),
                name: "podmesh-etcd-proxy".into(),
                advertise_url,
                cluster_id: AtomicU64::new(0),
                raft_term: AtomicU64::new(0),
                version: Mutex::new(String::new()),
            },
            state: AtomicI64::new(UpstreamState::Disconnected as i64),
            last_error: Mutex::new(None),
            shutdown,
            refusals: crate::tls::Throttle::default(),
        }
    }

    pub fn with_cache<R>(&self, f: impl FnOnce(&Cache) -> R) -> R {
        f(&self.cache.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A receiver of every update after the returned revision; taken under the
    /// cache lock so that nothing falls between the two.
    pub fn subscribe(&self) -> (broadcast::Receiver<Update>, i64) {
        let c = self.lock();
        (self.tx.subscribe(), c.revision())
    }

    /// The revision of the last update published (events or progress).
    pub fn published(&self) -> i64 {
        self.published.load(Ordering::Acquire)
    }

    pub fn shutdown(&self) -> watch::Receiver<bool> {
        self.shutdown.clone()
    }

    /// Applies upstream events and publishes what changed; an event that a
    /// progress report overtook changes nothing (the caller re-lists).
    pub fn apply(&self, events: Vec<PbEvent>) -> Result<(), Overtaken> {
        let n = events.len() as u64;
        let mut c = self.lock();
        self.metrics.events_in.inc_by(n);
        let out = c.apply(events)?;
        self.metrics.cache_keys.set(c.key_count() as i64);
        self.metrics.cache_revision.set(c.revision());
        if !out.is_empty() {
            let encoded = out.iter().map(EncodedEvent::new).collect();
            self.published.store(c.revision(), Ordering::Release);
            let _ = self.tx.send(Update::Events {
                revision: c.revision(),
                events: Arc::new(out),
                encoded,
            });
        }
        Ok(())
    }

    pub fn progress(&self, revision: i64) {
        let mut c = self.lock();
        if c.advance(revision) {
            self.metrics.cache_revision.set(revision);
            self.published.store(revision, Ordering::Release);
            let _ = self.tx.send(Update::Progress(revision));
        }
    }

    /// Installs a complete list; when the cache had been synced before,
    /// watchers are cancelled with `compact_revision` so they re-list.
    pub fn reset(&self, kvs: Vec<PbKeyValue>, revision: i64, compact_revision: i64) {
        let kvs: Vec<PbKeyValue> = kvs
            .into_iter()
            .filter(|kv| self.prefix.contains(&kv.key))
            .collect();
        let mut c = self.lock();
        let was_synced = c.synced();
        c.reset(kvs, revision);
        self.metrics.upstream_relists.inc();
        self.metrics.cache_keys.set(c.key_count() as i64);
        self.metrics.cache_revision.set(revision);
        if was_synced {
            let _ = self.tx.send(Update::Reset {
                compact_revision: compact_revision.max(1),
            });
        }
    }

    /// The upstream's history was lost and the cache cannot be trusted
    /// until a re-list completes: the proxy is unready, reads are refused,
    /// and watchers are cancelled with `compact_revision` so that their
    /// clients re-list (once the proxy has) instead of waiting on a frozen
    /// stream.
    pub fn invalidate(&self, compact_revision: i64) {
        let mut c = self.lock();
        if !c.synced() {
            return;
        }
        c.invalidate();
        let _ = self.tx.send(Update::Reset {
            compact_revision: compact_revision.max(1),
        });
    }

    pub fn header(&self, revision: i64) -> PbResponseHeader {
        PbResponseHeader {
            cluster_id: self.identity.cluster_id.load(Ordering::Relaxed),
            member_id: self.identity.member_id,
            revision,
            raft_term: self.identity.raft_term.load(Ordering::Relaxed),
        }
    }

    /// The upstream etcd cluster's ID as last seen (0 before the first connection).
    pub fn upstream_cluster_id(&self) -> u64 {
        self.identity.cluster_id.load(Ordering::Relaxed)
    }

    pub fn set_upstream_identity(&self, cluster_id: u64, raft_term: u64, version: &str) {
        self.identity
            .cluster_id
            .store(cluster_id, Ordering::Relaxed);
        self.identity.raft_term.store(raft_term, Ordering::Relaxed);
        *self
            .identity
            .version
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = version.to_owned();
    }

    pub fn upstream_version(&self) -> String {
        let v = self
            .identity
            .version
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if v.is_empty() {
            "3.4.0".to_owned()
        } else {
            v.clone()
        }
    }

    pub fn set_upstream_state(&self, s: UpstreamState) {
        self.state.store(s as i64, Ordering::Relaxed);
        self.metrics.upstream_state.set(s as i64);
        if s == UpstreamState::Watching {
            *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }

    pub fn upstream_state(&self) -> UpstreamState {
        match self.state.load(Ordering::Relaxed) {
            2 => UpstreamState::Watching,
            1 => UpstreamState::Connecting,
            _ => UpstreamState::Disconnected,
        }
    }

    pub fn set_upstream_error(&self, e: String) {
        let mut last = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
        let since = last
            .as_ref()
            .map_or_else(std::time::Instant::now, |(_, since)| *since);
        *last = Some((e, since));
    }

    /// How long the upstream has been failing, if it is: what clients and
    /// probes are told instead of the upstream's own error text (addresses,
    /// certificate subjects and etcd's messages are the operators' business).
    pub fn upstream_outage(&self) -> Option<std::time::Duration> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(_, since)| since.elapsed())
    }
}

/// Resolves once shutdown has been requested (or its sender is gone).
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Runs `check` every `every` until shutdown: the polling loop of the files
/// the proxy re-reads (Kubernetes swaps Secret volumes by symlink, so reading
/// the contents again is what catches every kind of update). `check` acts on a
/// change itself; a failure is passed to `failed` once, until a check
/// succeeds again, so that a file left broken does not flood the log.
pub async fn poll<E>(
    hub: &Hub,
    every: std::time::Duration,
    mut check: impl FnMut() -> Result<(), E>,
    failed: impl Fn(E),
) {
    let mut shutdown = hub.shutdown();
    let mut failing = false;
    loop {
        tokio::select! {
            _ = stopped(&mut shutdown) => return,
            _ = tokio::time::sleep(every) => {}
        }
        match check() {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                failing = true;
                failed(e);
            }
            Err(_) => {}
        }
    }
}
