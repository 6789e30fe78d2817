//! Conntrack's own events on the kprobe tier, against the kernel's counters.
//! They need kprobes: on a kernel without them (this project's development
//! machines) the tests say so and return; `cargo xtask vm-test` runs them in
//! Debian guest kernels.
use std::{net::Ipv4Addr, process::Command, time::Duration};

use ctrace_tests::{ctrace_bin, require_root, Lab, Recording, Sysctl, TempDir};
use serde_json::Value;

const EVICTEE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 6);
const NEWCOMER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 7);
const OPEN_PORT: u16 = 8080;
const SINK_PORT: u16 = 9;
const TABLE_MAX: u64 = 64;

fn kprobes() -> bool {
    let found = std::path::Path::new("/sys/bus/event_source/devices/kprobe").exists();
    if !found {
        eprintln!("SKIPPED: this kernel has no kprobes; this test runs in the guest kernels (cargo xtask vm-test)");
    }
    found
}

fn events<'a>(record: &'a Value, event: &str) -> Vec<&'a Value> {
    record["conntrack_events"].as_array().expect("conntrack_events").iter().filter(|e| e["event"] == event).collect()
}

/// A table full of unreplied flows (UDP datagrams nobody answers: not
/// assured, so evictable), then new flows: early drop evicts old entries to
/// make room.
#[test]
fn early_drops_name_the_evicted_entries_and_match_the_kernel() {
    require_root();
    if !kprobes() {
        return;
    }
    let lab = Lab::new("early", &[EVICTEE, NEWCOMER]).expect("lab");
    lab.track_connections("ctrace_early").unwrap();
    let _listener = lab.listen(OPEN_PORT).unwrap();
    let _sink = lab.udp_sink(SINK_PORT).unwrap();
    let out = TempDir::new("early");
    let recording = Recording::start(&out.0.join("r.json"), &["--tier", "kprobe"]).expect("ctrace record");
    let before = lab.server.conntrack_stat().unwrap();

    // Few buckets, so early drop's scan of a handful of them finds victims.
    let buckets = Sysctl::set("net.netfilter.nf_conntrack_buckets", "64").unwrap();
    let max = Sysctl::set("net.netfilter.nf_conntrack_max", &TABLE_MAX.to_string()).unwrap();
    let mut sent = 0;
    while lab.server.conntrack_stat().unwrap().entries < TABLE_MAX && sent < 4 * TABLE_MAX {
        lab.udp_send(EVICTEE, SINK_PORT).unwrap();
        sent += 1;
    }
    assert_eq!(lab.server.conntrack_stat().unwrap().entries, TABLE_MAX, "could not fill the table");
    let held: Vec<_> =
        (0..40).filter_map(|_| lab.connect(NEWCOMER, OPEN_PORT, Duration::from_millis(300)).ok()).collect();
    let after = lab.server.conntrack_stat().unwrap();
    drop(max);
    drop(buckets);
    std::thread::sleep(Duration::from_millis(200));
    let record = recording.stop().expect("record");
    drop(held);

    let kernel_early = after.early_drop - before.early_drop;
    eprintln!("kernel: {kernel_early} early drops; {} drops", after.drop - before.drop);
    assert!(kernel_early > 0, "no early drop happened: the test could not exercise the hook");
    assert_eq!(record["totals"]["conntrack"]["early_drop"], kernel_early, "exact hook count vs the kernel");
    let evicted = events(&record, "early_drop");
    let total: u64 = evicted.iter().map(|e| e["count"].as_u64().unwrap()).sum();
    assert_eq!(total, kernel_early, "per-source early drops vs the kernel: {evicted:#?}");
    for e in &evicted {
        assert_eq!(e["src"], EVICTEE.to_string(), "only the unreplied flows are evictable: {e}");
        assert_eq!(e["dport"], SINK_PORT);
        assert_eq!(e["proto"], "udp");
    }
    // The evicted entries' lifetimes (UDP: no TCP state), all inserted while recording.
    let lifetimes = record["lifetimes"].as_array().unwrap();
    let none = lifetimes.iter().find(|l| l["state"] == "NONE").expect("lifetimes of the UDP entries");
    assert!(none["entries"].as_u64().unwrap() >= kernel_early, "{none}");
    // Each newcomer that got in was inserted; the evictee's entries were too.
    let inserted = |src: Ipv4Addr| -> u64 {
        events(&record, "insert")
            .iter()
            .filter(|e| e["src"] == src.to_string())
            .map(|e| e["count"].as_u64().unwrap())
            .sum()
    };
    assert!(inserted(EVICTEE) >= TABLE_MAX, "the filling entries were inserted");
    assert_eq!(inserted(NEWCOMER), kernel_early, "every eviction made room for one newcomer");
}

