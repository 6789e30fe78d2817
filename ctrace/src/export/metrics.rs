//! OpenMetrics text: the same families for a record file
//! (`record --format openmetrics`) and for a scrape of `ctrace serve`.
//! Every family is listed in docs/metrics.md.
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{
    aggregate::flood::FloodSummary,
    export::json::RecordFile,
    model::{ConnState, Protocol, Reason},
};

type Labels = Vec<(String, String)>;

/// Drops of one source key.
#[derive(Clone, Debug)]
pub struct SourceCount {
    pub netns: u32,
    pub src: std::net::IpAddr,
    pub dport: u16,
    pub proto: Protocol,
    pub state: ConnState,
    pub reason: Reason,
    pub drops: u64,
}

/// Decoded drops of one namespace for one reason.
#[derive(Clone, Debug)]
pub struct ReasonCount {
    pub netns: u32,
    pub name: Option<String>,
    /// What lives in the namespace ([`crate::workload::Workload::label`]).
    pub workload: Option<String>,
    pub reason: Reason,
    pub drops: u64,
}

/// The kernel's own counters of one namespace.
#[derive(Clone, Debug, Default)]
pub struct NetnsCounts {
    pub netns: u32,
    pub name: Option<String>,
    pub workload: Option<String>,
    pub drop: u64,
    pub insert_failed: u64,
    pub early_drop: u64,
    pub invalid: u64,
    pub entries: u64,
}

