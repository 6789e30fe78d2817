//! What `ctrace live` knows, updated per event and per tick; `snapshot()`
//! makes the [`Snapshot`] every view (terminal, plain text, JSON lines)
//! renders.
use std::{collections::BTreeMap, net::IpAddr};

use rustc_hash::FxHashMap;
use serde::Serialize;

use crate::{
    aggregate::{
        flood::{Destination, FloodStats, FloodSummary},
        heavy::SpaceSaving,
        occupancy::{too_few_buckets, TimeToFull, Trend},
        tally::Tally,
        window::{per_second, Delta, Series},
        SourceKey,
    },
    census::Census,
    engine::Sink,
    export::metrics::{MetricsInput, NetnsCounts, ReasonCount, SourceCount},
    hooks::KernelTotals,
    live::query::Query,
    model::{ConnState, CtEvent, CtKind, DropEvent, Protocol, Reason},
    netns::ConntrackStats,
    workload::{Workload, Workloads},
};

use super::snapshot::sort_rows;
pub use super::snapshot::*;

/// One minute of one-second buckets.
pub const HISTORY: usize = 60;
const TREND_WINDOW_S: f64 = 10.0;
/// Destinations exported as metric series at most.
const METRIC_DESTINATIONS: usize = 10;

/// Reads one counter of a namespace's stats.
type Counter = fn(&ConntrackStats) -> u64;

/// The kernel's counters charted (summed over namespaces), each with the
/// name its chart has.
const KERNEL_COUNTERS: [(&str, Counter); 4] = [
    ("kernel_early_drop", |s| s.early_drop),
    ("kernel_insert_fail", |s| s.insert_failed),
    ("kernel_invalid", |s| s.invalid),
    ("kernel_drop", |s| s.drop),
];

/// The charts of rates, in display order: decoded drops by reason, the
/// kernel's counters, lost records.
struct Charts {
    reasons: [Series; Reason::ALL.len()],
    kernel: [Series; KERNEL_COUNTERS.len()],
    lost: Series,
}

impl Charts {
    fn new() -> Self {
        Charts {
            reasons: std::array::from_fn(|_| Series::new(HISTORY)),
            kernel: std::array::from_fn(|_| Series::new(HISTORY)),
            lost: Series::new(HISTORY),
        }
    }

    /// Each chart with its name.
    fn named(&self) -> impl Iterator<Item = (&'static str, &Series)> {
        let reasons = Reason::ALL.iter().map(|r| r.as_str()).zip(&self.reasons);
        let kernel = KERNEL_COUNTERS.iter().map(|(name, _)| *name).zip(&self.kernel);
        reasons.chain(kernel).chain(std::iter::once(("lost", &self.lost)))
    }
}

/// Kernel counters read once per tick for one namespace.
#[derive(Clone, Debug)]
pub struct NetnsSample {
    pub netns: u32,
    pub name: Option<String>,
    pub stats: ConntrackStats,
}

/// Values read once per tick.
#[derive(Clone, Debug, Default)]
pub struct TickInput {
    pub now_ns: u64,
    pub kernel: KernelTotals,
    pub namespaces: Vec<NetnsSample>,
    pub max: Option<u64>,
    pub buckets: Option<u64>,
}

impl TickInput {
    /// Keeps one namespace's counters only (see [`crate::engine::OnlyNetns`]).
    pub fn only_netns(mut self, netns: u32) -> Self {
        self.namespaces.retain(|ns| ns.netns == netns);
        self
    }
}

struct NetnsState {
    name: Option<String>,
    trend: Trend,
    entries: u64,
    /// The latest cumulative counters.
    last: ConntrackStats,
    /// Deltas of the [`KERNEL_COUNTERS`].
    deltas: [Delta; KERNEL_COUNTERS.len()],
    /// A counter moved in the latest interval.
    moved: bool,
    seen_at_tick: u64,
}

/// Entries by source as the conntrack hooks see them come and go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct FillKey {
    pub netns: u32,
    pub src: IpAddr,
    pub dport: u16,
    pub proto: Protocol,
}

#[derive(Clone, Copy, Debug, Default)]
struct FillCounts {
    inserted: u64,
    /// Removed (deleted or evicted) among those inserted since ctrace started.
    removed: u64,
    evicted: u64,
}

