//! RAII network namespaces (`ip netns`), removed on drop, also after a panic.
use std::{
    fs::File,
    os::fd::AsFd,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, bail};
use nix::sched::{CloneFlags, setns};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A network namespace made by a test. Its processes are killed and the
/// namespace deleted when this is dropped.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates `pmt<pid>-<seq>-<tag>` with loopback up.
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let name = format!(
            "pmt{}-{}-{tag}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        Self::named(&name)
    }

    /// Creates a namespace with exactly this name (the demo uses its own prefix).
    pub fn named(name: &str) -> anyhow::Result<Self> {
        ip(&["netns", "add", name])?;
        let ns = Self {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Adopts an existing namespace (it is deleted on drop like any other).
    pub fn adopt(name: &str) -> Self {
        Self {
            name: name.to_string(),
        }
    }

    /// The namespace's name (for `ip netns exec`, `ip -n`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <ns> <args>`; fails with ip's stderr.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// A command that runs inside the namespace (`ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `program args` inside the namespace and returns its output.
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<Output> {
        self.command(program)
            .args(args)
            .output()
            .with_context(|| format!("running {program} in {}", self.name))
    }

    /// Runs `program args` inside the namespace; fails unless it exits 0.
    pub fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let out = self.exec(program, args)?;
        if !out.status.success() {
            bail!(
                "{program} {} in {} failed: {}{}",
                args.join(" "),
                self.name,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        self.run("sysctl", &["-q", "-w", &format!("{key}={value}")])
            .map(drop)
    }

    /// `ping -c count -W 1 [-s size -M do] addr` from inside the namespace: true if answered.
    pub fn ping(&self, addr: &str, count: u32, size: Option<u32>) -> bool {
        let count = count.to_string();
        let mut args = vec!["-n", "-q", "-c", &count, "-W", "1", "-i", "0.2"];
        let size_s;
        if let Some(s) = size {
            size_s = s.to_string();
            args.extend_from_slice(&["-s", &size_s, "-M", "do"]);
        }
        args.push(addr);
        self.exec("ping", &args)
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    /// The elements of nftables set `set` of table `inet <table>` as `nft list
    /// set` prints them (`10.2.0.0/24`, `10.9.0.7`); an error when there is no such set.
    pub fn nft_set(
        &self,
        table: &str,
        set: &str,
    ) -> anyhow::Result<std::collections::BTreeSet<String>> {
        let out = self.run("nft", &["list", "set", "inet", table, set])?;
        Ok(match out.split_once("elements = {") {
            Some((_, rest)) => rest
                .split('}')
                .next()
                .unwrap_or_default()
                .split(',')
                .map(|e| e.trim().to_string())
                .filter(|e| !e.is_empty())
                .collect(),
            None => Default::default(),
        })
    }

    /// Moves the calling thread into this namespace until the guard drops.
    ///
    /// Use it on a thread of its own (or a current-thread runtime) to open
    /// netlink sockets or load eBPF programs inside the namespace.
    pub fn enter(&self) -> anyhow::Result<NsGuard> {
        let back = File::open("/proc/thread-self/ns/net").context("opening own netns")?;
        let target = File::open(format!("/run/netns/{}", self.name))
            .with_context(|| format!("opening /run/netns/{}", self.name))?;
        setns(target.as_fd(), CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("setns into {}", self.name))?;
        Ok(NsGuard { back })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Ok(o) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("warning: could not delete netns {}: {e}", self.name);
        }
    }
}

/// Restores the thread's previous network namespace on drop.
#[derive(Debug)]
pub struct NsGuard {
    back: File,
}

impl Drop for NsGuard {
    fn drop(&mut self) {
        if let Err(e) = setns(self.back.as_fd(), CloneFlags::CLONE_NEWNET) {
            // A thread stuck in a test namespace would run later code in the
            // wrong place: better to stop here.
            panic!("cannot return to the original netns: {e}");
        }
    }
}

/// Runs `ip <args>`; fails with its stderr.
pub fn ip(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether a namespace of this name exists.
pub fn exists(name: &str) -> bool {
    std::path::Path::new("/run/netns").join(name).exists()
}
