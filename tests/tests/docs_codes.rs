//! The documentation keeps up with the code: every finding and rejection code the agent and
//! `podmesh plan check` can report is explained in docs/troubleshooting.md.
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

/// The values of `pub const NAME: &str = "value";` lines in `file`.
fn string_consts(file: &Path) -> Vec<String> {
    let src = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    src.lines()
        .filter_map(|l| {
            let l = l.trim();
            let rest = l.strip_prefix("pub const ")?;
            let (_, value) = rest.split_once(": &str = \"")?;
            value.strip_suffix("\";").map(str::to_string)
        })
        .collect()
}

#[test]
fn every_code_is_explained_in_troubleshooting() {
    let docs = std::fs::read_to_string(root().join("docs/troubleshooting.md")).expect("docs");
    let mut codes = Vec::new();
    for f in ["agent/src/validate/mod.rs", "agent/src/desired/decode.rs"] {
        let found = string_consts(&root().join(f));
        assert!(
            found.len() >= 9,
            "{f}: the code constants moved? found {found:?}"
        );
        codes.extend(found);
    }
    // The runtime codes come from `podmesh_agent`; the source scan must see them all.
    for c in [
        podmesh_agent::desired::code::CLUSTER_REJECTED,
        podmesh_agent::validate::code::POD_CIDR_OVERLAP,
    ] {
        assert!(codes.iter().any(|x| x == c), "{c} not found by the scan");
    }
    let missing: Vec<&String> = codes
        .iter()
        .filter(|c| !docs.contains(&format!("`{c}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/troubleshooting.md does not explain {missing:?}"
    );
}
