//! etcd Watch served from the cache: create/cancel/progress per stream, replay from history, bounded fan-out.
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::future::{Ready, ready};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use etcd_client::proto::{PbEvent, PbWatchRequest, PbWatchRequestUnion, PbWatchResponse};
use futures::StreamExt;
use tokio::sync::{broadcast, mpsc};
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::server::NamedService;
use tonic::{Status, Streaming};

use super::watch_wire::{Batch, Events, Out, Pick, WatchCodec};
use crate::budget::{
    ConnectionBudget, MAX_KEY_BYTES, MAX_WATCHERS_PER_STREAM, REPLAY_CHUNK_BYTES,
    STREAM_REPLAY_BYTES, StreamBudget,
};
use crate::cache::{DELETE, PUT, in_range};
use crate::hub::{Hub, Update};
use crate::lean::ConnTasks;

/// Updates a stream takes from the broadcast at once when it is behind: one
/// response per watcher then carries all their events, so a stream that
/// falls behind catches up with fewer, larger responses.
const MAX_BATCH: usize = 64;

/// `WatchCreateRequest.FilterType`.
const FILTER_NOPUT: i32 = 0;
const FILTER_NODELETE: i32 = 1;

/// Tunables of the watch fan-out.
#[derive(Debug, Clone)]
pub struct WatchConfig {
    /// Responses queued per stream towards the client before the stream
    /// stops reading updates (and then lags on the broadcast).
    pub out_buffer: usize,
    /// Passes of live events (each one response per watcher, carrying
    /// every update the stream took at once) a stream may have queued and
    /// unread before its watchers are cut off.
    pub backlog: usize,
    /// Interval of progress notifications for watchers that asked for them.
    pub progress_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct WatchService {
    hub: Arc<Hub>,
    cfg: WatchConfig,
}

impl WatchService {
    pub fn new(hub: Arc<Hub>, cfg: WatchConfig) -> WatchService {
        WatchService { hub, cfg }
    }
}

impl WatchService {
    /// Serves one Watch stream: the stream's work (reading its requests and
    /// the cache's updates, writing the responses into the returned stream)
    /// runs on its connection's task when the connection takes work
    /// (`local`, the lean server), else on a task of its own.
    pub fn open(
        &self,
        requests: Streaming<PbWatchRequest>,
        conn: Option<ConnectionBudget>,
        local: Option<ConnTasks>,
    ) -> Outbox {
        // Room for the whole backlog of a stream with one watcher (what
        // an agent holds), so that it is cut off before it would wait.
        let (tx, rx) = mpsc::channel(self.cfg.out_buffer.max(self.cfg.backlog + 2));
        let (updates, revision) = self.hub.subscribe();
        let task = StreamTask {
            hub: self.hub.clone(),
            tx,
            watchers: HashMap::new(),
            next_id: 0,
            delivered: revision,
            conn,
            replay: StreamBudget::new(STREAM_REPLAY_BYTES),
            passes: VecDeque::new(),
            backlog: self.cfg.backlog.max(1),
        };
        self.hub.metrics.watch_streams.inc();
        let work = task.run(requests, updates, self.cfg.progress_interval);
        match local {
            Some(tasks) => {
                tasks.spawn(work);
                Outbox { rx, local: true }
            }
            None => {
                tokio::spawn(work);
                Outbox { rx, local: false }
            }
        }
    }
}

/// The responses of one Watch stream, as its HTTP/2 body takes them.
#[derive(Debug)]
pub struct Outbox {
    rx: mpsc::Receiver<Result<Out, Status>>,
    /// The stream's work runs on the connection's task, in each of its
    /// rounds before the body is polled: whatever it queued is here by
    /// then, so the body registers no waker (the work's queueing would
    /// only wake the task that is running it).
    local: bool,
}

impl futures::Stream for Outbox {
    type Item = Result<Out, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Self::Item>> {
        if !self.local {
            return self.rx.poll_recv(cx);
        }
        match self.rx.try_recv() {
            Ok(item) => Poll::Ready(Some(item)),
            Err(mpsc::error::TryRecvError::Empty) => Poll::Pending,
            Err(mpsc::error::TryRecvError::Disconnected) => Poll::Ready(None),
        }
    }
}

#[derive(Debug)]
struct Watcher {
    key: Vec<u8>,
    range_end: Vec<u8>,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
    progress_notify: bool,
    /// Events below this revision were replayed already or precede the start.
    next_rev: i64,
    sent_since_tick: bool,
}

impl Watcher {
    fn wants(&self, e: &PbEvent) -> bool {
        let Some(kv) = e.kv.as_ref() else {
            return false;
        };
        kv.mod_revision >= self.next_rev
            && in_range(&self.key, &self.range_end, &kv.key)
            && !(self.no_put && e.r#type == PUT)
            && !(self.no_delete && e.r#type == DELETE)
    }

    /// `e` as this watcher receives it (without `prev_kv` unless asked).
    fn copy(&self, e: &PbEvent) -> PbEvent {
        let mut e = e.clone();
        if !self.prev_kv {
            e.prev_kv = None;
        }
        e
    }

    #[cfg(test)]
    fn select(&self, events: &[PbEvent]) -> Vec<PbEvent> {
        events
            .iter()
            .filter(|e| self.wants(e))
            .map(|e| self.copy(e))
            .collect()
    }
}

/// The client is gone; the stream ends.
struct Gone;

/// How far a pass went without waiting.
enum Now {
    /// Every response is queued (or the client is gone).
    Done(Result<(), Gone>),
    /// The stream's backlog is full: its watchers are to be cut off.
    Cut,
    /// The responses the queue had no room for, in order.
    Rest(Vec<Out>),
}

/// What is left of a pass that has to wait.
enum Later {
    /// The update, untouched: a pass of it and of what is queued after it.
    Update(Update),
    Cut,
    Rest(Vec<Out>),
}

#[derive(Debug)]
struct StreamTask {
    hub: Arc<Hub>,
    tx: mpsc::Sender<Result<Out, Status>>,
    watchers: HashMap<i64, Watcher>,
    next_id: i64,
    /// Every update up to this revision has been handled by this stream.
    delivered: i64,
    /// The budget of the connection the stream is on (replays count against it).
    conn: Option<ConnectionBudget>,
    /// Replay bytes built on this stream and not yet sent.
    replay: StreamBudget,
    /// The passes of live events queued and not all taken by the
    /// connection yet: each response of a pass holds its token.
    passes: VecDeque<Weak<()>>,
    /// Passes that may be queued before the stream is cut off.
    backlog: usize,
}

impl Drop for StreamTask {
    /// The stream ended, or its connection went with the stream's work.
    fn drop(&mut self) {
        self.hub.metrics.watchers.dec_by(self.watchers.len() as i64);
        self.hub.metrics.watch_streams.dec();
    }
}

impl StreamTask {
    async fn run(
        mut self,
        mut requests: Streaming<PbWatchRequest>,
        mut updates: broadcast::Receiver<Update>,
        progress_interval: Duration,
    ) {
        let mut shutdown = self.hub.shutdown();
        let mut tick = tokio::time::interval(progress_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.reset();
        // One wait for shutdown for the stream's life: a new one per pass
        // would join and leave the shutdown channel's list of waiters (one
        // lock, shared by every stream) twice per update.
        let stop = crate::hub::stopped(&mut shutdown);
        tokio::pin!(stop);
        loop {
            // Biased, in this order: shutdown, then requests (a stream that
            // is behind still reads them), then updates, then the tick; a
            // random order would poll the tick too on half the wake-ups
            // for an update (what almost every pass is).
            let step = tokio::select! {
                biased;
                _ = &mut stop => {
                    // What etcd itself says when it stops: UNAVAILABLE is
                    // what etcd's clients retry (Go's clientv3 resumes every
                    // watcher from its last revision on another endpoint);
                    // a cancel, or a stream that just ends, stops them.
                    // A client that does not read gets a second to take it.
                    let _ = tokio::time::timeout(
                        Duration::from_secs(1),
                        self.tx
                            .send(Err(Status::unavailable("etcdserver: server stopped"))),
                    )
                    .await;
                    break;
                }
                // The handlers are boxed: this loop is what every idle
                // stream holds, and it should not be as large as the
                // largest of them (a watch's creation with its replay).
                req = requests.next() => match req {
                    Some(Ok(r)) => Box::pin(self.request(r)).await,
                    Some(Err(_)) | None => break,
                },
                upd = updates.recv() => match upd {
                    // Most passes: one update, taken by the watchers with
                    // room in the queue, nothing to wait for; the general
                    // path (a boxed future, an allocation) is for the rest.
                    Ok(u) => match self.pass_now(u) {
                        Ok(r) => r,
                        Err(Later::Update(u)) => Box::pin(self.updates(u, &mut updates)).await,
                        Err(Later::Cut) => Box::pin(self.backlog_full()).await,
                        Err(Later::Rest(rest)) => Box::pin(self.send_all(rest)).await,
                    },
                    Err(broadcast::error::RecvError::Lagged(n)) => Box::pin(self.lagged(n)).await,
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                _ = tick.tick() => Box::pin(self.progress_tick()).await,
            };
            if step.is_err() {
                break;
            }
        }
    }

    async fn send(&self, resp: PbWatchResponse) -> Result<(), Gone> {
        self.tx
            .send(Ok(Out::Msg(Box::new(resp))))
            .await
            .map_err(|_| Gone)
    }

    fn response(&self, watch_id: i64, revision: i64) -> PbWatchResponse {
        PbWatchResponse {
            header: Some(self.hub.header(revision)),
            watch_id,
            ..Default::default()
        }
    }

    async fn request(&mut self, req: PbWatchRequest) -> Result<(), Gone> {
        match req.request_union {
            Some(PbWatchRequestUnion::CreateRequest(c)) => {
                self.create(
                    c.key,
                    c.range_end,
                    c.start_revision,
                    c.watch_id,
                    c.prev_kv,
                    c.progress_notify,
                    &c.filters,
                )
                .await
            }
            Some(PbWatchRequestUnion::CancelRequest(c)) => {
                if self.watchers.remove(&c.watch_id).is_some() {
                    self.hub.metrics.watchers.dec();
                }
                let mut r = self.response(c.watch_id, self.delivered);
                r.canceled = true;
                self.send(r).await
            }
            Some(PbWatchRequestUnion::ProgressRequest(_)) => {
                // Not tied to one watcher: etcd answers with watch ID -1.
                self.send(self.response(-1, self.delivered)).await
            }
            None => Ok(()),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn create(
        &mut self,
        key: Vec<u8>,
        range_end: Vec<u8>,
        start_revision: i64,
        watch_id: i64,
        prev_kv: bool,
        progress_notify: bool,
        filters: &[i32],
    ) -> Result<(), Gone> {
        let refuse = |this: &Self, why: String| {
            let mut r = this.response(-1, this.delivered);
            r.created = true;
            r.canceled = true;
            r.cancel_reason = why;
            r
        };
        if key.len() > MAX_KEY_BYTES || range_end.len() > MAX_KEY_BYTES {
            self.hub.metrics.refuse("key_too_long");
            return self
                .send(refuse(
                    self,
                    format!(
                        "etcdserver: a key or range end of {} bytes (at most {MAX_KEY_BYTES})",
                        key.len().max(range_end.len())
                    ),
                ))
                .await;
        }
        if let Err(e) = self.hub.prefix.check(&key, &range_end) {
            self.hub.metrics.refuse(e.reason());
            tracing::debug!(error = %e, "watch refused");
            return self
                .send(refuse(self, format!("permission denied: {e}")))
                .await;
        }
        if self.watchers.len() >= MAX_WATCHERS_PER_STREAM {
            self.hub.metrics.refuse("too_many_watchers");
            return self
                .send(refuse(
                    self,
                    format!(
                        "this stream already holds {MAX_WATCHERS_PER_STREAM} watchers; cancel some or open another stream"
                    ),
                ))
                .await;
        }
        let id = if watch_id != 0 {
            if self.watchers.contains_key(&watch_id) {
                return self
                    .send(refuse(
                        self,
                        format!("watch ID {watch_id} is already in use on this stream"),
                    ))
                    .await;
            }
            watch_id
        } else {
            while self.watchers.contains_key(&self.next_id) {
                self.next_id += 1;
            }
            self.next_id
        };
        let (synced, current) = self.hub.with_cache(|c| (c.synced(), c.revision()));
        if !synced {
            self.hub.metrics.refuse("not_synced");
            return self
                .send(refuse(
                    self,
                    "the proxy has not listed its upstream etcd yet; retry shortly".into(),
                ))
                .await;
        }
        let mut created = self.response(id, current);
        created.created = true;
        self.send(created).await?;
        let mut w = Watcher {
            key,
            range_end,
            prev_kv,
            no_put: filters.contains(&FILTER_NOPUT),
            no_delete: filters.contains(&FILTER_NODELETE),
            progress_notify,
            next_rev: start_revision.max(1),
            sent_since_tick: false,
        };
        // The replay, in parts built one at a time under the cache lock and
        // each reserved from the connection's and the proxy's budget until
        // it is sent: a stream nobody reads holds at most its buffer of
        // parts, and a connection its budget, never a whole history per
        // watch created.
        if start_revision > 0 && start_revision <= current {
            let mut next = start_revision;
            while next <= current {
                let part = self.hub.with_cache(|c| {
                    c.replay_part(
                        next,
                        current,
                        REPLAY_CHUNK_BYTES,
                        |e| w.wants(e),
                        |e| w.copy(e),
                    )
                });
                let (events, after) = match part {
                    Ok(p) => p,
                    Err(compact_revision) => {
                        let mut r = self.response(id, current);
                        r.canceled = true;
                        r.compact_revision = compact_revision;
                        r.cancel_reason = format!(
                            "mvcc: required revision has been compacted: the proxy holds events from revision {} on; list again and watch from the list's revision + 1",
                            compact_revision + 1
                        );
                        self.hub.metrics.cancelled("compacted", 1);
                        return self.send(r).await;
                    }
                };
                next = after;
                if events.is_empty() {
                    continue;
                }
                let mut r = self.response(id, current);
                r.events = events;
                // Waits while this stream, its connection or the proxy holds
                // too many built parts nobody has read yet.
                let held = self
                    .hub
                    .budget
                    .reserve(
                        &self.replay,
                        self.conn.as_ref(),
                        prost::Message::encoded_len(&r),
                    )
                    .await;
                self.hub.metrics.events_out.inc_by(r.events.len() as u64);
                w.sent_since_tick = true;
                self.tx
                    .send(Ok(Out::Replay(Box::new((r, held)))))
                    .await
                    .map_err(|_| Gone)?;
            }
        }
        w.next_rev = w.next_rev.max(current + 1);
        self.watchers.insert(id, w);
        self.hub.metrics.watchers.inc();
        if watch_id == 0 {
            self.next_id += 1;
        }
        Ok(())
    }

    /// A pass of the one update `u` as far as it goes without waiting,
    /// when nothing else is queued for the stream (the hub has published
    /// nothing after it); otherwise `u` is given back, untouched, for
    /// [`StreamTask::updates`], which takes what is queued with it.
    fn pass_now(&mut self, u: Update) -> Result<Result<(), Gone>, Later> {
        let revision = match &u {
            Update::Events { revision, .. } | Update::Progress(revision) => *revision,
            Update::Reset { .. } => return Err(Later::Update(u)),
        };
        if revision < self.hub.published() {
            return Err(Later::Update(u));
        }
        match self.events_now(std::slice::from_ref(&u)) {
            Now::Done(r) => Ok(r),
            Now::Cut => Err(Later::Cut),
            Now::Rest(rest) => Err(Later::Rest(rest)),
        }
    }

    /// Handles `first` and whatever else is already queued (up to
    /// [`MAX_BATCH`]): every watcher gets one response for the lot.
    async fn updates(
        &mut self,
        first: Update,
        updates: &mut broadcast::Receiver<Update>,
    ) -> Result<(), Gone> {
        // Here when the stream is behind or the update is a reset; what is
        // queued after `first` joins it, up to MAX_BATCH.
        let second = match updates.try_recv() {
            Ok(u) => u,
            Err(broadcast::error::TryRecvError::Lagged(n)) => {
                self.pass(std::slice::from_ref(&first)).await?;
                return self.lagged(n).await;
            }
            Err(_) => return self.pass(std::slice::from_ref(&first)).await,
        };
        let mut batch = vec![first, second];
        while batch.len() < MAX_BATCH {
            match updates.try_recv() {
                Ok(u) => batch.push(u),
                Err(broadcast::error::TryRecvError::Lagged(n)) => {
                    self.pass(&batch).await?;
                    return self.lagged(n).await;
                }
                Err(_) => break,
            }
        }
        self.pass(&batch).await
    }

    /// Handles the updates a pass took.
    async fn pass(&mut self, batch: &[Update]) -> Result<(), Gone> {
        // A reset cancels everyone: what came before it is sent first.
        if let Some(i) = batch.iter().position(|u| matches!(u, Update::Reset { .. })) {
            self.events(&batch[..i]).await?;
            let Update::Reset { compact_revision } = batch[i] else {
                unreachable!("position found a reset")
            };
            let reason = format!(
                "the upstream etcd was compacted past the proxy's last revision (compact revision {compact_revision}); list again and watch from the list's revision + 1"
            );
            self.cancel_all("compacted", compact_revision, reason)
                .await?;
            // Nothing after a reset is for the cancelled watchers; new ones
            // created later start from the cache.
            return self.events(&batch[i + 1..]).await;
        }
        self.events(batch).await
    }

    /// The pass of [`StreamTask::events`] as far as it goes without
    /// waiting: every response queued (as a rule), or the stream to be cut
    /// off, or the responses the queue had no room for.
    fn events_now(&mut self, batch: &[Update]) -> Now {
        let mut revision = self.delivered;
        for u in batch {
            if let Update::Events { revision: r, .. } | Update::Progress(r) = u {
                revision = revision.max(*r);
            }
        }
        let header = self.hub.header(revision);
        let mut count = 0;
        let mut parts = 0;
        let mut first = None;
        for u in batch {
            if let Update::Events {
                events, encoded, ..
            } = u
            {
                count += events.len();
                parts += 1;
                first.get_or_insert(encoded);
            }
        }
        // The batch's events in order, without a list of them: a stream
        // (one watcher, as a rule) walks them once or twice per pass.
        let events = || {
            batch.iter().flat_map(|u| match u {
                Update::Events { events, .. } => events.as_slice(),
                _ => &[],
            })
        };
        let taken_by_any =
            count > 0 && self.watchers.values().any(|w| events().any(|e| w.wants(e)));
        if !taken_by_any {
            for w in self.watchers.values_mut() {
                w.next_rev = w.next_rev.max(revision + 1);
            }
            self.delivered = revision;
            return Now::Done(Ok(()));
        }
        // The client reads too slowly when earlier passes are still
        // queued: its watchers are cut off rather than holding updates,
        // and the memory they keep, for a client that may never read them.
        while self.passes.front().is_some_and(|p| p.strong_count() == 0) {
            self.passes.pop_front();
        }
        self.delivered = revision;
        if self.passes.len() >= self.backlog {
            return Now::Cut;
        }
        // The updates' shared encodings, referenced (never copied): one
        // list per pass of this stream, whatever its number of watchers,
        // and none for a pass of one update.
        let shared = match first {
            Some(one) if parts == 1 => Batch::One(one.clone()),
            _ => Batch::Many(
                batch
                    .iter()
                    .filter_map(|u| match u {
                        Update::Events { encoded, .. } => Some(encoded.clone()),
                        _ => None,
                    })
                    .collect(),
            ),
        };
        let pass = Arc::new(());
        self.passes.push_back(Arc::downgrade(&pass));
        let mut n = 0;
        let mut rest = Vec::new();
        for (id, w) in self.watchers.iter_mut() {
            // Usually the watcher takes every event: no list of picks.
            let taken = events().filter(|e| w.wants(e)).count();
            if taken == 0 {
                w.next_rev = w.next_rev.max(revision + 1);
                continue;
            }
            let pick = if taken == count {
                Pick::All
            } else {
                Pick::Some(
                    events()
                        .enumerate()
                        .filter(|(_, e)| w.wants(e))
                        .map(|(i, _)| i as u32)
                        .collect(),
                )
            };
            w.next_rev = w.next_rev.max(revision + 1);
            w.sent_since_tick = true;
            let frame = Out::Events(Box::new(Events {
                header,
                watch_id: *id,
                prev_kv: w.prev_kv,
                batch: shared.clone(),
                pick,
                _pass: pass.clone(),
            }));
            n += taken as u64;
            if !rest.is_empty() {
                rest.push(frame);
                continue;
            }
            match self.tx.try_send(Ok(frame)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(Ok(frame))) => rest.push(frame),
                Err(_) => return Now::Done(Err(Gone)),
            }
        }
        self.hub.metrics.events_out.inc_by(n);
        if rest.is_empty() {
            Now::Done(Ok(()))
        } else {
            Now::Rest(rest)
        }
    }

    /// Sends each watcher the events it selects from `batch` in one response.
    async fn events(&mut self, batch: &[Update]) -> Result<(), Gone> {
        match self.events_now(batch) {
            Now::Done(r) => r,
            Now::Cut => self.backlog_full().await,
            Now::Rest(rest) => self.send_all(rest).await,
        }
    }

    /// Responses that did not fit in the queue when they were built.
    async fn send_all(&self, rest: Vec<Out>) -> Result<(), Gone> {
        for frame in rest {
            self.tx.send(Ok(frame)).await.map_err(|_| Gone)?;
        }
        Ok(())
    }

    /// The client has not read the stream's whole backlog: every watcher
    /// of the stream is cancelled with the reason, after the responses
    /// already queued (so the client knows the last revision it has, and
    /// watches again from the one after it; the proxy replays from its
    /// history).
    async fn backlog_full(&mut self) -> Result<(), Gone> {
        let backlog = self.backlog;
        let last = self.delivered;
        let reason = format!(
            "watch stream fell behind: its backlog of {backlog} unread responses is full (the client reads too slowly); watch again from the revision after the last event received (the proxy replays its history), or list again and watch from the list's revision + 1"
        );
        tracing::warn!(
            backlog,
            revision = last,
            watchers = self.watchers.len(),
            "cutting off the watchers of a stream whose client does not read; hint: the client must read its watch stream, or raise --watch-backlog"
        );
        self.cancel_all("slow_watcher", 0, reason).await
    }

    async fn lagged(&mut self, n: u64) -> Result<(), Gone> {
        let reason = format!(
            "watch stream fell behind by {n} updates (the client reads too slowly); list again and watch from the list's revision + 1"
        );
        tracing::warn!(
            lagged = n,
            watchers = self.watchers.len(),
            "cancelling the watchers of a slow stream; hint: the client must read its watch stream faster, or raise --watch-buffer"
        );
        self.cancel_all("slow_watcher", 0, reason).await
    }

    async fn cancel_all(
        &mut self,
        label: &str,
        compact_revision: i64,
        reason: String,
    ) -> Result<(), Gone> {
        let ids: Vec<i64> = self.watchers.keys().copied().collect();
        self.hub.metrics.watchers.dec_by(ids.len() as i64);
        self.hub.metrics.cancelled(label, ids.len() as u64);
        self.watchers.clear();
        for id in ids {
            let mut r = self.response(id, self.delivered);
            r.canceled = true;
            r.compact_revision = compact_revision;
            r.cancel_reason = reason.clone();
            self.send(r).await?;
        }
        Ok(())
    }

    async fn progress_tick(&mut self) -> Result<(), Gone> {
        let mut due = Vec::new();
        for (id, w) in self.watchers.iter_mut() {
            if w.progress_notify && !w.sent_since_tick {
                due.push(*id);
            }
            w.sent_since_tick = false;
        }
        for id in due {
            self.send(self.response(id, self.delivered)).await?;
        }
        Ok(())
    }
}

/// `etcdserverpb.Watch` served with [`WatchCodec`].
#[derive(Debug, Clone)]
pub struct WatchServer {
    svc: WatchService,
}

impl WatchServer {
    pub fn new(svc: WatchService) -> WatchServer {
        WatchServer { svc }
    }
}

impl NamedService for WatchServer {
    const NAME: &'static str = "etcdserverpb.Watch";
}

/// The one method, as tonic's streaming handler wants it.
struct Call(WatchService);

impl Service<tonic::Request<tonic::Streaming<PbWatchRequest>>> for Call {
    type Response = tonic::Response<Outbox>;
    type Error = Status;
    type Future = Ready<Result<Self::Response, Status>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::Request<tonic::Streaming<PbWatchRequest>>) -> Self::Future {
        let conn = req.extensions().get::<ConnectionBudget>().cloned();
        let local = req.extensions().get::<ConnTasks>().cloned();
        ready(Ok(tonic::Response::new(self.0.open(
            req.into_inner(),
            conn,
            local,
        ))))
    }
}

impl Service<http::Request<Body>> for WatchServer {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let svc = self.svc.clone();
        Box::pin(async move {
            if req.uri().path() != "/etcdserverpb.Watch/Watch" {
                return Ok(Status::unimplemented("unknown Watch method").into_http());
            }
            let mut grpc = tonic::server::Grpc::new(WatchCodec);
            Ok(grpc.streaming(Call(svc), req).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_client::proto::PbKeyValue;

    fn ev(kind: i32, key: &str, rev: i64) -> PbEvent {
        PbEvent {
            r#type: kind,
            kv: Some(PbKeyValue {
                key: key.into(),
                mod_revision: rev,
                ..Default::default()
            }),
            prev_kv: Some(PbKeyValue {
                key: key.into(),
                value: b"old".to_vec(),
                ..Default::default()
            }),
        }
    }

    fn watcher(key: &str, end: &str, prev_kv: bool, filters: &[i32], next_rev: i64) -> Watcher {
        Watcher {
            key: key.into(),
            range_end: end.into(),
            prev_kv,
            no_put: filters.contains(&FILTER_NOPUT),
            no_delete: filters.contains(&FILTER_NODELETE),
            progress_notify: false,
            next_rev,
            sent_since_tick: false,
        }
    }

    #[test]
    fn selects_by_range_revision_and_filters_and_strips_prev_kv() {
        let events = vec![
            ev(PUT, "p/a", 5),
            ev(DELETE, "p/b", 6),
            ev(PUT, "p/c", 7),
            ev(PUT, "q/x", 8),
        ];
        let keys = |w: &Watcher| -> Vec<(i32, String, bool)> {
            w.select(&events)
                .iter()
                .map(|e| {
                    let kv = e.kv.as_ref().unwrap();
                    (
                        e.r#type,
                        String::from_utf8_lossy(&kv.key).into_owned(),
                        e.prev_kv.is_some(),
                    )
                })
                .collect()
        };
        let all = watcher("p/", "p0", false, &[], 1);
        assert_eq!(
            keys(&all),
            vec![
                (PUT, "p/a".into(), false),
                (DELETE, "p/b".into(), false),
                (PUT, "p/c".into(), false)
            ]
        );
        // Events before next_rev were replayed already (or precede the start).
        assert_eq!(keys(&watcher("p/", "p0", true, &[], 6)).len(), 2);
        assert!(keys(&watcher("p/", "p0", true, &[], 6)).iter().all(|k| k.2));
        assert_eq!(
            keys(&watcher("p/", "p0", false, &[FILTER_NOPUT], 1)),
            vec![(DELETE, "p/b".into(), false)]
        );
        assert_eq!(
            keys(&watcher("p/", "p0", false, &[FILTER_NODELETE], 1)).len(),
            2
        );
        assert_eq!(
            keys(&watcher("p/c", "", false, &[], 1)),
            vec![(PUT, "p/c".into(), false)]
        );
    }
}
