//! What `doctor` reads before it judges: the kernel's settings and
//! counters, each namespace's table and timeouts, what ctrace saw in the
//! window. Plain data, so that the rules over it are pure functions.
use std::{collections::BTreeMap, net::IpAddr};

use serde::Serialize;

use crate::{census::PortEntries, model::ConnState, model::Protocol, netns::ConntrackStats};

/// Everything the rules look at.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Evidence {
    pub window_s: f64,
    pub tier: String,
    /// `nf_conntrack_max`: one value for all namespaces.
    pub max: Option<u64>,
    /// `nf_conntrack_buckets`: the hash table size, shared as well.
    pub buckets: Option<u64>,
    pub entry_size: Option<EntrySize>,
    pub mem_total_bytes: Option<u64>,
    /// None: the kernel log could not be read (dmesg_restrict, no root).
    pub kernel_log: Option<KernelLog>,
    pub namespaces: Vec<NamespaceEvidence>,
}

/// Kernel memory one tracked connection takes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EntrySize {
    pub bytes: u64,
    /// Where it was read: "slabinfo" (the allocator's object size) or
    /// "btf" (`sizeof(struct nf_conn)` of the running kernel).
    pub source: &'static str,
}

/// The kernel's "table full, dropping packet" lines still in its log.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct KernelLog {
    pub lines: u64,
    /// Seconds since the latest one.
    pub last_ago_s: Option<f64>,
}

/// One namespace: its counters over the window and its table now.
#[derive(Clone, Debug, Default, Serialize)]
pub struct NamespaceEvidence {
    pub netns: u32,
    pub name: String,
    /// How to run a command inside it: "" (the host), `ip netns exec NAME `
    /// or `nsenter --net=/proc/PID/ns/net `.
    #[serde(skip)]
    pub exec_prefix: String,
    pub entries: u64,
    /// The most entries seen in the window (sampled every second).
    pub peak: u64,
    /// The kernel's counters at the start and end of the window.
    pub start: ConntrackStats,
    pub end: ConntrackStats,
    /// Drops ctrace attributed in the window, by reason.
    pub drops: BTreeMap<String, u64>,
    /// Conntrack's drops (not the ruleset's) by destination port, most first.
    pub drop_ports: Vec<PortCount>,
    /// Conntrack's drops by source, most first (a bounded top list).
    pub drop_sources: Vec<(IpAddr, u64)>,
    /// Distinct sources among conntrack's drops (estimated).
    pub distinct_drop_sources: u64,
    /// Refused insertions by destination port.
    pub insert_failed_ports: Vec<PortCount>,
    /// Insertion races the kernel settled, by destination port (hook tiers).
    pub clash_ports: Vec<PortCount>,
    /// New entries in the window (hook tiers only).
    pub inserts: Option<u64>,
    /// New entries by destination port (hook tiers only).
    pub insert_ports: Vec<PortCount>,
    /// The table now; None when it could not be read.
    pub census: Option<CensusSummary>,
    /// Timeout sysctls of the namespace, in seconds, by short name
    /// (`tcp_timeout_time_wait`, `udp_timeout`, ...).
    pub timeouts: BTreeMap<String, u64>,
    /// Ports with a listening TCP or bound UDP socket in the namespace.
    pub listeners: Vec<(Protocol, u16)>,
    /// Whether a notrack rule exists in the namespace (None: unknown).
    pub notrack_rules: Option<bool>,
}

impl NamespaceEvidence {
    /// Counter changes over the window.
    pub fn delta(&self) -> ConntrackStats {
        self.end.delta_since(&self.start)
    }

    pub fn conntrack_drops(&self) -> u64 {
        self.drops.iter().filter(|(reason, _)| *reason != "ruleset").map(|(_, n)| n).sum()
    }

    pub fn listens(&self, proto: Protocol, port: u16) -> bool {
        self.listeners.contains(&(proto, port))
    }
}

/// A count for one protocol and destination port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PortCount {
    pub proto: Protocol,
    pub port: u16,
    pub count: u64,
}

/// The table's contents, counted.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CensusSummary {
    /// Entries the kernel listed.
    pub entries: u64,
    /// The namespace's count just after the listing: more than `entries`
    /// when the kernel's listing skipped some.
    pub kernel_entries: Option<u64>,
    pub truncated: bool,
    pub by_state: BTreeMap<ConnState, u64>,
    /// UDP entries (state NONE in `by_state`, with other stateless ones).
    pub udp: u64,
    pub by_port: Vec<PortEntries>,
}

