//! A readable report of a record: what happened, checked against the kernel.
use std::fmt::Write as _;

use crate::{
    aggregate::flood::{FloodSummary, PREFIX_SHARE},
    export::json::{rfc3339_utc, RecordFile},
    model::Reason,
};

/// The second of the first drop, from the histograms (None: no drops).
pub fn first_drop_offset_s(record: &RecordFile) -> Option<f64> {
    record
        .sources
        .iter()
        .filter_map(|s| {
            let i = s.histogram.counts.iter().position(|n| *n > 0)?;
            Some(i as f64 * s.histogram.bucket_ms as f64 / 1000.0)
        })
        .min_by(f64::total_cmp)
}

/// The busiest second of a source, in drops per second.
fn peak_rate(counts: &[u64], bucket_ms: u64) -> f64 {
    counts.iter().copied().max().unwrap_or(0) as f64 * 1000.0 / bucket_ms.max(1) as f64
}

pub fn render(record: &RecordFile, top: usize) -> String {
    let mut out = String::new();
    let t = &record.totals;
    let _ = writeln!(out, "ctrace report");
    let _ = writeln!(
        out,
        "  host {} · kernel {} · tier {} · {} + {:.1} s",
        record.hostname, record.kernel, record.tier, record.started_at, record.duration_s
    )
    .map(|_| ());
    let conntrack = t.table_full + t.conntrack_other + t.insert_failed;
    match first_drop_offset_s(record) {
        Some(offset) => {
            let at = rfc3339_utc(record.started_unix() + offset as u64);
            let _ = writeln!(out, "  first drop: {at} (+{offset:.0} s)");
        }
        None => {
            let _ = writeln!(out, "  no drops recorded");
        }
    }

    let _ = writeln!(out, "\nTOTALS");
    let _ = writeln!(out, "  table_full        {:>10}", t.table_full);
    let _ = writeln!(out, "  conntrack_other   {:>10}", t.conntrack_other);
    if t.insert_failed > 0 {
        let _ = writeln!(out, "  insert_failed     {:>10}", t.insert_failed);
    }
    let _ = writeln!(out, "  ruleset           {:>10}", t.ruleset);
    let _ = writeln!(
        out,
        "  lost events       {:>10}{}",
        t.lost_events,
        if t.lost_events > 0 { "  (per-source counts are short by this many)" } else { "" }
    );
    match t.kernel.program_misses {
        Some(0) => {}
        Some(misses) => {
            let _ = writeln!(
                out,
                "  missed runs       {misses:>10}  (the kernel skipped ctrace's programs: events missing)"
            );
        }
        None if record.tier != crate::hooks::Tier::Tracepoint => {
            let _ = writeln!(out, "  missed runs       {:>10}  (this kernel does not count skipped kprobe runs)", "?");
        }
        None => {}
    }
    let accounted = t.table_full + t.conntrack_other + t.insert_failed + t.ruleset + t.undecodable + t.lost_events;
    let _ = writeln!(
        out,
        "  kernel saw        {:>10}  NETFILTER_DROP packets ({}; {} without a conntrack entry)",
        t.kernel.netfilter_drops,
        if accounted == t.kernel.netfilter_drops { "all accounted for" } else { "MISMATCH with the sum above" },
        t.kernel.netfilter_drops_no_entry
    );

    let _ = writeln!(out, "\nAGAINST THE KERNEL'S COUNTERS (per namespace, over the recording)");
    if record.kernel_counters.is_empty() {
        let _ = writeln!(out, "  no namespace's counters moved");
    }
    let mut total_kernel_drop = 0;
    for c in &record.kernel_counters {
        let conntrack_drop = |netns: u32, reason: Reason| netns == c.netns && reason != Reason::Ruleset;
        let ours: u64 =
            record.sources.iter().filter(|s| conntrack_drop(s.netns, s.reason)).map(|s| s.drops).sum::<u64>()
                + record.others.iter().filter(|o| conntrack_drop(o.netns, o.reason)).map(|o| o.drops).sum::<u64>();
        total_kernel_drop += c.drop;
        let verdict = if ours == c.drop { "match" } else { "differ" };
        let name = c.name.clone().unwrap_or_else(|| "?".into());
        let name = match record.workload_of(c.netns) {
            Some(w) => format!("{name} [{}]", w.label()),
            None => name,
        };
        let _ = writeln!(
            out,
            "  {name} ({}): kernel drop {} vs ctrace conntrack drops {ours}: {verdict}; insert_failed {}, \
             early_drop {}, invalid {}, clashres {}",
            c.netns, c.drop, c.insert_failed, c.early_drop, c.invalid, c.clash_resolve
        );
        let max = c.max.map_or("?".into(), |m| m.to_string());
        let peak = c.occupancy_peak.map_or("not sampled".into(), |p| format!("{}/{}", p.entries, p.max));
        let refusal = c
            .at_table_full
            .map_or(String::new(), |t| format!("; at the kernel's last refusal {}/{}", t.entries, t.max));
        let _ = writeln!(out, "      entries at end {}/{max}; fullest seen {peak}{refusal}", c.entries);
    }
    if record.kernel_counters.len() > 1 {
        let _ = writeln!(out, "  all namespaces: kernel drop {total_kernel_drop} vs ctrace {conntrack}");
    }

    if let Some(flood) = &record.flood {
        let _ = writeln!(out, "\nDESTINATIONS AND SOURCE PREFIXES");
        let name = |netns: u32| record.kernel_counters.iter().find(|c| c.netns == netns).and_then(|c| c.name.clone());
        for line in flood_lines(flood, name, top) {
            let _ = writeln!(out, "  {line}");
        }
    }

    let _ = writeln!(out, "\nTOP SOURCES");
    let _ = writeln!(
        out,
        "  {:<40} {:>5} {:<5} {:<11} {:<15} {:>8} {:>6} {:>8}  WORKLOAD",
        "SOURCE", "DPORT", "PROTO", "STATE", "REASON", "DROPS", "SHARE", "PEAK/S"
    );
    let others: u64 = record.others.iter().map(|o| o.drops).sum();
    let all: u64 = record.sources.iter().map(|s| s.drops).sum::<u64>() + others;
    for s in record.sources.iter().take(top) {
        let _ = writeln!(
            out,
            "  {:<40} {:>5} {:<5} {:<11} {:<15} {:>8} {:>5.1}% {:>8.0}  {}",
            s.src.to_string(),
            s.dport,
            s.proto.to_string(),
            s.state.to_string(),
            s.reason.as_str(),
            s.drops,
            if all == 0 { 0.0 } else { 100.0 * s.drops as f64 / all as f64 },
            peak_rate(&s.histogram.counts, s.histogram.bucket_ms),
            record.workload_column(s)
        );
    }
    let rest = record.sources.len().saturating_sub(top);
    if rest > 0 {
        let hidden: u64 = record.sources.iter().skip(top).map(|s| s.drops).sum();
        let _ = writeln!(out, "  ... {rest} more rows with {hidden} drops");
    }
    for o in &record.others {
        let _ = writeln!(
            out,
            "  {:<40} {:>5} {:<5} {:<11} {:<15} {:>8} {:>5.1}%",
            "(sources without a row)",
            "",
            "",
            "",
            o.reason.as_str(),
            o.drops,
            if all == 0 { 0.0 } else { 100.0 * o.drops as f64 / all as f64 }
        );
    }
    if let Some(a) = &record.approximate {
        let _ = writeln!(
            out,
            "  approximate: more sources than the {} rows kept ({} replaced); each row's drops are short by at \
             most {}, and every source with more than 1/{} of the drops has a row",
            a.capacity, a.evictions, a.error_bound, a.capacity
        );
    }

    if let Some(ct) = &record.totals.conntrack {
        let _ = writeln!(out, "\nCONNTRACK EVENTS (hook tier, exact)");
        let counts: Vec<String> = ct.named().iter().map(|(name, n)| format!("{name} {n}")).collect();
        let _ = writeln!(out, "  {}", counts.join(" · "));
        for row in record.conntrack_events.iter().take(top) {
            let event = row.event.name();
            let _ = writeln!(
                out,
                "  {:<40} {:>5} {:<5} {:<11} {:<14} {:>8}",
                row.src.to_string(),
                row.dport,
                row.proto.to_string(),
                row.state.to_string(),
                event,
                row.count
            );
        }
        for l in &record.lifetimes {
            let bins: Vec<String> = l
                .bins
                .iter()
                .filter(|b| b.entries > 0)
                .map(|b| format!("[{}, {}) s: {}", b.from_s, b.to_s, b.entries))
                .collect();
            let _ = writeln!(out, "  lifetimes, final state {}: {} entries; {}", l.state, l.entries, bins.join(", "));
        }
    }
    if !record.rate_histogram.is_empty() {
        let _ = writeln!(out, "\nSOURCES BY AVERAGE DROP RATE (drops/s)");
        // From the first occupied bin: the empty slow ones say nothing.
        for bin in record.rate_histogram.iter().skip_while(|b| b.sources == 0) {
            let _ = writeln!(
                out,
                "  [{:>6}, {:>6})  {:>6} {}",
                bin.from,
                bin.to,
                bin.sources,
                "#".repeat(bin.sources.min(60) as usize)
            );
        }
    }
    if !record.notes.is_empty() {
        let _ = writeln!(out, "\nNOTES");
        for note in &record.notes {
            let _ = writeln!(out, "  {note}");
        }
    }
    out
}