#[derive(Default)]
struct Fills {
    active: bool,
    by_source: FxHashMap<FillKey, FillCounts>,
    /// Sources beyond the capacity, together.
    others: FillCounts,
    /// Every removal by the entry's final TCP state.
    removed_by_state: std::collections::BTreeMap<ConnState, u64>,
}

pub struct LiveState {
    started_ns: u64,
    fills: Fills,
    /// The latest count of each namespace's table (every few seconds).
    census: std::collections::BTreeMap<u32, Census>,
    last_tick_ns: u64,
    interval_ns: u64,
    ticks: u64,
    heavy: SpaceSaving<SourceKey>,
    /// Distinct sources, destinations, source prefixes.
    flood: FloodStats,
    /// Exact drops per namespace and reason (namespaces are few).
    by_netns: Tally<(u32, Reason)>,
    /// Decoded drops by reason ([`Reason::index`]).
    decoded: [u64; Reason::ALL.len()],
    decoded_deltas: [Delta; Reason::ALL.len()],
    lost_delta: Delta,
    charts: Charts,
    namespaces: BTreeMap<u32, NetnsState>,
    max: Option<u64>,
    buckets: Option<u64>,
    kernel: KernelTotals,
    pub undecodable: u64,
    /// Who lives in each namespace and owns each local address; refreshed
    /// by the front end ([`LiveState::refresh_workloads`]), read here.
    pub workloads: Workloads,
}

impl LiveState {
    pub fn new(now_ns: u64, capacity: usize) -> Self {
        LiveState {
            started_ns: now_ns,
            last_tick_ns: now_ns,
            interval_ns: 0,
            ticks: 0,
            heavy: SpaceSaving::new(capacity),
            flood: FloodStats::default(),
            fills: Fills::default(),
            census: Default::default(),
            by_netns: Tally::default(),
            decoded: [0; Reason::ALL.len()],
            decoded_deltas: [Delta::default(); Reason::ALL.len()],
            lost_delta: Delta::default(),
            charts: Charts::new(),
            namespaces: BTreeMap::new(),
            max: None,
            buckets: None,
            kernel: KernelTotals::default(),
            undecodable: 0,
            workloads: Workloads::new(),
        }
    }

    /// Counts one drop going to `dst`. This is the per-event path: keep it lean.
    #[inline]
    pub fn count_drop(&mut self, key: &SourceKey, dst: IpAddr, ts_ns: u64) {
        // A random-source flood's one-off sources would each evict a row.
        self.heavy.offer(key, ts_ns);
        self.flood.add(key.src, Destination::of(key, dst), ts_ns);
        self.decoded[key.reason.index()] += 1;
        self.by_netns.add((key.netns, key.reason));
    }

    /// Replaces a namespace's table census.
    pub fn set_census(&mut self, netns: u32, census: Census) {
        self.census.insert(netns, census);
    }

    /// Namespaces whose tables have entries now (worth a census).
    pub fn namespaces_with_entries(&self) -> Vec<u32> {
        self.namespaces.iter().filter(|(_, ns)| ns.entries > 0).map(|(inum, _)| *inum).collect()
    }

    /// Counts one conntrack event (hook tiers): who fills the table.
    /// `state` is the entry's TCP state, named by the caller from BTF.
    pub fn count_conntrack(&mut self, ev: &CtEvent, state: ConnState) {
        self.fills.active = true;
        let key = FillKey { netns: ev.netns, src: ev.src, dport: ev.dport, proto: ev.proto };
        let capacity = self.heavy.capacity();
        let fills = &mut self.fills;
        let counts = if fills.by_source.contains_key(&key) || fills.by_source.len() < capacity {
            fills.by_source.entry(key).or_default()
        } else {
            &mut fills.others
        };
        match ev.kind {
            CtKind::Insert => counts.inserted += 1,
            CtKind::Delete | CtKind::EarlyDrop => {
                // A lifetime means ctrace saw the insertion: the entry was counted live.
                if ev.lifetime_ns > 0 {
                    counts.removed += 1;
                    if ev.kind == CtKind::EarlyDrop {
                        counts.evicted += 1;
                    }
                }
                *fills.removed_by_state.entry(state).or_default() += 1;
            }
            CtKind::TableFull
            | CtKind::AllocFailed
            | CtKind::InsertFailed
            | CtKind::ClashResolved
            | CtKind::Invalid => {}
        }
    }

