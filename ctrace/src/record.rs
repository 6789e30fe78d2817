//! `ctrace record`: attach, collect drops for a while, write one file.
use std::{
    collections::HashMap,
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::signal::unix::{signal, SignalKind};

use crate::{
    aggregate::{
        flood::{Destination, FloodStats},
        heavy::SpaceSaving,
        log2_bin, log2_bin_range, rate_histogram, DropTable, SourceKey,
    },
    engine::{monotonic_ns, Engine, Sink},
    export::{
        self,
        json::{
            rfc3339_utc, CtOthers, CtRow, LifetimeBin, Lifetimes, NetnsCounters, NetnsWorkload, OccupancySeries,
            RecordFile, Source, Totals, SCHEMA,
        },
        Format, Output,
    },
    model::{ConnState, CtEvent, CtKind, DropEvent, Occupancy, Protocol, Reason},
    netns::{self, ConntrackStats, Namespaces},
    privileges,
    workload::Workloads,
};

pub const BUCKET_NS: u64 = 1_000_000_000;
/// Destinations written to a record (the heaviest).
const FLOOD_DESTINATIONS: usize = 10;

pub struct Options {
    /// None: until Ctrl-C or SIGTERM.
    pub duration: Option<Duration>,
    /// `-` for stdout.
    pub output: PathBuf,
    pub format: Format,
    /// Sources shown by formats that show a selection.
    pub top: usize,
    /// Source rows (and conntrack event rows) kept at most.
    pub capacity: usize,
    pub hooks: crate::hooks::HookChoice,
}

/// Turns decoded records into per-source counts, in memory bounded by
/// the capacity whatever the number of sources.
pub struct Recorder {
    pub table: DropTable,
    /// Distinct sources, destinations, source prefixes.
    pub flood: FloodStats,
    /// Conntrack events per key, the heaviest `capacity` keys.
    conntrack: SpaceSaving<CtRowKey>,
    /// Events of keys that gave up their row, per kind.
    conntrack_others: HashMap<CtKind, u64>,
    /// Removed entries per final state, counted in log2 bins of seconds.
    lifetimes: HashMap<ConnState, Vec<u64>>,
    /// Per namespace, the table's fill at the last refusal (hook tiers).
    pub at_table_full: HashMap<u32, Occupancy>,
    pub undecodable: u64,
}

/// What conntrack events are counted by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtRowKey {
    pub netns: u32,
    pub src: std::net::IpAddr,
    pub dport: u16,
    pub proto: Protocol,
    pub state: ConnState,
    pub event: CtKind,
    pub zone: u16,
}

impl Recorder {
    pub fn new(start_ns: u64, capacity: usize) -> Self {
        Recorder {
            table: DropTable::new(start_ns, BUCKET_NS, capacity),
            flood: FloodStats::default(),
            conntrack: SpaceSaving::new(capacity),
            conntrack_others: HashMap::new(),
            lifetimes: HashMap::new(),
            at_table_full: HashMap::new(),
            undecodable: 0,
        }
    }

    /// Lifetime histograms per final state, states in conntrack's order.
    pub fn lifetime_rows(&self) -> Vec<Lifetimes> {
        let mut rows: Vec<Lifetimes> = self
            .lifetimes
            .iter()
            .map(|(state, bins)| Lifetimes {
                state: *state,
                entries: bins.iter().sum(),
                bins: bins
                    .iter()
                    .enumerate()
                    .map(|(i, &entries)| {
                        let (from_s, to_s) = log2_bin_range(i);
                        LifetimeBin { from_s, to_s, entries }
                    })
                    .collect(),
            })
            .collect();
        rows.sort_by_key(|r| r.state);
        rows
    }

    /// Conntrack rows, most frequent first, and the events of the keys
    /// without a row per kind.
    pub fn conntrack_rows(&self) -> (Vec<CtRow>, Vec<CtOthers>) {
        let mut rows: Vec<CtRow> = self
            .conntrack
            .iter()
            .map(|c| CtRow {
                netns: c.key.netns,
                src: c.key.src,
                dport: c.key.dport,
                proto: c.key.proto,
                state: c.key.state,
                event: c.key.event,
                zone: c.key.zone,
                count: c.count - c.error,
                error: c.error,
            })
            .collect();
        rows.sort_by(|a, b| {
            b.count
                .cmp(&a.count)
                .then((a.netns, a.src, a.dport, a.event, a.zone).cmp(&(b.netns, b.src, b.dport, b.event, b.zone)))
        });
        let mut others: Vec<CtOthers> =
            self.conntrack_others.iter().map(|(&event, &count)| CtOthers { event, count }).collect();
        others.sort_by_key(|o| o.event);
        (rows, others)
    }
}

