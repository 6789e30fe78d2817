//! From evidence to findings: what is wrong, the numbers that show it, and
//! the exact change that fixes it. Pure functions of [`Evidence`].
use std::collections::BTreeMap;

use serde::Serialize;

use super::evidence::{Evidence, NamespaceEvidence, PortCount};
use crate::{
    aggregate::flood::{FLOOD_DISTINCT_RATIO, FLOOD_MIN_DROPS},
    model::{ConnState, Protocol},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, strum::IntoStaticStr)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    /// The exit status: 0 healthy (info at most), 1 warnings, 2 critical.
    pub fn exit_code(worst: Option<Severity>) -> u8 {
        match worst {
            None | Some(Severity::Info) => 0,
            Some(Severity::Warning) => 1,
            Some(Severity::Critical) => 2,
        }
    }
}

/// One thing doctor found.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Finding {
    pub severity: Severity,
    /// Stable name of the rule (`table_full`, `timeout_holds_slots`, ...).
    pub id: &'static str,
    /// The namespace it is about; None for the machine as a whole.
    pub netns: Option<u32>,
    pub namespace: Option<String>,
    pub summary: String,
    /// The numbers that show it.
    pub evidence: Vec<String>,
    /// Commands that fix it now.
    pub fix: Vec<String>,
    /// What keeps the fix across reboots.
    pub persist: Vec<String>,
    /// The settings the fix changes, with their suggested values
    /// (sysctl names, or `nf_conntrack.hashsize`), for tools to apply.
    pub settings: BTreeMap<String, u64>,
}

impl Finding {
    fn new(severity: Severity, id: &'static str, ns: Option<&NamespaceEvidence>, summary: String) -> Self {
        Finding {
            severity,
            id,
            netns: ns.map(|n| n.netns),
            namespace: ns.map(|n| n.name.clone()),
            summary,
            evidence: Vec::new(),
            fix: Vec::new(),
            persist: Vec::new(),
            settings: BTreeMap::new(),
        }
    }
}

/// A table this full (share of max) is worth a warning.
pub const NEAR_FULL: f64 = 0.9;
/// A state or port holding this share of a busy table is what fills it.
pub const DOMINANT_SHARE: f64 = 0.5;
/// A table this full makes what fills it worth a warning (else info).
pub const BUSY: f64 = 0.5;
/// Entries a port needs before it is called a NOTRACK candidate.
pub const NOTRACK_MIN_ENTRIES: u64 = 100;
/// The share of the machine's memory a full table may take before doctor
/// warns, and the most a suggested maximum may take.
pub const MEMORY_SHARE: f64 = 0.125;
/// Where sysctl settings are made persistent.
pub const SYSCTL_FILE: &str = "/etc/sysctl.d/90-conntrack.conf";

/// Every finding, worst first.
pub fn diagnose(evidence: &Evidence) -> Vec<Finding> {
    let mut findings = Vec::new();
    findings.extend(sizing(evidence));
    findings.extend(kernel_log(evidence));
    for ns in &evidence.namespaces {
        findings.extend(drops(evidence, ns));
        findings.extend(early_drops(evidence, ns));
        findings.extend(insert_failed(evidence, ns));
        findings.extend(clashes_resolved(evidence, ns));
        findings.extend(chains_too_long(evidence, ns));
        findings.extend(invalid(evidence, ns));
        findings.extend(near_full(evidence, ns));
        findings.extend(timeouts(evidence, ns));
        findings.extend(notrack(evidence, ns));
    }
    findings.sort_by_key(|f| std::cmp::Reverse(f.severity));
    findings
}

fn rate(count: u64, window_s: f64) -> f64 {
    count as f64 / window_s.max(1e-3)
}

fn share(part: u64, whole: u64) -> f64 {
    part as f64 / whole.max(1) as f64
}

/// Bytes for people: KiB, MiB, GiB.
pub fn bytes(n: u64) -> String {
    let n = n as f64;
    match n {
        n if n >= (1u64 << 30) as f64 => format!("{:.1} GiB", n / (1u64 << 30) as f64),
        n if n >= (1u64 << 20) as f64 => format!("{:.1} MiB", n / (1u64 << 20) as f64),
        n => format!("{:.0} KiB", n / 1024.0),
    }
}

