//! The maths: drops per source with per-interval histograms (`record`),
//! bounded heavy hitters, rate windows and occupancy trends (`live`).
pub mod flood;
pub mod heavy;
pub mod occupancy;
pub mod tally;
pub mod window;

use std::{collections::HashMap, net::IpAddr};

use serde::{Deserialize, Serialize};

use crate::model::{ConnState, Protocol, Reason};
use heavy::SpaceSaving;

/// What drops are counted by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceKey {
    pub netns: u32,
    pub src: IpAddr,
    pub dport: u16,
    pub proto: Protocol,
    pub state: ConnState,
    pub reason: Reason,
}

/// Drops per bucket of time since the start of a recording.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Histogram {
    pub bucket_ms: u64,
    pub counts: Vec<u64>,
}

/// The index of the bucket holding `ts_ns`. Events stamped before the start
/// (possible only by clock skew between CPUs) go in the first.
pub fn bucket_index(start_ns: u64, bucket_ns: u64, ts_ns: u64) -> usize {
    (ts_ns.saturating_sub(start_ns) / bucket_ns) as usize
}

/// Buckets needed to cover `elapsed_ns`: a started bucket counts, and there
/// is always at least one.
pub fn bucket_count(elapsed_ns: u64, bucket_ns: u64) -> usize {
    (elapsed_ns.div_ceil(bucket_ns) as usize).max(1)
}

/// Sources counted by their average drop rate, in power-of-two bins.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RateBin {
    /// Drops per second, inclusive lower bound (0 for the first bin).
    pub from: f64,
    /// Exclusive upper bound.
    pub to: f64,
    pub sources: u64,
}

/// A log2 histogram of per-source rates: bin 0 is [0, 1) drops/s, then
/// [1, 2), [2, 4), [4, 8) ... up to the fastest source. Empty for no sources.
pub fn rate_histogram(rates: impl IntoIterator<Item = f64>) -> Vec<RateBin> {
    log2_bins(rates).into_iter().map(|(from, to, sources)| RateBin { from, to, sources }).collect()
}

/// The bin of `v` among [0, 1), [1, 2), [2, 4), [4, 8), ...
pub fn log2_bin(v: f64) -> usize {
    if v < 1.0 {
        0
    } else {
        v.log2().floor() as usize + 1
    }
}

/// The bounds of bin `i`: inclusive lower, exclusive upper.
pub fn log2_bin_range(i: usize) -> (f64, f64) {
    if i == 0 {
        (0.0, 1.0)
    } else {
        (2f64.powi(i as i32 - 1), 2f64.powi(i as i32))
    }
}

/// Counts values in bins [0, 1), [1, 2), [2, 4), ... up to the largest.
pub fn log2_bins(values: impl IntoIterator<Item = f64>) -> Vec<(f64, f64, u64)> {
    let mut counts: Vec<u64> = Vec::new();
    for v in values {
        let bin = log2_bin(v);
        if counts.len() <= bin {
            counts.resize(bin + 1, 0);
        }
        counts[bin] += 1;
    }
    counts
        .into_iter()
        .enumerate()
        .map(|(i, n)| {
            let (from, to) = log2_bin_range(i);
            (from, to, n)
        })
        .collect()
}

/// Histograms are kept to at most this many buckets: a longer recording
/// doubles the bucket width (merging neighbours) rather than grow.
pub const MAX_BUCKETS: usize = 128;

/// Drops per time bucket from bucket `first` on (sources that appear late
/// in a recording, as a spoofed flood's do, store no leading zeros).
#[derive(Clone, Debug, Default)]
struct Series {
    first: usize,
    counts: Vec<u64>,
}

impl Series {
    fn add(&mut self, bucket: usize, n: u64) {
        if self.counts.is_empty() {
            self.first = bucket;
        } else if bucket < self.first {
            // Clock skew between CPUs: an event stamped before the first.
            let shift = self.first - bucket;
            self.counts.splice(0..0, std::iter::repeat_n(0, shift));
            self.first = bucket;
        }
        let i = bucket - self.first;
        if self.counts.len() <= i {
            self.counts.resize(i + 1, 0);
        }
        self.counts[i] += n;
    }

    fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The same drops in buckets twice as wide.
    fn coarsen(&mut self) {
        let old = std::mem::take(self);
        for (i, n) in old.counts.iter().enumerate().filter(|(_, n)| **n > 0) {
            self.add((old.first + i) / 2, *n);
        }
    }

    /// A histogram of `buckets` buckets; drops past the end (drained after
    /// the recording stopped) count in the last.
    fn histogram(&self, buckets: usize, bucket_ms: u64) -> Histogram {
        let mut counts = vec![0; buckets];
        for (i, n) in self.counts.iter().enumerate() {
            counts[(self.first + i).min(buckets - 1)] += n;
        }
        Histogram { bucket_ms, counts }
    }
}

