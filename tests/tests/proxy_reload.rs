//! Certificate rotation while podmesh-etcd-proxy runs: a new client CA, and new upstream
//! credentials (a YAML naming new files, a certificate renewed in place), all without a restart.
use std::{path::Path, process::Output, sync::Arc, time::Duration};

use etcd_client::WatchStream;
use podmesh_tests::{
    daemon, describe_output,
    etcd::Etcd,
    eventually, eventually_async,
    pki::{CertFiles, Pki},
    proxy::Proxy,
};

const PREFIX: &str = "podmesh/v1/nodes/";

/// Replaces `dst` with the contents of `src` in one rename, as Kubernetes
/// swaps a Secret volume: a reader sees the old or the new file, never half.
fn replace(src: &Path, dst: &Path) {
    let tmp = dst.with_extension("new");
    std::fs::copy(src, &tmp).unwrap();
    std::fs::rename(&tmp, dst).unwrap();
}

/// A counter or gauge of the proxy.
fn metric(proxy: &Proxy, name: &str, labels: &str) -> f64 {
    proxy.metric(name, labels).unwrap()
}

/// The next events of `w` until `n` have arrived, as (key, mod revision).
async fn events(w: &mut WatchStream, n: usize) -> Vec<(String, i64)> {
    Proxy::next_events(w, n).await.unwrap()
}

/// A created watch of `PREFIX` through the proxy.
async fn watch(proxy: &Proxy) -> (etcd_client::Client, WatchStream) {
    proxy.watch_prefix(PREFIX).await.unwrap()
}

/// `--client-ca` is rewritten with another CA while the proxy runs: a client
/// certificate of the new CA is then accepted and one of the old CA refused,
/// by the same process, and the reload is counted.
#[test]
fn proxy_client_ca_rotation_accepts_the_new_ca_and_refuses_the_old_without_restart() {
    let etcd = Etcd::start().unwrap();
    let o = etcd
        .etcdctl(&["put", "podmesh/v1/clusters/east", "e"])
        .unwrap();
    assert!(o.status.success(), "{}", describe_output(&o));
    let proxy = Proxy::start(&etcd, &[]).unwrap();
    // The proxy's server certificate stays; clients keep trusting its CA,
    // which the rotation overwrites in the proxy's directory.
    let keep = tempfile::TempDir::new().unwrap();
    let server_ca = keep.path().join("server-ca.crt");
    std::fs::copy(proxy.pki().ca(), &server_ca).unwrap();
    let get = |client: &CertFiles| {
        daemon::etcdctl_command(&proxy.endpoint(), &server_ca, Some(client))
            .args(["--dial-timeout", "3s", "--command-timeout", "5s"])
            .args(["get", "podmesh/v1/clusters/east", "--print-value-only"])
            .output()
            .unwrap()
    };
    let accepted = |o: &Output| o.status.success() && o.stdout.starts_with(b"e\n");
    let new_ca = Pki::new("client-ca-2").unwrap();
    let new_client = new_ca.client("remote-agent-2").unwrap();
    let old_client = proxy.client().clone();
    let o = get(&new_client);
    assert!(
        !accepted(&o),
        "new CA accepted before the rotation: {}",
        describe_output(&o)
    );
    let o = get(&old_client);
    assert!(accepted(&o), "{}", describe_output(&o));
    let (pid, reloads) = (
        proxy.pid(),
        metric(&proxy, "podmesh_proxy_tls_reloads_total", ""),
    );

    replace(new_ca.ca(), proxy.pki().ca());
    eventually(Duration::from_secs(20), || {
        let o = get(&new_client);
        if accepted(&o) {
            Ok(())
        } else {
            Err(describe_output(&o))
        }
    })
    .unwrap();
    let o = get(&old_client);
    assert!(
        !accepted(&o) && o.stdout.is_empty(),
        "old CA still accepted: {}",
        describe_output(&o)
    );
    assert_eq!(proxy.pid(), pid, "the proxy restarted");
    assert!(
        metric(&proxy, "podmesh_proxy_tls_reloads_total", "") > reloads,
        "{}",
        proxy.log_tail()
    );
}

