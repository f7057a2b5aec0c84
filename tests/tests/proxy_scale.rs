//! 1,000 watchers through the proxy all receive every event, while the upstream etcd sees one watch.
use std::{collections::HashMap, time::Duration};

use etcd_client::WatchOptions;
use podmesh_tests::{etcd::Etcd, eventually, proxy::Proxy};

const WATCHERS: usize = 1000;
const STREAMS: usize = 10;
const EVENTS: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_thousand_watchers_receive_every_event_over_one_upstream_watch() {
    let etcd = Etcd::start().unwrap();
    let proxy = Proxy::start(&etcd, &[]).unwrap();
    let client = proxy.connect().await.unwrap();
    let mut streams = Vec::new();
    for _ in 0..STREAMS {
        let mut wc = client.watch_client();
        let mut s = wc
            .watch("podmesh/v1/nodes/", Some(WatchOptions::new().with_prefix()))
            .await
            .unwrap();
        for _ in 1..WATCHERS / STREAMS {
            s.watch("podmesh/v1/nodes/", Some(WatchOptions::new().with_prefix()))
                .await
                .unwrap();
        }
        streams.push(s);
    }
    let readers: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let mut created = 0;
                let mut per_watch: HashMap<i64, Vec<String>> = HashMap::new();
                while per_watch.len() < WATCHERS / STREAMS
                    || per_watch.values().any(|v| v.len() < EVENTS)
                {
                    let resp = tokio::time::timeout(Duration::from_secs(60), s.message())
                        .await
                        .expect("events stopped arriving")
                        .unwrap()
                        .unwrap();
                    assert!(!resp.canceled(), "{}", resp.cancel_reason());
                    if resp.created() {
                        created += 1;
                    }
                    for e in resp.events() {
                        per_watch
                            .entry(resp.watch_id())
                            .or_default()
                            .push(e.kv().unwrap().value_str().unwrap().to_string());
                    }
                }
                (created, per_watch)
            })
        })
        .collect();
    // All watchers are registered before the writes start.
    eventually(Duration::from_secs(60), || {
        let n = proxy
            .metric("podmesh_proxy_watchers", "")
            .map_err(|e| e.to_string())?;
        if n as usize == WATCHERS {
            Ok(())
        } else {
            Err(format!("{n} watchers"))
        }
    })
    .unwrap();
    let mut up = etcd.connect().await.unwrap();
    for i in 0..EVENTS {
        up.put(
            format!("podmesh/v1/nodes/east/n{}", i % 7),
            format!("{i}"),
            None,
        )
        .await
        .unwrap();
    }
    let want: Vec<String> = (0..EVENTS).map(|i| i.to_string()).collect();
    let mut total = 0;
    for r in readers {
        let (created, per_watch) = r.await.unwrap();
        assert_eq!(created, WATCHERS / STREAMS);
        assert_eq!(per_watch.len(), WATCHERS / STREAMS);
        for (id, got) in per_watch {
            assert_eq!(
                got, want,
                "watch {id}: events missing, duplicated or reordered"
            );
            total += 1;
        }
    }
    assert_eq!(total, WATCHERS);
    // The upstream etcd serves exactly one watch: the proxy's.
    assert_eq!(
        etcd.metric("etcd_debugging_mvcc_watcher_total").unwrap(),
        1.0
    );
}

/// A client that stops reading its watch stream cannot hold up the others:
/// the fast watcher gets every event while the stalled one is behind, and
/// the stalled one, once it reads again, finds a gap-free run of events
/// ended by a cancellation that says why and what to do (never a silent skip).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_watcher_is_cancelled_with_a_reason_and_holds_up_no_one() {
    const PUTS: usize = 600;
    let etcd = Etcd::start().unwrap();
    let proxy = Proxy::start(&etcd, &["--watch-buffer", "64"]).unwrap();
    let mut up = etcd.connect().await.unwrap();
    // Separate connections: separate HTTP/2 flow-control windows.
    let fast_client = proxy.connect().await.unwrap();
    let slow_client = proxy.connect().await.unwrap();
    let prefix = "podmesh/v1/nodes/";
    let mut fast = fast_client
        .watch_client()
        .watch(prefix, Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    let mut slow = slow_client
        .watch_client()
        .watch(prefix, Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    let reader = tokio::spawn(async move {
        let mut n = 0;
        while n < PUTS {
            let resp = tokio::time::timeout(Duration::from_secs(60), fast.message())
                .await
                .map_err(|_| format!("fast watcher stalled after {n} events"))?
                .map_err(|e| e.to_string())?
                .ok_or("fast watch stream ended")?;
            if resp.canceled() {
                return Err(format!(
                    "fast watcher cancelled after {n}: {}",
                    resp.cancel_reason()
                ));
            }
            n += resp.events().len();
        }
        Ok::<usize, String>(n)
    });
    // 16 KiB values: far more than the slow connection's windows and the
    // proxy's per-stream queue hold.
    let value = vec![b'x'; 16 << 10];
    for i in 0..PUTS {
        up.put(format!("{prefix}east/n{}", i % 40), value.clone(), None)
            .await
            .unwrap();
    }
    let got = reader.await.unwrap().unwrap();
    assert_eq!(got, PUTS, "the fast watcher missed events");

    let mut last = None;
    let mut received = 0;
    let reason = loop {
        let resp = tokio::time::timeout(Duration::from_secs(30), slow.message())
            .await
            .expect("the stalled watcher got neither its events nor a cancellation")
            .unwrap()
            .expect("the stalled watch stream ended without a cancellation");
        for e in resp.events() {
            let rev = e.kv().unwrap().mod_revision();
            if let Some(l) = last {
                assert_eq!(rev, l + 1, "gap in the stalled watcher's events");
            }
            last = Some(rev);
            received += 1;
        }
        if resp.canceled() {
            break resp.cancel_reason().to_string();
        }
        assert!(
            received < PUTS,
            "the stalled watcher received everything: it was never behind"
        );
    };
    assert!(
        reason.contains("fell behind") && reason.contains("list again"),
        "unclear cancellation: {reason}"
    );
    assert!(received < PUTS, "cancelled after all {PUTS} events");
    assert!(
        proxy
            .metric("podmesh_proxy_watchers_cancelled_total", "slow_watcher")
            .unwrap()
            >= 1.0
    );
}
