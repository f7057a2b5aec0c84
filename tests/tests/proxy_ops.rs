//! Operating podmesh-etcd-proxy: SIGTERM with open watch streams, the metrics an operator reads, /healthz and /readyz.
use std::time::{Duration, Instant};

use etcd_client::{GetOptions, WatchStream};
use podmesh_tests::{
    etcd::{Etcd, http_get},
    eventually, eventually_async,
    proxy::{Proxy, http_status},
};

const PREFIX: &str = "podmesh/v1/nodes/";

/// How long the proxy waits for connections to close after SIGTERM before
/// it exits anyway (`DRAIN_DEADLINE` in etcd-proxy/src/main.rs).
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

fn metric(proxy: &Proxy, name: &str, labels: &str) -> f64 {
    proxy.metric(name, labels).unwrap()
}

/// A created watch of `PREFIX` through the proxy, on its own connection.
async fn watch(proxy: &Proxy) -> (etcd_client::Client, WatchStream) {
    proxy.watch_prefix(PREFIX).await.unwrap()
}

/// How many events `w` delivers until at least `n` have arrived.
async fn events(w: &mut WatchStream, n: usize) -> usize {
    Proxy::next_events(w, n).await.unwrap().len()
}

/// SIGTERM while etcd-client watch streams are open: each stream ends with
/// UNAVAILABLE "etcdserver: server stopped" (not a hang, not a cancel), the proxy closes its connections
/// itself instead of waiting out its drain deadline, and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_sigterm_ends_open_watch_streams_and_exits_0_before_the_drain_deadline() {
    let etcd = Etcd::start().unwrap();
    let mut proxy = Proxy::start(&etcd, &[]).unwrap();
    let mut up = etcd.connect().await.unwrap();
    let mut streams = Vec::new();
    for _ in 0..3 {
        streams.push(watch(&proxy).await);
    }
    up.put(format!("{PREFIX}east/a"), "1", None).await.unwrap();
    for (_, w) in &mut streams {
        events(w, 1).await;
    }
    // Each stream is read from here on; its end is reported with the time.
    let start = Instant::now();
    let ends: Vec<_> = streams
        .into_iter()
        .map(|(c, mut w)| {
            tokio::spawn(async move {
                let _client = c;
                let end = tokio::time::timeout(Duration::from_secs(30), async {
                    loop {
                        match w.message().await {
                            Ok(Some(r)) if r.canceled() => {
                                break format!("cancelled: {}", r.cancel_reason());
                            }
                            Ok(Some(_)) => {}
                            Ok(None) => break "end of stream".to_owned(),
                            Err(etcd_client::Error::GRpcStatus(s)) => {
                                break format!("status {:?}: {}", s.code(), s.message());
                            }
                            Err(e) => break format!("error: {e}"),
                        }
                    }
                })
                .await;
                (end, start.elapsed())
            })
        })
        .collect();

    let status = tokio::task::block_in_place(|| proxy.terminate()).unwrap();
    let exited = start.elapsed();
    assert_eq!(status.code(), Some(0), "{status}: {}", proxy.log_tail());
    assert!(
        exited < DRAIN_DEADLINE,
        "exit took {exited:?}: streams were left to the drain deadline; log:\n{}",
        proxy.log_tail()
    );
    assert!(
        !proxy.log_tail().contains("still open"),
        "{}",
        proxy.log_tail()
    );
    for end in ends {
        let (how, when) = end.await.unwrap();
        let how = how.expect("a watch stream did not end within 30 s of SIGTERM");
        assert!(when < DRAIN_DEADLINE, "{how} after {when:?}");
        // UNAVAILABLE, as etcd says when it stops: the code etcd's clients
        // (Go's clientv3 among them) retry and resume their watchers on; a
        // cancel or a bare end of stream would stop them.
        assert!(
            how.starts_with("status Unavailable") && how.contains("server stopped"),
            "{how}"
        );
    }
}

