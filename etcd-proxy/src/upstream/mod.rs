//! The one upstream list+watch of the prefix: connection lifecycle, backoff, resume and re-list on compaction.
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, WatchOptions};
use podmesh_plumbing::{
    backoff::Backoff,
    lifecycle::{self, Event, Failure, Next},
};
use tokio::sync::watch;

use crate::hub::Hub;
use crate::metrics::UpstreamState;

mod list;
pub mod settings;

pub use list::{Fingerprint, Fingerprinter};
pub use settings::Settings;

/// Why one upstream session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
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
    #[error(
        "upstream etcd holds another history of the prefix at the proxy's revision {revision} ({upstream_keys} keys there, {our_keys} here, or the same count with other revisions): etcd rebuilt or restored under the same cluster ID; re-listing"
    )]
    Diverged {
        revision: i64,
        upstream_keys: u64,
        our_keys: u64,
    },
}

/// Interval of progress requests on the upstream watch: they move the cache
/// revision forward while nothing under the prefix changes.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Runs until shutdown: connect, list if needed, watch, and on any failure
/// back off and resume from the last revision ([`podmesh_plumbing::lifecycle`]:
/// connect, handshake and the first answer run under `connect_timeout`, so an
/// upstream that accepts connections and never answers is retried, not
/// waited on forever). New settings on `settings` (rotated credentials,
/// another endpoint) end the attempt or session at once and reconnect with
/// them without backoff, also resuming from the last revision: downstream
/// watchers keep their streams and miss nothing. Should the new endpoint be
/// another etcd cluster, the session notices and re-lists as always.
pub async fn run(
    mut settings: watch::Receiver<Arc<Settings>>,
    prefix: Vec<u8>,
    hub: Arc<Hub>,
    lifecycle: lifecycle::Settings,
) {
    let mut shutdown = hub.shutdown();
    let mut upstream = Upstream {
        settings: settings.clone(),
        prefix,
        hub: hub.clone(),
        need_list: true,
        compact_revision: 0,
        first: true,
    };
    loop {
        settings.borrow_and_update();
        tokio::select! {
            _ = crate::hub::stopped(&mut shutdown) => return,
            () = lifecycle::run(&mut upstream, lifecycle) => return,
            // The settings poller has logged the change; a fresh lifecycle
            // (no backoff: nothing failed) connects with them.
            () = changed(&mut settings) => hub.set_upstream_state(UpstreamState::Disconnected),
        }
    }
}