/// Ports with a listener in `/proc/net/{tcp,tcp6,udp,udp6}` text: TCP in
/// LISTEN (state 0A), UDP bound to a port (state 07, any address).
pub fn listening_ports(proto: Protocol, text: &str) -> Vec<u16> {
    let want = if proto == Protocol::Tcp { "0A" } else { "07" };
    let mut ports: Vec<u16> = text
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1)?;
            let state = fields.nth(1)?;
            let port = u16::from_str_radix(local.rsplit(':').next()?, 16).ok()?;
            (state == want && port != 0).then_some(port)
        })
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// The "table full" lines in `/dev/kmsg` records (`pri,seq,usec,flags;text`),
/// with the age of the latest against `now_us` (CLOCK_MONOTONIC).
pub fn table_full_lines<'a>(records: impl Iterator<Item = &'a str>, now_us: u64) -> KernelLog {
    let mut log = KernelLog::default();
    for record in records {
        let Some((head, text)) = record.split_once(';') else { continue };
        if !text.contains("nf_conntrack: table full, dropping packet") {
            continue;
        }
        log.lines += 1;
        if let Some(us) = head.split(',').nth(2).and_then(|t| t.parse::<u64>().ok()) {
            log.last_ago_s = Some(now_us.saturating_sub(us) as f64 / 1e6);
        }
    }
    log
}

/// The allocator's object size of the `nf_conntrack` cache in /proc/slabinfo.
pub fn slab_object_size(slabinfo: &str) -> Option<u64> {
    slabinfo.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        (fields.next()? == "nf_conntrack").then(|| fields.nth(2)?.parse().ok()).flatten()
    })
}

/// MemTotal of /proc/meminfo, in bytes.
pub fn mem_total(meminfo: &str) -> Option<u64> {
    let kib: u64 =
        meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

/// Whether a ruleset listing (`nft list ruleset`, `iptables-save -t raw`)
/// has a notrack rule.
pub fn has_notrack(listing: &str) -> bool {
    listing.lines().any(|l| l.contains("notrack") || l.contains("NOTRACK") || l.contains("--notrack"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_from_proc_net() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0101A8C6:1F90 0201A8C6:9C40 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1
   2: 0100007F:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0
";
        assert_eq!(listening_ports(Protocol::Tcp, tcp), [22, 8080]);
        let udp6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  12: 00000000000000000000000000000000:0035 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4 2 0 0
";
        assert_eq!(listening_ports(Protocol::Udp, udp6), [53]);
        assert!(listening_ports(Protocol::Udp, "header only\n").is_empty());
    }

    #[test]
    fn table_full_lines_are_counted_with_the_latest_age() {
        let kmsg = [
            "4,1201,5000000,-;nf_conntrack: nf_conntrack: table full, dropping packet",
            "6,1202,6000000,-;eth0: link up",
            "4,1203,9000000,-;nf_conntrack: table full, dropping packet",
            "garbage",
        ];
        let log = table_full_lines(kmsg.into_iter(), 10_000_000);
        assert_eq!(log, KernelLog { lines: 2, last_ago_s: Some(1.0) });
    }

    #[test]
    fn slab_and_memory() {
        let slabinfo = "slabinfo - version: 2.1\n# name <active_objs> <num_objs> <objsize> <objperslab>\n\
                        nf_conntrack_expect 0 0 208 19 1\nnf_conntrack         1224   1224    320   25    2 : tunables\n";
        assert_eq!(slab_object_size(slabinfo), Some(320));
        assert_eq!(slab_object_size("nothing"), None);
        assert_eq!(mem_total("MemTotal:        2014128 kB\nMemFree: 1 kB\n"), Some(2014128 * 1024));
    }

    #[test]
    fn notrack_rules_in_listings() {
        assert!(has_notrack("table inet raw {\n chain pre {\n udp dport 53 notrack\n }\n}"));
        assert!(has_notrack("-A PREROUTING -p udp -m udp --dport 53 -j NOTRACK"));
        assert!(has_notrack("-A PREROUTING -p udp -j CT --notrack"));
        assert!(!has_notrack("table inet filter {\n ct state established accept\n}"));
    }
}
