//! The demo's own network: a server and a client namespace on one veth,
//! with addresses in 198.18.0.0/16 only. Made with `ip` and `nft` (or
//! `iptables`), removed on drop; `--cleanup` removes what a killed run left.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context};

pub const SERVER_NS: &str = "ctrace-demo-srv";
pub const CLIENT_NS: &str = "ctrace-demo-cli";
pub const SERVER: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
/// Holds the table full (UDP entries that stay).
pub const FILLER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The named clients whose new flows are dropped.
pub const STORM: [Ipv4Addr; 2] = [Ipv4Addr::new(198, 18, 0, 3), Ipv4Addr::new(198, 18, 0, 4)];
/// Sends packets conntrack finds invalid.
pub const ODD: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 5);
/// The resolver whose parallel queries race.
pub const RESOLVER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 6);
/// The DNS port the resolver asks.
pub const DNS_PORT: u16 = 53;
pub const SERVICE_PORT: u16 = 8080;

pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output().context("cannot run `ip` (install iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

pub fn ns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

/// Runs a program inside a demo namespace.
pub fn exec_in(ns: &str, program: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut all = vec!["netns", "exec", ns, program];
    all.extend_from_slice(args);
    ip(&all)
}

/// Runs `f` on a thread inside a demo namespace (sockets made there stay in it).
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
    crate::netns::run_in(&ns_path(ns), f).with_context(|| format!("cannot enter namespace {ns}"))
}

/// The two namespaces, deleted on drop.
pub struct Lab;

impl Lab {
    /// `udp_timeout_s`: how long the server's UDP entries stay (its own
    /// sysctls, gone with it).
    pub fn create(invalid_drop_rule: bool, udp_timeout_s: u32) -> anyhow::Result<Lab> {
        for ns in [SERVER_NS, CLIENT_NS] {
            ip(&["netns", "add", ns])?;
        }
        let lab = Lab; // from here on, dropping removes what was made
        for ns in [SERVER_NS, CLIENT_NS] {
            exec_in(ns, "ip", &["link", "set", "lo", "up"])?;
            // No IPv6 chatter (neighbour discovery) in the demo's numbers.
            exec_in(ns, "sysctl", &["-qw", "net.ipv6.conf.all.disable_ipv6=1"])?;
        }
        exec_in(CLIENT_NS, "ip", &["link", "add", "veth-c", "type", "veth", "peer", "name", "veth-s"])?;
        exec_in(CLIENT_NS, "ip", &["link", "set", "veth-s", "netns", SERVER_NS])?;
        for addr in [FILLER, STORM[0], STORM[1], ODD, RESOLVER] {
            exec_in(CLIENT_NS, "ip", &["addr", "add", &format!("{addr}/16"), "dev", "veth-c"])?;
        }
        exec_in(SERVER_NS, "ip", &["addr", "add", &format!("{SERVER}/16"), "dev", "veth-s"])?;
        exec_in(CLIENT_NS, "ip", &["link", "set", "veth-c", "up"])?;
        exec_in(SERVER_NS, "ip", &["link", "set", "veth-s", "up"])?;
        // Replies to spoofed sources (198.19.0.0/16 too) go back over the
        // veth, never anywhere else.
        exec_in(SERVER_NS, "ip", &["route", "add", "198.19.0.0/16", "dev", "veth-s"])?;
        track(invalid_drop_rule)?;
        for sysctl in ["nf_conntrack_udp_timeout", "nf_conntrack_udp_timeout_stream"] {
            exec_in(SERVER_NS, "sysctl", &["-qw", &format!("net.netfilter.{sysctl}={udp_timeout_s}")])?;
        }
        Ok(lab)
    }
}

/// Turns conntrack on in the server namespace: a rule that matches on
/// connection state (nft, else iptables).
fn track(invalid_drop_rule: bool) -> anyhow::Result<()> {
    let mut ruleset = String::from(
        "table inet ctrace_demo {\n chain input {\n  type filter hook input priority filter; policy accept;\n",
    );
    if invalid_drop_rule {
        ruleset.push_str("  ct state invalid counter drop\n");
    }
    ruleset.push_str("  ct state new counter\n }\n}\n");
    let nft = in_ns(SERVER_NS, || {
        use std::io::Write as _;
        let mut child = Command::new("nft").args(["-f", "-"]).stdin(std::process::Stdio::piped()).spawn().ok()?;
        child.stdin.take()?.write_all(ruleset.as_bytes()).ok()?;
        child.wait().ok().filter(|s| s.success())
    })?;
    if nft.is_some() {
        return Ok(());
    }
    if invalid_drop_rule {
        exec_in(SERVER_NS, "iptables", &["-A", "INPUT", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"])?;
    }
    exec_in(SERVER_NS, "iptables", &["-A", "INPUT", "-m", "conntrack", "--ctstate", "NEW"])
        .context("neither nft nor iptables could turn conntrack on in the demo namespace")
}

impl Drop for Lab {
    fn drop(&mut self) {
        remove_namespaces();
    }
}

/// Deletes the demo's namespaces (and with them the veth, rules, sockets'
/// entries); says what could not be removed.
pub fn remove_namespaces() -> bool {
    let mut clean = true;
    for ns in [CLIENT_NS, SERVER_NS] {
        if ns_path(ns).exists() {
            if let Err(err) = ip(&["netns", "delete", ns]) {
                eprintln!("ctrace demo: cannot remove namespace {ns}: {err:#}");
                clean = false;
            }
        }
    }
    clean
}

pub fn exists() -> bool {
    ns_path(SERVER_NS).exists() || ns_path(CLIENT_NS).exists()
}
