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