impl Sink for Recorder {
    fn on_drop(&mut self, key: &SourceKey, event: &DropEvent) {
        self.table.add(*key, event.ts_ns);
        self.flood.add(key.src, Destination::of(key, event.dst), event.ts_ns);
    }

    fn on_conntrack(&mut self, ev: &CtEvent, state: ConnState) {
        if matches!(ev.kind, CtKind::Delete | CtKind::EarlyDrop) && ev.lifetime_ns > 0 {
            let bins = self.lifetimes.entry(state).or_default();
            let bin = log2_bin(ev.lifetime_ns as f64 / 1e9);
            if bins.len() <= bin {
                bins.resize(bin + 1, 0);
            }
            bins[bin] += 1;
        }
        let key = CtRowKey {
            netns: ev.netns,
            src: ev.src,
            dport: ev.dport,
            proto: ev.proto,
            state,
            event: ev.kind,
            zone: ev.zone,
        };
        if let Some((gone, events)) = self.conntrack.add(&key, ev.ts_ns).replaced {
            *self.conntrack_others.entry(gone.event).or_default() += events;
        }
        if let Some(table) = ev.table {
            self.at_table_full.insert(ev.netns, table);
        }
    }

    fn on_undecodable(&mut self) {
        self.undecodable += 1;
    }
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    // Fail on a bad output path before attaching anything.
    let output = Output::prepare(&options.output)?;
    let mut engine = Engine::start(options.hooks)?;

    let mut notes = Vec::new();
    if !privileges::can_enter_namespaces() {
        notes.push("no CAP_SYS_ADMIN: other namespaces' counters and occupancy could not be read".into());
    }
    let start_stats = engine.namespaces().snapshot_all();
    if !engine.pipeline.classifier.symbols_resolved() {
        notes.push("kernel symbols unreadable (kptr_restrict): drop locations were not used".into());
    }
    let started_at = SystemTime::now();
    let start_ns = monotonic_ns();
    let mut recorder = Recorder::new(start_ns, options.capacity);
    if engine.attached.drop_test == crate::hooks::kfree_skb::DropTest::Location {
        notes.push(format!("drops: {}", engine.attached.drop_test.describe()));
    }
    for hook in engine.attached.hooks.iter().filter(|h| h.tier.is_none()) {
        notes.push(format!("hook {} off: {}", hook.hook, hook.detail));
    }
    if let Some(note) = engine.pipeline.classifier.refusals_note() {
        notes.push(note.into());
    }

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let deadline = options.duration.map(|d| tokio::time::Instant::now() + d);
    let tier = engine.attached.tier;
    match options.duration {
        Some(d) => eprintln!("ctrace: {tier} attached; recording for {} s (Ctrl-C stops early)", d.as_secs_f64()),
        None => eprintln!("ctrace: {tier} attached; recording until Ctrl-C"),
    }

