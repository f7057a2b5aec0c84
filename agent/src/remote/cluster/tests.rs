//! Lifecycle tests against the in-memory store, with paused time.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use super::*;
use crate::{
    kvstore::{client_config::EtcdClientConfig, memory::MemoryStore},
    model::{cluster_key, node_key},
    remote::Connector,
};

#[derive(Clone, Default)]
struct MemConnector {
    stores: Arc<Mutex<HashMap<String, MemoryStore>>>,
    attempts: Arc<Mutex<Vec<Instant>>>,
}

impl Connector for MemConnector {
    type Store = MemoryStore;
    async fn connect(
        &self,
        cluster: &str,
        _path: &Path,
        _cfg: &EtcdClientConfig,
    ) -> Result<MemoryStore, KvError> {
        self.attempts.lock().unwrap().push(Instant::now());
        let s = self.stores.lock().unwrap().get(cluster).cloned().unwrap();
        s.get("probe").await?;
        Ok(s)
    }
}

fn file() -> RemoteFile {
    let cfg = EtcdClientConfig {
        endpoints: vec!["http://127.0.0.1:1".into()],
        trusted_ca_file: None,
        cert_file: None,
        key_file: None,
    };
    RemoteFile {
        path: PathBuf::from("/x/east"),
        config: Ok(cfg),
        fingerprint: 1,
    }
}

fn setup(store: &MemoryStore) -> (MemConnector, MeshCache, Status, tokio::task::JoinHandle<()>) {
    let conn = MemConnector::default();
    conn.stores
        .lock()
        .unwrap()
        .insert("east".into(), store.clone());
    let cache = MeshCache::new();
    let status = Status::new("home", "n");
    let task = RemoteCluster {
        name: "east".into(),
        file: file(),
        connector: conn.clone(),
        cache: cache.clone(),
        status: status.clone(),
        settings: RemoteSettings {
            empty_grace: Duration::from_secs(60),
            min_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
            connect_timeout: podmesh_plumbing::lifecycle::CONNECT_TIMEOUT,
        },
    };
    let h = tokio::spawn(task.run());
    (conn, cache, status, h)
}

async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

fn keys(cache: &MeshCache) -> Vec<String> {
    cache.with(|m| {
        m.get("east")
            .map(|r| r.entries.keys().cloned().collect())
            .unwrap_or_default()
    })
}

#[tokio::test(start_paused = true)]
async fn lists_watches_and_prunes_after_relist() {
    let s = MemoryStore::new();
    s.put(&cluster_key("east"), b"{}".to_vec(), None)
        .await
        .unwrap();
    s.put(&node_key("east", "a"), b"{}".to_vec(), None)
        .await
        .unwrap();
    let (_c, cache, status, h) = setup(&s);
    settle().await;
    assert_eq!(keys(&cache).len(), 2);
    assert!(status.ready());
    s.put(&node_key("east", "b"), b"{}".to_vec(), None)
        .await
        .unwrap();
    settle().await;
    assert_eq!(keys(&cache).len(), 3);
    // A deletion missed while disconnected is pruned by the next complete list.
    s.set_down(true);
    settle().await;
    assert!(!status.ready());
    s.delete(&node_key("east", "a"));
    s.set_down(false);
    tokio::time::sleep(Duration::from_secs(1)).await;
    settle().await;
    assert_eq!(
        keys(&cache),
        vec![cluster_key("east"), node_key("east", "b")]
    );
    assert!(status.ready());
    h.abort();
}

#[tokio::test(start_paused = true)]
async fn backoff_is_capped_and_not_a_hot_loop() {
    let s = MemoryStore::new();
    s.set_down(true);
    let (conn, _cache, status, h) = setup(&s);
    tokio::time::sleep(Duration::from_secs(120)).await;
    let attempts = conn.attempts.lock().unwrap().clone();
    // 200 ms doubling to a 10 s cap (jitter: upper half): about 16 attempts in 120 s.
    assert!(
        attempts.len() >= 10 && attempts.len() <= 30,
        "{}",
        attempts.len()
    );
    let gaps: Vec<Duration> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.iter().all(|g| *g <= Duration::from_secs(10)));
    assert!(gaps.last().unwrap() >= &Duration::from_secs(5));
    let st = status.snapshot();
    assert_eq!(st.remotes["east"].failures as usize, attempts.len());
    assert!(st.remotes["east"].last_error.is_some());
    h.abort();
}

#[tokio::test(start_paused = true)]
async fn empty_remote_keeps_entries_for_the_grace_period() {
    let s = MemoryStore::new();
    s.put(&cluster_key("east"), b"{}".to_vec(), None)
        .await
        .unwrap();
    s.put(&node_key("east", "a"), b"{}".to_vec(), None)
        .await
        .unwrap();
    s.put(&node_key("east", "b"), b"{}".to_vec(), None)
        .await
        .unwrap();
    let (_c, cache, status, h) = setup(&s);
    settle().await;
    assert_eq!(keys(&cache).len(), 3);
    s.wipe();
    tokio::time::sleep(Duration::from_secs(1)).await;
    settle().await;
    // Came back empty: nothing pruned yet, grace reported.
    assert_eq!(keys(&cache).len(), 3);
    assert!(
        status.snapshot().remotes["east"]
            .empty_grace_until
            .is_some()
    );
    // Node a and the cluster record republish during the grace period.
    s.put(&cluster_key("east"), b"{}".to_vec(), None)
        .await
        .unwrap();
    s.put(&node_key("east", "a"), b"{}".to_vec(), None)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(61)).await;
    settle().await;
    assert_eq!(
        keys(&cache),
        vec![cluster_key("east"), node_key("east", "a")]
    );
    assert!(
        status.snapshot().remotes["east"]
            .empty_grace_until
            .is_none()
    );
    h.abort();
}

#[tokio::test(start_paused = true)]
async fn compaction_relists_without_hot_loop() {
    let s = MemoryStore::new();
    s.put(&cluster_key("east"), b"{}".to_vec(), None)
        .await
        .unwrap();
    let (conn, cache, status, h) = setup(&s);
    settle().await;
    // Overflow the watch channel: the memory store reports it as a compaction.
    for i in 0..6000 {
        s.put(&node_key("east", &format!("n{i}")), b"{}".to_vec(), None)
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    settle().await;
    assert_eq!(keys(&cache).len(), 6001);
    assert!(conn.attempts.lock().unwrap().len() <= 3);
    let st = status.snapshot().remotes["east"].clone();
    assert!(st.compactions >= 1, "{st:?}");
    assert_eq!(st.lists, 1 + st.compactions, "{st:?}");
    assert_eq!(st.failures, 0, "a compaction is not a failure: {st:?}");
    assert!(st.synced);
    h.abort();
}