    /// The flood summaries, the `top` heaviest destinations.
    pub fn flood(&self, top: usize) -> FloodSummary {
        self.flood.summary(top)
    }

    /// What a metrics scrape reports: exact totals, the kernel's cumulative
    /// counters, and the `top` heaviest sources.
    pub fn metrics(&self, top: usize) -> MetricsInput {
        let mut drops: Vec<_> = self
            .by_netns
            .iter()
            .map(|(&(netns, reason), drops)| ReasonCount {
                netns,
                name: self.netns_name(netns).map(str::to_string),
                workload: self.workloads.of_netns(netns).map(Workload::label),
                reason,
                drops,
            })
            .collect();
        drops.sort_by_key(|d| (d.netns, d.reason));
        let mut heaviest: Vec<_> = self.heavy.iter().collect();
        heaviest.sort_by(|a, b| b.count.cmp(&a.count).then(a.key.cmp(&b.key)));
        MetricsInput {
            drops,
            netfilter_drops: self.kernel.netfilter_drops,
            lost_events: self.kernel.lost_events,
            lost_conntrack_events: self.kernel.lost_conntrack_events,
            program_misses: self.kernel.program_misses,
            sources: heaviest
                .into_iter()
                .take(top)
                .map(|c| SourceCount {
                    netns: c.key.netns,
                    src: c.key.src,
                    dport: c.key.dport,
                    proto: c.key.proto,
                    state: c.key.state,
                    reason: c.key.reason,
                    drops: c.count,
                })
                .collect(),
            namespaces: self
                .namespaces
                .iter()
                .map(|(&netns, ns)| NetnsCounts {
                    netns,
                    name: ns.name.clone(),
                    workload: self.workloads.of_netns(netns).map(Workload::label),
                    drop: ns.last.drop,
                    insert_failed: ns.last.insert_failed,
                    early_drop: ns.last.early_drop,
                    invalid: ns.last.invalid,
                    entries: ns.entries,
                })
                .collect(),
            max: self.max,
            duration_s: None,
            conntrack_events: Vec::new(),
            flood: Some(self.flood.summary(top.min(METRIC_DESTINATIONS))),
        }
    }

    /// Ends an interval: rates, sparklines and occupancy move on.
    pub fn tick(&mut self, input: TickInput) {
        self.interval_ns = input.now_ns.saturating_sub(self.last_tick_ns);
        self.last_tick_ns = input.now_ns;
        self.ticks += 1;
        self.heavy.mark();
        for ((series, delta), &count) in self.charts.reasons.iter_mut().zip(&mut self.decoded_deltas).zip(&self.decoded)
        {
            series.push(delta.next(count));
        }
        let mut kernel_sums = [0u64; KERNEL_COUNTERS.len()];
        let t_s = (input.now_ns - self.started_ns) as f64 / 1e9;
        for sample in input.namespaces {
            let ns = self.namespaces.entry(sample.netns).or_insert_with(|| NetnsState {
                name: sample.name.clone(),
                trend: Trend::new(TREND_WINDOW_S),
                entries: 0,
                last: ConntrackStats::default(),
                deltas: [Delta::default(); KERNEL_COUNTERS.len()],
                moved: false,
                seen_at_tick: 0,
            });
            let s = sample.stats;
            ns.moved = false;
            for (i, (_, counter)) in KERNEL_COUNTERS.iter().enumerate() {
                let delta = ns.deltas[i].next(counter(&s));
                ns.moved |= delta > 0;
                kernel_sums[i] += delta;
            }
            ns.entries = s.entries;
            ns.last = s;
            ns.trend.push(t_s, s.entries);
            ns.seen_at_tick = self.ticks;
        }
        // Namespaces that are gone are forgotten.
        let ticks = self.ticks;
        self.namespaces.retain(|_, ns| ns.seen_at_tick == ticks);
        for (series, sum) in self.charts.kernel.iter_mut().zip(kernel_sums) {
            series.push(sum);
        }
        self.charts.lost.push(self.lost_delta.next(input.kernel.lost_events));
        self.kernel = input.kernel;
        self.max = input.max;
        self.buckets = input.buckets;
    }

    /// Looks again at who lives where, if it is time or a namespace is new
    /// (I/O: call it from the tick, never per event).
    pub fn refresh_workloads(&mut self) {
        self.workloads.refresh(self.namespaces.keys().copied());
    }

