//! Plain-text and JSON-lines snapshots, for pipes and `ssh host ctrace live | tee`.
use std::fmt::Write as _;

use serde::Serialize;

use crate::{
    aggregate::{occupancy::TimeToFull, window::sparkline},
    live::{query::Query, state::Snapshot, Header},
};

/// `12.0`, `1.2k`, `3.4M`: rates and counts in a narrow column.
pub fn short(n: f64) -> String {
    match n {
        n if n >= 1e6 => format!("{:.1}M", n / 1e6),
        n if n >= 1e4 => format!("{:.1}k", n / 1e3),
        n if n >= 100.0 || n == n.trunc() => format!("{n:.0}"),
        n => format!("{n:.1}"),
    }
}

pub fn time_to_full(ttf: TimeToFull) -> String {
    match ttf {
        TimeToFull::Full => "FULL".into(),
        TimeToFull::Never => "not filling".into(),
        TimeToFull::In(s) if s < 120.0 => format!("full in {s:.0}s"),
        TimeToFull::In(s) if s < 7200.0 => format!("full in {:.0}m", s / 60.0),
        TimeToFull::In(s) => format!("full in {:.1}h", s / 3600.0),
    }
}

/// A text bar of `width` cells for a percentage.
pub fn bar(percent: f64, width: usize) -> String {
    let filled = ((percent / 100.0) * width as f64).round().clamp(0.0, width as f64) as usize;
    format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled))
}

pub fn netns_label(name: Option<&str>, inum: u32) -> String {
    match name {
        Some(name) => format!("{name} ({inum})"),
        None => inum.to_string(),
    }
}

/// The whole snapshot as text, the same content as the terminal view.
pub fn render(header: &Header, snap: &Snapshot, query: &Query) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "ctrace live · {} · kernel {} · up {:.0}s · {}",
        header.host, header.kernel, snap.uptime_s, header.tier
    );
    for line in &header.hooks {
        let _ = writeln!(out, "  {line}");
    }
    let max = snap.max.map_or("?".into(), |m| m.to_string());
    let buckets = snap.buckets.map_or("?".into(), |b| b.to_string());
    let warn = if snap.buckets_too_few { "  (buckets < max/4: long hash chains when full)" } else { "" };
    let _ = writeln!(out, "\nTABLES  nf_conntrack_max {max}  buckets {buckets}{warn}");
    if snap.namespaces.is_empty() {
        let _ = writeln!(out, "  no namespace has conntrack entries");
    }
    for ns in &snap.namespaces {
        let _ = writeln!(
            out,
            "  {:<34} {} {}/{} {:.1}%  {:+.1}/s  {}",
            netns_label(ns.name.as_deref(), ns.netns),
            bar(ns.percent, 20),
            ns.entries,
            ns.max,
            ns.percent,
            ns.rate_per_s,
            time_to_full(ns.time_to_full)
        );
    }
    let _ = writeln!(out, "\nRATES (per second; last minute)");
    for s in &snap.series {
        let _ = writeln!(
            out,
            "  {:<18} {:>8}/s  total {:<10} {}",
            s.name,
            short(s.per_s),
            s.total,
            sparkline(s.history.iter().copied())
        );
    }
    if snap.kernel.lost_conntrack_events > 0 {
        let _ = writeln!(
            out,
            "  !! {} conntrack events lost (ring buffer full): who-fills counts are short",
            snap.kernel.lost_conntrack_events
        );
    }
    if snap.kernel.lost_events > 0 {
        let _ = writeln!(
            out,
            "  !! {} events lost (ring buffer full): per-source counts are short",
            snap.kernel.lost_events
        );
    }
    if let Some(misses @ 1..) = snap.kernel.program_misses {
        let _ = writeln!(
            out,
            "  !! {misses} program runs skipped by the kernel (another BPF program was running on that CPU): \
             hook events are missing"
        );
    }
    let _ = writeln!(out, "\nDESTINATIONS AND SOURCE PREFIXES");
    for line in flood_lines(snap, query.limit) {
        let _ = writeln!(out, "  {line}");
    }
    let filter = if query.filter.is_empty() { "none".to_string() } else { query.filter.text().to_string() };
    let _ = writeln!(
        out,
        "\nTOP DROPPED (by {}, filter: {filter}; {} of {} rows)",
        query.sort.label(),
        snap.top.len(),
        snap.matching_rows
    );
    let _ = writeln!(
        out,
        "  {:<24} {:>5} {:<5} {:<11} {:<15} {:<22} {:>8} {:>8} {:>6} {:>6}  WORKLOAD",
        "SOURCE", "DPORT", "PROTO", "STATE", "REASON", "NETNS", "DROPS/S", "TOTAL", "SHARE", "LAST"
    );
    for row in &snap.top {
        let src = row.src_name.as_ref().map_or(row.src.to_string(), |n| format!("{n} ({})", row.src));
        let _ = writeln!(
            out,
            "  {:<24} {:>5} {:<5} {:<11} {:<15} {:<22} {:>8} {:>8} {:>5.1}% {:>5.0}s  {}",
            src,
            row.dport,
            row.proto.to_string(),
            row.state.to_string(),
            row.reason.as_str(),
            row.netns_name.clone().unwrap_or_else(|| row.netns.to_string()),
            short(row.per_s),
            row.total,
            row.share * 100.0,
            row.last_seen_s,
            row.workload_column()
        );
    }
    if snap.others > 0 {
        let _ = writeln!(out, "  others: {} drops in rows not shown", snap.others);
    }
    if snap.evictions > 0 || snap.declined > 0 {
        let _ = writeln!(
            out,
            "  approximate: more than {} sources seen; counts may be over by up to {}; \
             {} drops of sources seen once are in no row",
            snap.capacity, snap.error_bound, snap.declined
        );
    }
    let _ = writeln!(out, "\nWHO FILLS THE TABLE");
    for line in fills_lines(header, snap, usize::MAX) {
        let _ = writeln!(out, "  {line}");
    }
    out
}

