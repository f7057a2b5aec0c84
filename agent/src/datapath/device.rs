//! Tunnel devices podmesh owns (`podmesh0`, `podmesh-vx`): create, or adopt when present.
use std::net::IpAddr;

use crate::model::UnderlayFamily;

use super::{
    base::DatapathError,
    error::netlink_err,
    nl::Netlink,
    rtnl::{self, IFF_NOARP, IFF_UP, Link},
};

/// Bytes VXLAN adds over IPv4: outer IP 20 + UDP 8 + VXLAN 8 + inner Ethernet 14.
pub const VXLAN_OVERHEAD: u32 = 50;
/// Bytes VXLAN adds over IPv6: outer IPv6 header 40 + UDP 8 + VXLAN 8 + inner Ethernet 14.
pub const VXLAN6_OVERHEAD: u32 = 70;
/// Bytes IPIP adds: the outer IPv4 header.
pub const IPIP_OVERHEAD: u32 = 20;

/// Bytes VXLAN adds over an underlay of this family.
pub fn vxlan_overhead(underlay: UnderlayFamily) -> u32 {
    match underlay {
        UnderlayFamily::Ipv4 => VXLAN_OVERHEAD,
        UnderlayFamily::Ipv6 => VXLAN6_OVERHEAD,
    }
}

/// The wanted shape of a VXLAN device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VxlanSpec<'a> {
    /// Device name.
    pub name: &'a str,
    /// `None`: external (collect_md), the tunnel key comes from the tc program.
    pub vni: Option<u32>,
    /// UDP port.
    pub port: u16,
    /// Device MTU.
    pub mtu: u32,
    /// Set IFF_NOARP: with an L3 route into the device the kernel then uses
    /// the device's own MAC as neighbour address and never resolves.
    pub noarp: bool,
    /// The Ethernet address of a device this creates (`None`: random). A
    /// device recreated while the agent runs keeps the address the node
    /// published as `vtepMAC`, which the remote nodes send to.
    pub mac: Option<[u8; 6]>,
    /// Source address of a device with a VNI: an IPv6 one (`::` for any)
    /// makes the device send and receive over IPv6; `None` is IPv4 (an
    /// external device takes the family from each packet's tunnel key).
    pub local: Option<IpAddr>,
}

/// Creates the device, or adopts an existing one of that name with the same
/// kind, VNI mode and port (its MTU and flags are corrected). A device of that
/// name with another shape is podmesh's own (the name is reserved) and is
/// recreated. Returns the device as it is now.
pub fn ensure_vxlan(nl: &mut Netlink, spec: VxlanSpec<'_>) -> Result<Link, DatapathError> {
    let ctx = |what: &str, e: super::nl::NlError| {
        DatapathError::netlink(
            format!(
                "{what} {} (hint: podmesh needs CAP_NET_ADMIN and a kernel with VXLAN)",
                spec.name
            ),
            e,
        )
    };
    // Creating fails with EEXIST when another device already receives this
    // VNI (or, external, every VNI) on the port; bringing it up fails with
    // EADDRINUSE when the port's socket is another kind of VXLAN device's or
    // another program's. Both get named, with what to change.
    let conflict = |nl: &mut Netlink, what: &str, e: super::nl::NlError| match e.errno() {
        Some(errno @ (libc::EEXIST | libc::EADDRINUSE)) => {
            match port_conflict(nl, &spec, errno == libc::EADDRINUSE) {
                Some(why) => DatapathError::Unavailable(format!("{what} {}: {why}", spec.name)),
                None => ctx(what, e),
            }
        }
        _ => ctx(what, e),
    };
    let existing = rtnl::link_by_name(nl, spec.name).map_err(|e| ctx("listing links for", e))?;
    let matches = |l: &Link| {
        l.kind.as_deref() == Some("vxlan")
            && l.vxlan.is_some_and(|v| {
                v.port == spec.port
                    && v.local == spec.local.filter(|a| !a.is_unspecified())
                    && match spec.vni {
                        None => v.external,
                        Some(vni) => !v.external && v.vni == vni,
                    }
            })
    };
    let mut created = true;
    match existing {
        Some(l) if matches(&l) => created = false,
        Some(l) => {
            tracing::warn!(
                device = spec.name,
                "recreating {} with the configured VNI/port (it had another shape)",
                spec.name
            );
            rtnl::delete_link(nl, l.index).map_err(|e| ctx("deleting", e))?;
            rtnl::create_vxlan(
                nl, spec.name, spec.vni, spec.port, spec.mtu, spec.mac, spec.local,
            )
            .map_err(|e| conflict(nl, "creating", e))?;
        }
        None => rtnl::create_vxlan(
            nl, spec.name, spec.vni, spec.port, spec.mtu, spec.mac, spec.local,
        )
        .map_err(|e| conflict(nl, "creating", e))?,
    }
    let link = rtnl::link_by_name(nl, spec.name)
        .map_err(|e| ctx("reading back", e))?
        .ok_or_else(|| DatapathError::Other(format!("{} vanished after creation", spec.name)))?;
    let want = IFF_UP | if spec.noarp { IFF_NOARP } else { 0 };
    if (link.flags & (IFF_UP | IFF_NOARP) != want || link.mtu != spec.mtu)
        && let Err(e) = rtnl::set_link(nl, link.index, want, IFF_UP | IFF_NOARP, Some(spec.mtu))
    {
        let err = conflict(nl, "setting up", e);
        // A device made just now that cannot come up is not left behind.
        if created {
            let _ = rtnl::delete_link(nl, link.index);
        }
        return Err(err);
    }
    rtnl::link_by_name(nl, spec.name)
        .map_err(|e| ctx("reading back", e))?
        .ok_or_else(|| DatapathError::Other(format!("{} vanished after creation", spec.name)))
}