/// A new maximum: room for the peak plus every flow refused in the window
/// (each drop stands for a flow that wanted a slot; retransmissions make
/// this generous), with a quarter to spare, at least double the present
/// one, a power of two; capped by [`MEMORY_SHARE`] of the machine's memory.
/// Returns the value and whether the cap cut it.
pub fn suggested_max(max: u64, peak: u64, refused: u64, entry: Option<u64>, mem_total: Option<u64>) -> (u64, bool) {
    let wanted = (peak.max(max) + refused).saturating_mul(5) / 4;
    let target = wanted.max(max.saturating_mul(2)).max(1).next_power_of_two();
    match (entry, mem_total) {
        (Some(entry), Some(mem)) if entry > 0 => {
            let cap = ((mem as f64 * MEMORY_SHARE) as u64 / entry).max(1);
            let cap = if cap.is_power_of_two() { cap } else { cap.next_power_of_two() / 2 };
            if target > cap {
                (cap.max(max), true)
            } else {
                (target, false)
            }
        }
        _ => (target, false),
    }
}

/// The command that runs `command` in the namespace.
fn inside(ns: &NamespaceEvidence, command: &str) -> String {
    format!("{}{command}", ns.exec_prefix)
}

/// Adds the fix for a new maximum ([`suggested_max`] for this peak and
/// these refused flows) when it is above the present one. Returns the
/// suggestion and whether the memory cap cut it.
fn raise_max(finding: &mut Finding, evidence: &Evidence, max: u64, peak: u64, refused: u64) -> (u64, bool) {
    let entry = evidence.entry_size.as_ref().map(|e| e.bytes);
    let (suggested, capped) = suggested_max(max, peak, refused, entry, evidence.mem_total_bytes);
    if suggested > max {
        max_fix(finding, evidence, suggested);
    }
    (suggested, capped)
}

fn max_fix(finding: &mut Finding, evidence: &Evidence, suggested: u64) {
    finding.fix.push(format!("sysctl -w net.netfilter.nf_conntrack_max={suggested}"));
    finding.persist.push(format!("echo 'net.netfilter.nf_conntrack_max = {suggested}' >> {SYSCTL_FILE}"));
    finding.settings.insert("net.netfilter.nf_conntrack_max".into(), suggested);
    if let Some(entry) = &evidence.entry_size {
        finding.evidence.push(format!(
            "a table of {suggested} entries takes up to {} of kernel memory ({} B per entry, from {}){}",
            bytes(suggested * entry.bytes),
            entry.bytes,
            entry.source,
            evidence
                .mem_total_bytes
                .map(|m| format!(", {:.1}% of {}", 100.0 * share(suggested * entry.bytes, m), bytes(m)))
                .unwrap_or_default()
        ));
    }
    if let Some(buckets) = evidence.buckets {
        if buckets < suggested / 4 {
            let hashsize = suggested / 2;
            finding.fix.push(format!("echo {hashsize} > /sys/module/nf_conntrack/parameters/hashsize"));
            finding
                .persist
                .push(format!("echo 'options nf_conntrack hashsize={hashsize}' > /etc/modprobe.d/nf_conntrack.conf"));
            finding.settings.insert("nf_conntrack.hashsize".into(), hashsize);
        }
    }
}

/// Conntrack dropped packets: new flows never reached a socket.
fn drops(evidence: &Evidence, ns: &NamespaceEvidence) -> Option<Finding> {
    let kernel = ns.delta().drop;
    let table_full = ns.drops.get("table_full").copied().unwrap_or(0);
    if kernel == 0 && table_full == 0 {
        return None;
    }
    let max = evidence.max.unwrap_or(0);
    let full = table_full > 0 || (max > 0 && ns.peak >= max);
    let summary = if full {
        format!("the table is full: conntrack dropped {kernel} packets of new flows in {:.0} s", evidence.window_s)
    } else {
        format!("conntrack dropped {kernel} packets in {:.0} s", evidence.window_s)
    };
    let mut f =
        Finding::new(Severity::Critical, if full { "table_full" } else { "conntrack_drops" }, Some(ns), summary);
    // ctrace attaches a moment before the counters' first read: under a
    // running storm the two counts differ by the drops in between.
    f.evidence.push(format!(
        "kernel drop counter +{kernel} ({:.1}/s); ctrace saw {} since attaching (table_full {table_full})",
        rate(kernel, evidence.window_s),
        ns.conntrack_drops()
    ));
    f.evidence.push(format!("entries {} of nf_conntrack_max {max} now, peak {}", ns.entries, ns.peak));
    if !ns.drop_sources.is_empty() {
        let top: Vec<String> = ns.drop_sources.iter().take(5).map(|(src, n)| format!("{src} {n}")).collect();
        f.evidence.push(format!("dropped sources: {}", top.join(", ")));
    }
    if !ns.drop_ports.is_empty() {
        f.evidence.push(format!("dropped to: {}", ports(&ns.drop_ports)));
    }
    let dropped = ns.conntrack_drops().max(kernel);
    let flood = dropped >= FLOOD_MIN_DROPS && ns.distinct_drop_sources as f64 >= FLOOD_DISTINCT_RATIO * dropped as f64;
    if flood {
        f.evidence.push(format!(
            "about {} distinct sources for {dropped} drops: a random-source flood; a bigger table only buys time \
             (the sources are spoofed): filter or rate-limit it upstream, or take the port out of tracking",
            ns.distinct_drop_sources
        ));
    }
    if full && max > 0 {
        let before_fix = f.evidence.len();
        let (suggested, capped) = raise_max(&mut f, evidence, max, ns.peak, dropped);
        if capped {
            f.evidence.insert(
                before_fix,
                format!(
                    "{suggested} is the most a table may take of this machine's memory ({:.1}%): free slots \
                     instead (see the timeout and NOTRACK findings)",
                    MEMORY_SHARE * 100.0
                ),
            );
        }
    }
    Some(f)
}