/// Everything the families are made from.
#[derive(Clone, Debug, Default)]
pub struct MetricsInput {
    /// Decoded drops per namespace and reason.
    pub drops: Vec<ReasonCount>,
    /// Exact kernel-side count of NETFILTER_DROP packets.
    pub netfilter_drops: u64,
    pub lost_events: u64,
    pub lost_conntrack_events: u64,
    /// Runs of ctrace's programs the kernel skipped (None: not counted).
    pub program_misses: Option<u64>,
    /// Per-source counters: only the top sources, to bound label cardinality.
    pub sources: Vec<SourceCount>,
    pub namespaces: Vec<NetnsCounts>,
    pub max: Option<u64>,
    /// A record file's duration; absent for a live scrape.
    pub duration_s: Option<f64>,
    /// Hook tiers: conntrack's own events by kind (exact, per-CPU counters).
    pub conntrack_events: Vec<(&'static str, u64)>,
    /// Distinct sources and the heaviest destinations (bounded series).
    pub flood: Option<FloodSummary>,
}

/// A namespace's labels; `workload` only where it is known (namespaces are
/// few, so it is bounded; sources never get one).
fn ns_labels(netns: u32, name: &Option<String>, workload: &Option<String>) -> Labels {
    let mut labels = vec![("netns".into(), netns.to_string()), ("netns_name".into(), name.clone().unwrap_or_default())];
    if let Some(workload) = workload {
        labels.push(("workload".into(), workload.clone()));
    }
    labels
}

fn counter_family(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Counter> {
    let family = Family::<Labels, Counter>::default();
    registry.register(name, help, family.clone());
    family
}

fn gauge_family(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Gauge> {
    let family = Family::<Labels, Gauge>::default();
    registry.register(name, help, family.clone());
    family
}

/// Encodes the families in the OpenMetrics text format (ends with `# EOF`).
pub fn encode_input(input: &MetricsInput) -> String {
    let mut registry = Registry::default();
    let drops = counter_family(&mut registry, "ctrace_drops", "Dropped packets attributed by ctrace, by reason");
    for d in &input.drops {
        let mut labels = ns_labels(d.netns, &d.name, &d.workload);
        labels.push(("reason".into(), d.reason.as_str().into()));
        drops.get_or_create(&labels).inc_by(d.drops);
    }
    let netfilter = Counter::<u64>::default();
    registry.register(
        "ctrace_netfilter_drops",
        "Packets the kernel freed with reason NETFILTER_DROP (exact, per-CPU counters)",
        netfilter.clone(),
    );
    netfilter.inc_by(input.netfilter_drops);
    let lost = Counter::<u64>::default();
    registry.register("ctrace_lost_events", "Drop records lost because the ring buffer was full", lost.clone());
    lost.inc_by(input.lost_events);
    let lost_ct = Counter::<u64>::default();
    registry.register(
        "ctrace_lost_conntrack_events",
        "Conntrack event records lost because the ring buffer was full (hook tiers)",
        lost_ct.clone(),
    );
    lost_ct.inc_by(input.lost_conntrack_events);
    if let Some(misses) = input.program_misses {
        let missed = Counter::<u64>::default();
        registry.register(
            "ctrace_program_misses",
            "Runs of ctrace's kernel programs the kernel skipped (another BPF program was running on that CPU): \
             their events are missing",
            missed.clone(),
        );
        missed.inc_by(misses);
    }

    let sources = counter_family(
        &mut registry,
        "ctrace_source_drops",
        "Drops per source key, for the top sources only (bounded label cardinality)",
    );
    for s in &input.sources {
        let labels: Labels = vec![
            ("netns".into(), s.netns.to_string()),
            ("src".into(), s.src.to_string()),
            ("dport".into(), s.dport.to_string()),
            ("proto".into(), s.proto.to_string()),
            ("state".into(), s.state.to_string()),
            ("reason".into(), s.reason.as_str().into()),
        ];
        sources.get_or_create(&labels).inc_by(s.drops);
    }

    let kernel = [
        ("ctrace_conntrack_drop", "The namespace's own nf_conntrack `drop` counter"),
        ("ctrace_conntrack_insert_failed", "The namespace's own nf_conntrack `insert_failed` counter"),
        ("ctrace_conntrack_early_drop", "The namespace's own nf_conntrack `early_drop` counter"),
        ("ctrace_conntrack_invalid", "The namespace's own nf_conntrack `invalid` counter"),
    ]
    .map(|(name, help)| counter_family(&mut registry, name, help));
    let entries = gauge_family(&mut registry, "ctrace_conntrack_entries", "Entries in the namespace's conntrack table");
    for ns in &input.namespaces {
        let labels = ns_labels(ns.netns, &ns.name, &ns.workload);
        for (family, value) in kernel.iter().zip([ns.drop, ns.insert_failed, ns.early_drop, ns.invalid]) {
            family.get_or_create(&labels).inc_by(value);
        }
        entries.get_or_create(&labels).set(ns.entries as i64);
    }
    if !input.conntrack_events.is_empty() {
        let events = counter_family(
            &mut registry,
            "ctrace_conntrack_events",
            "Conntrack's own events seen by the hooks (kprobe/fentry tiers): insert, insert_failed, \
             clash_resolved, early_drop, delete, table_full, alloc_failed, invalid (with --invalid)",
        );
        for (event, n) in &input.conntrack_events {
            events.get_or_create(&vec![("event".to_string(), event.to_string())]).inc_by(*n);
        }
    }
    if let Some(flood) = &input.flood {
        encode_flood(&mut registry, flood);
    }
    if let Some(max) = input.max {
        let gauge = Gauge::<i64>::default();
        registry.register("ctrace_conntrack_max", "nf_conntrack_max (one value for all namespaces)", gauge.clone());
        gauge.set(max as i64);
    }
    if let Some(duration) = input.duration_s {
        let gauge = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register("ctrace_record_duration_seconds", "Length of the recording", gauge.clone());
        gauge.set(duration);
    }
    let mut out = String::new();
    encode(&mut out, &registry).expect("writing to a String cannot fail");
    sorted_samples(&out)
}

/// Distinct sources, and per destination its drops, distinct sources and
/// whether it looks like a random-source flood.
fn encode_flood(registry: &mut Registry, flood: &FloodSummary) {
    let distinct = Gauge::<i64>::default();
    registry.register(
        "ctrace_distinct_sources",
        "Distinct source addresses among the drops, estimated (HyperLogLog, relative standard error 1.6%)",
        distinct.clone(),
    );
    distinct.set(flood.distinct_sources as i64);
    let drops = counter_family(
        registry,
        "ctrace_destination_drops",
        "Drops per destination, for the heaviest destinations only (bounded label cardinality)",
    );
    let sources = gauge_family(
        registry,
        "ctrace_destination_distinct_sources",
        "Distinct sources of the drops per destination, estimated",
    );
    let random = gauge_family(
        registry,
        "ctrace_destination_random_source_flood",
        "1 when most drops to the destination come from sources seen once (a random-source flood)",
    );
    for d in &flood.destinations {
        let labels: Labels = vec![
            ("netns".into(), d.netns.to_string()),
            ("dst".into(), d.dst.to_string()),
            ("dport".into(), d.dport.to_string()),
            ("proto".into(), d.proto.to_string()),
        ];
        drops.get_or_create(&labels).inc_by(d.drops);
        sources.get_or_create(&labels).set(d.distinct_sources as i64);
        random.get_or_create(&labels).set(i64::from(d.random_sources));
    }
}

/// Families keep samples in hash order; sort each family's samples so the
/// output is the same for the same state (diffable, testable).
fn sorted_samples(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut samples: Vec<&str> = Vec::new();
    let flush = |samples: &mut Vec<&str>, out: &mut String| {
        samples.sort_unstable();
        for line in samples.drain(..) {
            out.push_str(line);
            out.push('\n');
        }
    };
    for line in text.lines() {
        if line.starts_with('#') {
            flush(&mut samples, &mut out);
            out.push_str(line);
            out.push('\n');
        } else {
            samples.push(line);
        }
    }
    flush(&mut samples, &mut out);
    out
}

/// The record's totals as metrics: counters count over the recording.
pub fn from_record(record: &RecordFile, top: usize) -> String {
    let name = |netns: u32| record.kernel_counters.iter().find(|c| c.netns == netns).and_then(|c| c.name.clone());
    let workload = |netns: u32| record.workloads.iter().find(|w| w.netns == netns).map(|w| w.workload.label());
    // Rows and the drops of sources without a row: exact per reason.
    let mut drops: Vec<ReasonCount> = Vec::new();
    let counted = record.sources.iter().map(|s| (s.netns, s.reason, s.drops));
    for (netns, reason, n) in counted.chain(record.others.iter().map(|o| (o.netns, o.reason, o.drops))) {
        match drops.iter_mut().find(|d| d.netns == netns && d.reason == reason) {
            Some(d) => d.drops += n,
            None => drops.push(ReasonCount { netns, name: name(netns), workload: workload(netns), reason, drops: n }),
        }
    }
    drops.sort_by_key(|d| (d.netns, d.reason));
    let input = MetricsInput {
        drops,
        netfilter_drops: record.totals.kernel.netfilter_drops,
        lost_events: record.totals.lost_events,
        lost_conntrack_events: record.totals.kernel.lost_conntrack_events,
        program_misses: record.totals.kernel.program_misses,
        sources: record
            .sources
            .iter()
            .take(top)
            .map(|s| SourceCount {
                netns: s.netns,
                src: s.src,
                dport: s.dport,
                proto: s.proto,
                state: s.state,
                reason: s.reason,
                drops: s.drops,
            })
            .collect(),
        namespaces: record
            .kernel_counters
            .iter()
            .map(|c| NetnsCounts {
                netns: c.netns,
                name: c.name.clone(),
                workload: workload(c.netns),
                drop: c.drop,
                insert_failed: c.insert_failed,
                early_drop: c.early_drop,
                invalid: c.invalid,
                entries: c.entries,
            })
            .collect(),
        max: record.kernel_counters.iter().find_map(|c| c.max),
        duration_s: Some(record.duration_s),
        conntrack_events: record.totals.conntrack.as_ref().map(|c| c.named().to_vec()).unwrap_or_default(),
        flood: record.flood.clone(),
    };
    encode_input(&input)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_and_labels() {
        let text = from_record(&crate::export::tests::fixture(), 2);
        assert!(text.ends_with("# EOF\n"));
        assert!(text.contains("# TYPE ctrace_drops counter"));
        assert!(
            text.contains(
                "ctrace_drops_total{netns=\"4026532177\",netns_name=\"srv\",workload=\"container server (podman)\",\
                 reason=\"table_full\"} 50"
            ),
            "{text}"
        );
        let per_source = text.lines().filter(|l| l.starts_with("ctrace_source_drops_total{")).count();
        // Drops of sources without a row count in their reason's total.
        let mut approximate = crate::export::tests::fixture();
        approximate.others.push(crate::export::json::Others {
            netns: 4026532177,
            reason: Reason::TableFull,
            drops: 7,
            histogram: crate::aggregate::Histogram { bucket_ms: 1000, counts: vec![7] },
        });
        let with_others = from_record(&approximate, 2);
        assert!(
            with_others
                .contains("ctrace_drops_total{netns=\"4026532177\",netns_name=\"srv\",workload=\"container server (podman)\",reason=\"table_full\"} 57"),
            "{with_others}"
        );
        assert_eq!(per_source, 2, "only the top sources get labels");
        let namespace = "netns=\"4026532177\",netns_name=\"srv\",workload=\"container server (podman)\"";
        assert!(text.contains(&format!("ctrace_conntrack_drop_total{{{namespace}}} 50")), "{text}");
        // The namespace's workload, never a source's: per-source series stay bounded.
        assert!(text.lines().filter(|l| l.starts_with("ctrace_source_drops_total{")).all(|l| !l.contains("workload=")));
    }
}