/// The upstream etcd's CA is rotated: etcd restarts trusting only a new CA
/// (its server certificate from that CA too), and the proxy's
/// `--upstream-config` is rewritten to name the new CA, certificate and key,
/// which live at new paths (the old files stay, as in a Secret that gained
/// new keys). The proxy cannot reconnect with what it had; once the YAML
/// changes it reconnects with the new files, without a restart, and resumes
/// where it was: a watcher through it keeps its stream and receives the
/// writes made while the proxy was cut off, then the ones after, in order,
/// with no gap and no cancellation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_upstream_config_naming_new_ca_files_reconnects_and_watchers_miss_nothing() {
    let mut etcd = Etcd::start().unwrap();
    let proxy = Proxy::start(&etcd, &[]).unwrap();
    let (_c, mut w) = watch(&proxy).await;
    let put = |etcd: &Etcd, k: &str| {
        let o = etcd
            .etcdctl(&["put", &format!("{PREFIX}{k}"), "v"])
            .unwrap();
        assert!(o.status.success(), "{}", describe_output(&o));
    };
    put(&etcd, "east/k0");
    let first = events(&mut w, 1).await;
    let pid = proxy.pid();

    // The old CA's files stay where the YAML names them.
    let _old = etcd.pki().clone();
    etcd.restart_with_pki(Arc::new(Pki::new("etcd-rotated").unwrap()))
        .unwrap();
    eventually_async(Duration::from_secs(20), || async {
        match metric(&proxy, "podmesh_proxy_upstream_state", "") {
            2.0 => Err("still watching".to_owned()),
            _ => Ok(()),
        }
    })
    .await
    .unwrap();
    for k in ["east/k1", "east/k2", "east/k3"] {
        put(&etcd, k);
    }
    // Cut off, it serves the last state it has.
    let mut c = proxy.connect().await.unwrap();
    let r = c.get(format!("{PREFIX}east/k1"), None).await.unwrap();
    assert!(r.kvs().is_empty(), "{r:?}");

    let yaml = proxy.upstream_config().with_extension("rotated");
    etcd.client_config(&yaml).unwrap();
    std::fs::rename(&yaml, proxy.upstream_config()).unwrap();
    let got = events(&mut w, 3).await;
    put(&etcd, "east/k4");
    let got: Vec<_> = got.into_iter().chain(events(&mut w, 1).await).collect();
    let keys: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        ["k1", "k2", "k3", "k4"].map(|k| format!("{PREFIX}east/{k}")),
        "{got:?}"
    );
    let revs: Vec<i64> = first.iter().chain(&got).map(|(_, r)| *r).collect();
    assert!(
        revs.windows(2).all(|p| p[1] == p[0] + 1),
        "revisions with a gap or out of order: {revs:?}"
    );
    assert_eq!(proxy.pid(), pid, "the proxy restarted");
    assert!(metric(&proxy, "podmesh_proxy_upstream_config_reloads_total", "") >= 1.0);
    assert_eq!(metric(&proxy, "podmesh_proxy_upstream_state", ""), 2.0);
    assert_eq!(
        metric(&proxy, "podmesh_proxy_watchers_cancelled_total", ""),
        0.0
    );
}

/// The upstream client certificate is renewed in place (same paths, same
/// CA, as cert-manager does). A half-written renewal (the new certificate
/// with the old key) is not taken: the proxy says so and stays connected.
/// The complete pair is: the proxy reconnects with it at once, while the old
/// connection still works, and a watcher keeps its stream and gets the next
/// write with the next revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_upstream_certificate_renewed_in_place_reconnects_without_an_outage() {
    let etcd = Etcd::start().unwrap();
    let proxy = Proxy::start(&etcd, &[]).unwrap();
    let writer = etcd.pki().client("writer").unwrap();
    let mut up = podmesh_tests::etcd::connect(&[etcd.endpoint()], etcd.pki().ca(), Some(&writer))
        .await
        .unwrap();
    let (_c, mut w) = watch(&proxy).await;
    up.put(format!("{PREFIX}east/k0"), "v", None).await.unwrap();
    let first = events(&mut w, 1).await;
    let reconnects = metric(&proxy, "podmesh_proxy_upstream_reconnects_total", "");

    // The proxy's YAML names etcd's root client certificate.
    let renewed = etcd.pki().client("etcd-root-renewed").unwrap();
    let current = etcd.root_client().clone();
    replace(&renewed.cert, &current.cert);
    eventually(Duration::from_secs(20), || {
        let log = proxy.log_tail();
        if log.contains("upstream config or credentials unreadable or invalid") {
            Ok(())
        } else {
            Err(log)
        }
    })
    .unwrap();
    assert!(
        proxy.log_tail().contains("do not form a pair"),
        "{}",
        proxy.log_tail()
    );
    assert_eq!(
        metric(&proxy, "podmesh_proxy_upstream_config_reloads_total", ""),
        0.0
    );
    assert_eq!(metric(&proxy, "podmesh_proxy_upstream_state", ""), 2.0);

    replace(&renewed.key, &current.key);
    eventually(Duration::from_secs(20), || {
        match metric(&proxy, "podmesh_proxy_upstream_config_reloads_total", "") {
            1.0 => Ok(()),
            n => Err(format!("{n} reloads")),
        }
    })
    .unwrap();
    eventually(Duration::from_secs(20), || {
        let n = metric(&proxy, "podmesh_proxy_upstream_reconnects_total", "");
        let state = metric(&proxy, "podmesh_proxy_upstream_state", "");
        if n > reconnects && state == 2.0 {
            Ok(())
        } else {
            Err(format!(
                "reconnects {n} (before {reconnects}), state {state}"
            ))
        }
    })
    .unwrap();
    up.put(format!("{PREFIX}east/k1"), "v", None).await.unwrap();
    let got = events(&mut w, 1).await;
    assert_eq!(got[0].0, format!("{PREFIX}east/k1"));
    assert_eq!(got[0].1, first[0].1 + 1, "{first:?} then {got:?}");
    assert_eq!(
        metric(&proxy, "podmesh_proxy_watchers_cancelled_total", ""),
        0.0
    );
}