/// Early drops: the table was full and the kernel evicted unreplied
/// entries to admit new ones; those flows broke.
fn early_drops(evidence: &Evidence, ns: &NamespaceEvidence) -> Option<Finding> {
    let n = ns.delta().early_drop;
    if n == 0 {
        return None;
    }
    let mut f = Finding::new(
        Severity::Warning,
        "early_drop",
        Some(ns),
        format!("the table was full: the kernel evicted {n} unreplied entries to admit new flows"),
    );
    f.evidence.push(format!("early_drop counter +{n} ({:.1}/s)", rate(n, evidence.window_s)));
    if let Some(max) = evidence.max {
        raise_max(&mut f, evidence, max, ns.peak, n);
    }
    Some(f)
}

/// Refused insertions: two packets of one new flow raced to create its
/// entry (the DNS A/AAAA race) or a hash chain was too long.
fn insert_failed(evidence: &Evidence, ns: &NamespaceEvidence) -> Option<Finding> {
    let n = ns.delta().insert_failed;
    if n == 0 {
        return None;
    }
    // The hook tiers name refused insertions; the tracepoint tier sees them
    // as conntrack's drops.
    let dns = ns.insert_failed_ports.iter().chain(&ns.drop_ports).any(|p| p.proto == Protocol::Udp && p.port == 53);
    let mut f = Finding::new(
        Severity::Warning,
        if dns { "dns_insert_race" } else { "insert_failed" },
        Some(ns),
        if dns {
            format!("{n} DNS queries lost to the conntrack insertion race (parallel A and AAAA from one socket)")
        } else {
            format!("conntrack refused to insert {n} new entries")
        },
    );
    f.evidence.push(format!("insert_failed counter +{n} ({:.1}/s)", rate(n, evidence.window_s)));
    if !ns.insert_failed_ports.is_empty() {
        f.evidence.push(format!("refused to: {}", ports(&ns.insert_failed_ports)));
    }
    if dns {
        resolver_fixes(&mut f);
    } else {
        f.fix.push(
            "find who with `ctrace live --filter insert_failed`; if clashes are between parallel UDP flows of one \
             socket, separate them; if chains are long, raise the hash size (see sizing)"
                .into(),
        );
    }
    Some(f)
}

/// What takes the A/AAAA race away: the two queries from separate sockets
/// (separate flows), or not over UDP.
fn resolver_fixes(f: &mut Finding) {
    f.fix.push(
        "glibc clients: add `options single-request-reopen` to /etc/resolv.conf (A and AAAA from separate sockets)"
            .into(),
    );
    f.fix.push(
        "musl clients (Alpine), which ignore it: `options use-vc` (DNS over TCP), or a node-local DNS cache".into(),
    );
    f.persist.push("the resolver options in the image or pod spec (Kubernetes: dnsConfig.options)".into());
}

/// Insertion races the kernel settled (`clashres`): two packets of one new
/// flow both made an entry and the second found the first. Nothing was
/// lost here, but these are the races that cost a query where the kernel
/// cannot settle them (before 5.6 with NAT to different backends; always
/// for TCP): named, so that a rising `insert_failed` is understood.
fn clashes_resolved(evidence: &Evidence, ns: &NamespaceEvidence) -> Option<Finding> {
    let n = ns.delta().clash_resolve;
    if n == 0 {
        return None;
    }
    let is_dns = |proto: Protocol, port: u16| proto == Protocol::Udp && port == 53;
    // The hook tiers name the raced ports; on the tracepoint tier the table
    // says whose flows these are likely to be.
    let dns = if ns.clash_ports.is_empty() {
        ns.census.as_ref().and_then(|c| c.by_port.first()).is_some_and(|p| is_dns(p.proto, p.dport))
    } else {
        ns.clash_ports.iter().any(|p| is_dns(p.proto, p.port))
    };
    let mut f = Finding::new(
        Severity::Info,
        if dns { "dns_race_resolved" } else { "clash_resolved" },
        Some(ns),
        if dns {
            format!("{n} DNS lookups raced their A and AAAA queries through conntrack; the kernel settled every race")
        } else {
            format!("{n} new flows raced two packets through conntrack; the kernel settled every race")
        },
    );
    f.evidence.push(format!("clashres counter +{n} ({:.1}/s), insert_failed +{}", rate(n, evidence.window_s), {
        ns.delta().insert_failed
    }));
    if !ns.clash_ports.is_empty() {
        f.evidence.push(format!("raced to: {}", ports(&ns.clash_ports)));
    } else if dns {
        f.evidence.push("the table's entries are mostly to udp/53 (this tier does not see which flows raced)".into());
    }
    f.evidence.push(
        "no packet was lost to them here; where the kernel cannot settle a race (TCP, or UDP through NAT to \
         different backends before Linux 5.6) it refuses the entry and the packet is dropped (insert_failed)"
            .into(),
    );
    if dns {
        resolver_fixes(&mut f);
    }
    Some(f)
}

