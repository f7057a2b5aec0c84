//! Setup for the manifest tests: kubernetes-validate (PyPI) and a kustomize.
//!
//! `tests/tests/deploy_render.rs` renders `deploy/` with `kubectl kustomize`
//! and validates the result offline, strictly, against the Kubernetes schemas
//! that kubernetes-validate ships. The validator lives in its own virtualenv
//! under `~/.cache/podmesh` (never in the system Python) and is linked into
//! `.tools/bin/`, where the test looks first.
use std::{path::PathBuf, process::Command};

use anyhow::{Context, bail};

use crate::util::{answers_version, output, root, sh};

/// The kubernetes-validate release whose bundled schemas the tests use.
pub const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

pub fn run(check: bool) -> anyhow::Result<()> {
    let validator = ensure_kubernetes_validate(check)?;
    eprintln!("setup: kubernetes-validate at {}", validator.display());
    match kustomize_version() {
        Some(v) => eprintln!("setup: kubectl kustomize {v}"),
        // kubectl comes with the machine image; Debian's kubernetes-client
        // (1.20) embeds kustomize v2, which cannot render `deploy/`.
        None => eprintln!(
            "setup: WARNING: no `kubectl` with kustomize v4 or newer on PATH; \
             the deploy_render tests will fail until one is installed"
        ),
    }
    Ok(())
}

/// `.tools/bin/kubernetes-validate`, a link into a virtualenv kept in
/// `~/.cache/podmesh` across work trees.
fn ensure_kubernetes_validate(check: bool) -> anyhow::Result<PathBuf> {
    let local = root().join(".tools/bin/kubernetes-validate");
    if answers_version(&local) {
        return Ok(local);
    }
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let venv = PathBuf::from(home).join(format!(
        ".cache/podmesh/kubernetes-validate-{KUBERNETES_VALIDATE_VERSION}"
    ));
    let cached = venv.join("bin/kubernetes-validate");
    if !answers_version(&cached) {
        if check {
            bail!(
                "kubernetes-validate {KUBERNETES_VALIDATE_VERSION} is not installed; \
                 run `cargo xtask setup`"
            );
        }
        eprintln!("setup: installing kubernetes-validate {KUBERNETES_VALIDATE_VERSION} (PyPI)");
        sh(Command::new("python3").arg("-m").arg("venv").arg(&venv))
            .context("python3 -m venv failed (Debian: apt-get install python3-venv)")?;
        sh(Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(format!(
                "kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"
            )))
        .context("pip install kubernetes-validate failed; is PyPI reachable?")?;
    }
    std::fs::create_dir_all(local.parent().expect("has parent"))?;
    let _ = std::fs::remove_file(&local);
    std::os::unix::fs::symlink(&cached, &local)
        .with_context(|| format!("linking {} to {}", local.display(), cached.display()))?;
    Ok(local)
}

/// `v5.5.0` from `kubectl version --client`, when it is v4 or newer.
fn kustomize_version() -> Option<String> {
    let out = output(Command::new("kubectl").args(["version", "--client"])).ok()?;
    let v = out
        .lines()
        .find_map(|l| l.strip_prefix("Kustomize Version: "))?
        .trim()
        .to_string();
    let major: u32 = v.trim_start_matches('v').split('.').next()?.parse().ok()?;
    (major >= 4).then_some(v)
}
