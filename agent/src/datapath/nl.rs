//! The agent's netlink client: `podmesh-netlink`, shared with podmesh-wireguard.
pub use podmesh_netlink::*;