/// Insertions refused because their hash chain was too long: too few
/// buckets for the entries (or a hash skewed by the traffic).
fn chains_too_long(evidence: &Evidence, ns: &NamespaceEvidence) -> Option<Finding> {
    let n = ns.delta().chain_too_long;
    if n == 0 {
        return None;
    }
    let mut f = Finding::new(
        Severity::Warning,
        "chains_too_long",
        Some(ns),
        format!("conntrack refused {n} new entries because their hash chain was too long"),
    );
    f.evidence.push(format!(
        "chaintoolong counter +{n} ({:.1}/s); buckets {}, max {}",
        rate(n, evidence.window_s),
        evidence.buckets.map_or("?".into(), |b| b.to_string()),
        evidence.max.map_or("?".into(), |m| m.to_string())
    ));
    if let Some(max) = evidence.max {
        let hashsize = (max / 2).max(evidence.buckets.unwrap_or(0) * 2);
        f.fix.push(format!("echo {hashsize} > /sys/module/nf_conntrack/parameters/hashsize"));
        f.persist.push(format!("echo 'options nf_conntrack hashsize={hashsize}' > /etc/modprobe.d/nf_conntrack.conf"));
        f.settings.insert("nf_conntrack.hashsize".into(), hashsize);
    }
    Some(f)
}

/// Packets conntrack could not make sense of.
fn invalid(evidence: &Evidence, ns: &NamespaceEvidence) -> Option<Finding> {
    let n = ns.delta().invalid;
    if n == 0 {
        return None;
    }
    let mut f = Finding::new(
        Severity::Info,
        "invalid",
        Some(ns),
        format!("conntrack found {n} packets invalid ({:.1}/s)", rate(n, evidence.window_s)),
    );
    f.evidence.push(
        "invalid packets are dropped only by rules that match `ct state invalid`; out-of-window TCP (asymmetric \
         routes, lost state) is the usual cause"
            .into(),
    );
    f.fix.push("see who sends them: ctrace live --invalid".into());
    f.fix.push(inside(
        ns,
        "sysctl -w net.netfilter.nf_conntrack_tcp_be_liberal=1  # only if out-of-window TCP is expected",
    ));
    Some(f)
}

/// A table close to its maximum, not yet dropping.
fn near_full(evidence: &Evidence, ns: &NamespaceEvidence) -> Option<Finding> {
    let max = evidence.max?;
    if ns.delta().drop > 0 || ns.drops.get("table_full").is_some_and(|&n| n > 0) {
        return None; // the drops finding says it
    }
    let fullest = ns.entries.max(ns.peak);
    if share(fullest, max) < NEAR_FULL {
        return None;
    }
    let mut f = Finding::new(
        Severity::Warning,
        "near_full",
        Some(ns),
        format!("the table is {:.0}% full ({fullest} of {max})", 100.0 * share(fullest, max)),
    );
    let growth = ns.end.entries as f64 - ns.start.entries as f64;
    if growth > 0.0 {
        let per_s = growth / evidence.window_s.max(1e-3);
        f.evidence.push(format!(
            "growing by {per_s:.1} entries/s: full in about {:.0} s at this rate",
            max.saturating_sub(ns.entries) as f64 / per_s
        ));
    }
    raise_max(&mut f, evidence, max, fullest, 0);
    Some(f)
}

/// The timeout sysctl that holds entries of a state, with a shorter value
/// that is safe for most services.
fn timeout_for(state: ConnState, proto: Protocol) -> Option<(&'static str, u64)> {
    Some(match (proto, state) {
        (Protocol::Tcp, ConnState::TimeWait) => ("nf_conntrack_tcp_timeout_time_wait", 30),
        (Protocol::Tcp, ConnState::SynRecv) => ("nf_conntrack_tcp_timeout_syn_recv", 30),
        (Protocol::Tcp, ConnState::SynSent) => ("nf_conntrack_tcp_timeout_syn_sent", 30),
        (Protocol::Tcp, ConnState::CloseWait) => ("nf_conntrack_tcp_timeout_close_wait", 30),
        (Protocol::Tcp, ConnState::FinWait) => ("nf_conntrack_tcp_timeout_fin_wait", 30),
        (Protocol::Tcp, ConnState::Established) => ("nf_conntrack_tcp_timeout_established", 86_400),
        (Protocol::Udp, _) => ("nf_conntrack_udp_timeout", 10),
        _ => return None,
    })
}

