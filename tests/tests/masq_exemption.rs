//! The masquerade exemption's table and sets in a scratch namespace: what
//! nft shows is what podmesh wrote, through adds, partial and bulk deletes,
//! a table removed by hand, and IPv6.
use std::{collections::BTreeSet, path::PathBuf};

use ipnet::{IpNet, Ipv4Net};
use podmesh_agent::datapath::masq::MasqExemption;
use podmesh_tests::{netns::NetNs, require_root};

fn prefixes(n: u32) -> Vec<IpNet> {
    (0..n)
        .map(|i| IpNet::V4(Ipv4Net::new((0x0a00_0000 + i * 64).into(), 26).expect("valid")))
        .collect()
}

#[test]
fn the_sets_hold_exactly_what_podmesh_wrote() -> anyhow::Result<()> {
    if !require_root("the_sets_hold_exactly_what_podmesh_wrote") {
        return Ok(());
    }
    let ns = NetNs::new("masq")?;
    let path = PathBuf::from(format!("/run/netns/{}", ns.name()));
    let mut x = MasqExemption::new(Some(&path));
    assert_eq!(x.ensure()?, None, "the first set-up is no repair");
    let all = prefixes(3000);
    x.add(all.iter().copied())?;
    let listed = ns.nft_set("podmesh", "remote-pods-v4")?;
    assert_eq!(listed.len(), 3000, "nft lists {} elements", listed.len());
    assert!(listed.contains("10.0.0.64/26") && listed.contains(&all[2999].to_string()));

    // A bulk delete (a flush and the ten that stay) and a partial one.
    x.remove(&all[10..])?;
    let keep: BTreeSet<IpNet> = all[..10].iter().copied().collect();
    assert_eq!(x.sync(&keep)?, (0, 0), "read back after a bulk delete");
    let want: BTreeSet<String> = keep.iter().map(ToString::to_string).collect();
    assert_eq!(ns.nft_set("podmesh", "remote-pods-v4")?, want);
    x.remove(&all[..2])?;
    let keep: BTreeSet<IpNet> = all[2..10].iter().copied().collect();
    assert_eq!(x.sync(&keep)?, (0, 0), "read back after a partial delete");

    // IPv6 goes to its own set.
    let v6: IpNet = "fd00:2::/64".parse()?;
    x.add([v6])?;
    assert_eq!(
        ns.nft_set("podmesh", "remote-pods-v6")?,
        BTreeSet::from(["fd00:2::/64".to_string()])
    );

    // Someone adds an element and removes another: sync puts it right.
    ns.run(
        "nft",
        &[
            "add",
            "element",
            "inet",
            "podmesh",
            "remote-pods-v4",
            "{ 192.168.7.0/24 }",
        ],
    )?;
    ns.run(
        "nft",
        &[
            "delete",
            "element",
            "inet",
            "podmesh",
            "remote-pods-v4",
            &format!("{{ {} }}", all[5]),
        ],
    )?;
    let mut keep = keep;
    keep.insert(v6);
    assert_eq!(x.sync(&keep)?, (1, 1));
    assert_eq!(x.sync(&keep)?, (0, 0));

    // Removed by hand: ensure says so and sets the table up again, empty.
    ns.run("nft", &["delete", "table", "inet", "podmesh"])?;
    let repaired = x.ensure()?.expect("a repair");
    assert!(repaired.contains("missing"), "{repaired}");
    assert_eq!(x.sync(&keep)?, (keep.len(), 0));
    assert_eq!(x.handle().lock().expect("lock").repairs, 1);

    // A changed chain is a defect too.
    ns.run("nft", &["flush", "chain", "inet", "podmesh", "postrouting"])?;
    assert!(x.ensure()?.expect("a repair").contains("rules"));
    assert!(x.remove_table()?);
    assert!(
        ns.run("nft", &["list", "table", "inet", "podmesh"])
            .is_err()
    );
    Ok(())
}
