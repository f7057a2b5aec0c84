//! Upstream etcd killed, restarted and compacted during a stream of writes: every watcher behind
//! the proxy ends with exactly the upstream's final state, with no duplicated or reordered event.
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use etcd_client::{Client, CompactionOptions, EventType, GetOptions, WatchOptions};
use podmesh_tests::{etcd::Etcd, eventually_async, proxy::Proxy};

const PREFIX: &str = "podmesh/v1/nodes/";

#[derive(Debug, Default)]
struct Seen {
    state: BTreeMap<String, String>,
    relists: u32,
    /// Violations: an event at or below the last revision applied.
    out_of_order: Vec<String>,
}

async fn list(c: &mut Client) -> anyhow::Result<(BTreeMap<String, String>, i64)> {
    let r = c.get(PREFIX, Some(GetOptions::new().with_prefix())).await?;
    let state = r
        .kvs()
        .iter()
        .map(|kv| {
            (
                kv.key_str().unwrap().to_string(),
                kv.value_str().unwrap().to_string(),
            )
        })
        .collect();
    Ok((state, r.header().unwrap().revision()))
}

/// What a remote agent does: list, watch from the list's revision + 1, apply;
/// on a cancelled watch (compacted), list again.
async fn agent(mut c: Client, seen: Arc<Mutex<Seen>>) {
    loop {
        let Ok((state, rev)) = list(&mut c).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        {
            let mut s = seen.lock().unwrap();
            s.state = state;
            s.relists += 1;
        }
        let Ok(mut w) = c
            .watch(
                PREFIX,
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(rev + 1),
                ),
            )
            .await
        else {
            continue;
        };
        let mut last = rev;
        while let Ok(Some(resp)) = w.message().await {
            if resp.canceled() {
                break;
            }
            let mut s = seen.lock().unwrap();
            for e in resp.events() {
                let kv = e.kv().unwrap();
                if kv.mod_revision() <= last {
                    s.out_of_order.push(format!(
                        "{} at {} after {last}",
                        kv.key_str().unwrap(),
                        kv.mod_revision()
                    ));
                }
                last = kv.mod_revision();
                let k = kv.key_str().unwrap().to_string();
                match e.event_type() {
                    EventType::Put => s.state.insert(k, kv.value_str().unwrap().to_string()),
                    EventType::Delete => s.state.remove(&k),
                };
            }
        }
    }
}