/// Says so when the kernel's listing of the table gave fewer entries than
/// it counts (it skips entries when the table changes while it is read):
/// shares are then of the entries listed.
fn short_listing(ns: &NamespaceEvidence) -> Option<String> {
    let census = ns.census.as_ref()?;
    crate::census::is_short(census.entries, census.kernel_entries).then(|| {
        format!(
            "the kernel listed {} of the {} entries it counts (its listing skips entries when the table changes \
             while it is read); shares are of the entries listed",
            census.entries,
            census.kernel_entries.unwrap_or_default()
        )
    })
}

/// One state (or UDP) holds most of a busy table: its timeout is what
/// to shorten.
fn timeouts(evidence: &Evidence, ns: &NamespaceEvidence) -> Option<Finding> {
    let census = ns.census.as_ref()?;
    let max = evidence.max?;
    if census.entries == 0 || share(ns.entries, max) < BUSY {
        return None;
    }
    let tcp_states =
        census.by_state.iter().filter(|(s, _)| **s != ConnState::None).map(|(s, n)| (Protocol::Tcp, *s, *n));
    let (proto, state, held) =
        tcp_states.chain(std::iter::once((Protocol::Udp, ConnState::None, census.udp))).max_by_key(|(_, _, n)| *n)?;
    if share(held, census.entries) < DOMINANT_SHARE {
        return None;
    }
    let (sysctl, suggested) = timeout_for(state, proto)?;
    let short = sysctl.trim_start_matches("nf_conntrack_");
    let current = *ns.timeouts.get(short)?;
    if current <= suggested {
        return None;
    }
    let what = if proto == Protocol::Udp { "UDP".to_string() } else { state.as_str().to_string() };
    let severity = if share(ns.entries, max) >= NEAR_FULL { Severity::Warning } else { Severity::Info };
    let mut f = Finding::new(
        severity,
        "timeout_holds_slots",
        Some(ns),
        format!(
            "{what} entries hold {:.0}% of the table ({held} of {}), each for up to {current} s",
            100.0 * share(held, census.entries),
            census.entries
        ),
    );
    f.evidence.push(format!("{sysctl} = {current} s; table {} of {max}", ns.entries));
    f.evidence.extend(short_listing(ns));
    if state == ConnState::Established {
        f.evidence.push(
            "a shorter established timeout drops state of connections idle that long: keep it above the longest \
             idle period of your long-lived connections (or their keepalive interval)"
                .into(),
        );
    }
    let name = format!("net.netfilter.{sysctl}");
    f.fix.push(inside(ns, &format!("sysctl -w {name}={suggested}")));
    f.persist.push(if ns.exec_prefix.is_empty() {
        format!("echo '{name} = {suggested}' >> {SYSCTL_FILE}")
    } else {
        format!("set {name}={suggested} where the namespace is made (the sysctl is per namespace)")
    });
    f.settings.insert(name, suggested);
    Some(f)
}

