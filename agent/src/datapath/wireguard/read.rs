//! Reading the WireGuard device, whichever WireGuard serves it: the agent's
//! datapath and `podmesh diagnose` read it through these.
use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
};

use super::{WG_DEVICE, genl, uapi, uapi::DeviceState};
use crate::datapath::base::DatapathError;

/// Reads the device served by the userspace process behind `sock`.
pub fn uapi(sock: &Path) -> Result<DeviceState, DatapathError> {
    uapi::get(sock)
        .map_err(|e| DatapathError::io(format!("reading WireGuard through {}", sock.display()), e))
}

/// Reads `podmesh-wg` in this network namespace as the agent's status names
/// its backend: `kernel` over generic netlink, else through `sock`.
pub fn device(backend: &str, sock: &Path) -> Result<DeviceState, DatapathError> {
    match backend {
        "kernel" => genl::get(None, WG_DEVICE),
        _ => uapi(sock),
    }
}

/// A peer's endpoint as the device reports it, for comparing with the one a
/// node record gives: an IPv4 peer reached through an IPv4-mapped IPv6
/// address (a dual-stack socket's view) as the IPv4 address it is.
pub fn normalize_endpoint(e: SocketAddr) -> SocketAddr {
    match e {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => e,
        },
        SocketAddr::V4(_) => e,
    }
}
