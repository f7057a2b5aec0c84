//! A packet capture inside a namespace (an `AF_PACKET` socket on every device), for tests that
//! must show what crosses the underlay: which UDP ports, which addresses, which bytes.
use std::{
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use anyhow::Context;
use nix::sys::{
    socket::{
        AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, recv, setsockopt, socket,
        sockopt::ReceiveTimeout,
    },
    time::TimeVal,
};

use crate::netns::NetNs;

/// One captured Ethernet frame.
#[derive(Clone, Debug)]
pub struct Frame(pub Vec<u8>);

impl Frame {
    /// The IPv4 header's source and destination, if the frame carries IPv4.
    pub fn ipv4(&self) -> Option<(Ipv4Addr, Ipv4Addr, u8, &[u8])> {
        let b = &self.0;
        if b.len() < 34 || b[12..14] != [0x08, 0x00] {
            return None;
        }
        let ip = &b[14..];
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        if ip.len() < ihl {
            return None;
        }
        let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
        let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
        Some((src, dst, ip[9], &ip[ihl..]))
    }

    /// UDP source and destination ports over IPv4.
    pub fn udp_ports(&self) -> Option<(u16, u16)> {
        let (_, _, proto, l4) = self.ipv4()?;
        if proto != 17 || l4.len() < 8 {
            return None;
        }
        Some((
            u16::from_be_bytes([l4[0], l4[1]]),
            u16::from_be_bytes([l4[2], l4[3]]),
        ))
    }

    /// Whether `pattern` occurs anywhere in the frame.
    pub fn contains(&self, pattern: &[u8]) -> bool {
        self.0.windows(pattern.len()).any(|w| w == pattern)
    }
}

/// A running capture; [`Capture::stop`] returns the frames.
#[derive(Debug)]
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<Vec<Frame>>>>,
}

impl Capture {
    /// Captures every frame of every device of `ns` (each frame once per
    /// device it crosses) until stopped.
    pub fn start(ns: &NetNs) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let ns = NetNs::adopt(ns.name());
        let flag = stop.clone();
        let thread = std::thread::spawn(move || -> anyhow::Result<Vec<Frame>> {
            let fd: OwnedFd = {
                let _in = ns.enter()?;
                let fd = socket(
                    AddressFamily::Packet,
                    SockType::Raw,
                    SockFlag::empty(),
                    SockProtocol::EthAll,
                )
                .context("opening an AF_PACKET socket")?;
                std::mem::forget(ns);
                fd
            };
            setsockopt(&fd, ReceiveTimeout, &TimeVal::new(0, 100_000))?;
            let _ = ready_tx.send(());
            let mut frames = Vec::new();
            let mut buf = vec![0u8; 65536];
            while !flag.load(Ordering::SeqCst) {
                match recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                    Ok(n) => frames.push(Frame(buf[..n].to_vec())),
                    Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {}
                    Err(e) => return Err(e).context("capturing"),
                }
            }
            Ok(frames)
        });
        ready_rx
            .recv()
            .context("the capture thread ended before its socket was open")?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the capture; every frame it saw.
    pub fn stop(mut self) -> anyhow::Result<Vec<Frame>> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .context("stopped twice")?
            .join()
            .map_err(|_| anyhow::anyhow!("the capture thread panicked"))?
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