/// Per-source drop series in bounded memory. At most `capacity` sources
/// are tracked, chosen by Space-Saving, so every source with more than
/// total/capacity drops is among them; the drops of sources pushed out are
/// kept per namespace and reason in `others`, so those totals stay exact.
pub struct DropTable {
    start_ns: u64,
    bucket_ns: u64,
    heavy: SpaceSaving<SourceKey>,
    /// Per Space-Saving slot: the drops of the key now in it.
    series: Vec<Series>,
    others: HashMap<(u32, Reason), Series>,
    totals: HashMap<Reason, u64>,
}

/// One source's drops at the end of a recording.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceRow {
    pub key: SourceKey,
    /// Drops counted for this source (exact since it was last tracked).
    pub drops: u64,
    /// Drops it may have had before that and that count in `others`: 0
    /// unless the table ran out of room.
    pub error: u64,
    pub histogram: Histogram,
}

/// Drops of sources the table had no room to keep, per namespace and reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OthersRow {
    pub netns: u32,
    pub reason: Reason,
    pub drops: u64,
    pub histogram: Histogram,
}

/// How far from exact a finished table is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Approximation {
    pub capacity: usize,
    /// Times a source was pushed out to make room.
    pub evictions: u64,
    /// No source's drops are short by more than this.
    pub error_bound: u64,
}

impl DropTable {
    pub fn new(start_ns: u64, bucket_ns: u64, capacity: usize) -> Self {
        assert!(bucket_ns > 0, "bucket width must be positive");
        DropTable {
            start_ns,
            bucket_ns,
            heavy: SpaceSaving::new(capacity),
            series: Vec::new(),
            others: HashMap::new(),
            totals: HashMap::new(),
        }
    }

    pub fn add(&mut self, key: SourceKey, ts_ns: u64) {
        while bucket_index(self.start_ns, self.bucket_ns, ts_ns) >= MAX_BUCKETS {
            self.coarsen();
        }
        let bucket = bucket_index(self.start_ns, self.bucket_ns, ts_ns);
        let added = self.heavy.add(&key, ts_ns);
        if added.slot == self.series.len() {
            self.series.push(Series::default());
        }
        if let Some((evicted, _)) = added.replaced {
            let gone = std::mem::take(&mut self.series[added.slot]);
            let others = self.others.entry((evicted.netns, evicted.reason)).or_default();
            for (i, n) in gone.counts.iter().enumerate().filter(|(_, n)| **n > 0) {
                others.add(gone.first + i, *n);
            }
        }
        self.series[added.slot].add(bucket, 1);
        *self.totals.entry(key.reason).or_default() += 1;
    }

    fn coarsen(&mut self) {
        self.bucket_ns *= 2;
        self.series.iter_mut().chain(self.others.values_mut()).for_each(Series::coarsen);
    }

    pub fn total(&self, reason: Reason) -> u64 {
        self.totals.get(&reason).copied().unwrap_or(0)
    }

    /// None while every source fitted: then every row is exact.
    pub fn approximation(&self) -> Option<Approximation> {
        (self.heavy.evictions() > 0).then(|| Approximation {
            capacity: self.heavy.capacity(),
            evictions: self.heavy.evictions(),
            error_bound: self.heavy.error_bound(),
        })
    }

