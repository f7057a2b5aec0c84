//! One remote cluster's connection lifecycle: connect with the Secret entry's
//! TLS settings, list `podmesh/v1/` at a revision then watch from the next,
//! back off with jitter on failure, re-list after compaction, prune entries
//! missing from a complete list (after a grace period when the remote came
//! back empty), and report every step in the status.
use std::{future::pending, time::Duration};

use futures::StreamExt;
use tokio::time::Instant;

use podmesh_plumbing::lifecycle::{self, Event, Failure, Next};

use super::{
    Connector, RemoteSettings,
    backoff::Backoff,
    hint::{CLIENT_CERT_REFUSED, Cause, NOT_TLS, cause, hint},
    probe,
    secret::RemoteFile,
};
use crate::{
    desired::{
        MeshCache,
        decode::{Entry, decode},
    },
    kvstore::{EventStream, KvError, KvEvent, KvStore, client_config::EtcdClientConfig},
    model::PREFIX,
    status::{Status, unix_now},
};

/// A remote cluster's connection task.
#[derive(Debug)]
pub struct RemoteCluster<C> {
    /// Cluster name.
    pub name: String,
    /// Its Secret entry.
    pub file: RemoteFile,
    /// How to connect.
    pub connector: C,
    /// Where its entries go.
    pub cache: MeshCache,
    /// Where its state is reported.
    pub status: Status,
    /// Backoff and grace settings.
    pub settings: RemoteSettings,
}

/// What ended a session (one connection's list + watch).
enum End {
    Failed(KvError),
    Compacted,
}

const TIMED_OUT: &str = "the endpoint accepted the connection but did not complete the TLS handshake or answer in time (a hung etcd proxy, or a load balancer with no healthy backend): check the remote's etcd proxy; routes of this cluster stay as last known; retrying with backoff";

/// What the local files say about a refused client certificate: whether
/// `cert-file` is signed by the CA in `trusted-ca-file` (in a mesh both are
/// normally the remote's CA).
fn diagnose_client_cert(cfg: &EtcdClientConfig) -> Option<String> {
    let read = |p: &std::path::Path| std::fs::read(p).ok();
    let cert = read(cfg.cert_file.as_deref()?)?;
    let ca = read(cfg.trusted_ca_file.as_deref()?)?;
    let (_, cert) = x509_parser::pem::parse_x509_pem(&cert).ok()?;
    let (_, ca) = x509_parser::pem::parse_x509_pem(&ca).ok()?;
    let cert = cert.parse_x509().ok()?;
    let ca = ca.parse_x509().ok()?;
    (cert.issuer().as_raw() != ca.subject().as_raw()).then(|| {
        format!(
            "; cert-file is issued by \"{}\", not by the CA of trusted-ca-file (\"{}\")",
            cert.issuer(),
            ca.subject()
        )
    })
}

impl<C: Connector> RemoteCluster<C> {
    /// Puts the list entries gathered so far into the cache.
    fn flush_list(&self, generation: u64, listing: &mut Vec<(String, Entry)>, listed: &mut usize) {
        *listed += listing.len();
        self.cache
            .put_batch(&self.name, generation, std::mem::take(listing));
    }

    async fn fail(&self, failure: &Failure<KvError>) {
        let (h, diagnosis) = match failure {
            Failure::TimedOut(_) => (TIMED_OUT, String::new()),
            Failure::Failed(e) => {
                let mut h = hint(e);
                // A closed or reset connection looks the same whether a TLS 1.3
                // server refused the client certificate or a plaintext server
                // dropped the ClientHello: ask the endpoints in plaintext HTTP/2.
                if h == CLIENT_CERT_REFUSED
                    && cause(e) != Some(Cause::ClientCertRefused)
                    && let Ok(cfg) = &self.file.config
                    && probe::any_speaks_plaintext(&cfg.endpoints).await
                {
                    h = NOT_TLS;
                }
                let diagnosis = if h == CLIENT_CERT_REFUSED {
                    self.file
                        .config
                        .as_ref()
                        .ok()
                        .and_then(diagnose_client_cert)
                        .unwrap_or_default()
                } else {
                    String::new()
                };
                (h, diagnosis)
            }
        };
        tracing::warn!(cluster = %self.name, error = ?failure.to_string(), hint = %format!("{h}{diagnosis}"), "remote cluster connection failed; keeping its last known routes and retrying");
        self.status.remote(&self.name, |r| {
            r.connected = false;
            r.synced = false;
            r.failures += 1;
            r.last_failure = Some(unix_now());
            r.last_error = Some(format!("{failure} (hint: {h}{diagnosis})"));
        });
    }

