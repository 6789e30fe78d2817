//! The maths: drops per source with per-interval histograms (`record`),
//! bounded heavy hitters, rate windows and occupancy trends (`live`).
pub mod heavy;
pub mod occupancy;
pub mod window;

use std::{collections::HashMap, net::IpAddr};

use serde::{Deserialize, Serialize};

use crate::model::{ConnState, Protocol, Reason};

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

/// Counts values in bins [0, 1), [1, 2), [2, 4), ... up to the largest.
pub fn log2_bins(values: impl IntoIterator<Item = f64>) -> Vec<(f64, f64, u64)> {
    let mut counts: Vec<u64> = Vec::new();
    for v in values {
        let bin = if v < 1.0 { 0 } else { v.log2().floor() as usize + 1 };
        if counts.len() <= bin {
            counts.resize(bin + 1, 0);
        }
        counts[bin] += 1;
    }
    counts
        .into_iter()
        .enumerate()
        .map(|(i, n)| {
            let (from, to) = if i == 0 { (0.0, 1.0) } else { (2f64.powi(i as i32 - 1), 2f64.powi(i as i32)) };
            (from, to, n)
        })
        .collect()
}

/// Per-source drop series, growing as events arrive.
#[derive(Debug)]
pub struct DropTable {
    start_ns: u64,
    bucket_ns: u64,
    sources: HashMap<SourceKey, Vec<u64>>,
    totals: HashMap<Reason, u64>,
}

/// One source's total and histogram at the end of a recording.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceRow {
    pub key: SourceKey,
    pub drops: u64,
    pub histogram: Histogram,
}

impl DropTable {
    pub fn new(start_ns: u64, bucket_ns: u64) -> Self {
        assert!(bucket_ns > 0, "bucket width must be positive");
        DropTable { start_ns, bucket_ns, sources: HashMap::new(), totals: HashMap::new() }
    }

    pub fn add(&mut self, key: SourceKey, ts_ns: u64) {
        let bucket = bucket_index(self.start_ns, self.bucket_ns, ts_ns);
        let series = self.sources.entry(key).or_default();
        if series.len() <= bucket {
            series.resize(bucket + 1, 0);
        }
        series[bucket] += 1;
        *self.totals.entry(key.reason).or_default() += 1;
    }

    pub fn total(&self, reason: Reason) -> u64 {
        self.totals.get(&reason).copied().unwrap_or(0)
    }

    /// Rows for a recording that ended at `end_ns`, heaviest source first.
    /// Every histogram has the same number of buckets and sums to its row's
    /// drops: events that arrive after the end (drained from the ring buffer
    /// while stopping) count in the last bucket.
    pub fn finish(&self, end_ns: u64) -> Vec<SourceRow> {
        let buckets = bucket_count(end_ns.saturating_sub(self.start_ns), self.bucket_ns);
        let mut rows: Vec<SourceRow> = self
            .sources
            .iter()
            .map(|(key, series)| {
                let mut counts = vec![0; buckets];
                for (i, n) in series.iter().enumerate() {
                    counts[i.min(buckets - 1)] += n;
                }
                SourceRow {
                    key: *key,
                    drops: counts.iter().sum(),
                    histogram: Histogram { bucket_ms: self.bucket_ns / 1_000_000, counts },
                }
            })
            .collect();
        rows.sort_by(|a, b| b.drops.cmp(&a.drops).then(a.key.cmp(&b.key)));
        rows
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
        let mut table = DropTable::new(start, SEC);
        let a = key("198.18.0.3", Reason::TableFull);
        let b = key("198.18.0.4", Reason::TableFull);
        for t in [0, SEC / 2, SEC + 1, 2 * SEC + 5] {
            table.add(a, start + t);
        }
        table.add(b, start + 3 * SEC);
        // Drained after the end: lands in the last bucket.
        table.add(b, start + 9 * SEC);

        let rows = table.finish(start + 4 * SEC);
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
        let mut table = DropTable::new(0, SEC);
        table.add(key("198.18.0.3", Reason::TableFull), 1);
        table.add(key("198.18.0.3", Reason::Ruleset), 2);
        table.add(key("198.18.0.3", Reason::Ruleset), 3);
        let rows = table.finish(SEC);
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].key.reason, rows[0].drops), (Reason::Ruleset, 2));
        assert_eq!((rows[1].key.reason, rows[1].drops), (Reason::TableFull, 1));
    }
}
