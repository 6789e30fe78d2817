use std::net::{IpAddr, Ipv4Addr};

use super::*;
use crate::{
    census::PortEntries,
    doctor::evidence::{CensusSummary, EntrySize, KernelLog},
    model::{ConnState, Protocol},
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
    assert!(f.fix.iter().any(|c| c == "ip netns exec srv nft add rule inet ctrace_notrack pre udp dport 53 notrack"));
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
