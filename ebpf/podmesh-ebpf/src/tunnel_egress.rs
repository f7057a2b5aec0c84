//! tc egress program of `podmesh0` (VXLAN, external/collect_md mode).
//!
//! For each IPv4 or IPv6 packet routed into the tunnel device it looks the
//! inner destination up in the remote-CIDR LPM map of its family, sets the tunnel key (remote
//! node address, IPv4 or IPv6, + VNI) that the VXLAN driver reads in collect_md mode
//! (drivers/net/vxlan/vxlan_core.c, `vxlan_xmit`: `skb_tunnel_info`), and
//! rewrites the inner destination MAC to the remote tunnel device's MAC,
//! because the receiving stack drops frames that are not addressed to it
//! (net/core/dev.c, `eth_type_trans` -> PACKET_OTHERHOST).
use aya_ebpf::{
    bindings::{BPF_F_TUNINFO_IPV6, TC_ACT_OK, TC_ACT_SHOT, bpf_tunnel_key},
    helpers::bpf_skb_set_tunnel_key,
    macros::classifier,
    maps::lpm_trie::Key,
    programs::TcContext,
};
use podmesh_common::{REMOTE_IPV6, counter};

use crate::maps::{PODMESH_REMOTES_V4, PODMESH_REMOTES_V6, count};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
/// Offset of the destination address in an IPv4 header.
const IPV4_DADDR: usize = 16;
/// Offset of the destination address in an IPv6 header.
const IPV6_DADDR: usize = 24;

#[classifier]
pub fn podmesh_tunnel_egress(ctx: TcContext) -> i32 {
    match try_tunnel_egress(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_tunnel_egress(ctx: &TcContext) -> Result<i32, i32> {
    let ethertype = u16::from_be(ctx.load::<u16>(12).map_err(|_| TC_ACT_OK)?);
    let found = match ethertype {
        ETH_P_IP => {
            let daddr: [u8; 4] = ctx.load(ETH_HLEN + IPV4_DADDR).map_err(|_| TC_ACT_OK)?;
            PODMESH_REMOTES_V4.get(&Key::new(32, daddr))
        }
        ETH_P_IPV6 => {
            let daddr: [u8; 16] = ctx.load(ETH_HLEN + IPV6_DADDR).map_err(|_| TC_ACT_OK)?;
            if daddr[0] == 0xff {
                // The device's own multicast (router solicitations, MLD):
                // not pod traffic, passed on like before IPv6 support (the
                // driver drops it: no tunnel key). Not a miss.
                count(counter::NOT_IPV4);
                return Ok(TC_ACT_OK);
            }
            PODMESH_REMOTES_V6.get(&Key::new(128, daddr))
        }
        _ => {
            count(counter::NOT_IPV4);
            return Ok(TC_ACT_OK);
        }
    };
    let Some(remote) = found else {
        count(counter::MISS);
        return Err(TC_ACT_SHOT);
    };

    // SAFETY: bpf_tunnel_key is plain data; all-zero is a valid value.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    key.tunnel_id = remote.vni;
    let flags = if remote.flags & REMOTE_IPV6 != 0 {
        // The kernel copies remote_ipv6 as bytes in network order
        // (net/core/filter.c, `bpf_skb_set_tunnel_key`: memcpy into
        // `info->key.u.ipv6.dst`), unlike remote_ipv4, which it byte-swaps.
        let a = remote.addr_v6;
        key.__bindgen_anon_1.remote_ipv6 = [
            u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
            u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
            u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
            u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
        ];
        u64::from(BPF_F_TUNINFO_IPV6)
    } else {
        key.__bindgen_anon_1.remote_ipv4 = remote.addr_v4;
        0
    };
    key.tunnel_ttl = 64;
    // SAFETY: the helper reads `size` bytes of `key`, which lives on our stack.
    let ret = unsafe {
        bpf_skb_set_tunnel_key(
            ctx.skb.skb,
            &mut key,
            core::mem::size_of::<bpf_tunnel_key>() as u32,
            flags,
        )
    };
    if ret != 0 {
        count(counter::TUNNEL_KEY_FAILED);
        return Err(TC_ACT_SHOT);
    }
    ctx.store(0, &remote.vtep_mac, 0).map_err(|_| TC_ACT_SHOT)?;
    count(counter::FORWARDED);
    Ok(TC_ACT_OK)
}