/// Where the drops go and how many sources send them: the answer when
/// sources are too many to list. A random-source flood comes first, as a
/// line that starts with `!!`.
pub fn flood_lines(flood: &FloodSummary, netns_name: impl Fn(u32) -> Option<String>, max_rows: usize) -> Vec<String> {
    if flood.drops == 0 {
        return vec!["no drops yet".into()];
    }
    let mut lines = Vec::new();
    if let Some(verdict) = &flood.verdict {
        lines.push(format!("!! {verdict}"));
    }
    lines.push(format!(
        "about {} distinct sources (±{:.0}%) in {} drops",
        flood.distinct_sources,
        200.0 * flood.relative_error,
        flood.drops
    ));
    lines.push(format!("{:<30} {:<22} {:>9} {:>9}", "DESTINATION", "NETNS", "DROPS", "SOURCES"));
    for d in flood.destinations.iter().take(max_rows) {
        let name = netns_name(d.netns);
        lines.push(format!(
            "{:<30} {:<22} {:>9} {:>9}{}",
            d.endpoint(),
            name.unwrap_or_else(|| d.netns.to_string()),
            d.drops,
            d.distinct_sources,
            if d.random_sources { "  random sources" } else { "" }
        ));
    }
    let prefixes: Vec<String> =
        flood.prefixes.iter().map(|p| format!("{} {:.1}%", p.prefix, 100.0 * p.share)).collect();
    lines.push(if prefixes.is_empty() {
        format!("no source prefix (/8 /16 /24, /32 /48 /64) has {:.0}% of the drops", 100.0 * PREFIX_SHARE)
    } else {
        format!("source prefixes with {:.0}%+ of the drops: {}", 100.0 * PREFIX_SHARE, prefixes.join(", "))
    });
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_checks_against_the_kernel() {
        let record = crate::export::tests::fixture();
        let text = render(&record, 5);
        assert!(text.contains("kernel drop 50 vs ctrace conntrack drops 50: match"), "{text}");
        assert!(text.contains("all accounted for"), "{text}");
        assert!(text.contains("first drop:"), "{text}");
        assert!(text.contains("198.18.0.3"), "{text}");
        assert_eq!(first_drop_offset_s(&record), Some(0.0));
    }
}
