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
    // The check names of `podmesh diagnose` and the codes only live records have.
    for f in ["agent/src/diagnose/check.rs", "agent/src/plan/live.rs"] {
        let found = string_consts(&root().join(f));
        assert!(!found.is_empty(), "{f}: the constants moved?");
        codes.extend(found);
    }
    // The runtime codes come from `podmesh_agent`; the source scan must see them all.
    for c in [
        podmesh_agent::desired::code::CLUSTER_REJECTED,
        podmesh_agent::validate::code::POD_CIDR_OVERLAP,
        podmesh_agent::diagnose::check::WRITE_REFUSED,
        podmesh_agent::plan::live::code::POD_CIDR_HIJACK,
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

/// Relative links of `text` (Markdown): the targets of `](target)` outside
/// code blocks and code spans that are not URLs or in-page anchors, without
/// their `#anchor`.
fn relative_links(text: &str) -> Vec<String> {
    let mut prose = String::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            // Even pieces between backticks are outside code spans.
            prose.extend(line.split('`').step_by(2));
            prose.push('\n');
        }
    }
    prose
        .split("](")
        .skip(1)
        .filter_map(|rest| rest.split_once(')').map(|(t, _)| t))
        .filter(|t| !t.contains("://") && !t.starts_with('#') && !t.starts_with("mailto:"))
        .map(|t| t.split('#').next().unwrap_or(t).to_string())
        .collect()
}

/// A reader of the repository finds what README.md and docs/ point to: every
/// relative link resolves to a file of the repository, and the README points
/// to the design contracts in docs/design.md rather than to notes outside it.
#[test]
fn readme_and_docs_link_to_files_that_exist() {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    assert!(
        relative_links(&readme)
            .iter()
            .any(|l| l == "docs/design.md"),
        "README.md does not link docs/design.md"
    );
    let mut files = vec![(root(), readme)];
    for e in std::fs::read_dir(root().join("docs")).expect("docs/") {
        let path = e.unwrap().path();
        if path.extension().is_some_and(|x| x == "md") {
            let text = std::fs::read_to_string(&path).unwrap();
            files.push((root().join("docs"), text));
        }
    }
    assert!(files.len() >= 5, "README.md and docs/*.md: {}", files.len());
    for (dir, text) in &files {
        for link in relative_links(text) {
            assert!(
                dir.join(&link).exists(),
                "{}: link to {link}, which does not exist",
                dir.display()
            );
        }
    }
}
