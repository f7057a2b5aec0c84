//! An upstream that accepts TCP connections and never answers: the proxy's connection attempts
//! time out (connect, TLS handshake and first answer are under --connect-timeout), it reports
//! not ready with a last error saying so, keeps retrying, and becomes ready and serves the data
//! once the endpoint answers again.
use std::time::Duration;

use podmesh_tests::{
    etcd::{Etcd, http_get},
    eventually,
    proxy::{Proxy, http_status},
    stall::Stall,
};

#[test]
fn proxy_times_out_on_a_silent_upstream_and_recovers_when_it_answers() {
    let etcd = Etcd::start().expect("etcd");
    let put = etcd
        .etcdctl(&[
            "put",
            "podmesh/v1/clusters/east",
            "{\"name\":\"east\",\"id\":1}",
        ])
        .expect("etcdctl put");
    assert!(put.status.success(), "{put:?}");
    let stall = Stall::start().expect("stall");
    let mut proxy =
        Proxy::start_unready_at(&etcd, &[stall.endpoint()], &["--connect-timeout", "1s"])
            .expect("proxy");
    let port = proxy.metrics_port();

    // While silent: not ready and failing (the probe is told how long, the
    // log why: the attempt timed out), and the proxy keeps trying (new
    // connections reach the endpoint).
    let body = eventually(Duration::from_secs(20), || {
        let b = http_get(port, "/readyz").map_err(|e| e.to_string())?;
        if http_status(&b) == Some(503) && b.contains("failing_for=") && stall.held() >= 3 {
            Ok(b)
        } else {
            Err(format!("held {}: {b}", stall.held()))
        }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", proxy.log_tail()));
    assert!(body.contains("synced=false"), "{body}");
    let log = proxy.log();
    assert!(log.contains("no answer within 1s"), "{}", proxy.log_tail());
    assert!(
        log.matches("timed out").count() >= 2,
        "every timed-out attempt is logged and retried:\n{}",
        proxy.log_tail()
    );

    // The endpoint answers again: the next attempt gets through, the proxy
    // lists the upstream, becomes ready and serves what it holds.
    stall.forward_to(etcd.port());
    proxy
        .wait_ready(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", proxy.log_tail()));
    let got = proxy
        .etcdctl(
            Some(proxy.client()),
            &["get", "--print-value-only", "podmesh/v1/clusters/east"],
        )
        .expect("etcdctl get through the proxy");
    assert!(got.status.success(), "{got:?}");
    assert_eq!(
        String::from_utf8_lossy(&got.stdout).trim(),
        "{\"name\":\"east\",\"id\":1}"
    );
    // Ready at the end of the list; the watch follows, and clears the error.
    eventually(Duration::from_secs(10), || {
        let b = http_get(port, "/readyz").map_err(|e| e.to_string())?;
        if b.contains("upstream=watching") && !b.contains("last_error") {
            Ok(())
        } else {
            Err(b)
        }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", proxy.log_tail()));
}
