//! Kernel WireGuard over generic netlink (the "wireguard" family): creating the device,
//! reading it and changing it, with the same operations the userspace socket offers.
use std::path::Path;

use super::uapi::{DeviceState, PeerChange};
use crate::datapath::{base::DatapathError, nl::Netlink};

/// Whether this kernel can create WireGuard devices.
pub fn supported(_nl: &mut Netlink) -> bool {
    false
}

/// Creates the kernel WireGuard device `name`.
pub fn create_link(_nl: &mut Netlink, name: &str) -> Result<(), DatapathError> {
    Err(DatapathError::Unavailable(format!(
        "cannot create the kernel WireGuard device {name}: this kernel has no WireGuard \
         (use --wireguard-backend userspace or auto)"
    )))
}

/// Reads the kernel device `name`.
pub fn get(_netns: Option<&Path>, name: &str) -> Result<DeviceState, DatapathError> {
    Err(DatapathError::Unavailable(format!(
        "cannot read the kernel WireGuard device {name}"
    )))
}

/// Changes the kernel device `name`.
pub fn set(
    _netns: Option<&Path>,
    name: &str,
    _private_key: Option<&[u8; 32]>,
    _port: Option<u16>,
    _changes: &[PeerChange],
) -> Result<(), DatapathError> {
    Err(DatapathError::Unavailable(format!(
        "cannot configure the kernel WireGuard device {name}"
    )))
}
