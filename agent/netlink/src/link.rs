//! Link requests by name: create one of a kind, delete one.
use crate::consts::{NLM_F_CREATE, NLM_F_EXCL, RTM_DELLINK, RTM_NEWLINK};
use crate::{Attrs, Msg};

const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;

/// `ifinfomsg` (family, type, index, flags, change), all zero: the link is
/// named by its `IFLA_IFNAME`.
const IFINFOMSG: [u8; 16] = [0; 16];

/// Creates the link `name` of `kind` (`wireguard`, …); the kernel refuses
/// it with EEXIST when the name is taken, and with EOPNOTSUPP when it has
/// no such kind.
pub fn create(name: &str, kind: &str) -> Msg {
    let mut info = Attrs::default();
    info.put(IFLA_INFO_KIND, kind.as_bytes());
    let mut a = Attrs::with_header(&IFINFOMSG);
    a.put(IFLA_IFNAME, &nul(name)).nested(IFLA_LINKINFO, &info);
    Msg {
        ty: RTM_NEWLINK,
        flags: NLM_F_CREATE | NLM_F_EXCL,
        body: a.build(),
    }
}

/// Deletes the link `name` (ENODEV when there is none).
pub fn delete(name: &str) -> Msg {
    let mut a = Attrs::with_header(&IFINFOMSG);
    a.put(IFLA_IFNAME, &nul(name));
    Msg {
        ty: RTM_DELLINK,
        flags: 0,
        body: a.build(),
    }
}

fn nul(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attrs;

    #[test]
    fn create_names_the_link_and_nests_its_kind() {
        let m = create("podmesh-wg", "wireguard");
        assert_eq!((m.ty, m.flags), (RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL));
        let got: Vec<(u16, Vec<u8>)> = attrs(&m.body[16..]).map(|(t, v)| (t, v.to_vec())).collect();
        assert_eq!(got[0], (IFLA_IFNAME, b"podmesh-wg\0".to_vec()));
        assert_eq!(got[1].0, IFLA_LINKINFO);
        let kind: Vec<(u16, Vec<u8>)> = attrs(&got[1].1).map(|(t, v)| (t, v.to_vec())).collect();
        assert_eq!(kind, vec![(IFLA_INFO_KIND, b"wireguard".to_vec())]);
        let d = delete("podmesh-wg");
        assert_eq!(d.ty, RTM_DELLINK);
        assert_eq!(attrs(&d.body[16..]).count(), 1);
    }
}
