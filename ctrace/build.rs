//! Builds the kernel programs (ctrace-ebpf) for bpfel-unknown-none with the
//! nightly toolchain and bpf-linker, so `cargo build` gives one binary with
//! the object embedded. `cargo xtask setup` installs what this needs.
use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new().no_deps().exec().context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == "ctrace-ebpf")
        .ok_or_else(|| anyhow!("ctrace-ebpf package not found"))?;
    let root_dir = ebpf.manifest_path.parent().ok_or_else(|| anyhow!("ctrace-ebpf has no folder"))?;
    aya_build::build_ebpf(
        [Package { name: "ctrace-ebpf", root_dir: root_dir.as_str(), ..Default::default() }],
        Toolchain::default(),
    )
}