    /// Runs until aborted.
    pub async fn run(self) {
        let cfg = match &self.file.config {
            Ok(c) => c.clone(),
            Err(e) => {
                tracing::warn!(cluster = %self.name, error = %e, "remote cluster configuration unusable; fix the Secret entry (checked again on every change)");
                self.status.remote(&self.name, |r| {
                    r.connected = false;
                    r.synced = false;
                    r.failures += 1;
                    r.last_failure = Some(unix_now());
                    r.last_error = Some(e.clone());
                });
                return pending().await;
            }
        };
        self.status
            .remote(&self.name, |r| r.endpoints = cfg.endpoints.clone());
        let settings = lifecycle::Settings {
            min_backoff: self.settings.min_backoff,
            max_backoff: self.settings.max_backoff,
            connect_timeout: self.settings.connect_timeout,
        };
        let mut handler = Lifecycle {
            cluster: &self,
            cfg,
            started: Instant::now(),
            grace: None,
        };
        lifecycle::run(&mut handler, settings).await;
    }

    fn end_grace(&self, generation: u64) {
        let pruned = self.cache.prune_stale(&self.name, generation);
        tracing::info!(cluster = %self.name, pruned, "grace period over: withdrawing routes of nodes that did not republish");
        self.status
            .remote(&self.name, |r| r.empty_grace_until = None);
        self.cache.notify();
    }

    async fn session(
        &self,
        mut stream: EventStream,
        started: Instant,
        backoff: &mut Backoff,
        grace: &mut Option<(Instant, u64)>,
    ) -> End {
        self.status.remote(&self.name, |r| {
            r.connected = true;
            r.synced = false;
            r.lists += 1;
        });
        let generation = self.cache.begin_list(&self.name);
        let mut synced = false;
        // The list's entries go into the cache in batches: a batch that is
        // large next to what the cache holds is merged with full B-tree nodes
        // (`crate::compact`); nothing reads a list before its end anyway.
        let mut listing: Vec<(String, Entry)> = Vec::new();
        let mut listed = 0usize;
        loop {
            let grace_at = grace.map(|(t, _)| t);
            let ev = tokio::select! {
                ev = stream.next() => ev,
                () = async {
                    match grace_at {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => pending().await,
                    }
                } => {
                    // What this list has brought back must be in the cache
                    // before the grace period prunes what did not come back.
                    self.flush_list(generation, &mut listing, &mut listed);
                    if let Some((_, g)) = grace.take() {
                        self.end_grace(g);
                    }
                    continue;
                }
            };
            if !matches!(ev, Some(Ok(KvEvent::Put(_))))
                || listing.len() >= LIST_BATCH.max(listed / 4)
            {
                self.flush_list(generation, &mut listing, &mut listed);
            }
            match ev {
                Some(Ok(KvEvent::Put(kv))) => {
                    let entry = decode(
                        &self.name,
                        &kv.key,
                        &kv.value,
                        kv.create_revision,
                        kv.mod_revision,
                    );
                    if synced {
                        self.cache.put(&self.name, generation, kv.key, entry);
                        self.cache.notify();
                        self.status
                            .remote(&self.name, |r| r.last_event = Some(unix_now()));
                    } else {
                        listing.push((kv.key, entry));
                    }
                }
                Some(Ok(KvEvent::Delete { key, .. })) => {
                    self.cache.delete(&self.name, &key);
                    if synced {
                        self.cache.notify();
                        self.status
                            .remote(&self.name, |r| r.last_event = Some(unix_now()));
                    }
                }
                Some(Ok(KvEvent::ListDone { revision })) => {
                    synced = true;
                    backoff.reset();
                    let (listed, held) = self.cache.counts(&self.name, generation);
                    if listed == 0 && held > 0 {
                        if grace.is_none() {
                            let until = Instant::now() + self.settings.empty_grace;
                            *grace = Some((until, generation));
                            tracing::warn!(cluster = %self.name, held, grace_seconds = self.settings.empty_grace.as_secs(), "remote cluster's etcd came back empty; keeping its routes for the grace period so its agents can republish");
                            let at = unix_now() + self.settings.empty_grace.as_secs_f64();
                            self.status
                                .remote(&self.name, |r| r.empty_grace_until = Some(at));
                        }
                        self.cache.mark_synced(&self.name);
                    } else if let Some((until, _)) = *grace {
                        // Entries are coming back: the ones that return in time keep their routes.
                        *grace = Some((until, generation));
                        self.cache.mark_synced(&self.name);
                    } else {
                        let pruned = self.cache.prune_stale(&self.name, generation);
                        if pruned > 0 {
                            tracing::info!(cluster = %self.name, pruned, "entries missing from the complete list removed");
                        }
                    }
                    let secs = started.elapsed().as_secs_f64();
                    self.status.remote(&self.name, |r| {
                        r.connected = true;
                        r.synced = true;
                        r.last_sync = Some(unix_now());
                        r.last_event = r.last_sync;
                        r.sync_seconds = Some(secs);
                        r.last_error = None;
                    });
                    tracing::info!(cluster = %self.name, revision, entries = listed, seconds = secs, "remote cluster synced");
                    self.cache.notify();
                }
                Some(Err(KvError::Compacted { .. })) => return End::Compacted,
                Some(Err(e)) => return End::Failed(e),
                None => {
                    return End::Failed(KvError::WatchClosed {
                        reason: "stream ended".into(),
                    });
                }
            }
        }
    }
}

