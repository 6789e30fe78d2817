//! `ctrace record`: attach, collect drops for a while, write one file.
use std::{
    collections::HashMap,
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::{
    io::{unix::AsyncFd, Interest},
    signal::unix::{signal, SignalKind},
};

use crate::{
    aggregate::{rate_histogram, DropTable},
    classify::{Classifier, Symbols},
    decode::decode,
    export::{
        self,
        json::{rfc3339_utc, NetnsCounters, RecordFile, Totals, SCHEMA},
        Format, Output,
    },
    hooks::{kernel_btf, Attached},
    model::Reason,
    netns::{self, ConntrackStats, Namespaces},
    privileges,
};

pub const BUCKET_NS: u64 = 1_000_000_000;

/// The kernel wakes the reader only in batches (see ctrace-ebpf's maps.rs);
/// whatever is below the wake-up threshold is collected this often.
pub const DRAIN_EVERY: Duration = Duration::from_millis(50);

pub struct Options {
    /// None: until Ctrl-C or SIGTERM.
    pub duration: Option<Duration>,
    /// `-` for stdout.
    pub output: PathBuf,
    pub format: Format,
    /// Sources shown by formats that show a selection.
    pub top: usize,
}

/// Turns ring-buffer records into per-source counts.
pub struct Recorder {
    pub table: DropTable,
    pub classifier: Classifier,
    pub undecodable: u64,
}

impl Recorder {
    pub fn new(start_ns: u64, classifier: Classifier) -> Self {
        Recorder { table: DropTable::new(start_ns, BUCKET_NS), classifier, undecodable: 0 }
    }

    pub fn on_record(&mut self, bytes: &[u8]) {
        match decode(bytes) {
            Ok(event) => {
                let key = self.classifier.key(&event);
                self.table.add(key, event.ts_ns);
            }
            Err(_) => self.undecodable += 1,
        }
    }
}

pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer; CLOCK_MONOTONIC is what bpf_ktime_get_ns reads.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    // Fail on a bad output path before attaching anything.
    let output = Output::prepare(&options.output)?;
    let btf = kernel_btf()?;
    let (mut attached, events) = Attached::attach(&btf)?;

    let mut namespaces = Namespaces::new();
    let mut notes = Vec::new();
    if !privileges::can_enter_namespaces() {
        notes.push("no CAP_SYS_ADMIN: other namespaces' counters and occupancy could not be read".into());
    }
    let start_stats = namespaces.snapshot_all();
    let classifier = Classifier::new(Symbols::load(), namespaces);
    if !classifier.symbols_resolved() {
        notes.push("kernel symbols unreadable (kptr_restrict): drop locations were not used".into());
    }
    let started_at = SystemTime::now();
    let start_ns = monotonic_ns();
    let mut recorder = Recorder::new(start_ns, classifier);

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let deadline = options.duration.map(|d| tokio::time::Instant::now() + d);
    match options.duration {
        Some(d) => {
            eprintln!("ctrace: {} attached; recording for {} s (Ctrl-C stops early)", attached.tier, d.as_secs_f64())
        }
        None => eprintln!("ctrace: {} attached; recording until Ctrl-C", attached.tier),
    }

    // SAFETY: the ring buffer owns its map fd, which stays open and the same
    // until into_inner() below hands the ring buffer back.
    let mut events = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("cannot poll the ring buffer: {e}"))?;
    let mut drain = tokio::time::interval(DRAIN_EVERY);
    loop {
        tokio::select! {
            ready = events.readable_mut() => {
                let mut guard = ready?;
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    recorder.on_record(&item);
                }
                guard.clear_ready();
            }
            _ = drain.tick() => {
                let ring = events.get_mut();
                while let Some(item) = ring.next() {
                    recorder.on_record(&item);
                }
            }
            _ = sleep_until(deadline) => break,
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    let end_ns = monotonic_ns();

    // Detach, then take what is still in the ring: after this, no record
    // the counters know of is missing from the table, except lost ones.
    let mut events = events.into_inner();
    attached.detach();
    while let Some(item) = events.next() {
        recorder.on_record(&item);
    }
    let kernel = attached.totals()?;
    if kernel.lost_events > 0 {
        notes.push(format!(
            "{} events were lost (ring buffer full): per-source counts are short by that many; totals.kernel is exact",
            kernel.lost_events
        ));
    }

    let end_stats = recorder.classifier.namespaces.snapshot_all();
    let rows = recorder.table.finish(end_ns);
    let duration_s = (end_ns - start_ns) as f64 / 1e9;
    let seen: Vec<u32> = rows.iter().map(|r| r.key.netns).collect();
    let kernel_counters = counters_report(&start_stats, &end_stats, &seen, &recorder.classifier.namespaces);

    let file = RecordFile {
        schema: SCHEMA.into(),
        tier: attached.tier,
        kernel: read_trimmed("/proc/sys/kernel/osrelease"),
        hostname: read_trimmed("/proc/sys/kernel/hostname"),
        started_at: rfc3339_utc(started_at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()),
        duration_s,
        totals: Totals {
            table_full: recorder.table.total(Reason::TableFull),
            conntrack_other: recorder.table.total(Reason::ConntrackOther),
            ruleset: recorder.table.total(Reason::Ruleset),
            lost_events: kernel.lost_events,
            undecodable: recorder.undecodable,
            kernel,
        },
        kernel_counters,
        rate_histogram: rate_histogram(rows.iter().map(|r| r.drops as f64 / duration_s)),
        sources: rows.into_iter().map(Into::into).collect(),
        notes,
    };
    output.write(&export::render(&file, options.format, options.top)?)?;
    eprintln!(
        "ctrace: {} drops ({} table_full, {} conntrack_other, {} ruleset), {} lost; wrote {}",
        kernel.netfilter_drops,
        file.totals.table_full,
        file.totals.conntrack_other,
        file.totals.ruleset,
        kernel.lost_events,
        output.describe()
    );
    Ok(())
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