    /// Forgets counts and history (the `r` key); occupancy stays.
    pub fn reset(&mut self, now_ns: u64) {
        self.heavy.clear();
        self.flood.clear();
        self.fills = Fills { active: self.fills.active, ..Fills::default() };
        self.by_netns.clear();
        self.started_ns = now_ns.min(self.last_tick_ns);
        self.charts = Charts::new();
        for ns in self.namespaces.values_mut() {
            ns.trend = Trend::new(TREND_WINDOW_S);
        }
        self.decoded = [0; Reason::ALL.len()];
        self.decoded_deltas = [Delta::default(); Reason::ALL.len()];
        self.undecodable = 0;
    }

    /// The state as the views show it, with `query`'s filter and order.
    pub fn snapshot(&self, query: &Query, now_ns: u64) -> Snapshot {
        let interval_ns = self.interval_ns.max(1);
        let total_drops = self.heavy.total();
        let mut top: Vec<TopRow> = self
            .heavy
            .iter()
            .filter(|c| query.filter.matches(&c.key, self.netns_name(c.key.netns)))
            .filter(|c| {
                query.filter.matches_workload(|| {
                    (self.workloads.of_netns(c.key.netns).cloned(), self.workloads.of_address(c.key.src))
                })
            })
            .map(|c| TopRow {
                netns: c.key.netns,
                netns_name: self.netns_name(c.key.netns).map(str::to_string),
                src: c.key.src,
                src_name: None,
                dport: c.key.dport,
                proto: c.key.proto,
                state: c.key.state,
                reason: c.key.reason,
                per_s: per_second(c.last_interval, interval_ns),
                total: c.count,
                error: c.error,
                share: if total_drops == 0 { 0.0 } else { c.count as f64 / total_drops as f64 },
                last_seen_s: now_ns.saturating_sub(c.last_seen_ns) as f64 / 1e9,
                src_workload: None,
                workload: None,
            })
            .collect();
        sort_rows(&mut top, query.sort, query.descending);
        let matching = top.len();
        let matching_drops: u64 = top.iter().map(|r| r.total).sum();
        top.truncate(query.limit);
        // Named for the rows shown only.
        for row in &mut top {
            row.src_workload = self.workloads.of_address(row.src).map(|w| w.short());
            row.workload = self.workloads.of_netns(row.netns).map(Workload::short);
        }
        let shown: u64 = top.iter().map(|r| r.total).sum();

        let series = self
            .charts
            .named()
            .map(|(name, s)| SeriesView {
                name,
                per_s: per_second(s.last(), interval_ns),
                total: s.total(),
                history: s.values().collect(),
            })
            .collect();

        let mut namespaces: Vec<NetnsView> = self
            .namespaces
            .iter()
            .filter(|(_, ns)| ns.entries > 0 || ns.moved)
            .map(|(inum, ns)| {
                let max = self.max.unwrap_or(0);
                NetnsView {
                    netns: *inum,
                    name: ns.name.clone(),
                    entries: ns.entries,
                    max,
                    percent: if max == 0 { 0.0 } else { 100.0 * ns.entries as f64 / max as f64 },
                    rate_per_s: ns.trend.rate(),
                    time_to_full: if max == 0 { TimeToFull::Never } else { ns.trend.time_to_full(max) },
                }
            })
            .collect();
        namespaces.sort_by(|a, b| b.percent.total_cmp(&a.percent).then(a.netns.cmp(&b.netns)));

        let fills = self.fills.active.then(|| {
            let mut rows: Vec<FillRow> = self
                .fills
                .by_source
                .iter()
                .map(|(k, c)| FillRow {
                    key: *k,
                    live: c.inserted.saturating_sub(c.removed),
                    inserted: c.inserted,
                    removed: c.removed,
                    evicted: c.evicted,
                })
                .collect();
            rows.sort_by(|a, b| b.live.cmp(&a.live).then(b.inserted.cmp(&a.inserted)).then(a.key.cmp(&b.key)));
            rows.truncate(query.limit);
            FillsView {
                rows,
                others_live: self.fills.others.inserted.saturating_sub(self.fills.others.removed),
                removed_by_state: self.fills.removed_by_state.iter().map(|(s, n)| (*s, *n)).collect(),
            }
        });
        let census = (!self.census.is_empty()).then(|| {
            let mut by_state: std::collections::BTreeMap<ConnState, u64> = Default::default();
            let mut rows: Vec<CensusRow> = Vec::new();
            for (inum, c) in self.census.iter().filter(|(inum, _)| self.namespaces.contains_key(inum)) {
                for (state, n) in &c.by_state {
                    *by_state.entry(*state).or_default() += n;
                }
                rows.extend(c.by_source.iter().map(|s| CensusRow {
                    netns: *inum,
                    netns_name: self.netns_name(*inum).map(str::to_string),
                    src: s.src,
                    proto: s.proto,
                    entries: s.entries,
                    states: s.states.clone(),
                    inserted: None,
                    removed: None,
                }));
            }
            rows.sort_by(|a, b| b.entries.cmp(&a.entries).then(a.src.cmp(&b.src)));
            rows.truncate(query.limit);
            if self.fills.active {
                for row in &mut rows {
                    let (mut inserted, mut removed) = (0, 0);
                    for (k, c) in &self.fills.by_source {
                        if k.netns == row.netns && k.src == row.src && k.proto == row.proto {
                            inserted += c.inserted;
                            removed += c.removed;
                        }
                    }
                    row.inserted = Some(inserted);
                    row.removed = Some(removed);
                }
            }
            CensusView {
                entries: self.census.values().map(|c| c.entries).sum(),
                kernel_entries: self.census.values().map(|c| c.kernel_entries).sum(),
                truncated: self.census.values().any(|c| c.truncated),
                by_state: by_state.into_iter().collect(),
                rows,
            }
        });
        Snapshot {
            flood: self.flood.summary(query.limit),
            census,
            fills,
            uptime_s: now_ns.saturating_sub(self.started_ns) as f64 / 1e9,
            max: self.max,
            buckets: self.buckets,
            buckets_too_few: matches!((self.buckets, self.max), (Some(b), Some(m)) if too_few_buckets(b, m)),
            namespaces,
            series,
            total_drops,
            kernel: self.kernel,
            undecodable: self.undecodable,
            top,
            matching_rows: matching,
            others: matching_drops - shown,
            tracked: self.heavy.len(),
            capacity: self.heavy.capacity(),
            evictions: self.heavy.evictions(),
            error_bound: self.heavy.error_bound(),
            declined: self.heavy.declined(),
        }
    }

