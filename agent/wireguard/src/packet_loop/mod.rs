//! podmesh's own packet loop around gotatun's WireGuard sessions
//! ([`gotatun::noise::Tunn`]), in place of gotatun's `Device`: a thread per
//! direction (or one for both), batches from TUN offloads and UDP GSO/GRO
//! handled without channels between tasks, a timer thread, and the UAPI
//! protocol served on the same device state.
mod datapath;
mod device;
pub mod socket;
pub mod uapi;

use std::{
    io,
    os::fd::AsFd,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use tokio::sync::mpsc;

pub use device::Device;

use datapath::{Inbound, Outbound, would_block};

/// How often the WireGuard timers run.
const TICK: Duration = Duration::from_millis(250);

/// A running packet loop.
#[derive(Debug)]
pub struct Running {
    pub device: Arc<Device>,
    /// Says why the loop stopped (the TUN device is gone).
    pub stopped: mpsc::UnboundedReceiver<String>,
}

/// Creates the TUN device `name` with offloads and starts the loop: one
/// thread per direction when `threads` ≥ 2, else one for both.
pub fn start(name: &str, threads: usize) -> io::Result<Running> {
    let tun = tun_rs::DeviceBuilder::new()
        .name(name)
        .offload(true)
        .tx_queue_len(crate::tun::TX_QUEUE_LEN)
        .build_sync()?;
    let tun = Arc::new(tun);
    let device = Arc::new(Device::new(tun.mtu()?));
    let (tx, stopped) = mpsc::unbounded_channel();
    let report = move |what: &str, e: io::Error| {
        let _ = tx.send(format!("the {what} stopped: {e}"));
    };
    {
        let dev = Arc::clone(&device);
        let tun = Arc::clone(&tun);
        spawn("wg-timers", move || {
            let mut ticks = 0u32;
            loop {
                std::thread::sleep(TICK);
                dev.tick();
                ticks = ticks.wrapping_add(1);
                // The agent sets the MTU after the device exists.
                if ticks.is_multiple_of(12)
                    && let Ok(m) = tun.mtu()
                {
                    dev.mtu.store(m, Ordering::Relaxed);
                }
            }
        })?;
    }
    if threads >= 2 {
        let mut out = Outbound::new(Arc::clone(&device), Arc::clone(&tun));
        let report_out = report.clone();
        spawn("wg-out", move || {
            loop {
                match out.step() {
                    Ok(()) => {}
                    Err(e) if would_block(&e) => {}
                    Err(e) => return report_out("TUN reader", e),
                }
            }
        })?;
        let mut inb = Inbound::new(Arc::clone(&device), Arc::clone(&tun), false);
        spawn("wg-in", move || {
            loop {
                if let Err(e) = inb.step() {
                    return report("TUN writer", e);
                }
            }
        })?;
    } else {
        tun.set_nonblocking(true)?;
        let mut out = Outbound::new(Arc::clone(&device), Arc::clone(&tun));
        let mut inb = Inbound::new(Arc::clone(&device), Arc::clone(&tun), true);
        spawn("wg-loop", move || {
            loop {
                let sock = inb.socket();
                let mut fds = vec![PollFd::new(tun.as_fd(), PollFlags::POLLIN)];
                if let Some(s) = &sock {
                    fds.push(PollFd::new(s.as_fd(), PollFlags::POLLIN));
                }
                if let Err(e) = poll(&mut fds, PollTimeout::from(200u8)) {
                    if e != nix::errno::Errno::EINTR {
                        return report("packet loop", e.into());
                    }
                    continue;
                }
                let ready = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
                let (tun_ready, sock_ready) = (ready(&fds[0]), fds.get(1).is_some_and(ready));
                drop(fds);
                if tun_ready {
                    // A bounded number of reads, so that the other direction gets its turn.
                    for _ in 0..8 {
                        match out.step() {
                            Ok(()) => {}
                            Err(e) if would_block(&e) => break,
                            Err(e) => return report("TUN reader", e),
                        }
                    }
                }
                if sock_ready && let Err(e) = inb.step() {
                    return report("TUN writer", e);
                }
            }
        })?;
    }
    Ok(Running { device, stopped })
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> io::Result<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map(drop)
}
