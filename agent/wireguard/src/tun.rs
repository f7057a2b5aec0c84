//! The TUN device with offloads (`IFF_VNET_HDR`, TSO and checksum offload),
//! batched reads and coalesced writes, as gotatun's packet source and sink.
//!
//! gotatun's own TUN reads and writes one packet per system call, and the
//! kernel then runs its whole TCP/IP path once per 1,440-byte packet on both
//! ends of the tunnel. With offloads the kernel hands over a TCP send of up to
//! 64 KiB in one read (split here into MTU-sized packets for encryption), and
//! the packets decrypted from one batch of datagrams are coalesced back into
//! such segments before they are written (GRO), so the receiving stack sees a
//! few large segments instead of dozens of small ones. tun-rs does the
//! splitting and the coalescing (the scheme wireguard-go uses).
use std::{io, sync::Arc, time::Duration};

use bytes::BytesMut;
use gotatun::{
    packet::{Ip, Packet, PacketBufPool},
    tun::{IpRecv, IpSend, MtuWatcher},
};
use tokio::sync::{mpsc, watch};
use tun_rs::{AsyncDevice, GROTable, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

/// Packets the device's send queue holds (the kernel drops what does not fit;
/// the default of 1,000 overflows while a TCP sender's burst waits for a read).
pub const TX_QUEUE_LEN: u32 = 10_000;

/// Decrypted packets waiting for the TUN writer. A full queue makes gotatun
/// wait, and it stops reading the UDP socket.
const WRITE_QUEUE: usize = 1024;

/// Largest IP packet a read hands over (the device's MTU bounds segments; a
/// non-GSO packet is at most the MTU too).
const SEGMENT_BUF: usize = 4096;

/// The TUN device `name`, created with offloads, as gotatun's sender and receiver.
pub fn create(name: &str) -> io::Result<(TunSend, TunRecv)> {
    let dev = tun_rs::DeviceBuilder::new()
        .name(name)
        .offload(true)
        .tx_queue_len(TX_QUEUE_LEN)
        .build_async()?;
    let dev = Arc::new(dev);
    let mtu = dev.mtu()?;
    let (mtu_tx, mtu_rx) = watch::channel(mtu);
    // gotatun sizes nothing by it but keeps it for its MTU-dependent padding;
    // the agent sets the MTU after the device exists, so follow it.
    let weak = Arc::downgrade(&dev);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(3)).await;
            let Some(dev) = weak.upgrade() else { return };
            if let Ok(m) = dev.mtu() {
                mtu_tx.send_if_modified(|old| std::mem::replace(old, m) != m);
            }
        }
    });
    let (tx, rx) = mpsc::channel(WRITE_QUEUE);
    tokio::spawn(write_loop(Arc::clone(&dev), rx));
    Ok((
        TunSend { tx },
        TunRecv {
            dev,
            mtu: mtu_rx.into(),
            raw: vec![0; VIRTIO_NET_HDR_LEN + 65535],
            segments: vec![vec![0; SEGMENT_BUF]; IDEAL_BATCH_SIZE],
            sizes: vec![0; IDEAL_BATCH_SIZE],
            out: Vec::with_capacity(IDEAL_BATCH_SIZE),
        },
    ))
}

/// Writes what gotatun decrypted: everything queued at the time, coalesced.
async fn write_loop(dev: Arc<AsyncDevice>, mut rx: mpsc::Receiver<Packet<Ip>>) {
    let mut batch: Vec<Packet<Ip>> = Vec::with_capacity(IDEAL_BATCH_SIZE);
    let mut bufs: Vec<BytesMut> = Vec::with_capacity(IDEAL_BATCH_SIZE);
    let mut gro = GROTable::default();
    loop {
        if rx.recv_many(&mut batch, IDEAL_BATCH_SIZE).await == 0 {
            return;
        }
        let n = batch.len();
        // Each buffer may become the head that the packets after it are
        // appended to, and tun-rs coalesces only into the capacity there is.
        while bufs.len() < n {
            bufs.push(BytesMut::with_capacity(2 * VIRTIO_NET_HDR_LEN + 65535));
        }
        for (buf, packet) in bufs.iter_mut().zip(batch.drain(..)) {
            buf.clear();
            buf.resize(VIRTIO_NET_HDR_LEN, 0);
            buf.extend_from_slice(&packet.into_bytes());
        }
        if let Err(e) = dev
            .send_multiple(&mut gro, &mut bufs[..n], VIRTIO_NET_HDR_LEN)
            .await
        {
            if e.raw_os_error() == Some(libc::EBADFD) {
                tracing::error!(error = %e, "the TUN device is gone");
                return;
            }
            tracing::debug!(error = %e, "writing to the TUN device failed");
        }
    }
}

/// gotatun's side of the writer: hands each decrypted packet to [`write_loop`].
#[derive(Debug, Clone)]
pub struct TunSend {
    tx: mpsc::Sender<Packet<Ip>>,
}

impl IpSend for TunSend {
    async fn send(&mut self, packet: Packet<Ip>) -> io::Result<()> {
        self.tx
            .send(packet)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the TUN writer stopped"))
    }
}

/// Reads the device: one read, up to 64 KiB split into MTU-sized packets.
pub struct TunRecv {
    dev: Arc<AsyncDevice>,
    mtu: MtuWatcher,
    raw: Vec<u8>,
    segments: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    out: Vec<Packet<Ip>>,
}

impl std::fmt::Debug for TunRecv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunRecv").finish_non_exhaustive()
    }
}

impl IpRecv for TunRecv {
    async fn recv<'a>(
        &'a mut self,
        pool: &mut PacketBufPool,
    ) -> io::Result<impl Iterator<Item = Packet<Ip>> + Send + 'a> {
        self.out.clear();
        while self.out.is_empty() {
            let n = self
                .dev
                .recv_multiple(&mut self.raw, &mut self.segments, &mut self.sizes, 0)
                .await?;
            for (seg, &size) in self.segments.iter().zip(&self.sizes).take(n) {
                let mut packet = pool.get();
                let buf = packet.buf_mut();
                buf.clear();
                buf.extend_from_slice(&seg[..size]);
                // Not IP (cannot come from a TUN device without packet
                // information): dropped like gotatun's own device does.
                if let Ok(ip) = packet.try_into_ip() {
                    self.out.push(ip);
                }
            }
        }
        Ok(self.out.drain(..))
    }

    fn mtu(&self) -> MtuWatcher {
        self.mtu.clone()
    }
}