/// [`RemoteCluster`]'s connection as the shared lifecycle drives it: connect
/// and the list's first page run under the connect deadline; the rest of the
/// list and the watch are the session.
struct Lifecycle<'a, C> {
    cluster: &'a RemoteCluster<C>,
    cfg: EtcdClientConfig,
    /// When the current attempt started (the sync time counts from it).
    started: Instant,
    /// A running grace period: its end and the list generation it keeps.
    grace: Option<(Instant, u64)>,
}

impl<C: Connector> lifecycle::Handler for Lifecycle<'_, C> {
    /// The store is kept with its stream: the stream is its list and watch.
    type Conn = (C::Store, EventStream);
    type Error = KvError;

    async fn connect(&mut self) -> Result<Self::Conn, KvError> {
        self.started = Instant::now();
        let c = self.cluster;
        let store = c
            .connector
            .connect(&c.name, &c.file.path, &self.cfg)
            .await?;
        // Returns once the first page of the list has come: the first answer.
        let stream = store.list_and_watch(PREFIX).await?;
        Ok((store, stream))
    }

    async fn session(
        &mut self,
        (_store, stream): Self::Conn,
        backoff: &mut Backoff,
    ) -> Result<Next, KvError> {
        let c = self.cluster;
        match c
            .session(stream, self.started, backoff, &mut self.grace)
            .await
        {
            End::Failed(e) => Err(e),
            End::Compacted => {
                tracing::info!(cluster = %c.name, "remote watch compacted; re-listing");
                c.status.remote(&c.name, |r| {
                    r.synced = false;
                    r.compactions += 1;
                });
                Ok(Next::Backoff)
            }
        }
    }

    async fn report(&mut self, event: Event<'_, KvError>) {
        if let Event::Failed { failure, .. } = event {
            self.cluster.fail(failure).await;
        }
    }

    async fn wait(&mut self, delay: Duration) {
        // A grace period may expire while disconnected.
        let deadline = Instant::now() + delay;
        while let Some((until, generation)) = self.grace
            && until <= deadline
        {
            tokio::time::sleep_until(until).await;
            self.cluster.end_grace(generation);
            self.grace = None;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

/// Entries of a list put into the cache at once (at least; more once the
/// list is long, see `crate::compact`): the etcd store's page size.
const LIST_BATCH: usize = 500;

/// The default first reconnect delay.
pub const MIN_BACKOFF: Duration = Duration::from_millis(200);

#[cfg(test)]
mod tests;