    /// Rows for a recording that ended at `end_ns`, heaviest source first,
    /// and the others per reason. Every histogram has the same number of
    /// buckets and sums to its row's drops.
    pub fn finish(&self, end_ns: u64) -> (Vec<SourceRow>, Vec<OthersRow>) {
        let buckets = bucket_count(end_ns.saturating_sub(self.start_ns), self.bucket_ns);
        let bucket_ms = self.bucket_ns / 1_000_000;
        let mut rows: Vec<SourceRow> = self
            .series
            .iter()
            .enumerate()
            .map(|(slot, series)| {
                let counter = self.heavy.slot(slot);
                SourceRow {
                    key: counter.key,
                    drops: series.total(),
                    error: counter.error,
                    histogram: series.histogram(buckets, bucket_ms),
                }
            })
            .collect();
        rows.sort_by(|a, b| b.drops.cmp(&a.drops).then(a.key.cmp(&b.key)));
        let mut others: Vec<OthersRow> = self
            .others
            .iter()
            .map(|(&(netns, reason), series)| OthersRow {
                netns,
                reason,
                drops: series.total(),
                histogram: series.histogram(buckets, bucket_ms),
            })
            .collect();
        others.sort_by_key(|o| (o.netns, o.reason));
        (rows, others)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn key(src: &str, reason: Reason) -> SourceKey {
        SourceKey {
            netns: 1,
            src: src.parse().unwrap(),
            dport: 80,
            proto: Protocol::Tcp,
            state: ConnState::SynSent,
            reason,
        }
    }

    #[test]
    fn buckets() {
        assert_eq!(bucket_index(100, SEC, 100), 0);
        assert_eq!(bucket_index(100, SEC, 100 + SEC - 1), 0);
        assert_eq!(bucket_index(100, SEC, 100 + SEC), 1);
        assert_eq!(bucket_index(100, SEC, 50), 0);
        assert_eq!(bucket_count(0, SEC), 1);
        assert_eq!(bucket_count(SEC, SEC), 1);
        assert_eq!(bucket_count(SEC + 1, SEC), 2);
        assert_eq!(bucket_count(10 * SEC, SEC), 10);
    }

    #[test]
    fn histograms_sum_to_drops_and_share_a_length() {
        let start = 5 * SEC;
        let mut table = DropTable::new(start, SEC, 16);
        let a = key("198.18.0.3", Reason::TableFull);
        let b = key("198.18.0.4", Reason::TableFull);
        for t in [0, SEC / 2, SEC + 1, 2 * SEC + 5] {
            table.add(a, start + t);
        }
        table.add(b, start + 3 * SEC);
        // Drained after the end: lands in the last bucket.
        table.add(b, start + 9 * SEC);

        let (rows, others) = table.finish(start + 4 * SEC);
        assert!(others.is_empty() && table.approximation().is_none());
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].key, a);
        assert_eq!(rows[0].drops, 4);
        assert_eq!(rows[0].histogram.counts, [2, 1, 1, 0]);
        assert_eq!(rows[1].histogram.counts, [0, 0, 0, 2]);
        assert_eq!(rows[1].drops, 2);
        assert_eq!(rows[0].histogram.bucket_ms, 1000);
        assert_eq!(table.total(Reason::TableFull), 6);
        assert_eq!(table.total(Reason::Ruleset), 0);
    }

    #[test]
    fn log2_rate_bins() {
        let bins = rate_histogram([0.2, 0.9, 1.0, 1.5, 3.0, 100.0]);
        let counts: Vec<u64> = bins.iter().map(|b| b.sources).collect();
        // [0,1) [1,2) [2,4) [4,8) [8,16) [16,32) [32,64) [64,128)
        assert_eq!(counts, [2, 2, 1, 0, 0, 0, 0, 1]);
        assert_eq!((bins[7].from, bins[7].to), (64.0, 128.0));
        assert!(rate_histogram([]).is_empty());
    }

    #[test]
    fn keys_keep_reasons_apart() {
        let mut table = DropTable::new(0, SEC, 16);
        table.add(key("198.18.0.3", Reason::TableFull), 1);
        table.add(key("198.18.0.3", Reason::Ruleset), 2);
        table.add(key("198.18.0.3", Reason::Ruleset), 3);
        let (rows, _) = table.finish(SEC);
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].key.reason, rows[0].drops), (Reason::Ruleset, 2));
        assert_eq!((rows[1].key.reason, rows[1].drops), (Reason::TableFull, 1));
    }

    #[test]
    fn a_spoofed_flood_stays_bounded_and_its_totals_exact() {
        let mut table = DropTable::new(0, SEC, 8);
        let heavy = key("198.18.0.3", Reason::TableFull);
        // 1,000 one-drop sources, and one source with 300 drops among them.
        for i in 0..1_000u32 {
            let src = std::net::Ipv4Addr::from(0xc612_0000 + i + 10).to_string();
            table.add(key(&src, Reason::TableFull), u64::from(i) * SEC / 100);
            if i % 3 == 0 && i < 900 {
                table.add(heavy, u64::from(i) * SEC / 100);
            }
        }
        let (rows, others) = table.finish(10 * SEC);
        assert!(rows.len() <= 8, "at most capacity rows");
        let approx = table.approximation().expect("it ran out of room");
        assert_eq!(approx.capacity, 8);
        // The heavy source is kept, and its count is exact up to the bound.
        let row = rows.iter().find(|r| r.key == heavy).expect("the heavy hitter is tracked");
        assert!(row.drops <= 300 && row.drops + row.error >= 300, "{row:?}");
        assert!(row.error <= approx.error_bound);
        // Rows and others add up to the exact total, histograms to drops.
        let kept: u64 = rows.iter().map(|r| r.drops).sum();
        let other: u64 = others.iter().map(|o| o.drops).sum();
        assert_eq!(kept + other, 1_300);
        assert_eq!(table.total(Reason::TableFull), 1_300);
        for r in &rows {
            assert_eq!(r.histogram.counts.iter().sum::<u64>(), r.drops);
        }
        assert_eq!(others[0].histogram.counts.iter().sum::<u64>(), others[0].drops);
    }

    #[test]
    fn long_recordings_widen_buckets_instead_of_growing() {
        let mut table = DropTable::new(0, SEC, 4);
        let a = key("198.18.0.3", Reason::TableFull);
        for s in 0..1_000u64 {
            table.add(a, s * SEC);
        }
        let (rows, _) = table.finish(1_000 * SEC);
        let h = &rows[0].histogram;
        assert!(h.counts.len() <= MAX_BUCKETS, "{} buckets", h.counts.len());
        assert_eq!(h.bucket_ms, 8_000, "1,000 s in at most 128 buckets: 8 s each");
        assert_eq!(h.counts.iter().sum::<u64>(), 1_000);
        assert_eq!(h.counts[0], 8);
    }
}
