//! In-memory [`KvStore`] for unit tests: revisions, leases, watches, and knobs
//! to break them (drop watchers, wipe everything, expire a lease).
use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use tokio::sync::broadcast;
use tokio_stream::wrappers::ReceiverStream;

use super::{EventStream, KeyValue, KvError, KvEvent, KvStore, LeaseId};

#[derive(Debug, Default)]
struct Inner {
    revision: i64,
    data: BTreeMap<String, (KeyValue, Option<LeaseId>)>,
    leases: HashMap<LeaseId, Duration>,
    next_lease: LeaseId,
    down: bool,
}

/// A store in memory. Clones share the data.
#[derive(Clone, Debug)]
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
    events: broadcast::Sender<Result<KvEvent, String>>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store at revision 1.
    pub fn new() -> Self {
        let (events, _) = broadcast::channel(4096);
        Self {
            inner: Arc::new(Mutex::new(Inner {
                revision: 1,
                next_lease: 1,
                ..Inner::default()
            })),
            events,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("memory store lock")
    }

    fn check_up(&self, op: &'static str) -> Result<(), KvError> {
        if self.lock().down {
            return Err(KvError::Unavailable {
                op,
                endpoints: "memory".into(),
                source: "store is down".into(),
            });
        }
        Ok(())
    }

    /// Makes every operation fail (and ends every watch) until [`MemoryStore::set_down`]`(false)`.
    pub fn set_down(&self, down: bool) {
        self.lock().down = down;
        if down {
            let _ = self.events.send(Err("store went down".into()));
        }
    }

    /// Forgets everything, like an etcd that came back with an empty data directory.
    /// Revisions continue (watchers are ended, so they re-list).
    pub fn wipe(&self) {
        let mut g = self.lock();
        g.data.clear();
        g.leases.clear();
        drop(g);
        let _ = self.events.send(Err("store wiped".into()));
    }

    /// Expires `lease` now, deleting its keys.
    pub fn expire_lease(&self, lease: LeaseId) {
        let mut g = self.lock();
        g.leases.remove(&lease);
        let keys: Vec<String> = g
            .data
            .iter()
            .filter(|(_, (_, l))| *l == Some(lease))
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            g.revision += 1;
            let revision = g.revision;
            g.data.remove(&k);
            let _ = self.events.send(Ok(KvEvent::Delete { key: k, revision }));
        }
    }

    /// Deletes `key`.
    pub fn delete(&self, key: &str) {
        let mut g = self.lock();
        if g.data.remove(key).is_some() {
            g.revision += 1;
            let revision = g.revision;
            let _ = self.events.send(Ok(KvEvent::Delete {
                key: key.to_string(),
                revision,
            }));
        }
    }

    /// A copy of the data.
    pub fn dump(&self) -> BTreeMap<String, Vec<u8>> {
        self.lock()
            .data
            .iter()
            .map(|(k, (kv, _))| (k.clone(), kv.value.clone()))
            .collect()
    }

    /// The lease `key` is bound to.
    pub fn lease_of(&self, key: &str) -> Option<LeaseId> {
        self.lock().data.get(key).and_then(|(_, l)| *l)
    }

    fn put_locked(&self, g: &mut Inner, key: &str, value: Vec<u8>, lease: Option<LeaseId>) {
        g.revision += 1;
        let revision = g.revision;
        let create_revision = g
            .data
            .get(key)
            .map(|(kv, _)| kv.create_revision)
            .unwrap_or(revision);
        let kv = KeyValue {
            key: key.to_string(),
            value,
            create_revision,
            mod_revision: revision,
        };
        g.data.insert(key.to_string(), (kv.clone(), lease));
        let _ = self.events.send(Ok(KvEvent::Put(kv)));
    }
}