/// On a machine without kprobes, `ctrace probes` says which hooks are off
/// and why; with them, that the conntrack hooks attach.
#[test]
fn probes_explains_every_hook() {
    require_root();
    let out = Command::new(ctrace_bin()).args(["probes", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let hooks = report["hooks"].as_array().unwrap();
    let names: Vec<&str> = hooks.iter().map(|h| h["hook"].as_str().unwrap()).collect();
    assert_eq!(names, ["drops", "table_full", "insert", "delete"]);
    assert_eq!(hooks[0]["tier"], "tracepoint");
    if std::path::Path::new("/sys/bus/event_source/devices/kprobe").exists() {
        // Conntrack may not be loaded yet; either it attached, or the reason says so.
        for h in &hooks[1..] {
            let attached = h["tier"] == "kprobe" || h["tier"] == "fentry";
            assert!(attached || h["detail"].as_str().unwrap().contains("not loaded"), "{h}");
        }
    } else {
        // Without kprobes, only fentry could attach (where the kernel allows it).
        assert!(report["tier"] == "tracepoint" || report["tier"] == "fentry", "{report}");
        for h in hooks[1..].iter().filter(|h| h["tier"].is_null()) {
            assert!(h["detail"].as_str().unwrap().contains("no kprobes"), "the reason is given: {h}");
        }
    }
}

/// Failed insertions, made deterministic: with the fewest hash buckets the
/// kernel allows (one page: 512) and 60,000 entries, chains average over 100
/// entries, longer than `__nf_conntrack_confirm` accepts (50 to 80): new
/// entries are refused ("chain too long", counted as insert_failed, the
/// packet dropped).
#[test]
fn failed_insertions_match_the_kernels_insert_failed_counter() {
    require_root();
    if !kprobes() {
        return;
    }
    const SOURCE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 8);
    let lab = Lab::new("clash", &[SOURCE]).expect("lab");
    lab.track_connections("ctrace_clash").unwrap();
    let out = TempDir::new("clash");
    let recording = Recording::start(&out.0.join("r.json"), &["--tier", "kprobe"]).expect("ctrace record");
    let before = lab.server.conntrack_stat().unwrap();
    let buckets = Sysctl::set("net.netfilter.nf_conntrack_buckets", "1").unwrap();
    let max = Sysctl::set("net.netfilter.nf_conntrack_max", "200000").unwrap();
    let sent = lab.udp_spray(SOURCE, 1..=60_000).unwrap();
    let after = lab.server.conntrack_stat().unwrap();
    drop(max);
    drop(buckets);
    eprintln!("sent {sent} datagrams; {} entries", after.entries);
    std::thread::sleep(Duration::from_millis(500));
    let record = recording.stop().expect("record");

    let kernel_failed = after.insert_failed - before.insert_failed;
    eprintln!("kernel: {kernel_failed} failed insertions");
    assert!(kernel_failed > 0, "no insertion failed: the test could not exercise the hook");
    assert_eq!(record["totals"]["conntrack"]["insert_failed"], kernel_failed, "exact hook count vs the kernel");
    let failed = events(&record, "insert_failed");
    let total: u64 = failed.iter().map(|e| e["count"].as_u64().unwrap()).sum();
    assert_eq!(total, kernel_failed, "per-source failed insertions vs the kernel: {failed:#?}");
    assert!(failed.iter().all(|e| e["src"] == SOURCE.to_string() && e["proto"] == "udp"), "{failed:#?}");
    assert_eq!(record["totals"]["lost_events"], 0, "lost events would make the per-source count short");
    // The refused packets were dropped: conntrack's drops, not a rule's.
    assert_eq!(record["totals"]["insert_failed"], kernel_failed, "drops marked insert_failed");
    assert_eq!(record["totals"]["ruleset"], 0, "no rule dropped anything here");
}