    fn netns_name(&self, inum: u32) -> Option<&str> {
        self.namespaces.get(&inum).and_then(|ns| ns.name.as_deref())
    }
}

impl Sink for LiveState {
    #[inline]
    fn on_drop(&mut self, key: &SourceKey, event: &DropEvent) {
        self.count_drop(key, event.dst, event.ts_ns);
    }

    fn on_conntrack(&mut self, event: &CtEvent, state: ConnState) {
        self.count_conntrack(event, state);
    }

    fn on_undecodable(&mut self) {
        self.undecodable += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::live::query::{Filter, SortBy};

    const SEC: u64 = 1_000_000_000;
    const SERVER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(198, 18, 0, 1));

    fn key(src: &str, dport: u16, reason: Reason) -> SourceKey {
        SourceKey {
            netns: 7,
            src: src.parse().unwrap(),
            dport,
            proto: Protocol::Tcp,
            state: ConnState::SynSent,
            reason,
        }
    }

    fn sample(entries: u64, drop: u64) -> Vec<NetnsSample> {
        vec![NetnsSample {
            netns: 7,
            name: Some("srv".into()),
            stats: ConntrackStats { entries, drop, ..Default::default() },
        }]
    }

    #[test]
    fn a_tick_keeps_only_the_scoped_namespace() {
        let sample = |netns| NetnsSample { netns, name: None, stats: ConntrackStats::default() };
        let input = TickInput { namespaces: vec![sample(7), sample(8), sample(9)], ..Default::default() };
        let kept: Vec<u32> = input.only_netns(8).namespaces.iter().map(|ns| ns.netns).collect();
        assert_eq!(kept, [8]);
    }

