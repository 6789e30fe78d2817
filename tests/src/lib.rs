//! Fixtures for ctrace's privileged end-to-end tests: network namespaces
//! joined by veth, rules, sysctls and a running `ctrace`, each undone by its
//! guard's Drop, so the machine is left as it was even when a test fails.
//!
//! Test traffic stays inside namespaces the tests create, on 198.18.0.0/15.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

pub mod doctor;
mod lab;
mod netns;
pub mod nfqueue;
mod process;

pub use self::{lab::*, netns::*, process::*};

/// How long a wait may last before the test calls it a hang. Waits end on
/// readiness (a line printed, a counter moved, a screen drawn), never on a
/// guessed time: under CI's emulated CPUs everything takes 10-50 times
/// longer, so this limit only catches what would never finish.
pub const HANG: Duration = Duration::from_secs(600);

/// How long a connection that must get in (a table with room) may take:
/// only a failure waits this long.
pub const FILL_TIMEOUT: Duration = Duration::from_secs(30);

/// Polls `ready` until it gives a value; fails, saying what was awaited,
/// only after [`HANG`].
pub fn wait_for<T>(what: &str, ready: impl FnMut() -> Option<T>) -> T {
    wait_for_explained(what, ready, String::new)
}

/// [`wait_for`], and on a hang also says what `seen` finds then, so that a
/// hang in CI can be understood from its log.
pub fn wait_for_explained<T>(what: &str, mut ready: impl FnMut() -> Option<T>, seen: impl FnOnce() -> String) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = ready() {
            return value;
        }
        if started.elapsed() >= HANG {
            panic!("waited {HANG:?} for {what}: a hang; {}", seen());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// True, having said why, in a guest kernel (`CTRACE_GUEST`): for tests of
/// what does not depend on the kernel's hooks, which the host runs.
pub fn skipped_in_guest(why: &str) -> bool {
    match std::env::var("CTRACE_GUEST") {
        Ok(guest) => {
            eprintln!("SKIPPED in the {guest} guest: {why}; the host runs this");
            true
        }
        Err(_) => false,
    }
}

/// Fails, saying how to get it, where podman is missing.
pub fn require_podman() {
    assert!(Command::new("podman").arg("--version").output().is_ok(), "podman is missing: run `cargo xtask setup`");
}

/// Does this kernel's skb:kfree_skb carry a drop reason? (`ctrace probes`
/// says which drop program runs.)
pub fn kfree_skb_has_reason() -> bool {
    let out = Command::new(ctrace_bin()).args(["probes", "--json"]).output().expect("ctrace probes");
    assert!(out.status.success(), "ctrace probes: {}", String::from_utf8_lossy(&out.stderr));
    let probes: serde_json::Value = serde_json::from_slice(&out.stdout).expect("probes JSON");
    !probes["hooks"][0]["detail"].as_str().unwrap_or("").contains("without a drop reason")
}

/// Loads nf_conntrack where it is a module not loaded yet (a fresh guest):
/// without it no namespace has conntrack counters or nf_conntrack_max.
pub fn ensure_conntrack_loaded() {
    if !Path::new("/proc/sys/net/netfilter/nf_conntrack_max").exists() {
        run("modprobe", &["nf_conntrack"]).expect("nf_conntrack is not loaded and modprobe failed");
    }
}

/// Privileged tests cannot be faked: without root they fail, saying why.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test loads eBPF programs and creates network namespaces: it must run as root \
         (run `cargo xtask test` as root)"
    );
    for tool in ["ip", "nft", "iptables"] {
        let found = Command::new(tool).arg("--version").output().is_ok();
        assert!(found, "`{tool}` is not installed: run `cargo xtask setup`");
    }
}

/// Runs a command, failing with its stderr when it fails.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program).args(args).output().with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!("{program} {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command inside a named namespace.
pub fn run_in(ns: &str, program: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut all = vec!["netns", "exec", ns, program];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// The path of the ctrace binary under test: `CTRACE_BIN`, or the workspace's
/// debug build.
pub fn ctrace_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("CTRACE_BIN") {
        return PathBuf::from(bin);
    }
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/ctrace");
    assert!(bin.exists(), "{} is missing: build it first (`cargo build`, or `cargo xtask test`)", bin.display());
    bin
}

/// A temporary folder removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ctrace-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
