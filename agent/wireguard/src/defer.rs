//! `--defer-to-kernel-wireguard`: where the kernel has WireGuard, this process
//! creates nothing and waits for SIGTERM, so that the agent's
//! `--wireguard-backend auto` finds no userspace device and takes the kernel's.
//!
//! The probe is the agent's (`auto` creates a `wireguard` link and keeps it
//! when the kernel lets it): a throwaway `wireguard` link created over
//! rtnetlink and deleted again. It is written out here, a few netlink
//! messages, rather than shared, because the agent's netlink layer would
//! bring the whole agent into this binary.
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, sendto,
    socket,
};
use std::os::fd::{AsRawFd, OwnedFd};

/// The throwaway link (15 bytes, the longest name Linux takes).
const PROBE_LINK: &str = "podmesh-wgprobe";

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
/// `struct nlmsghdr` and `struct ifinfomsg` are 16 bytes each.
const HEADER_LEN: usize = 16;

/// Whether this network namespace's kernel can create a WireGuard device;
/// `Err` says why not (no WireGuard, no CAP_NET_ADMIN, …).
pub fn kernel_has_wireguard() -> Result<(), String> {
    let sock = open().map_err(|e| format!("opening rtnetlink: {e}"))?;
    let create = || request(&sock, RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, true);
    let mut created = create();
    if created == Err(nix::errno::Errno::EEXIST) {
        // Left by a probe that did not finish: ours to remove.
        let _ = request(&sock, RTM_DELLINK, 0, false);
        created = create();
    }
    created.map_err(|e| format!("creating a wireguard link: {}", e.desc()))?;
    if let Err(e) = request(&sock, RTM_DELLINK, 0, false) {
        tracing::warn!(
            link = PROBE_LINK,
            error = %e.desc(),
            "cannot delete the probe's WireGuard link; remove it with `ip link del {PROBE_LINK}`"
        );
    }
    Ok(())
}

fn open() -> nix::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
    Ok(fd)
}

/// Sends one link request about [`PROBE_LINK`] (of kind `wireguard` when
/// `kind`) and reads the kernel's acknowledgement.
fn request(sock: &OwnedFd, ty: u16, flags: u16, kind: bool) -> nix::Result<()> {
    let mut attrs = Vec::new();
    let mut name = PROBE_LINK.as_bytes().to_vec();
    name.push(0);
    put_attr(&mut attrs, IFLA_IFNAME, &name);
    if kind {
        let mut info = Vec::new();
        put_attr(&mut info, IFLA_INFO_KIND, b"wireguard");
        put_attr(&mut attrs, IFLA_LINKINFO, &info);
    }
    let len = 2 * HEADER_LEN + attrs.len();
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&u32::try_from(len).expect("small").to_ne_bytes());
    msg.extend_from_slice(&ty.to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK | flags).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    msg.extend_from_slice(&[0; HEADER_LEN]); // ifinfomsg: any family, no index
    msg.extend_from_slice(&attrs);
    sendto(
        sock.as_raw_fd(),
        &msg,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )?;
    let mut buf = vec![0u8; 8192];
    loop {
        let n = recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        let mut at = 0;
        while at + HEADER_LEN + 4 <= n {
            let len = u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as usize;
            let ty = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().expect("2 bytes"));
            if ty == NLMSG_ERROR {
                let code = i32::from_ne_bytes(
                    buf[at + HEADER_LEN..at + HEADER_LEN + 4]
                        .try_into()
                        .expect("4 bytes"),
                );
                return match code {
                    0 => Ok(()),
                    c => Err(nix::errno::Errno::from_raw(-c)),
                };
            }
            if len < HEADER_LEN {
                return Err(nix::errno::Errno::EBADMSG);
            }
            at += (len + 3) & !3;
        }
    }
}

/// Appends one netlink attribute, padded to 4 bytes.
fn put_attr(out: &mut Vec<u8>, ty: u16, data: &[u8]) {
    let len = u16::try_from(4 + data.len()).expect("small attribute");
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&ty.to_ne_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// Stands by until SIGTERM or SIGINT: no TUN device, no socket.
pub async fn stand_by(interface: &str) -> anyhow::Result<()> {
    // Before the log line: whoever waits for it may send SIGTERM at once.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tracing::info!(
        interface,
        "the kernel's WireGuard serves this node (--defer-to-kernel-wireguard): \
         standing by without a TUN device or a UAPI socket until SIGTERM; \
         podmesh-agent's --wireguard-backend auto takes the kernel's device"
    );
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    tracing::info!("stopped; nothing to remove");
    Ok(())
}
