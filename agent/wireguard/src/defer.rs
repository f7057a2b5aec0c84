//! `--defer-to-kernel-wireguard`: where the kernel has WireGuard, this process
//! creates nothing and waits for SIGTERM, so that the agent's
//! `--wireguard-backend auto` finds no userspace device and takes the kernel's.
//!
//! The probe is the agent's (`auto` creates a `wireguard` link and keeps it
//! when the kernel lets it), with the same netlink client and request
//! (`podmesh-netlink`): a throwaway `wireguard` link created and deleted again.
use podmesh_netlink::{Netlink, NlError, link};

/// The throwaway link (15 bytes, the longest name Linux takes).
const PROBE_LINK: &str = "podmesh-wgprobe";

/// Whether this network namespace's kernel can create a WireGuard device;
/// `Err` says why not (no WireGuard, no CAP_NET_ADMIN, …).
pub fn kernel_has_wireguard() -> Result<(), String> {
    let mut nl = Netlink::open(None).map_err(|e| format!("opening rtnetlink: {e}"))?;
    let mut created = nl.request(link::create(PROBE_LINK, "wireguard"));
    if matches!(&created, Err(e) if e.errno() == Some(libc::EEXIST)) {
        // Left by a probe that did not finish: ours to remove.
        let _ = nl.request(link::delete(PROBE_LINK));
        created = nl.request(link::create(PROBE_LINK, "wireguard"));
    }
    created.map_err(|e: NlError| format!("creating a wireguard link: {e}"))?;
    if let Err(e) = nl.request(link::delete(PROBE_LINK)) {
        tracing::warn!(
            link = PROBE_LINK,
            error = %e,
            "cannot delete the probe's WireGuard link; remove it with `ip link del {PROBE_LINK}`"
        );
    }
    Ok(())
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