/// Resolves when new settings arrive; never once their poller is gone.
async fn changed(rx: &mut watch::Receiver<Arc<Settings>>) {
    if rx.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// What the upstream connection does with a connection: the handler of
/// [`lifecycle::run`]. Its fields outlive connections and settings.
struct Upstream {
    settings: watch::Receiver<Arc<Settings>>,
    prefix: Vec<u8>,
    hub: Arc<Hub>,
    need_list: bool,
    compact_revision: i64,
    first: bool,
}

/// A connection that has answered: the client and its first answer.
struct Connected {
    client: Client,
    status: etcd_client::StatusResponse,
}

impl lifecycle::Handler for Upstream {
    type Conn = Connected;
    type Error = SessionError;

    async fn connect(&mut self) -> Result<Connected, SessionError> {
        let etcd = |op| move |source| SessionError::Etcd { op, source };
        let settings = self.settings.borrow().clone();
        let mut client = Client::connect(&settings.config.endpoints, Some(settings.options()))
            .await
            .map_err(etcd("connect"))?;
        // The first request: the TLS handshake and the first answer.
        let status = client.status().await.map_err(etcd("status"))?;
        Ok(Connected { client, status })
    }

    async fn session(
        &mut self,
        conn: Connected,
        backoff: &mut Backoff,
    ) -> Result<Next, SessionError> {
        let session = Session {
            prefix: &self.prefix,
            hub: &self.hub,
        };
        session
            .run(
                conn,
                &mut self.need_list,
                &mut self.compact_revision,
                backoff,
            )
            .await
            .map(|()| Next::Backoff)
    }

    async fn report(&mut self, event: Event<'_, SessionError>) {
        match event {
            Event::Connecting { .. } => {
                if !std::mem::take(&mut self.first) {
                    self.hub.metrics.upstream_reconnects.inc();
                }
                self.hub.set_upstream_state(UpstreamState::Connecting);
            }
            Event::Connected => {}
            Event::Failed { failure, delay } => {
                self.hub.set_upstream_state(UpstreamState::Disconnected);
                // What the cache holds is no longer the upstream's history
                // (compacted past it, another etcd, a re-list that failed):
                // unready, and watchers cancelled, until a re-list completes.
                if self.need_list {
                    self.hub.invalidate(self.compact_revision);
                }
                self.hub.set_upstream_error(failure.to_string());
                let endpoints = self.settings.borrow().config.endpoints.clone();
                match failure {
                    Failure::Failed(
                        SessionError::Compacted(_)
                        | SessionError::Rewound { .. }
                        | SessionError::Replaced { .. }
                        | SessionError::Overtaken(_)
                        | SessionError::Diverged { .. },
                    ) => {
                        tracing::warn!(error = %failure, "upstream history lost; downstream watchers will be cancelled to re-list")
                    }
                    _ => tracing::warn!(
                        error = %failure,
                        ?endpoints,
                        retry_in = ?delay,
                        "upstream etcd unavailable; serving the last known state and retrying; hint: check the upstream endpoints and credentials in --upstream-config, and that the upstream etcd answers"
                    ),
                }
            }
        }
    }
}

struct Session<'a> {
    prefix: &'a [u8],
    hub: &'a Hub,
}

impl Session<'_> {
    async fn run(
        &self,
        conn: Connected,
        need_list: &mut bool,
        compact_revision: &mut i64,
        backoff: &mut Backoff,
    ) -> Result<(), SessionError> {
        let etcd = |op| move |source| SessionError::Etcd { op, source };
        let Connected { client, status } = conn;
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
        if !*need_list && ours > 0 {
            // Same cluster ID and not behind, but is it the same history? An
            // etcd rebuilt with the same name, peer URL and token keeps its
            // cluster ID, and once its revision passes ours, resuming would
            // serve keys it never had and miss keys it has. Compare the
            // prefix at our revision, keys and revisions without values.
            let mut kv = client
                .kv_client()
                .max_decoding_message_size(list::RECEIVE_LIMIT);
            let theirs = match list::fingerprint_at(&mut kv, self.prefix, ours).await {
                Ok(f) => f,
                Err(source) => {
                    // Compacted past our revision: the watch from ours+1
                    // would be refused too; re-list either way rather than
                    // resume on a history that could not be checked.
                    *need_list = true;
                    *compact_revision = upstream_rev;
                    return Err(SessionError::Etcd {
                        op: "continuity check at the proxy's revision",
                        source,
                    });
                }
            };
            let mine = self.hub.with_cache(|c| c.fingerprint());
            if theirs != mine {
                *need_list = true;
                *compact_revision = upstream_rev;
                self.hub.metrics.upstream_diverged.inc();
                return Err(SessionError::Diverged {
                    revision: ours,
                    upstream_keys: theirs.keys,
                    our_keys: mine.keys,
                });
            }
            tracing::debug!(
                revision = ours,
                keys = mine.keys,
                "upstream continues the proxy's history"
            );
        }
        if *need_list {
            let mut kv = client
                .kv_client()
                .max_decoding_message_size(list::RECEIVE_LIMIT);
            let (kvs, revision) = list::list(&mut kv, self.prefix)
                .await
                .map_err(etcd("list"))?;
            tracing::info!(keys = kvs.len(), revision, "listed the upstream prefix");
            self.hub
                .reset(kvs, revision, (*compact_revision).max(revision));
            *need_list = false;
        }
        let start = self.hub.with_cache(|c| c.revision()) + 1;
        let mut stream = client
            .watch_client()
            .max_decoding_message_size(list::RECEIVE_LIMIT)
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