/// A local service whose flows fill a busy table: stateless traffic
/// (DNS, health checks) need not be tracked at all.
fn notrack(evidence: &Evidence, ns: &NamespaceEvidence) -> Option<Finding> {
    let census = ns.census.as_ref()?;
    let max = evidence.max?;
    if census.entries == 0 || ns.notrack_rules == Some(true) || share(ns.entries, max) < BUSY {
        return None;
    }
    // The port's share of what was listed, of the kernel's count.
    let estimate = |listed: u64| (share(listed, census.entries) * ns.entries as f64).round() as u64;
    let port = census.by_port.iter().find(|p| {
        p.dport != 0
            && estimate(p.entries).max(p.entries) >= NOTRACK_MIN_ENTRIES
            && share(p.entries, census.entries) >= DOMINANT_SHARE
            && ns.listens(p.proto, p.dport)
    })?;
    let proto = match port.proto {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        _ => return None,
    };
    let severity = if share(ns.entries, max) >= NEAR_FULL { Severity::Warning } else { Severity::Info };
    let mut f = Finding::new(
        severity,
        "notrack_candidate",
        Some(ns),
        format!(
            "{proto}/{} (a local service) holds {:.0}% of the table: it need not be tracked",
            port.dport,
            100.0 * share(port.entries, census.entries)
        ),
    );
    f.evidence.push(format!("{} of {} entries are to {proto} port {}", port.entries, census.entries, port.dport));
    f.evidence.extend(short_listing(ns));
    f.evidence.push(
        "untracked packets skip `ct state` matches: allow the port explicitly in both directions before this".into(),
    );
    if ns.notrack_rules.is_none() {
        f.evidence.push("whether notrack rules exist could not be read (no nft or iptables-save)".into());
    }
    let p = port.dport;
    f.fix.push(inside(ns, "nft add table inet ctrace_notrack"));
    f.fix.push(inside(ns, "nft add chain inet ctrace_notrack pre '{ type filter hook prerouting priority raw; }'"));
    f.fix.push(inside(ns, "nft add chain inet ctrace_notrack out '{ type filter hook output priority raw; }'"));
    f.fix.push(inside(ns, &format!("nft add rule inet ctrace_notrack pre {proto} dport {p} notrack")));
    f.fix.push(inside(ns, &format!("nft add rule inet ctrace_notrack out {proto} sport {p} notrack")));
    f.fix.push(format!(
        "or with iptables: {}; {}",
        inside(ns, &format!("iptables -t raw -A PREROUTING -p {proto} --dport {p} -j NOTRACK")),
        inside(ns, &format!("iptables -t raw -A OUTPUT -p {proto} --sport {p} -j NOTRACK"))
    ));
    f.persist.push("add the table to /etc/nftables.conf (or iptables-save > /etc/iptables/rules.v4)".into());
    Some(f)
}

/// Hash size and memory: one setting for the whole machine.
fn sizing(evidence: &Evidence) -> Vec<Finding> {
    let mut findings = Vec::new();
    let Some(max) = evidence.max else { return findings };
    if let Some(buckets) = evidence.buckets {
        if buckets < max / 4 {
            let hashsize = (max / 2).max(1);
            let mut f = Finding::new(
                Severity::Warning,
                "hash_too_small",
                None,
                format!("{buckets} hash buckets for up to {max} entries: chains of {} at full", max / buckets.max(1)),
            );
            f.evidence.push("every lookup walks a chain; keep buckets between max/4 and max/2".into());
            f.fix.push(format!("echo {hashsize} > /sys/module/nf_conntrack/parameters/hashsize"));
            f.persist.push(format!(
                "echo 'options nf_conntrack hashsize={hashsize}' > /etc/modprobe.d/nf_conntrack.conf (built-in \
                 conntrack: nf_conntrack.hashsize={hashsize} on the kernel command line)"
            ));
            f.settings.insert("nf_conntrack.hashsize".into(), hashsize);
            findings.push(f);
        }
    }
    if let (Some(entry), Some(mem)) = (&evidence.entry_size, evidence.mem_total_bytes) {
        let full = max.saturating_mul(entry.bytes);
        let severity = if share(full, mem) > 2.0 * MEMORY_SHARE { Severity::Warning } else { Severity::Info };
        let mut f = Finding::new(
            severity,
            "table_memory",
            None,
            format!(
                "a full table takes {} ({:.1}% of {} memory) per namespace that fills it",
                bytes(full),
                100.0 * share(full, mem),
                bytes(mem)
            ),
        );
        f.evidence.push(format!("{max} entries of {} B (from {})", entry.bytes, entry.source));
        findings.push(f);
    }
    findings
}

/// What the kernel logged (the one trace it leaves by itself).
fn kernel_log(evidence: &Evidence) -> Option<Finding> {
    let log = evidence.kernel_log.as_ref()?;
    if log.lines == 0 {
        return None;
    }
    let mut f = Finding::new(
        Severity::Info,
        "kernel_log",
        None,
        format!("the kernel log has {} \"nf_conntrack: table full, dropping packet\" lines", log.lines),
    );
    if let Some(ago) = log.last_ago_s {
        f.evidence.push(format!("the latest {ago:.0} s ago (the kernel rate-limits them: drops are many more)"));
    }
    f.evidence.push("the line names no namespace: the per-namespace findings say which table it was".into());
    Some(f)
}

