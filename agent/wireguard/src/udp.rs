//! gotatun's UDP socket, sending with UDP GSO: a run of datagrams to one
//! peer goes down the stack as one buffer that is cut into datagrams at the
//! device (or not at all, up to a receiver that takes it whole with UDP GRO).
//!
//! gotatun's socket sends a batch with sendmmsg(2), which still runs the
//! kernel's UDP/IP output path (and a veth's receive path) once per datagram;
//! that was the largest single cost of the tunnel. Where the kernel or the
//! route refuses GSO, the run is sent datagram by datagram instead.
use std::{
    io::{self, IoSlice},
    net::SocketAddr,
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use gotatun::{
    packet::Packet,
    udp::{UdpSend, socket::UdpSocket},
};
use nix::sys::socket::{ControlMessage, MsgFlags, SockaddrStorage, sendmsg};
use tokio::io::Interest;

use crate::packet_loop::socket::{gso_refused, run_len};

/// Datagrams gotatun hands over at once.
const MAX_BATCH: usize = 128;

/// gotatun's [`UdpSocket`] whose batches go out with UDP GSO.
#[derive(Clone)]
pub struct GsoSocket {
    inner: UdpSocket,
    /// Cleared when the kernel refuses GSO on this socket for good.
    gso: Arc<AtomicBool>,
}

impl std::fmt::Debug for GsoSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GsoSocket")
            .field("gso", &self.gso.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl GsoSocket {
    pub fn new(inner: UdpSocket) -> Self {
        Self {
            inner,
            gso: Arc::new(AtomicBool::new(true)),
        }
    }

    /// One GSO send of `run` (datagrams of `run[0]`'s size, the last one
    /// possibly shorter) to `dst`.
    async fn send_gso(&self, run: &[(Packet, SocketAddr)], dst: SocketAddr) -> io::Result<()> {
        let socket = self.inner.socket();
        let fd = socket.as_raw_fd();
        let iov: Vec<IoSlice<'_>> = run.iter().map(|(p, _)| IoSlice::new(p)).collect();
        let addr = SockaddrStorage::from(dst);
        let segment = u16::try_from(run[0].0.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
        socket
            .async_io(Interest::WRITABLE, || {
                sendmsg(
                    fd,
                    &iov,
                    &[ControlMessage::UdpGsoSegments(&segment)],
                    MsgFlags::MSG_DONTWAIT,
                    Some(&addr),
                )
                .map_err(io::Error::from)
            })
            .await
            .map(drop)
    }
}

/// Where a run of datagrams starting at `packets[0]` ends: same destination,
/// and within that [`run_len`]'s rule (same size, the GSO limits).
fn run_to_one(packets: &[(Packet, SocketAddr)]) -> usize {
    let dst = packets[0].1;
    run_len(
        packets
            .iter()
            .take_while(|(_, d)| *d == dst)
            .map(|(p, _)| p.len()),
    )
}

impl UdpSend for GsoSocket {
    type SendManyBuf = ();

    async fn send_to(&self, packet: Packet, target: SocketAddr) -> io::Result<()> {
        self.inner.send_to(packet, target).await
    }

    async fn send_many_to(
        &self,
        _buf: &mut (),
        packets: &mut Vec<(Packet, SocketAddr)>,
    ) -> io::Result<()> {
        let socket = self.inner.socket();
        let mut start = 0;
        let mut result = Ok(());
        while start < packets.len() {
            let n = run_to_one(&packets[start..]);
            let run = &packets[start..start + n];
            let dst = run[0].1;
            let sent = if n > 1 && self.gso.load(Ordering::Relaxed) {
                match self.send_gso(run, dst).await {
                    Ok(()) => true,
                    Err(e) => {
                        // No checksum offload on the route's device, or a
                        // kernel without UDP_SEGMENT: not on this socket.
                        if e.raw_os_error().is_some_and(gso_refused) {
                            tracing::info!(error = %e, "UDP GSO refused; sending datagram by datagram");
                            self.gso.store(false, Ordering::Relaxed);
                        }
                        false
                    }
                }
            } else {
                false
            };
            if !sent {
                for (p, d) in run {
                    if let Err(e) = socket.send_to(p, *d).await {
                        result = Err(e);
                    }
                }
            }
            start += n;
        }
        packets.clear();
        result
    }

    fn max_number_of_packets_to_send(&self) -> usize {
        MAX_BATCH
    }

    fn local_addr(&self) -> io::Result<Option<SocketAddr>> {
        self.inner.local_addr().map(Some)
    }

    fn set_fwmark(&self, mark: u32) -> io::Result<()> {
        self.inner.set_fwmark(mark)
    }
}
