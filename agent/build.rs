//! Builds the kernel programs (`ebpf/podmesh-ebpf`) for `bpfel-unknown-none`
//! and leaves the object in `OUT_DIR` for `include_bytes_aligned!`.
//!
//! The nested build uses Debian's rustc (`/usr/bin/rustc`, which ships a
//! prebuilt `core` for the BPF target) and `bpf-linker`; every variable of
//! the host build that would leak into it is removed. `cargo xtask setup`
//! installs both.
//!
//! `AYA_BUILD_SKIP=1` (aya-build's switch) skips the nested build and embeds
//! an empty object, so that lint-only builds (`cargo clippy`, `cargo doc`)
//! need neither Debian's rustc nor bpf-linker. Such an agent compiles but
//! cannot load its programs: the ebpf datapath fails at start.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

const BPF_LINKER_VERSION: &str = "0.13.0";

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir.parent().context("agent has a parent dir")?;
    let ebpf_dir = root.join("ebpf/podmesh-ebpf");
    let common_dir = root.join("ebpf/podmesh-common");
    for p in [
        ebpf_dir.join("src"),
        ebpf_dir.join("Cargo.toml"),
        ebpf_dir.join("Cargo.lock"),
        common_dir.join("src"),
        common_dir.join("Cargo.toml"),
    ] {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    println!("cargo:rerun-if-env-changed=PODMESH_BPF_LINKER");
    println!("cargo:rerun-if-env-changed=PODMESH_BPF_RUSTC");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    if skip_requested() {
        println!(
            "cargo:warning=AYA_BUILD_SKIP is set: the eBPF programs are not built and the agent \
             embeds an empty object (for lint-only builds; the ebpf datapath cannot start)"
        );
        std::fs::write(out_dir.join("podmesh-ebpf.o"), [])
            .context("writing the empty eBPF object")?;
        return Ok(());
    }
    let rustc = env::var("PODMESH_BPF_RUSTC").unwrap_or_else(|_| "/usr/bin/rustc".into());
    let cargo = Path::new(&rustc).with_file_name("cargo");
    if !Path::new(&rustc).exists() || !cargo.exists() {
        bail!(
            "{rustc} (Debian rustc-web) is needed to build podmesh's eBPF programs; \
             run `cargo xtask setup`"
        );
    }
    let linker = find_bpf_linker(root).with_context(|| {
        format!("bpf-linker {BPF_LINKER_VERSION} not found; run `cargo xtask setup`")
    })?;
    let linker_dir = linker.parent().context("bpf-linker has a parent dir")?;
    let path = env::join_paths(
        std::iter::once(linker_dir.to_path_buf())
            .chain(env::split_paths(&env::var_os("PATH").unwrap_or_default())),
    )?;

    let target_dir = out_dir.join("ebpf-target");
    let mut cmd = Command::new(&cargo);
    // Drop every variable of the host build: the nested build is a different
    // toolchain, target and workspace.
    for (k, _) in env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("CARGO")
            || k.starts_with("RUST")
            || k == "OUT_DIR"
            || k == "TARGET"
            || k == "HOST"
            || k == "PROFILE"
            || k == "OPT_LEVEL"
            || k == "DEBUG"
            || k == "NUM_JOBS"
        {
            cmd.env_remove(k.as_ref());
        }
    }
    cmd.current_dir(&ebpf_dir)
        .env("PATH", path)
        .env("RUSTC", &rustc)
        // aya-ebpf uses unstable features on the BPF target; allow them for
        // that crate only.
        .env("RUSTC_BOOTSTRAP", "aya_ebpf")
        .env("CARGO_TARGET_DIR", &target_dir)
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "bpfel-unknown-none",
        ]);
    let status = cmd
        .status()
        .context("running the nested eBPF cargo build")?;
    if !status.success() {
        bail!("building ebpf/podmesh-ebpf failed ({status}); see the output above");
    }
    let obj = target_dir.join("bpfel-unknown-none/release/podmesh-ebpf");
    std::fs::copy(&obj, out_dir.join("podmesh-ebpf.o"))
        .with_context(|| format!("copying {}", obj.display()))?;
    Ok(())
}

/// Whether `AYA_BUILD_SKIP` asks to skip the eBPF build: set to anything
/// but empty, `0` or `false`.
fn skip_requested() -> bool {
    env::var("AYA_BUILD_SKIP")
        .is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

/// `$PODMESH_BPF_LINKER`, then the project's `.tools/`, then the user cache
/// that `cargo xtask setup` fills, then `$PATH`.
fn find_bpf_linker(root: &Path) -> Option<PathBuf> {
    if let Some(p) = env::var_os("PODMESH_BPF_LINKER") {
        return Some(PathBuf::from(p));
    }
    let mut candidates = vec![root.join(format!(
        ".tools/bpf-linker-{BPF_LINKER_VERSION}/bin/bpf-linker"
    ))];
    if let Some(home) = env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(format!(
            ".cache/podmesh/bpf-linker-{BPF_LINKER_VERSION}/bin/bpf-linker"
        )));
    }
    candidates.extend(
        env::split_paths(&env::var_os("PATH").unwrap_or_default()).map(|d| d.join("bpf-linker")),
    );
    candidates.into_iter().find(|p| p.is_file())
}
