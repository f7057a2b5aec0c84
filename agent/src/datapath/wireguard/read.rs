//! Reading the WireGuard device, whichever WireGuard serves it: the agent's
//! datapath and `podmesh diagnose` read it through these.
use std::path::Path;

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
