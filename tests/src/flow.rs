//! TCP flows between namespaces: what address a connection really arrives from.
//!
//! A [`Sink`] listens inside a namespace; [`exchange`] connects from another
//! one, sends some bytes and reads back what the sink saw: the source address
//! of the connection (after whatever NAT the path applied) and the byte count.
//! A completed exchange also proves the replies came back from the address
//! the client connected to: its socket accepts nothing else.
use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, bail};

use crate::netns::NetNs;

/// The port sinks listen on.
pub const SINK_PORT: u16 = 7077;

/// A TCP server in a namespace that reports each connection's source address.
#[derive(Debug)]
pub struct Sink {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Sink {
    /// Listens on `0.0.0.0:SINK_PORT` (and `[::]` where the namespace has IPv6) inside `ns`.
    pub fn start(ns: &NetNs) -> anyhow::Result<Self> {
        let listener = std::thread::scope(|s| {
            s.spawn(|| -> anyhow::Result<TcpListener> {
                let _in = ns.enter()?;
                let l = TcpListener::bind(("::", SINK_PORT))
                    .or_else(|_| TcpListener::bind(("0.0.0.0", SINK_PORT)))
                    .with_context(|| format!("listening on {SINK_PORT} in {}", ns.name()))?;
                l.set_nonblocking(true)?;
                Ok(l)
            })
            .join()
            .unwrap_or_else(|_| bail!("sink thread panicked"))
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, peer)) => {
                        let _ = serve(conn, peer);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

/// Reads to EOF, answers `<peer ip> <bytes>\n`.
fn serve(mut conn: TcpStream, peer: SocketAddr) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0usize;
    loop {
        match conn.read(&mut buf)? {
            0 => break,
            n => total += n,
        }
    }
    let ip = match peer.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    writeln!(conn, "{ip} {total}")
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the sink saw of one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    /// The connection's source address as it arrived.
    pub source: IpAddr,
    /// Bytes received.
    pub bytes: usize,
}

/// Connects from `from` to the sink at `to`, sends `bytes` bytes, and
/// returns what the sink saw.
pub fn exchange(from: &NetNs, to: IpAddr, bytes: usize) -> anyhow::Result<Seen> {
    std::thread::scope(|s| {
        s.spawn(|| -> anyhow::Result<Seen> {
            let _in = from.enter()?;
            let addr = SocketAddr::new(to, SINK_PORT);
            let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
                .with_context(|| format!("connecting from {} to {addr}", from.name()))?;
            c.set_write_timeout(Some(Duration::from_secs(20)))?;
            c.set_read_timeout(Some(Duration::from_secs(20)))?;
            let chunk = vec![0x5au8; 64 * 1024];
            let mut left = bytes;
            while left > 0 {
                let n = left.min(chunk.len());
                c.write_all(&chunk[..n]).with_context(|| {
                    format!("sending to {addr} ({} of {bytes} sent)", bytes - left)
                })?;
                left -= n;
            }
            c.shutdown(std::net::Shutdown::Write)?;
            let mut answer = String::new();
            c.read_to_string(&mut answer)
                .with_context(|| format!("reading {addr}'s answer"))?;
            let (ip, n) = answer
                .trim()
                .split_once(' ')
                .with_context(|| format!("{addr} answered {answer:?}"))?;
            Ok(Seen {
                source: ip.parse()?,
                bytes: n.parse()?,
            })
        })
        .join()
        .unwrap_or_else(|_| bail!("exchange thread panicked"))
    })
}

/// The port [`iperf3_server`] listens on.
pub const IPERF3_PORT: u16 = 5201;

/// A one-shot `iperf3` server (`-s -1`) in `ns` on [`IPERF3_PORT`], returned
/// once it listens, so that a client started right after does not race it.
/// The caller kills or waits for the child.
pub fn iperf3_server(ns: &NetNs) -> anyhow::Result<std::process::Child> {
    let port = IPERF3_PORT.to_string();
    let mut server = ns
        .command("iperf3")
        .args(["-s", "-1", "-p", &port])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting iperf3 -s (is iperf3 installed?)")?;
    let filter = format!("sport = :{port}");
    let listening = crate::eventually(Duration::from_secs(5), || {
        let o = ns
            .exec("ss", &["-ltn", &filter])
            .map_err(|e| e.to_string())?;
        if String::from_utf8_lossy(&o.stdout).contains(&format!(":{port}")) {
            Ok(())
        } else {
            Err(format!("iperf3 not listening on {port} in {}", ns.name()))
        }
    });
    if let Err(e) = listening {
        let _ = server.kill();
        let _ = server.wait();
        return Err(e);
    }
    Ok(server)
}