fn ports(list: &[PortCount]) -> String {
    let shown: Vec<String> = list.iter().take(5).map(|p| format!("{}/{} {}", p.proto, p.port, p.count)).collect();
    shown.join(", ")
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::{
        census::PortEntries,
        doctor::evidence::{CensusSummary, EntrySize, KernelLog},
        netns::ConntrackStats,
    };

    fn machine() -> Evidence {
        Evidence {
            window_s: 5.0,
            tier: "kprobe".into(),
            max: Some(64),
            buckets: Some(64),
            entry_size: Some(EntrySize { bytes: 320, source: "slabinfo" }),
            mem_total_bytes: Some(2 << 30),
            kernel_log: Some(KernelLog::default()),
            namespaces: Vec::new(),
        }
    }

    fn namespace(entries: u64) -> NamespaceEvidence {
        NamespaceEvidence {
            netns: 7,
            name: "srv".into(),
            exec_prefix: "ip netns exec srv ".into(),
            entries,
            peak: entries,
            start: ConntrackStats { entries, ..Default::default() },
            end: ConntrackStats { entries, ..Default::default() },
            ..Default::default()
        }
    }

    fn ids(findings: &[Finding]) -> Vec<&str> {
        findings.iter().map(|f| f.id).collect()
    }

    #[test]
    fn a_quiet_namespace_is_healthy() {
        let mut evidence = machine();
        evidence.namespaces.push(namespace(3));
        let findings = diagnose(&evidence);
        assert_eq!(ids(&findings), ["table_memory"]);
        assert_eq!(Severity::exit_code(findings.iter().map(|f| f.severity).max()), 0);
    }

    #[test]
    fn a_full_table_is_critical_with_a_max_that_fits_the_refused_flows() {
        let mut evidence = machine();
        let mut ns = namespace(64);
        ns.end.drop = 50;
        ns.drops.insert("table_full".into(), 50);
        ns.drop_sources = vec![(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 3)), 30)];
        ns.distinct_drop_sources = 2;
        evidence.namespaces.push(ns);
        let findings = diagnose(&evidence);
        let f = &findings[0];
        assert_eq!((f.id, f.severity, f.netns), ("table_full", Severity::Critical, Some(7)));
        // 64 + 50 refused, a quarter more: 142 -> 256.
        assert_eq!(f.settings["net.netfilter.nf_conntrack_max"], 256);
        assert_eq!(f.fix[0], "sysctl -w net.netfilter.nf_conntrack_max=256");
        assert!(f.evidence[0].contains("+50"), "{:?}", f.evidence);
        assert_eq!(Severity::exit_code(findings.iter().map(|f| f.severity).max()), 2);
    }

    #[test]
    fn suggested_max_doubles_at_least_and_respects_memory() {
        assert_eq!(suggested_max(64, 64, 0, None, None), (128, false));
        assert_eq!(suggested_max(1000, 1000, 10_000, None, None), (16384, false));
        // 1 GiB at 12.5% is 128 MiB: 419,430 entries of 320 B, so 262,144.
        assert_eq!(suggested_max(262_144, 262_144, 1_000_000, Some(320), Some(1 << 30)), (262_144, true));
        assert_eq!(suggested_max(65_536, 65_536, 0, Some(320), Some(1 << 30)), (131_072, false));
    }

    #[test]
    fn a_random_source_flood_is_named() {
        let mut evidence = machine();
        let mut ns = namespace(64);
        ns.end.drop = 20_000;
        ns.drops.insert("table_full".into(), 20_000);
        ns.distinct_drop_sources = 19_800;
        evidence.namespaces.push(ns);
        let f = &diagnose(&evidence)[0];
        assert!(f.evidence.iter().any(|e| e.contains("random-source flood")), "{:?}", f.evidence);
    }

    #[test]
    fn dns_insert_race_is_named() {
        let mut evidence = machine();
        let mut ns = namespace(10);
        ns.end.insert_failed = 12;
        ns.insert_failed_ports = vec![PortCount { proto: Protocol::Udp, port: 53, count: 12 }];
        evidence.namespaces.push(ns);
        let f = diagnose(&evidence).into_iter().find(|f| f.id == "dns_insert_race").expect("dns finding");
        assert_eq!(f.severity, Severity::Warning);
        assert!(f.fix[0].contains("single-request-reopen"));
    }

    #[test]
    fn settled_races_are_information_named_by_port_or_by_the_table() {
        let mut evidence = machine();
        let mut ns = namespace(10);
        ns.end.clash_resolve = 40;
        ns.clash_ports = vec![PortCount { proto: Protocol::Udp, port: 53, count: 40 }];
        evidence.namespaces.push(ns.clone());
        let f = diagnose(&evidence).into_iter().find(|f| f.id == "dns_race_resolved").expect("dns race finding");
        assert_eq!(f.severity, Severity::Info);
        assert!(f.evidence[0].starts_with("clashres counter +40"), "{:?}", f.evidence);
        assert!(f.fix[0].contains("single-request-reopen"));
        // Another port: named generically, no resolver advice.
        ns.clash_ports = vec![PortCount { proto: Protocol::Udp, port: 4789, count: 40 }];
        evidence.namespaces[0] = ns.clone();
        let f = diagnose(&evidence).into_iter().find(|f| f.id == "clash_resolved").expect("clash finding");
        assert!(f.fix.is_empty());
        // No hooks: the table's top port decides.
        ns.clash_ports.clear();
        ns.census = Some(CensusSummary {
            entries: 10,
            by_port: vec![PortEntries { proto: Protocol::Udp, dport: 53, entries: 9, states: vec![] }],
            ..Default::default()
        });
        evidence.namespaces[0] = ns.clone();
        assert!(ids(&diagnose(&evidence)).contains(&"dns_race_resolved"));
        ns.end.clash_resolve = 0;
        evidence.namespaces[0] = ns;
        assert!(!ids(&diagnose(&evidence)).iter().any(|id| id.contains("resolved")));
    }

    #[test]
    fn time_wait_pile_up_gets_a_shorter_timeout_inside_the_namespace() {
        let mut evidence = machine();
        let mut ns = namespace(60);
        ns.census = Some(CensusSummary {
            entries: 60,
            by_state: [(ConnState::TimeWait, 55), (ConnState::Established, 5)].into(),
            ..Default::default()
        });
        ns.timeouts.insert("tcp_timeout_time_wait".into(), 120);
        evidence.namespaces.push(ns);
        let findings = diagnose(&evidence);
        let f = findings.iter().find(|f| f.id == "timeout_holds_slots").expect("timeout finding");
        assert_eq!(f.severity, Severity::Warning);
        assert_eq!(f.fix, ["ip netns exec srv sysctl -w net.netfilter.nf_conntrack_tcp_timeout_time_wait=30"]);
        assert_eq!(f.settings["net.netfilter.nf_conntrack_tcp_timeout_time_wait"], 30);
        // Already short: nothing to say.
        evidence.namespaces[0].timeouts.insert("tcp_timeout_time_wait".into(), 30);
        assert!(!ids(&diagnose(&evidence)).contains(&"timeout_holds_slots"));
    }

    #[test]
    fn a_local_service_filling_the_table_is_a_notrack_candidate() {
        let mut evidence = machine();
        evidence.max = Some(1000);
        let mut ns = namespace(950);
        ns.census = Some(CensusSummary {
            entries: 950,
            udp: 900,
            by_state: [(ConnState::None, 900), (ConnState::Established, 50)].into(),
            by_port: vec![PortEntries { proto: Protocol::Udp, dport: 53, entries: 900, states: vec![] }],
            ..Default::default()
        });
        ns.listeners = vec![(Protocol::Udp, 53)];
        ns.notrack_rules = Some(false);
        evidence.namespaces.push(ns.clone());
        let f = diagnose(&evidence).into_iter().find(|f| f.id == "notrack_candidate").expect("notrack finding");
        assert!(f
            .fix
            .iter()
            .any(|c| c == "ip netns exec srv nft add rule inet ctrace_notrack pre udp dport 53 notrack"));
        // Not a local service, or already untracked: no candidate.
        ns.listeners.clear();
        evidence.namespaces[0] = ns.clone();
        assert!(!ids(&diagnose(&evidence)).contains(&"notrack_candidate"));
        ns.listeners = vec![(Protocol::Udp, 53)];
        ns.notrack_rules = Some(true);
        evidence.namespaces[0] = ns;
        assert!(!ids(&diagnose(&evidence)).contains(&"notrack_candidate"));
    }

    #[test]
    fn small_hash_and_kernel_log() {
        let mut evidence = machine();
        evidence.max = Some(262_144);
        evidence.buckets = Some(16_384);
        evidence.kernel_log = Some(KernelLog { lines: 3, last_ago_s: Some(12.0) });
        let findings = diagnose(&evidence);
        let hash = findings.iter().find(|f| f.id == "hash_too_small").expect("hash finding");
        assert_eq!(hash.settings["nf_conntrack.hashsize"], 131_072);
        let log = findings.iter().find(|f| f.id == "kernel_log").expect("log finding");
        assert_eq!(log.severity, Severity::Info);
    }

    #[test]
    fn long_chains_get_a_bigger_hash() {
        let mut evidence = machine();
        evidence.max = Some(262_144);
        evidence.buckets = Some(262_144);
        let mut ns = namespace(10);
        ns.end.chain_too_long = 7;
        evidence.namespaces.push(ns);
        let f = diagnose(&evidence).into_iter().find(|f| f.id == "chains_too_long").expect("chains finding");
        assert_eq!(f.severity, Severity::Warning);
        assert_eq!(f.settings["nf_conntrack.hashsize"], 524_288);
    }

    #[test]
    fn near_full_says_when_it_will_be_full() {
        let mut evidence = machine();
        evidence.max = Some(1000);
        let mut ns = namespace(950);
        ns.start.entries = 900;
        evidence.namespaces.push(ns);
        let f = diagnose(&evidence).into_iter().find(|f| f.id == "near_full").expect("near full");
        // 50 entries in 5 s: 10/s, 50 left: 5 s.
        assert!(f.evidence[0].contains("full in about 5 s"), "{:?}", f.evidence);
    }
}
