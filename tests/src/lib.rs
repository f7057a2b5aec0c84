//! Test harness: network namespaces, topologies, a real etcd with mTLS.
//!
//! Privileged tests create their own namespaces (never touching the host's),
//! clean up on drop (also after a panic), and wait with [`eventually`]
//! instead of bare sleeps. A test that cannot run says why, and fails when
//! `$CI` is set instead of passing silently ([`require_root`]).
use std::time::{Duration, Instant};

pub mod capture;
pub mod cni;
pub mod daemon;
pub mod etcd;
pub mod flow;
pub mod mesh;
pub mod netns;
pub mod ping;
pub mod pki;
pub mod proxy;
pub mod rawgrpc;
pub mod stall;
pub mod topo;
#[cfg(feature = "etcd-client")]
pub mod watchconn;

/// Whether privileged tests can run here (root, `ip netns` usable).
///
/// When they cannot, prints why and returns `false` so the test can return;
/// under CI (`$CI` set) it panics instead: a CI run that skips is a failure.
pub fn require_root(test: &str) -> bool {
    let why = if !nix::unistd::geteuid().is_root() {
        Some("it needs root (network namespaces, netlink, eBPF)".to_string())
    } else {
        match std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
        {
            Ok(o) if o.status.success() => None,
            Ok(o) => Some(format!(
                "`ip netns list` failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => Some(format!("cannot run `ip` (install iproute2): {e}")),
        }
    };
    match why {
        None => true,
        Some(why) if std::env::var_os("CI").is_some() => {
            panic!("{test} cannot run: {why}; under CI this is a failure, not a skip")
        }
        Some(why) => {
            eprintln!("SKIPPED {test}: {why}");
            false
        }
    }
}

/// A finished command's status and output, for assertion messages.
pub fn describe_output(o: &std::process::Output) -> String {
    format!(
        "status {} stdout {:?} stderr {:?}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Polls `f` every 50 ms until it returns `Ok`, or until `timeout` passes,
/// then fails with the last error.
pub fn eventually<T>(
    timeout: Duration,
    mut f: impl FnMut() -> Result<T, String>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => {
                anyhow::bail!("not true after {timeout:?}: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// [`eventually`] for async conditions; uses tokio's clock.
pub async fn eventually_async<T, F, Fut>(timeout: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                anyhow::bail!("not true after {timeout:?}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// A benchmark setting from the environment variable `name` (set by
/// `cargo xtask bench …`), or `default` when it is unset or unparsable.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// A free TCP port on 127.0.0.1, below the kernel's ephemeral range and
/// never handed out twice by this process.
///
/// A port from `bind(0)` comes from the ephemeral range, where the kernel
/// also picks the source ports of outgoing connections: between the probe
/// and the daemon's own bind, any etcd client, proxy or agent connecting out
/// may take it ("bind: address already in use"). Below the range only
/// another explicit bind can collide, and the probe checks for that.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOWEST: u32 = 10_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let below = ephemeral_low().max(LOWEST + 1_000);
    let span = below - LOWEST;
    // Each test process starts at its own offset, so that a daemon left by
    // an earlier process (still dying) is unlikely to sit on the first pick.
    let start = std::process::id().wrapping_mul(7_919) % span;
    let _ = NEXT.compare_exchange(0, start + 1, Ordering::SeqCst, Ordering::SeqCst);
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = u16::try_from(LOWEST + n % span).expect("below 65536");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free TCP port on 127.0.0.1 in {LOWEST}..{below}")
}

/// The low end of `net.ipv4.ip_local_port_range` (32768 when unreadable).
fn ephemeral_low() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}
