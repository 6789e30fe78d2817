//! What runs ctrace on many nodes: the container image, and the offline
//! checks of deploy/ (Prometheus rules, Kubernetes manifests).
use std::{path::PathBuf, process::Command};

use anyhow::Context as _;

use crate::{cargo, root, run};

/// The target of the image's binary: glibc, linked statically.
const STATIC_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Builds the statically linked release binary the image holds (the fleet
/// suite builds its image from it) and returns its path.
pub fn static_binary() -> anyhow::Result<PathBuf> {
    // --target keeps RUSTFLAGS off build scripts and proc macros, which
    // cannot be static; only ctrace itself is.
    run(cargo()
        .args(["build", "--release", "--bin", "ctrace", "--target", STATIC_TARGET])
        .env("RUSTFLAGS", "-C target-feature=+crt-static"))?;
    Ok(root().join("target").join(STATIC_TARGET).join("release/ctrace"))
}

/// `cargo xtask image`: the binary, then `podman build` of
/// deploy/container/Containerfile in a context holding only the two.
pub fn image(tag: &str) -> anyhow::Result<()> {
    let binary = static_binary()?;
    let context = root().join("target/image-context");
    let _ = std::fs::remove_dir_all(&context);
    std::fs::create_dir_all(&context)?;
    std::fs::copy(&binary, context.join("ctrace")).context("copy the binary into the build context")?;
    std::fs::copy(root().join("deploy/container/Containerfile"), context.join("Containerfile"))?;
    run(Command::new("podman").args(["build", "-t", tag, "-f"]).arg(context.join("Containerfile")).arg(&context))?;
    eprintln!("xtask: built {tag}; push it to your registry and set it in deploy/kubernetes/daemonset.yaml");
    Ok(())
}

/// Kubernetes manifests checked against the API's schemas, offline.
const MANIFESTS: &[&str] = &["deploy/kubernetes/namespace.yaml", "deploy/kubernetes/daemonset.yaml"];

/// Checks of deploy/ that need no privileges: the rules (promtool) and the
/// manifests (kubernetes-validate, strict: unknown fields fail).
pub fn check_deploy() -> anyhow::Result<()> {
    run(Command::new("promtool").args(["check", "rules", "deploy/prometheus/ctrace-rules.yml"]))?;
    run(Command::new("promtool").args(["test", "rules", "deploy/prometheus/ctrace-rules.test.yml"]))?;
    run(Command::new("python3").args(["-m", "kubernetes_validate", "--strict"]).args(MANIFESTS))?;
    // The PodMonitor is the Prometheus operator's resource, whose schema
    // kubernetes-validate does not have: it is parsed, not validated.
    eprintln!("xtask: NOT VALIDATED: deploy/kubernetes/podmonitor.yaml (no schema for the operator's CRDs offline)");
    Ok(())
}