impl KvStore for MemoryStore {
    async fn list_and_watch(&self, prefix: &str) -> Result<EventStream, KvError> {
        self.check_up("list")?;
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let (snapshot, revision, mut sub) = {
            let g = self.lock();
            let snap: Vec<KeyValue> = g
                .data
                .range(prefix.to_string()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(_, (kv, _))| kv.clone())
                .collect();
            (snap, g.revision, self.events.subscribe())
        };
        let prefix = prefix.to_string();
        tokio::spawn(async move {
            for kv in snapshot {
                if tx.send(Ok(KvEvent::Put(kv))).await.is_err() {
                    return;
                }
            }
            if tx.send(Ok(KvEvent::ListDone { revision })).await.is_err() {
                return;
            }
            loop {
                let item = tokio::select! {
                    r = sub.recv() => r,
                    () = tx.closed() => return,
                };
                let out = match item {
                    Ok(Ok(ev)) => {
                        let key = match &ev {
                            KvEvent::Put(kv) => &kv.key,
                            KvEvent::Delete { key, .. } => key,
                            KvEvent::ListDone { .. } => continue,
                        };
                        if !key.starts_with(&prefix) {
                            continue;
                        }
                        Ok(ev)
                    }
                    Ok(Err(reason)) => Err(KvError::WatchClosed { reason }),
                    Err(broadcast::error::RecvError::Lagged(_)) => Err(KvError::Compacted {
                        compact_revision: 0,
                    }),
                    Err(broadcast::error::RecvError::Closed) => Err(KvError::WatchClosed {
                        reason: "store dropped".into(),
                    }),
                };
                let end = out.is_err();
                if tx.send(out).await.is_err() || end {
                    return;
                }
            }
        });
        Ok(ReceiverStream::new(rx).boxed())
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>, KvError> {
        self.check_up("get")?;
        Ok(self.lock().data.get(key).map(|(kv, _)| kv.clone()))
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<(), KvError> {
        self.check_up("put")?;
        let mut g = self.lock();
        if let Some(l) = lease
            && !g.leases.contains_key(&l)
        {
            return Err(KvError::Unavailable {
                op: "put",
                endpoints: "memory".into(),
                source: format!("lease {l} not found").into(),
            });
        }
        self.put_locked(&mut g, key, value, lease);
        Ok(())
    }

    async fn create(&self, key: &str, value: Vec<u8>) -> Result<Option<KeyValue>, KvError> {
        self.check_up("create")?;
        let mut g = self.lock();
        if let Some((kv, _)) = g.data.get(key) {
            return Ok(Some(kv.clone()));
        }
        self.put_locked(&mut g, key, value, None);
        Ok(None)
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, KvError> {
        self.check_up("grant lease")?;
        let mut g = self.lock();
        let id = g.next_lease;
        g.next_lease += 1;
        g.leases.insert(id, ttl);
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<bool, KvError> {
        self.check_up("keep lease alive")?;
        Ok(self.lock().leases.contains_key(&lease))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn list_then_done_then_changes() {
        let s = MemoryStore::new();
        s.put("p/a", b"1".to_vec(), None).await.unwrap();
        s.put("q/x", b"1".to_vec(), None).await.unwrap();
        let mut w = s.list_and_watch("p/").await.unwrap();
        assert!(matches!(w.next().await, Some(Ok(KvEvent::Put(kv))) if kv.key == "p/a"));
        assert!(matches!(w.next().await, Some(Ok(KvEvent::ListDone { .. }))));
        s.put("q/y", b"1".to_vec(), None).await.unwrap();
        s.put("p/b", b"2".to_vec(), None).await.unwrap();
        assert!(matches!(w.next().await, Some(Ok(KvEvent::Put(kv))) if kv.key == "p/b"));
        s.wipe();
        assert!(matches!(
            w.next().await,
            Some(Err(KvError::WatchClosed { .. }))
        ));
    }

    #[tokio::test]
    async fn create_is_put_if_absent_and_leases_expire() {
        let s = MemoryStore::new();
        assert_eq!(s.create("k", b"a".to_vec()).await.unwrap(), None);
        let existing = s.create("k", b"b".to_vec()).await.unwrap().unwrap();
        assert_eq!(existing.value, b"a");
        let l = s.grant_lease(Duration::from_secs(5)).await.unwrap();
        s.put("n", b"x".to_vec(), Some(l)).await.unwrap();
        assert!(s.keep_alive(l).await.unwrap());
        s.expire_lease(l);
        assert!(!s.keep_alive(l).await.unwrap());
        assert!(s.get("n").await.unwrap().is_none());
    }
}
