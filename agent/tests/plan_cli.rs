//! Golden tests of `podmesh plan check|suggest`: the real binary, its output and exit codes.
//!
//! Set `UPDATE_GOLDEN=1` to rewrite the expected files after an intended change.
use std::{path::Path, process::Command};

use podmesh_agent::validate::code;

const DIR: &str = "tests/testdata/plan";

/// Findings about a cluster's identity (its name or ID) involve no CIDR;
/// every other finding of `plan check` is about CIDRs and lists them.
const IDENTITY_CODES: &[&str] = &[
    code::CLUSTER_NAME_INVALID,
    code::CLUSTER_NAME_DUPLICATE,
    code::CLUSTER_ID_INVALID,
    code::CLUSTER_ID_DUPLICATE,
];

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn podmesh(args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_podmesh"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("NO_COLOR")
        .output()
        .expect("run podmesh");
    Run {
        code: out.status.code().expect("exited"),
        stdout: String::from_utf8(out.stdout).expect("utf-8 stdout"),
        stderr: String::from_utf8(out.stderr).expect("utf-8 stderr"),
    }
}

fn golden(name: &str, got: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DIR).join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with UPDATE_GOLDEN=1 to create it)",
            path.display()
        )
    });
    assert_eq!(got, want, "output differs from {}", path.display());
}

/// Runs `plan check` on `plan`.yaml in both formats against the golden files
/// and returns the JSON report.
fn check_golden(plan: &str, want_code: i32) -> serde_json::Value {
    let file = format!("{DIR}/{plan}.yaml");
    let table = podmesh(&["plan", "check", &file]);
    assert_eq!(
        table.code, want_code,
        "exit code of {plan}: {}",
        table.stderr
    );
    assert!(!table.stdout.contains('\x1b'), "no colour when piped");
    golden(&format!("{plan}.table"), &table.stdout);
    let json = podmesh(&["plan", "check", &file, "-o", "json"]);
    assert_eq!(json.code, want_code);
    let v: serde_json::Value = serde_json::from_str(&json.stdout).expect("one JSON object");
    for f in v["findings"].as_array().expect("findings list") {
        assert!(["error", "warning", "info"].contains(&f["severity"].as_str().unwrap()));
        assert!(!f["code"].as_str().unwrap().is_empty());
        assert!(!f["clusters"].as_array().unwrap().is_empty(), "{f}");
        assert!(!f["message"].as_str().unwrap().is_empty());
        if !IDENTITY_CODES.contains(&f["code"].as_str().unwrap()) {
            assert!(
                !f["cidrs"].as_array().unwrap().is_empty(),
                "{plan}: a finding about CIDRs lists none: {f}"
            );
        }
    }
    golden(&format!("{plan}.json"), &json.stdout);
    v
}

#[test]
fn clean_dual_stack_plan_exits_0() {
    check_golden("clean", 0);
}

#[test]
fn warnings_alone_exit_0() {
    check_golden("warnings", 0);
}

#[test]
fn overlaps_exit_1() {
    check_golden("overlaps", 1);
}

#[test]
fn identities_and_unusable_cidrs_exit_1() {
    check_golden("identity", 1);
}

#[test]
fn capacity_exit_1() {
    let v = check_golden("capacity", 1);
    // Every capacity rule is exercised, so the CIDR check above covers them.
    let codes: Vec<&str> = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["code"].as_str().unwrap())
        .collect();
    for c in [
        code::CAPACITY_INSUFFICIENT,
        code::CAPACITY_HEADROOM_LOW,
        code::NODE_MASK_SIZE_INVALID,
        code::NODE_MASK_SIZE_UNUSED,
        code::CAPACITY_NOT_CHECKED,
    ] {
        assert!(codes.contains(&c), "capacity.yaml yields no {c}: {codes:?}");
    }
}

