//! A `ping -i 0.05` (20 pps) stream from a pod, and what it saw: which requests were answered.
use std::{
    collections::BTreeSet,
    io::Read,
    net::Ipv4Addr,
    process::{Child, Stdio},
    thread::JoinHandle,
};

use anyhow::Context;

use crate::mesh::Mesh;

/// A `ping -i 0.05` stream whose output is collected on a thread (a long
/// stream would fill the pipe).
#[derive(Debug)]
pub struct PingStream {
    child: Child,
    out: Option<JoinHandle<String>>,
}

impl PingStream {
    pub fn start(m: &Mesh, from: &str, to: Ipv4Addr) -> anyhow::Result<Self> {
        let (_, pod) = m
            .topo
            .pods()
            .find(|(_, p)| p.name == from)
            .with_context(|| format!("no pod {from}"))?;
        // -O: say so when a reply is missing before the next request goes.
        let mut child = pod
            .ns
            .command("ping")
            .args(["-n", "-O", "-i", "0.05", "-W", "1", &to.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let mut stdout = child.stdout.take().context("ping stdout")?;
        let out = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        });
        Ok(Self {
            child,
            out: Some(out),
        })
    }

    pub fn running(&mut self) -> anyhow::Result<()> {
        if let Some(st) = self.child.try_wait()? {
            anyhow::bail!("ping exited early with {st}");
        }
        Ok(())
    }

    /// Stops the stream (SIGINT: ping prints its summary) and returns its output.
    pub fn stop(mut self) -> anyhow::Result<String> {
        // `ip netns exec` execs ping: the child is ping itself.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )?;
        self.child.wait()?;
        self.out
            .take()
            .context("output taken")?
            .join()
            .map_err(|_| anyhow::anyhow!("ping reader panicked"))
    }
}

impl Drop for PingStream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the stream saw: requests sent and the sequence numbers answered.
#[derive(Debug)]
pub struct PingResult {
    /// Requests sent.
    pub transmitted: u32,
    /// Sequence numbers answered.
    pub answered: BTreeSet<u32>,
}

impl PingResult {
    pub fn parse(out: &str) -> anyhow::Result<Self> {
        let mut answered = BTreeSet::new();
        for line in out.lines().filter(|l| l.contains(" bytes from ")) {
            if let Some(seq) = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("icmp_seq="))
            {
                answered.insert(seq.parse()?);
            }
        }
        let summary = out
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .with_context(|| format!("no summary in ping's output:\n{out}"))?;
        let transmitted = summary
            .split_whitespace()
            .next()
            .context("empty summary")?
            .parse()
            .with_context(|| format!("summary: {summary}"))?;
        Ok(Self {
            transmitted,
            answered,
        })
    }

    /// Requests without a reply. The last one may still have been in flight
    /// when the stream was stopped: it does not count.
    pub fn lost(&self) -> Vec<u32> {
        (1..self.transmitted)
            .filter(|s| !self.answered.contains(s))
            .collect()
    }
}
