//! What the harness's child processes (etcd, podmesh-etcd-proxy, podmesh-agent) share: readiness waits, SIGTERM, log tails, loopback endpoints, etcdctl.
use std::{
    path::Path,
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::bail;

use crate::pki::CertFiles;

/// A podmesh-agent of cluster "home" (ID 9), node h1 at 192.168.9.1 with
/// 10.9.1.0/24, on the dry-run datapath: the agent under test of the tests
/// that need one node of a cluster of their own, before their own flags.
pub const HOME_AGENT_FLAGS: &[&str] = &[
    "--cluster-name",
    "home",
    "--cluster-id",
    "9",
    "--node-name",
    "h1",
    "--node-ip",
    "192.168.9.1",
    "--pod-cidr",
    "10.9.1.0/24",
    "--datapath-dry-run",
];

/// Clears every `ETCD*` variable from `cmd`'s environment: etcd and etcdctl
/// read them as flags, so the caller's environment must not leak in.
pub fn without_etcd_env(cmd: &mut Command) -> &mut Command {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("ETCD") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// The last `lines` lines of a log file (empty when unreadable).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `https://127.0.0.1:<port>`.
pub fn loopback_endpoint(port: u16) -> String {
    format!("https://127.0.0.1:{port}")
}

/// Polls `ready` every 50 ms until it holds; fails at once when `child`
/// exits and after `timeout`, both times with the tail of `log`.
pub fn wait_until(
    what: &str,
    child: &mut Option<Child>,
    log: &Path,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            bail!("{what} exited with {status}; log:\n{}", log_tail(log, 40));
        }
        if ready() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{what} not ready after {timeout:?}; log:\n{}",
                log_tail(log, 40)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Stops `child` with SIGTERM, as the kubelet stops a pod, and returns its
/// exit status; one that has not exited after `timeout` is killed and is an
/// error.
pub fn terminate(child: &mut Child, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "process {} did not exit within {timeout:?} of SIGTERM",
                child.id()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Kills the child (SIGKILL) and reaps it.
pub fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// `etcdctl` (v3 API) against `endpoint`, trusting `ca`, with `client` as
/// its identity (None: no client certificate).
pub fn etcdctl_command(endpoint: &str, ca: &Path, client: Option<&CertFiles>) -> Command {
    let mut cmd = Command::new("etcdctl");
    without_etcd_env(&mut cmd)
        .env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(endpoint)
        .arg("--cacert")
        .arg(ca);
    if let Some(c) = client {
        cmd.arg("--cert").arg(&c.cert).arg("--key").arg(&c.key);
    }
    cmd
}