/// The proxy's metrics against what the upstream holds: the upstream state
/// while etcd runs, is killed and comes back; events in and out counted per
/// upstream event and per delivery to each watcher; the cache's key count
/// and revision equal to the upstream's; refusals counted by reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_metrics_follow_upstream_state_events_cache_and_refusals() {
    let mut etcd = Etcd::start().unwrap();
    let proxy = Proxy::start(&etcd, &[]).unwrap();
    let state = || metric(&proxy, "podmesh_proxy_upstream_state", "");
    eventually(Duration::from_secs(20), || match state() {
        2.0 => Ok(()),
        s => Err(format!("upstream_state {s}")),
    })
    .unwrap();

    let mut up = etcd.connect().await.unwrap();
    let (_c1, mut w1) = watch(&proxy).await;
    let (_c2, mut w2) = watch(&proxy).await;
    assert_eq!(metric(&proxy, "podmesh_proxy_watchers", ""), 2.0);
    let (ins, outs) = (
        metric(&proxy, "podmesh_proxy_events_in_total", ""),
        metric(&proxy, "podmesh_proxy_events_out_total", ""),
    );
    for i in 0..5 {
        up.put(format!("{PREFIX}east/n{i}"), "v", None)
            .await
            .unwrap();
    }
    up.delete(format!("{PREFIX}east/n0"), None).await.unwrap();
    assert_eq!(events(&mut w1, 6).await, 6);
    assert_eq!(events(&mut w2, 6).await, 6);
    assert_eq!(
        metric(&proxy, "podmesh_proxy_events_in_total", "") - ins,
        6.0
    );
    // Counted once a delivery is queued for the client: maybe a moment
    // after the client has read it.
    eventually(Duration::from_secs(5), || {
        match metric(&proxy, "podmesh_proxy_events_out_total", "") - outs {
            12.0 => Ok(()),
            n => Err(format!("{n} events out")),
        }
    })
    .unwrap();
    // A client that goes takes its stream and its watcher off the gauges;
    // the other client's stay.
    drop((_c1, w1));
    eventually(Duration::from_secs(10), || {
        match (
            metric(&proxy, "podmesh_proxy_watchers", ""),
            metric(&proxy, "podmesh_proxy_watch_streams", ""),
        ) {
            (1.0, 1.0) => Ok(()),
            n => Err(format!("watchers and streams {n:?}")),
        }
    })
    .unwrap();
    let listed = up
        .get("podmesh/v1/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    let revision = listed.header().unwrap().revision();
    assert_eq!(listed.kvs().len(), 4);
    assert_eq!(metric(&proxy, "podmesh_proxy_cache_keys", ""), 4.0);
    assert_eq!(
        metric(&proxy, "podmesh_proxy_cache_revision", ""),
        revision as f64
    );

    // Refusals by reason, each counted once per refused request.
    let reasons = [
        "key_outside_prefix",
        "range_end_outside_prefix",
        "empty_key",
    ];
    let count = |r: &str| {
        metric(
            &proxy,
            "podmesh_proxy_refused_requests_total",
            &format!("reason=\"{r}\""),
        )
    };
    let before: Vec<f64> = reasons.iter().map(|r| count(r)).collect();
    let mut c = proxy.connect().await.unwrap();
    for (key, opts) in [
        ("secret/admin", None),
        (
            "podmesh/v1/a",
            Some(GetOptions::new().with_range("podmesh/v2")),
        ),
        ("", None),
    ] {
        let e = c.get(key, opts).await.unwrap_err();
        assert!(e.to_string().contains("podmesh/v1/"), "{key:?}: {e}");
    }
    for (r, b) in reasons.iter().zip(before) {
        assert_eq!(count(r) - b, 1.0, "refused_requests_total{{reason={r:?}}}");
    }

    // Upstream gone: disconnected (between retries); back: watching.
    etcd.kill();
    eventually(Duration::from_secs(20), || match state() {
        0.0 => Ok(()),
        s => Err(format!("upstream_state {s}")),
    })
    .unwrap();
    etcd.restart().unwrap();
    eventually_async(Duration::from_secs(30), || async {
        match state() {
            2.0 => Ok(()),
            s => Err(format!("upstream_state {s}")),
        }
    })
    .await
    .unwrap();
}

/// /healthz answers 200 as soon as the process runs; /readyz answers 503
/// (with `synced=false`) while the upstream etcd is not running yet, and
/// 200 once the proxy has listed it.
#[test]
fn proxy_healthz_and_readyz_before_and_after_the_upstream_is_reachable() {
    let mut etcd = Etcd::start().unwrap();
    etcd.kill();
    let proxy = Proxy::start_unready(&etcd, &[]).unwrap();
    let get = |path: &str| http_get(proxy.metrics_port(), path).unwrap();
    let h = get("/healthz");
    assert_eq!(http_status(&h), Some(200), "{h}");
    let r = get("/readyz");
    assert_eq!(http_status(&r), Some(503), "{r}");
    assert!(r.contains("synced=false"), "{r}");
    // Neither the unauthenticated probe nor a remote client's Status RPC
    // learns the upstream's error text (its address, its certificates):
    // they get the state and how long it has lasted; the log says why.
    let port = etcd.port().to_string();
    let r = eventually(Duration::from_secs(30), || {
        let r = get("/readyz");
        if r.contains("failing_for=") {
            Ok(r)
        } else {
            Err(r)
        }
    })
    .unwrap();
    assert!(!r.contains(&port) && !r.contains("last_error"), "{r}");
    let errors = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut c = proxy.connect().await.unwrap();
        c.status().await.unwrap().errors().to_vec()
    });
    assert!(
        errors
            .iter()
            .any(|e| e.contains("not watched") && e.contains("failing for")),
        "{errors:?}"
    );
    assert!(errors.iter().all(|e| !e.contains(&port)), "{errors:?}");
    assert!(
        proxy.log().contains(&port),
        "the proxy's own log names the upstream it cannot reach: {}",
        proxy.log_tail()
    );
    etcd.restart().unwrap();
    let r = eventually(Duration::from_secs(30), || {
        let r = get("/readyz");
        if http_status(&r) == Some(200) && r.contains("upstream=watching") {
            Ok(r)
        } else {
            Err(r)
        }
    })
    .unwrap();
    assert!(r.contains("synced=true"), "{r}");
    let h = get("/healthz");
    assert_eq!(http_status(&h), Some(200), "{h}");
}