/// Whether the device `name` is still the one at `ifindex`, and up: `None`
/// when it is, else what happened to it (removed, recreated, set down).
pub fn lost(nl: &mut Netlink, name: &str, ifindex: u32) -> Result<Option<String>, DatapathError> {
    let link = rtnl::link_by_name(nl, name)
        .map_err(|e| DatapathError::netlink(format!("looking up {name}"), e))?;
    Ok(match link {
        None => Some(format!("{name} was removed")),
        Some(l) if l.index != ifindex => Some(format!("{name} was replaced by another device")),
        Some(l) if l.flags & IFF_UP == 0 => Some(format!("{name} was set down")),
        Some(_) => None,
    })
}

/// Why `spec`'s device cannot have its UDP port, naming the VXLAN devices
/// that use the port (flannel's `flannel.1` and Cilium's `cilium_vxlan`
/// default to 8472 too), or `None` when nothing explains it. `in_use`: the
/// kernel said EADDRINUSE (the port's socket is another kind of device's or
/// another program's), else EEXIST (a device of the same kind has the VNI).
fn port_conflict(nl: &mut Netlink, spec: &VxlanSpec<'_>, in_use: bool) -> Option<String> {
    // EADDRINUSE: the devices that are up hold a socket on the port. EEXIST:
    // the devices of the same kind with the same VNI (external: any).
    let holders: Vec<Link> = rtnl::links(nl)
        .ok()?
        .into_iter()
        .filter(|l| {
            l.name != spec.name
                && l.vxlan.is_some_and(|v| {
                    v.port == spec.port
                        && if in_use {
                            l.flags & IFF_UP != 0
                        } else {
                            v.external == spec.vni.is_none()
                                && (v.external || Some(v.vni) == spec.vni)
                        }
                })
        })
        .collect();
    let shape = |external: bool, vni: u32| {
        if external {
            "external".to_string()
        } else {
            format!("VNI {vni}")
        }
    };
    let named = format!(
        "the VXLAN device{} {}",
        if holders.len() > 1 { "s" } else { "" },
        holders
            .iter()
            .filter_map(|l| l
                .vxlan
                .map(|v| format!("{} ({})", l.name, shape(v.external, v.vni))))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let ours = shape(spec.vni.is_none(), spec.vni.unwrap_or(0));
    let fix = format!(
        "run every podmesh agent of the mesh with another --tunnel-port{} (all nodes of all \
         clusters must use the same)",
        if spec.vni.is_some() {
            " or another --vni"
        } else {
            ""
        }
    );
    let port = spec.port;
    match (in_use, holders.is_empty()) {
        (true, false) => Some(format!(
            "UDP port {port} is taken by {named}, and the kernel cannot share one port between \
             a device of that kind and podmesh's {ours} device; {fix}"
        )),
        (true, true) => Some(format!(
            "UDP port {port} is held by another program (`ss -ulpn 'sport = :{port}'` names \
             it); {fix}"
        )),
        (false, false) => Some(format!(
            "{named} already receive{} {} on UDP port {port}; {fix}",
            if holders.len() > 1 { "" } else { "s" },
            match spec.vni {
                Some(vni) => format!("VNI {vni}"),
                None => "every VNI".to_string(),
            }
        )),
        (false, true) => None,
    }
}

/// The MTU of the underlay: the configured value, else the MTU of the device
/// that holds `node_ip`, else (no node address yet: the Node comes from
/// Kubernetes after the datapath is up) the MTU of the device the default
/// route leaves by, else 1500.
pub fn underlay_mtu(
    nl: &mut Netlink,
    configured: Option<u32>,
    node_ip: Option<IpAddr>,
) -> Result<u32, DatapathError> {
    if let Some(m) = configured {
        return Ok(m);
    }
    let index = match node_ip {
        Some(ip) => rtnl::link_with_address(nl, ip)
            .map_err(|e| DatapathError::netlink(format!("finding the device of {ip}"), e))?,
        // A FIB lookup only (nothing is sent): a documentation address
        // (RFC 5737) is routed by the default route. No default route: 1500.
        None => rtnl::route_get(nl, IpAddr::from([192, 0, 2, 1]))
            .ok()
            .map(|(oif, _)| oif)
            .filter(|&oif| oif != 0),
    };
    let Some(index) = index else { return Ok(1500) };
    Ok(rtnl::links(nl)
        .map_err(netlink_err("reading the underlay device's MTU"))?
        .into_iter()
        .find(|l| l.index == index)
        .map_or(1500, |l| l.mtu))
}

/// The 6-byte MAC of a link.
pub fn mac_of(link: &Link) -> Result<[u8; 6], DatapathError> {
    link.mac
        .as_slice()
        .try_into()
        .map_err(|_| DatapathError::Other(format!("{} has no Ethernet address", link.name)))
}