    let mut each_second = tokio::time::interval(Duration::from_secs(1));
    let mut occupancy = OccupancyLog::default();
    // Who lives in each namespace, kept while the recording runs: a
    // container that stops before the end is still named.
    let mut workloads = Workloads::new();
    loop {
        tokio::select! {
            _ = each_second.tick() => {
                let present = occupancy.sample(engine.namespaces());
                workloads.refresh(present);
            }
            woke = engine.wait() => {
                woke?;
                engine.drain(&mut recorder);
            }
            _ = sleep_until(deadline) => break,
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    let end_ns = monotonic_ns();
    engine.stop(&mut recorder);
    let kernel = engine.attached.totals()?;
    let conntrack = (engine.attached.tier != crate::hooks::Tier::Tracepoint)
        .then(|| engine.attached.conntrack_totals())
        .transpose()?;
    if kernel.lost_conntrack_events > 0 {
        notes.push(format!(
            "{} conntrack events were lost (ring buffer full): conntrack_events rows are short by that many; \
             totals.conntrack is exact",
            kernel.lost_conntrack_events
        ));
    }
    if kernel.lost_events > 0 {
        notes.push(format!(
            "{} events were lost (ring buffer full): per-source counts are short by that many; totals.kernel is exact",
            kernel.lost_events
        ));
    }

    match kernel.program_misses {
        Some(0) => {}
        Some(misses) => notes.push(format!(
            "the kernel skipped {misses} runs of ctrace's programs (another BPF program was running on that CPU): \
             hook events are missing by up to that many"
        )),
        None => notes.push(
            "this kernel does not count skipped kprobe runs (Linux 6.7+ does): a run skipped because another BPF \
             program was running on that CPU would go unnoticed"
                .into(),
        ),
    }
    let end_stats = engine.namespaces().snapshot_all();
    let (rows, others) = recorder.table.finish(end_ns);
    let approximate = recorder.table.approximation();
    if let Some(a) = approximate {
        notes.push(format!(
            "more sources than --capacity {} rows: the {} heaviest are kept, each short by at most {} drops; \
             the rest are in `others` per reason, so totals are exact",
            a.capacity,
            rows.len(),
            a.error_bound
        ));
    }
    let (conntrack_events, conntrack_others) = recorder.conntrack_rows();
    let duration_s = (end_ns - start_ns) as f64 / 1e9;
    let seen: Vec<u32> = rows.iter().map(|r| r.key.netns).collect();
    let mut kernel_counters = counters_report(&start_stats, &end_stats, &seen, engine.namespaces());
    for c in &mut kernel_counters {
        c.at_table_full = recorder.at_table_full.get(&c.netns).copied();
    }
    // The last word on who lived where (the namespaces gone by now keep
    // what the scans during the recording found).
    workloads.refresh(std::iter::empty());
    workloads.refresh_now();
    notes.extend(workloads.warnings.iter().cloned());
    let occupancy = occupancy.series(engine.namespaces());
    let mut in_record: Vec<u32> = seen
        .iter()
        .copied()
        .chain(kernel_counters.iter().map(|c| c.netns))
        .chain(occupancy.iter().map(|o| o.netns))
        .collect();
    in_record.sort_unstable();
    in_record.dedup();
    let namespace_workloads = in_record
        .into_iter()
        .filter_map(|netns| Some(NetnsWorkload { netns, workload: workloads.of_netns(netns)?.clone() }))
        .collect();
    let rate_histogram = rate_histogram(rows.iter().map(|r| r.drops as f64 / duration_s));
    let sources = rows
        .into_iter()
        .map(|row| {
            let src_workload = workloads.of_address(row.key.src);
            Source { src_workload, ..row.into() }
        })
        .collect();

    let file = RecordFile {
        schema: SCHEMA.into(),
        tier: engine.attached.tier,
        kernel: read_trimmed("/proc/sys/kernel/osrelease"),
        hostname: read_trimmed("/proc/sys/kernel/hostname"),
        started_at: rfc3339_utc(started_at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()),
        duration_s,
        totals: Totals {
            table_full: recorder.table.total(Reason::TableFull),
            conntrack_other: recorder.table.total(Reason::ConntrackOther),
            insert_failed: recorder.table.total(Reason::InsertFailed),
            ruleset: recorder.table.total(Reason::Ruleset),
            lost_events: kernel.lost_events,
            undecodable: recorder.undecodable,
            kernel,
            conntrack,
        },
        kernel_counters,
        conntrack_events,
        conntrack_others,
        lifetimes: recorder.lifetime_rows(),
        occupancy,
        rate_histogram,
        flood: Some(recorder.flood.summary(FLOOD_DESTINATIONS)),
        sources,
        workloads: namespace_workloads,
        approximate: approximate.map(Into::into),
        others: others.into_iter().map(Into::into).collect(),
        notes,
    };
    output.write(&export::render(&file, options.format, options.top)?)?;
    eprintln!(
        "ctrace: {} drops ({} table_full, {} conntrack_other, {} insert_failed, {} ruleset), {} lost; wrote {}",
        kernel.netfilter_drops,
        file.totals.table_full,
        file.totals.conntrack_other,
        file.totals.insert_failed,
        file.totals.ruleset,
        kernel.lost_events,
        output.describe()
    );
    if let Some(verdict) = file.flood.as_ref().and_then(|f| f.verdict.clone()) {
        eprintln!("ctrace: {verdict}");
    }
    Ok(())
}

/// Entries and the maximum, per namespace, once a second: the table filling
/// up over the recording. Only namespaces that ever had entries are kept.
#[derive(Default)]
struct OccupancyLog {
    samples: usize,
    series: HashMap<u32, (Vec<u64>, Vec<u64>)>,
}

impl OccupancyLog {
    /// Samples every namespace; returns those there are.
    fn sample(&mut self, namespaces: &mut Namespaces) -> Vec<u32> {
        let max = netns::conntrack_max().unwrap_or(0);
        let all = namespaces.snapshot_recent();
        let present = all.keys().copied().collect();
        for (inum, stats) in all {
            if stats.entries == 0 && !self.series.contains_key(&inum) {
                continue;
            }
            // A namespace first seen now had no entries before.
            let (entries, maxes) =
                self.series.entry(inum).or_insert_with(|| (vec![0; self.samples], vec![max; self.samples]));
            entries.push(stats.entries);
            maxes.push(max);
        }
        self.samples += 1;
        for (entries, maxes) in self.series.values_mut() {
            entries.resize(self.samples, 0); // gone namespaces: no entries
            maxes.resize(self.samples, max);
        }
        present
    }

    fn series(&self, namespaces: &Namespaces) -> Vec<OccupancySeries> {
        let mut out: Vec<OccupancySeries> = self
            .series
            .iter()
            .map(|(inum, (entries, max))| OccupancySeries {
                netns: *inum,
                name: namespaces.name(*inum).map(str::to_string),
                interval_ms: 1000,
                entries: entries.clone(),
                max: max.clone(),
            })
            .collect();
        out.sort_by_key(|o| o.netns);
        out
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Namespaces worth reporting: those with drops, or whose counters moved.
fn counters_report(
    start: &HashMap<u32, ConntrackStats>,
    end: &HashMap<u32, ConntrackStats>,
    seen: &[u32],
    namespaces: &Namespaces,
) -> Vec<NetnsCounters> {
    let max = netns::conntrack_max();
    let mut report: Vec<NetnsCounters> = end
        .iter()
        .filter_map(|(inum, end)| {
            // A namespace born during the recording started from zero.
            let delta = end.delta_since(start.get(inum).unwrap_or(&ConntrackStats::default()));
            let moved = ConntrackStats { entries: 0, ..delta };
            (seen.contains(inum) || !moved.is_idle()).then(|| {
                NetnsCounters::new(
                    *inum,
                    namespaces.name(*inum).map(str::to_string),
                    &delta,
                    max,
                    namespaces.peak(*inum),
                )
            })
        })
        .collect();
    report.sort_by_key(|c| c.netns);
    report
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path).map(|s| s.trim().to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use ctrace_common::{ct_event, family, kind, ConntrackEvent};

    use super::*;
    use crate::{
        classify::{Classifier, Symbols},
        decode::encode_conntrack,
        engine::Pipeline,
        netns::Namespaces,
    };

    fn event(event: u8, src: u8, zone: u16) -> ConntrackEvent {
        let mut raw = ConntrackEvent {
            kind: kind::CONNTRACK,
            event,
            family: family::INET,
            proto: 17,
            netns: 7,
            dport: 53,
            zone,
            ..Default::default()
        };
        raw.src[..4].copy_from_slice(&[198, 18, 0, src]);
        raw
    }

    #[test]
    fn conntrack_rows_per_source_event_and_zone_and_the_last_fill_per_namespace() {
        let mut pipeline = Pipeline::new(Classifier::new(Symbols::unresolved(), Namespaces::new()), Vec::new());
        let mut recorder = Recorder::new(0, 16);
        for _ in 0..3 {
            pipeline.feed(&encode_conntrack(&event(ct_event::INSERT, 2, 0)), &mut recorder);
        }
        pipeline.feed(&encode_conntrack(&event(ct_event::INSERT, 2, 5)), &mut recorder);
        pipeline.feed(&encode_conntrack(&event(ct_event::CLASH_RESOLVED, 2, 0)), &mut recorder);
        let mut full = event(ct_event::TABLE_FULL, 3, 0);
        (full.table_count, full.table_max) = (63, 64);
        pipeline.feed(&encode_conntrack(&full), &mut recorder);
        (full.table_count, full.table_max) = (64, 64);
        pipeline.feed(&encode_conntrack(&full), &mut recorder);

        let (rows, others) = recorder.conntrack_rows();
        assert!(others.is_empty());
        let count = |ev: CtKind, src: &str, zone: u16| {
            rows.iter().find(|r| r.event == ev && r.src.to_string() == src && r.zone == zone).map(|r| r.count)
        };
        assert_eq!(count(CtKind::Insert, "198.18.0.2", 0), Some(3));
        assert_eq!(count(CtKind::Insert, "198.18.0.2", 5), Some(1), "zones are separate rows");
        assert_eq!(count(CtKind::ClashResolved, "198.18.0.2", 0), Some(1));
        assert_eq!(count(CtKind::TableFull, "198.18.0.3", 0), Some(2));
        assert_eq!(rows[0].count, 3, "most frequent first");
        assert_eq!(recorder.at_table_full.get(&7), Some(&Occupancy { entries: 64, max: 64 }), "the last refusal");
    }
}