/// The destinations panel: [`crate::export::text::flood_lines`] with the
/// namespaces' names.
pub fn flood_lines(snap: &Snapshot, max_rows: usize) -> Vec<String> {
    let name = |netns: u32| snap.namespaces.iter().find(|n| n.netns == netns).and_then(|n| n.name.clone());
    crate::export::text::flood_lines(&snap.flood, name, max_rows)
}

/// The kernel's table counted by source and state (every tier).
fn census_lines(census: &crate::live::state::CensusView, max_rows: usize) -> Vec<String> {
    let mut lines = vec![format!(
        "{:<24} {:<5} {:<22} {:>8} {:>8} {:>8}  {}",
        "SOURCE", "PROTO", "NETNS", "ENTRIES", "INSERTED", "REMOVED", "BY STATE"
    )];
    let dash = |v: Option<u64>| v.map_or("-".to_string(), |n| n.to_string());
    for row in census.rows.iter().take(max_rows) {
        let states: Vec<String> = row.states.iter().take(3).map(|(s, n)| format!("{s} {n}")).collect();
        lines.push(format!(
            "{:<24} {:<5} {:<22} {:>8} {:>8} {:>8}  {}",
            row.src.to_string(),
            row.proto.to_string(),
            row.netns_name.clone().unwrap_or_else(|| row.netns.to_string()),
            row.entries,
            dash(row.inserted),
            dash(row.removed),
            states.join(", ")
        ));
    }
    let states: Vec<String> = census.by_state.iter().map(|(s, n)| format!("{s} {n}")).collect();
    let note = if census.truncated {
        " (first 500,000 entries of a larger table)".to_string()
    } else if crate::census::is_short(census.entries, census.kernel_entries) {
        format!(
            " (listed of {}: the kernel's listing skips entries when the table changes while it is read)",
            census.kernel_entries.unwrap_or_default()
        )
    } else {
        String::new()
    };
    lines.push(format!("{} entries by state: {}{note}", census.entries, states.join(", ")));
    lines
}

/// The "who fills the table" panel as lines: entries inserted since ctrace
/// started, per source, with how many are still there; or why it is empty.
pub fn fills_lines(header: &Header, snap: &Snapshot, max_rows: usize) -> Vec<String> {
    if let Some(census) = snap.census.as_ref().filter(|c| !c.rows.is_empty()) {
        return census_lines(census, max_rows);
    }
    let Some(fills) = snap.fills.as_ref().filter(|f| !f.rows.is_empty()) else {
        return vec![header.fills_note.clone()];
    };
    let mut lines = vec![format!(
        "{:<24} {:>5} {:<5} {:<22} {:>8} {:>8} {:>8} {:>8}",
        "SOURCE", "DPORT", "PROTO", "NETNS", "LIVE", "INSERTED", "REMOVED", "EVICTED"
    )];
    for row in fills.rows.iter().take(max_rows) {
        let k = &row.key;
        lines.push(format!(
            "{:<24} {:>5} {:<5} {:<22} {:>8} {:>8} {:>8} {:>8}",
            k.src.to_string(),
            k.dport,
            k.proto.to_string(),
            k.netns,
            row.live,
            row.inserted,
            row.removed,
            row.evicted
        ));
    }
    if fills.others_live > 0 {
        lines.push(format!("others: {} live entries", fills.others_live));
    }
    if !fills.removed_by_state.is_empty() {
        let states: Vec<String> = fills.removed_by_state.iter().map(|(s, n)| format!("{s} {n}")).collect();
        lines.push(format!("removed entries by final state: {}", states.join(", ")));
    }
    lines.push(
        "(live: inserted since ctrace started and not yet removed; entries older than ctrace are not counted)".into(),
    );
    lines
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    header: &'a Header,
    #[serde(flatten)]
    snapshot: &'a Snapshot,
}

/// One JSON object per snapshot, on one line.
pub fn render_jsonl(header: &Header, snap: &Snapshot, time: String) -> String {
    let mut line = serde_json::to_string(&Line { time, header, snapshot: snap }).expect("serialisable");
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_fit_columns() {
        assert_eq!(short(0.0), "0");
        assert_eq!(short(2.5), "2.5");
        assert_eq!(short(12.0), "12");
        assert_eq!(short(150.7), "151");
        assert_eq!(short(12_345.0), "12.3k");
        assert_eq!(short(3_400_000.0), "3.4M");
        assert_eq!(bar(50.0, 10), "[#####.....]");
        assert_eq!(bar(140.0, 4), "[####]");
        assert_eq!(time_to_full(TimeToFull::In(30.0)), "full in 30s");
        assert_eq!(time_to_full(TimeToFull::In(600.0)), "full in 10m");
        assert_eq!(time_to_full(TimeToFull::Full), "FULL");
    }
}
