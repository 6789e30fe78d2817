//! What one tick shows: the snapshot of [`LiveState`](super::state::LiveState)
//! that the terminal view, the plain text and the JSON lines all render.
use std::net::IpAddr;

use serde::Serialize;

use crate::{
    aggregate::{flood::FloodSummary, occupancy::TimeToFull},
    hooks::KernelTotals,
    live::{query::SortBy, state::FillKey},
    model::{ConnState, Protocol, Reason},
};

pub(super) fn sort_rows(rows: &mut [TopRow], by: SortBy, descending: bool) {
    rows.sort_by(|a, b| {
        let order = match by {
            SortBy::Rate => a.per_s.total_cmp(&b.per_s).then(a.total.cmp(&b.total)),
            SortBy::Total => a.total.cmp(&b.total),
            SortBy::LastSeen => b.last_seen_s.total_cmp(&a.last_seen_s),
            SortBy::Source => a.src.cmp(&b.src),
            SortBy::Port => a.dport.cmp(&b.dport),
            SortBy::Reason => a.reason.cmp(&b.reason),
            SortBy::Netns => a.netns.cmp(&b.netns),
        };
        let order = if descending { order.reverse() } else { order };
        // Stable, readable ties: heaviest first, then by address.
        order.then(b.total.cmp(&a.total)).then(a.src.cmp(&b.src)).then(a.dport.cmp(&b.dport))
    });
}

/// Who fills the table, from the kernel's own table (all tiers).
#[derive(Clone, Debug, Serialize)]
pub struct CensusView {
    /// Entries listed.
    pub entries: u64,
    /// The kernel's count of them (None if a namespace's was unreadable).
    pub kernel_entries: Option<u64>,
    /// A table was larger than ctrace reads at once.
    pub truncated: bool,
    pub by_state: Vec<(ConnState, u64)>,
    pub rows: Vec<CensusRow>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CensusRow {
    pub netns: u32,
    pub netns_name: Option<String>,
    pub src: IpAddr,
    pub proto: Protocol,
    /// Entries in the table now.
    pub entries: u64,
    /// By TCP state, most first.
    pub states: Vec<(ConnState, u64)>,
    /// Hook tiers: insertions and removals seen since ctrace started.
    pub inserted: Option<u64>,
    pub removed: Option<u64>,
}

/// Who fills the table: entries inserted since ctrace started, per source.
#[derive(Clone, Debug, Serialize)]
pub struct FillsView {
    pub rows: Vec<FillRow>,
    /// Live entries of sources beyond the tracking capacity.
    pub others_live: u64,
    /// Every removal (deletion or eviction) by the entry's final TCP state.
    pub removed_by_state: Vec<(ConnState, u64)>,
}

#[derive(Clone, Debug, Serialize)]
pub struct FillRow {
    #[serde(flatten)]
    pub key: FillKey,
    /// Inserted and not yet removed.
    pub live: u64,
    pub inserted: u64,
    pub removed: u64,
    /// Of the removed, evicted by early drop.
    pub evicted: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Snapshot {
    /// Distinct sources, destinations, prefixes; a random-source flood named.
    pub flood: FloodSummary,
    /// Entries per source and state in the kernel's tables (None until read).
    pub census: Option<CensusView>,
    /// None on the tracepoint tier (no conntrack events).
    pub fills: Option<FillsView>,
    pub uptime_s: f64,
    pub max: Option<u64>,
    pub buckets: Option<u64>,
    pub buckets_too_few: bool,
    pub namespaces: Vec<NetnsView>,
    pub series: Vec<SeriesView>,
    /// Drops decoded since start (or reset).
    pub total_drops: u64,
    /// Exact kernel-side totals since ctrace attached.
    pub kernel: KernelTotals,
    pub undecodable: u64,
    pub top: Vec<TopRow>,
    /// Rows matching the filter, before the limit.
    pub matching_rows: usize,
    /// Drops of matching rows not shown (below the limit).
    pub others: u64,
    pub tracked: usize,
    pub capacity: usize,
    /// Keys replaced because more sources than `capacity` were seen; when
    /// non-zero, counts may overcount by up to `error_bound`.
    pub evictions: u64,
    pub error_bound: u64,
    /// Drops in the total but in no row: first sightings of sources not
    /// tracked while every row was taken (a spoofed flood's one-off
    /// sources); a row may be short by one such drop of its own.
    pub declined: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct NetnsView {
    pub netns: u32,
    pub name: Option<String>,
    pub entries: u64,
    pub max: u64,
    pub percent: f64,
    /// Entries per second over the last 10 s.
    pub rate_per_s: f64,
    pub time_to_full: TimeToFull,
}

#[derive(Clone, Debug, Serialize)]
pub struct SeriesView {
    pub name: &'static str,
    pub per_s: f64,
    pub total: u64,
    /// Per-second amounts of the last minute, oldest first.
    pub history: Vec<u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TopRow {
    pub netns: u32,
    pub netns_name: Option<String>,
    pub src: IpAddr,
    /// Reverse-DNS name, with `--resolve`, once known.
    pub src_name: Option<String>,
    pub dport: u16,
    pub proto: Protocol,
    pub state: ConnState,
    pub reason: Reason,
    pub per_s: f64,
    pub total: u64,
    /// Possible overcount of `total` (Space-Saving error).
    pub error: u64,
    pub share: f64,
    pub last_seen_s: f64,
    /// The local workload owning the source address, and the one living in
    /// the namespace ([`crate::workload::Workload::label`]).
    pub src_workload: Option<String>,
    pub workload: Option<String>,
}

impl TopRow {
    /// The WORKLOAD column: `source's -> namespace's`, `-` where unknown.
    pub fn workload_column(&self) -> String {
        let or_dash = |w: &Option<String>| w.clone().unwrap_or_else(|| "-".into());
        format!("{} -> {}", or_dash(&self.src_workload), or_dash(&self.workload))
    }
}