fn unreadable(plan: &str, line: usize, needle: &str) {
    let file = format!("{DIR}/{plan}.yaml");
    for out in ["table", "json"] {
        let r = podmesh(&["plan", "check", &file, "-o", out]);
        assert_eq!(r.code, 2, "{plan}: {}", r.stderr);
        assert!(r.stdout.is_empty());
        assert!(
            r.stderr.starts_with(&format!("podmesh: {file}:{line}:")),
            "file and line first: {}",
            r.stderr
        );
        assert!(r.stderr.contains(needle), "{needle:?} in {}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "one line: {}", r.stderr);
    }
}

#[test]
fn not_a_cidr_exits_2_naming_field_and_line() {
    unreadable("bad-cidr", 4, "clusters[0].podCIDRs[1]");
}

#[test]
fn unknown_field_exits_2_naming_it() {
    unreadable("unknown-field", 4, "podCidrs");
}

/// The location is the unclosed bracket's (line 4), where serde-saphyr
/// points; serde_yaml pointed at the end of the input (line 5).
#[test]
fn bad_yaml_exits_2() {
    unreadable("bad-yaml", 4, "unclosed");
}

#[test]
fn missing_file_exits_2() {
    let r = podmesh(&["plan", "check", "tests/testdata/plan/no-such.yaml"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("no-such.yaml"), "{}", r.stderr);
}

#[test]
fn suggest_prints_free_blocks() {
    let file = format!("{DIR}/overlaps.yaml");
    let r = podmesh(&[
        "plan",
        "suggest",
        &file,
        "--prefix-len",
        "16",
        "--count",
        "3",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout, "10.0.0.0/16\n10.2.0.0/16\n10.3.0.0/16\n");
    let r = podmesh(&[
        "plan",
        "suggest",
        &file,
        "--prefix-len",
        "48",
        "--family",
        "6",
        "-o",
        "json",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["suggestions"], serde_json::json!(["fd00::/48"]));
    let r = podmesh(&[
        "plan",
        "suggest",
        &file,
        "--prefix-len",
        "16",
        "--within",
        "fd00:1::/48",
    ]);
    assert_eq!(r.code, 64, "a /16 does not fit in a /48");
    let r = podmesh(&[
        "plan",
        "suggest",
        &file,
        "--prefix-len",
        "18",
        "--within",
        "10.1.0.0/16",
        "--count",
        "2",
    ]);
    assert_eq!(r.code, 1, "10.1.0.0/16 is taken: {}", r.stdout);
    assert!(r.stderr.contains("only 0 free /18"), "{}", r.stderr);
}

/// A `--within` range with host bits set is refused (exit 64, one line naming
/// the value and its canonical form), not silently truncated to a range the
/// user did not write.
#[test]
fn suggest_refuses_within_with_host_bits() {
    let file = format!("{DIR}/overlaps.yaml");
    for (within, canonical, prefix) in [
        ("10.1.2.3/16", "10.1.0.0/16", "24"),
        ("172.16.0.1/12", "172.16.0.0/12", "16"),
        ("fd00:1::5/48", "fd00:1::/48", "64"),
    ] {
        for out in ["table", "json"] {
            let r = podmesh(&[
                "plan",
                "suggest",
                &file,
                "--prefix-len",
                prefix,
                "--within",
                within,
                "-o",
                out,
            ]);
            assert_eq!(r.code, 64, "--within {within}: {}{}", r.stdout, r.stderr);
            assert!(r.stdout.is_empty(), "nothing suggested: {}", r.stdout);
            assert_eq!(r.stderr.lines().count(), 1, "one line: {}", r.stderr);
            assert!(
                r.stderr.starts_with("podmesh: --within ")
                    && r.stderr.contains(within)
                    && r.stderr.contains("host bits")
                    && r.stderr.contains(&format!("write {canonical}")),
                "{}",
                r.stderr
            );
        }
    }
    // The canonical form of the same range is accepted.
    let r = podmesh(&[
        "plan",
        "suggest",
        &file,
        "--prefix-len",
        "24",
        "--within",
        "172.16.0.0/12",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout, "172.16.0.0/24\n");
}

/// On a terminal (a pty from util-linux `script`) the table has ANSI colour;
/// with `NO_COLOR` set, or piped (every other test here), it has none.
#[test]
fn table_is_coloured_on_a_terminal_unless_no_color() {
    let tty = |no_color: bool| -> String {
        let cmd = format!(
            "{} plan check {DIR}/overlaps.yaml",
            env!("CARGO_BIN_EXE_podmesh")
        );
        let mut c = Command::new("script");
        c.args(["-qec", &cmd, "/dev/null"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env_remove("NO_COLOR");
        if no_color {
            c.env("NO_COLOR", "1");
        }
        let out = c
            .output()
            .expect("run `script` (util-linux) to give podmesh a terminal");
        assert_eq!(out.status.code(), Some(1), "overlaps.yaml has errors");
        String::from_utf8(out.stdout).expect("utf-8")
    };
    let coloured = tty(false);
    assert!(
        coloured.contains("\x1b["),
        "no colour on a terminal:\n{coloured}"
    );
    assert!(coloured.contains("overlap"), "not the table:\n{coloured}");
    let plain = tty(true);
    assert!(
        !plain.contains("\x1b["),
        "colour despite NO_COLOR:\n{plain}"
    );
    assert!(plain.contains("overlap"), "not the table:\n{plain}");
    assert!(
        !podmesh(&["plan", "check", &format!("{DIR}/overlaps.yaml")])
            .stdout
            .contains("\x1b[")
    );
}
