//! `cargo xtask setup`: what a fresh machine needs to build and test ctrace.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};

use crate::run;

/// Debian packages: the tests' tools (namespaces, rules, sysctls) and
/// bpftool for looking at loaded programs by hand.
const PACKAGES: &[&str] = &[
    "iproute2",
    "nftables",
    "iptables",
    "procps",
    "bpftool",
    "tmux",
    "bpftrace",
    // The bench's sampled hook time (perf record).
    "linux-perf",
    "prometheus",
    // The fleet and workloads suites: podman (runc: crun refuses the
    // hybrid cgroup layout here; netavark for its networks), TLS
    // certificates, requests.
    "podman",
    "runc",
    "netavark",
    "openssl",
    "curl",
    "file",
    "kmod",
    "xz-utils",
    "busybox-static",
    "qemu-system-x86",
    // The built-in guest kernel (fentry tier) is built from Debian's source.
    "linux-source-6.12",
    "dwarves",
    "flex",
    "bison",
    "bc",
    "libelf-dev",
    "libssl-dev",
    "make",
    "gcc",
];

/// The bpf-linker release the build is known to work with.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// PyPI packages: the Kubernetes API schemas, for checking the manifests
/// offline (no cluster runs here).
const PYTHON_PACKAGES: &[&str] = &["kubernetes-validate==1.37.0"];

pub fn setup() -> anyhow::Result<()> {
    apt_packages()?;
    python_packages()?;
    nightly_rust_src()?;
    bpf_linker()?;
    eprintln!("xtask: setup complete");
    Ok(())
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn apt_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "missing Debian packages {}: install them as root (apt-get install {})",
            missing.join(", "),
            missing.join(" ")
        );
    }
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn python_packages() -> anyhow::Result<()> {
    let have = Command::new("python3").args(["-m", "pip", "freeze"]).output().context("python3 with pip is needed")?;
    let have = String::from_utf8_lossy(&have.stdout).to_lowercase();
    let missing: Vec<&str> = PYTHON_PACKAGES.iter().copied().filter(|p| !have.contains(&p.to_lowercase())).collect();
    if missing.is_empty() {
        return Ok(());
    }
    run(Command::new("python3").args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"]).args(&missing))
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("cannot run {}", crate::describe(cmd)))?;
    if !out.status.success() {
        bail!("`{}` failed: {}", crate::describe(cmd), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nightly_rust_src() -> anyhow::Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        run(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
    }
    let components =
        output(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", "nightly"]))?;
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    Ok(())
}

/// The nightly's LLVM: its major version and the shared library rustc ships.
struct NightlyLlvm {
    major: u32,
    library: PathBuf,
}

fn nightly_llvm() -> anyhow::Result<NightlyLlvm> {
    let verbose = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let version = verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("rustc +nightly -vV names no LLVM version")?;
    let major: u32 = version.split('.').next().unwrap_or("").parse().context("LLVM major version")?;
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    // e.g. libLLVM.so.22.1-rust-1.97.0-nightly
    let library = std::fs::read_dir(&lib_dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with(&format!("libLLVM.so.{major}.")) && name.contains("-rust-")
        })
        .with_context(|| format!("no libLLVM.so.{major}.*-rust-* in {}", lib_dir.display()))?;
    Ok(NightlyLlvm { major, library })
}

/// Works if the installed bpf-linker starts and is the expected release.
fn bpf_linker_works() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
}

/// bpf-linker's default LLVM is newer than the nightly's, so it is built
/// against the nightly's own libLLVM: a prefix folder whose lib/ links to it,
/// under both the name the build links with and the soname the binary loads.
fn bpf_linker() -> anyhow::Result<()> {
    if bpf_linker_works() {
        return Ok(());
    }
    let llvm = nightly_llvm()?;
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let prefix = Path::new(&home).join(format!(".local/share/ctrace/llvm-{}", llvm.major));
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib)?;
    let soname = llvm.library.file_name().expect("file name").to_owned();
    for name in [std::ffi::OsStr::new("libLLVM.so"), soname.as_os_str()] {
        let link = lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&llvm.library, &link)
            .with_context(|| format!("link {} -> {}", link.display(), llvm.library.display()))?;
    }
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--force",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{}", llvm.major))
        .env("LLVM_PREFIX", &prefix))?;
    if !bpf_linker_works() {
        bail!("bpf-linker was built but does not run: is ~/.cargo/bin on PATH?");
    }
    Ok(())
}