async fn writes(up: &mut Client, from: u32, n: u32) {
    for i in from..from + n {
        let key = format!("{PREFIX}east/k{}", i % 17);
        if i % 7 == 3 {
            up.delete(key, None).await.unwrap();
        } else {
            up.put(key, format!("v{i}"), None).await.unwrap();
        }
        // Writes outside the prefix move the revision too.
        if i % 5 == 0 {
            up.put(format!("other/{i}"), "x", None).await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_watchers_end_with_upstream_state_across_kill_restart_and_compaction() {
    let mut etcd = Etcd::start().unwrap();
    let proxy = Proxy::start(&etcd, &["--history-events", "100000"]).unwrap();
    let mut up = etcd.connect().await.unwrap();
    writes(&mut up, 0, 30).await;

    let mut agents = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let c = proxy.connect().await.unwrap();
        tasks.push(tokio::spawn(agent(c, seen.clone())));
        agents.push(seen);
    }
    writes(&mut up, 30, 100).await;

    // 1. etcd killed and restarted on the same data: the proxy resumes from
    //    its last revision; watchers continue without re-listing.
    etcd.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    etcd.restart().unwrap();
    let mut up = etcd.connect().await.unwrap();
    writes(&mut up, 130, 100).await;
    let relists_before: Vec<u32> = agents.iter().map(|s| s.lock().unwrap().relists).collect();
    converge(&mut up, &agents, &proxy).await;
    let relists_after: Vec<u32> = agents.iter().map(|s| s.lock().unwrap().relists).collect();
    assert_eq!(
        relists_before, relists_after,
        "a resumed upstream watch must not cancel downstream watchers"
    );

    // 2. etcd killed; while the proxy is stopped, etcd comes back, takes
    //    writes and is compacted past the proxy's revision. The proxy must
    //    re-list and make every watcher re-list: no silent gap.
    let pid = nix::unistd::Pid::from_raw(proxy.pid().unwrap() as i32);
    etcd.kill();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let restarted = etcd.restart();
    let mut up = match restarted {
        Ok(()) => etcd.connect().await.unwrap(),
        Err(e) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
            panic!("{e}");
        }
    };
    writes(&mut up, 230, 60).await;
    let rev = up
        .get("other/", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    up.compact(rev, Some(CompactionOptions::new().with_physical()))
        .await
        .unwrap();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    writes(&mut up, 290, 100).await;
    converge(&mut up, &agents, &proxy).await;
    for (i, s) in agents.iter().enumerate() {
        let s = s.lock().unwrap();
        assert!(
            s.relists >= 2,
            "agent {i} must have been told to re-list after the compaction"
        );
        assert!(s.out_of_order.is_empty(), "agent {i}: {:?}", s.out_of_order);
    }
    assert!(
        proxy
            .metric("podmesh_proxy_watchers_cancelled_total", "compacted")
            .unwrap()
            >= 8.0
    );
    // No hot loop: a handful of reconnects, not hundreds.
    let reconnects = proxy
        .metric("podmesh_proxy_upstream_reconnects_total", "")
        .unwrap();
    assert!((2.0..30.0).contains(&reconnects), "reconnects {reconnects}");
    for t in tasks {
        t.abort();
    }
}

/// Waits until every agent and a Range through the proxy hold exactly the
/// upstream's contents of the prefix.
async fn converge(up: &mut Client, agents: &[Arc<Mutex<Seen>>], proxy: &Proxy) {
    let (want, _) = list(up).await.unwrap();
    assert!(!want.is_empty());
    let mut pc = proxy.connect().await.unwrap();
    eventually_async(Duration::from_secs(60), || {
        let want = want.clone();
        let agents = agents.to_vec();
        let mut pc = pc.clone();
        async move {
            let (got, _) = list(&mut pc).await.map_err(|e| e.to_string())?;
            if got != want {
                return Err(format!("proxy Range {got:?} != upstream {want:?}"));
            }
            for (i, s) in agents.iter().enumerate() {
                let s = s.lock().unwrap();
                if s.state != want {
                    return Err(format!("agent {i} {:?} != upstream {want:?}", s.state));
                }
            }
            Ok(())
        }
    })
    .await
    .unwrap();
    let _ = list(&mut pc).await;
}

/// What both swaps below share: a watcher behind the proxy has converged on
/// `etcd`, which then holds `old_keys` too; the proxy is stopped, `swap`
/// puts another etcd behind the same endpoints, which takes writes (in
/// batches of `batch`) until its revision is past the proxy's; the proxy
/// resumes, and the watcher converges on the new etcd. Returns the
/// watcher's view, its task, and the cluster IDs before and after.
async fn swap_upstream_while_the_proxy_is_stopped(
    etcd: &mut Etcd,
    proxy: &Proxy,
    old_keys: &[String],
    batch: u32,
    swap: impl FnOnce(&mut Etcd) -> anyhow::Result<()>,
) -> (Arc<Mutex<Seen>>, tokio::task::JoinHandle<()>, u64, u64) {
    let mut up = etcd.connect().await.unwrap();
    let id_before = up.status().await.unwrap().header().unwrap().cluster_id();
    writes(&mut up, 0, 20).await;
    for k in old_keys {
        up.put(k.as_str(), "x", None).await.unwrap();
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    let task = tokio::spawn(agent(proxy.connect().await.unwrap(), seen.clone()));
    converge(&mut up, std::slice::from_ref(&seen), proxy).await;
    let proxy_rev = list(&mut proxy.connect().await.unwrap()).await.unwrap().1;

    let pid = nix::unistd::Pid::from_raw(proxy.pid().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let mut up = match swap(etcd) {
        Ok(()) => etcd.connect().await.unwrap(),
        Err(e) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
            panic!("{e}");
        }
    };
    let id_after = up.status().await.unwrap().header().unwrap().cluster_id();
    let mut i = 1000;
    while list(&mut up).await.unwrap().1 <= proxy_rev + 5 {
        writes(&mut up, i, batch).await;
        i += batch;
    }
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    converge(&mut up, std::slice::from_ref(&seen), proxy).await;
    (seen, task, id_before, id_after)
}

/// The upstream etcd is replaced by another etcd cluster (new cluster ID)
/// whose revision has passed the proxy's before the proxy sees it: resuming
/// at the proxy's revision would keep keys the new etcd never had. The proxy
/// notices the new cluster ID, re-lists, and makes its watchers re-list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_relists_when_the_upstream_is_another_etcd_cluster() {
    let mut etcd = Etcd::start().unwrap();
    let proxy = Proxy::start(&etcd, &[]).unwrap();
    let old = [format!("{PREFIX}east/only-in-the-old-etcd")];
    let (seen, task, id_before, id_after) =
        swap_upstream_while_the_proxy_is_stopped(&mut etcd, &proxy, &old, 10, |e| {
            e.replace_with_new_cluster()
        })
        .await;
    assert_ne!(
        id_before, id_after,
        "the replacement must be another cluster"
    );
    let s = seen.lock().unwrap();
    assert!(
        !s.state
            .contains_key(&format!("{PREFIX}east/only-in-the-old-etcd")),
        "a key of the old etcd survived"
    );
    assert!(s.relists >= 2, "the watcher was not told to re-list");
    drop(s);
    assert!(
        proxy.log_tail().contains("cluster ID changed"),
        "the proxy did not say why it re-listed:\n{}",
        proxy.log_tail()
    );
    task.abort();
}

/// The upstream etcd is rebuilt from nothing with the same name, peer URL
/// and cluster token, so it keeps its cluster ID, and its revision passes
/// the proxy's before the proxy reconnects. Only the content tells the
/// histories apart: the proxy compares the prefix at its revision (keys and
/// revisions) with its cache, finds another history, re-lists, and makes its
/// watchers re-list; nothing of the old etcd survives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_relists_when_the_upstream_was_rebuilt_with_the_same_cluster_id() {
    let mut etcd = Etcd::start().unwrap();
    let proxy = Proxy::start(&etcd, &[]).unwrap();
    let old: Vec<String> = (0..6)
        .map(|i| format!("{PREFIX}east/only-in-the-old-etcd-{i}"))
        .collect();
    // The same number of keys as before, other ones, and a revision past the proxy's.
    let (seen, task, id_before, id_after) =
        swap_upstream_while_the_proxy_is_stopped(&mut etcd, &proxy, &old, 26, |e| {
            e.restart_empty()
        })
        .await;
    assert_eq!(
        id_before, id_after,
        "the rebuilt etcd must keep the cluster ID, or this is the replaced-cluster test"
    );
    let s = seen.lock().unwrap();
    assert!(
        !s.state.keys().any(|k| k.contains("only-in-the-old-etcd")),
        "a key of the old etcd survived"
    );
    assert!(s.relists >= 2, "the watcher was not told to re-list");
    drop(s);
    assert!(
        proxy.log_tail().contains("another history"),
        "the proxy did not say why it re-listed:\n{}",
        proxy.log_tail()
    );
    assert!(
        proxy
            .metric("podmesh_proxy_upstream_diverged_total", "")
            .unwrap()
            >= 1.0
    );
    task.abort();
}