    #[test]
    fn rates_totals_and_shares() {
        let mut s = LiveState::new(0, 16);
        s.tick(TickInput { now_ns: SEC, namespaces: sample(60, 0), max: Some(64), ..Default::default() });
        for i in 0..30 {
            s.count_drop(&key("198.18.0.3", 80, Reason::TableFull), SERVER, SEC + i);
        }
        for i in 0..10 {
            s.count_drop(&key("198.18.0.4", 80, Reason::TableFull), SERVER, SEC + i);
        }
        s.tick(TickInput { now_ns: 2 * SEC, namespaces: sample(64, 40), max: Some(64), ..Default::default() });
        let snap = s.snapshot(&Query::default(), 2 * SEC);
        assert_eq!(snap.top.len(), 2);
        assert_eq!(snap.top[0].src.to_string(), "198.18.0.3");
        assert_eq!(snap.top[0].per_s, 30.0);
        assert_eq!(snap.top[0].total, 30);
        assert_eq!(snap.top[0].share, 0.75);
        assert_eq!(snap.top[0].netns_name.as_deref(), Some("srv"));
        let table_full = &snap.series[0];
        assert_eq!((table_full.name, table_full.per_s, table_full.total), ("table_full", 40.0, 40));
        let kernel_drop = snap.series.iter().find(|s| s.name == "kernel_drop").unwrap();
        assert_eq!(kernel_drop.total, 40);
        assert_eq!(snap.namespaces[0].time_to_full, TimeToFull::Full);
        assert_eq!(snap.namespaces[0].percent, 100.0);
        assert_eq!(snap.others, 0);
    }

    #[test]
    fn limit_filter_and_others() {
        let mut s = LiveState::new(0, 16);
        for (i, src) in ["198.18.0.1", "198.18.0.2", "198.18.0.3"].iter().enumerate() {
            for _ in 0..=i {
                s.count_drop(&key(src, 80, Reason::TableFull), SERVER, 1);
            }
        }
        s.count_drop(&key("198.18.0.9", 22, Reason::Ruleset), SERVER, 1);
        s.tick(TickInput { now_ns: SEC, ..Default::default() });
        let query = Query { limit: 2, sort: SortBy::Total, ..Default::default() };
        let snap = s.snapshot(&query, SEC);
        assert_eq!(snap.top.len(), 2);
        assert_eq!(snap.matching_rows, 4);
        assert_eq!(snap.others, 2, "the two lightest rows");
        let query = Query { filter: Filter::parse("ruleset").unwrap(), ..Default::default() };
        let snap = s.snapshot(&query, SEC);
        assert_eq!(snap.top.len(), 1);
        assert_eq!(snap.top[0].dport, 22);
    }

    #[test]
    fn fills_count_live_entries_per_source() {
        let mut s = LiveState::new(0, 16);
        let ev = |src: &str, kind, lifetime_ns| CtEvent {
            kind,
            ts_ns: 1,
            netns: 7,
            src: src.parse().unwrap(),
            dst: "198.18.1.1".parse().unwrap(),
            sport: 1000,
            dport: 80,
            proto: Protocol::Tcp,
            raw_tcp_state: 0,
            zone: 0,
            entry: 0,
            lifetime_ns,
            table: None,
        };
        assert!(s.snapshot(&Query::default(), 1).fills.is_none(), "no hooks, no panel");
        for _ in 0..5 {
            s.count_conntrack(&ev("198.18.0.2", CtKind::Insert, 0), ConnState::SynSent);
        }
        s.count_conntrack(&ev("198.18.0.2", CtKind::Delete, 5), ConnState::TimeWait);
        s.count_conntrack(&ev("198.18.0.2", CtKind::EarlyDrop, 9), ConnState::SynRecv);
        // Inserted before ctrace started: not one of the live ones.
        s.count_conntrack(&ev("198.18.0.9", CtKind::Delete, 0), ConnState::TimeWait);
        let fills = s.snapshot(&Query::default(), 1).fills.unwrap();
        let row = &fills.rows[0];
        assert_eq!(row.key.src.to_string(), "198.18.0.2");
        assert_eq!((row.live, row.inserted, row.removed, row.evicted), (3, 5, 2, 1));
        assert_eq!(fills.removed_by_state, [(ConnState::SynRecv, 1), (ConnState::TimeWait, 2)]);
    }

    #[test]
    fn reset_forgets_counts() {
        let mut s = LiveState::new(0, 16);
        s.count_drop(&key("198.18.0.3", 80, Reason::TableFull), SERVER, 1);
        s.tick(TickInput { now_ns: SEC, ..Default::default() });
        s.reset(SEC);
        s.tick(TickInput { now_ns: 2 * SEC, ..Default::default() });
        let snap = s.snapshot(&Query::default(), 2 * SEC);
        assert!(snap.top.is_empty());
        assert_eq!(snap.series[0].total, 0);
    }
}
