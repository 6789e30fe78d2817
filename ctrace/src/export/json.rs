//! The `ctrace.drops.v2` record file (documented in docs/record-schema.md).
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

pub use crate::model::CtTotals;
use crate::{
    aggregate::{Histogram, RateBin, SourceRow},
    hooks::{KernelTotals, Tier},
    model::Occupancy,
    model::{ConnState, CtKind, Protocol, Reason},
    netns::ConntrackStats,
    workload::Workload,
};

/// v2 added the workloads (`workloads`, `sources[].src_workload`); a v1
/// file reads as one without them.
pub const SCHEMA: &str = "ctrace.drops.v2";
/// Schemas `report` reads.
pub const SCHEMAS_READ: &[&str] = &["ctrace.drops.v1", SCHEMA];

/// Records are bounded (`--capacity` rows of at most 128 buckets); a file
/// far past that is not one, and reading it whole would cost its size in
/// memory several times over.
pub const MAX_RECORD_BYTES: u64 = 256 << 20;

#[derive(Debug, Serialize, Deserialize)]
pub struct RecordFile {
    pub schema: String,
    pub tier: Tier,
    /// `uname -r` of the traced kernel.
    pub kernel: String,
    pub hostname: String,
    /// RFC 3339, UTC.
    pub started_at: String,
    pub duration_s: f64,
    pub totals: Totals,
    pub kernel_counters: Vec<NetnsCounters>,
    pub sources: Vec<Source>,
    /// Present when more sources dropped than `--capacity` rows could
    /// hold: the rows are then the heaviest, each exact up to `error_bound`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approximate: Option<Approximate>,
    /// Drops of the sources that did not keep a row, per namespace and
    /// reason: with `sources`, each total is exact.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub others: Vec<Others>,
    /// Conntrack's own events per source (kprobe tier; empty otherwise):
    /// insertions, failed insertions, early-drop evictions, deletions,
    /// table-full and allocation failures, keyed like `sources`.
    #[serde(default)]
    pub conntrack_events: Vec<CtRow>,
    /// Conntrack events of the keys that did not keep a row, per kind.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conntrack_others: Vec<CtOthers>,
    /// Hook tiers: how long removed entries held their slots, per final TCP
    /// state (entries whose insertion ctrace saw).
    #[serde(default)]
    pub lifetimes: Vec<Lifetimes>,
    /// Per namespace with entries: entries and nf_conntrack_max each second.
    #[serde(default)]
    pub occupancy: Vec<OccupancySeries>,
    /// Sources by average drop rate, in log2 bins.
    #[serde(default)]
    pub rate_histogram: Vec<RateBin>,
    /// Distinct sources (estimated), the heaviest destinations and the
    /// source prefixes that stand out: what to read when sources are too
    /// many to list. Absent from records of earlier versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flood: Option<crate::aggregate::flood::FloodSummary>,
    /// What each namespace in the record is: host, `ip netns` name,
    /// container or pod (v2).
    #[serde(default)]
    pub workloads: Vec<NetnsWorkload>,
    /// Things the reader should know to trust the figures (lost events,
    /// unresolvable locations, namespaces whose counters could not be read).
    pub notes: Vec<String>,
}

/// Drops by reason, from the decoded events, next to the exact kernel-side
/// counts. `table_full + conntrack_other + ruleset + undecodable + lost_events`
/// equals `kernel.netfilter_drops`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Totals {
    pub table_full: u64,
    pub conntrack_other: u64,
    /// Hook tiers: drops of packets whose entry conntrack refused to insert.
    #[serde(default)]
    pub insert_failed: u64,
    pub ruleset: u64,
    pub lost_events: u64,
    pub undecodable: u64,
    pub kernel: KernelTotals,
    /// Exact counts of conntrack's own events (kprobe tier only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conntrack: Option<CtTotals>,
}

/// How far from exact the per-source rows are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approximate {
    /// Rows kept (`--capacity`).
    pub capacity: usize,
    /// Times a source gave up its row to a new one.
    pub evictions: u64,
    /// No row's drops are short by more than this.
    pub error_bound: u64,
}

impl From<crate::aggregate::Approximation> for Approximate {
    fn from(a: crate::aggregate::Approximation) -> Self {
        Approximate { capacity: a.capacity, evictions: a.evictions, error_bound: a.error_bound }
    }
}

/// Drops of the sources without a row, for one namespace and reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Others {
    pub netns: u32,
    pub reason: Reason,
    pub drops: u64,
    pub histogram: Histogram,
}

impl From<crate::aggregate::OthersRow> for Others {
    fn from(o: crate::aggregate::OthersRow) -> Self {
        Others { netns: o.netns, reason: o.reason, drops: o.drops, histogram: o.histogram }
    }
}

/// Conntrack events of the keys without a row, for one kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CtOthers {
    pub event: CtKind,
    pub count: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Lifetimes of removed entries in one final TCP state, log2 bins of seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lifetimes {
    pub state: ConnState,
    pub entries: u64,
    pub bins: Vec<LifetimeBin>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LifetimeBin {
    /// Seconds, inclusive.
    pub from_s: f64,
    /// Seconds, exclusive.
    pub to_s: f64,
    pub entries: u64,
}

/// A namespace's table over the recording, one sample per `interval_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OccupancySeries {
    pub netns: u32,
    pub name: Option<String>,
    pub interval_ms: u64,
    pub entries: Vec<u64>,
    pub max: Vec<u64>,
}

/// Conntrack events of one kind for one source key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CtRow {
    pub netns: u32,
    pub src: IpAddr,
    pub dport: u16,
    pub proto: Protocol,
    /// The entry's TCP state when the event happened (`NONE` for other protocols).
    pub state: ConnState,
    pub event: CtKind,
    /// Conntrack zone of the entry (0 without zones); absent in older files.
    #[serde(default)]
    pub zone: u16,
    pub count: u64,
    /// Events this key may have had before it kept its row (they count in
    /// `conntrack_others`); 0 unless rows ran out.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub error: u64,
}

/// One namespace's counters over the recording, from its own
/// `/proc/net/stat/nf_conntrack`.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetnsCounters {
    pub netns: u32,
    pub name: Option<String>,
    /// Changes during the recording.
    pub drop: u64,
    pub insert_failed: u64,
    pub early_drop: u64,
    pub invalid: u64,
    /// Clashes resolved without a drop (`clashres`); absent in older files.
    #[serde(default)]
    pub clash_resolve: u64,
    /// Entries at the end, and the (global) maximum then.
    pub entries: u64,
    pub max: Option<u64>,
    /// The fullest the table was seen when ctrace sampled it to classify
    /// conntrack's drops (absent if it never needed to).
    pub occupancy_peak: Option<Occupancy>,
    /// Hook tiers: the entry count and maximum the kernel itself had when it
    /// last refused an allocation here (absent without table-full events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_table_full: Option<Occupancy>,
}

impl NetnsCounters {
    pub fn new(
        netns: u32,
        name: Option<String>,
        delta: &ConntrackStats,
        max: Option<u64>,
        occupancy_peak: Option<Occupancy>,
    ) -> Self {
        NetnsCounters {
            netns,
            name,
            drop: delta.drop,
            insert_failed: delta.insert_failed,
            early_drop: delta.early_drop,
            invalid: delta.invalid,
            clash_resolve: delta.clash_resolve,
            entries: delta.entries,
            max,
            occupancy_peak,
            at_table_full: None,
        }
    }
}

#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    pub netns: u32,
    pub src: IpAddr,
    pub dport: u16,
    pub proto: Protocol,
    pub state: ConnState,
    pub reason: Reason,
    pub drops: u64,
    /// Drops this source may have had before it kept its row (they count
    /// in `others`); 0 unless the record is approximate.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub error: u64,
    pub histogram: Histogram,
    /// The local workload with the source address on an interface (v2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_workload: Option<Workload>,
}

/// A namespace and what lives in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetnsWorkload {
    pub netns: u32,
    pub workload: Workload,
}

impl From<SourceRow> for Source {
    fn from(row: SourceRow) -> Self {
        let k = row.key;
        Source {
            netns: k.netns,
            src: k.src,
            dport: k.dport,
            proto: k.proto,
            state: k.state,
            reason: k.reason,
            drops: row.drops,
            error: row.error,
            histogram: row.histogram,
            src_workload: None,
        }
    }
}

impl RecordFile {
    /// What lives in a namespace of the record (v2 records).
    pub fn workload_of(&self, netns: u32) -> Option<&Workload> {
        self.workloads.iter().find(|w| w.netns == netns).map(|w| &w.workload)
    }

    /// A source row's `source's -> namespace's` workloads, `-` where unknown.
    pub fn workload_column(&self, source: &Source) -> String {
        let label = |w: Option<&Workload>| w.map_or_else(|| "-".to_string(), Workload::label);
        format!("{} -> {}", label(source.src_workload.as_ref()), label(self.workload_of(source.netns)))
    }
    /// Reads a record file, checking its schema.
    pub fn load(path: &std::path::Path) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let size = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?.len();
        if size > MAX_RECORD_BYTES {
            anyhow::bail!(
                "{} is {} MiB, larger than any record ctrace writes (rows are bounded by --capacity); not read",
                path.display(),
                size >> 20
            );
        }
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses a record's text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let probe: serde_json::Value = serde_json::from_str(text).with_context(|| format!("{origin} is not JSON"))?;
        if !SCHEMAS_READ.iter().any(|schema| probe["schema"] == *schema) {
            anyhow::bail!("{origin} is not a ctrace record (schema {}, expected {SCHEMA})", probe["schema"]);
        }
        let record: Self =
            serde_json::from_value(probe).with_context(|| format!("{origin} does not match {SCHEMA}"))?;
        record.check().map_err(|why| anyhow::anyhow!("{origin} does not match {SCHEMA}: {why}"))?;
        Ok(record)
    }

    /// Values the schema's types allow but no recording makes, and that
    /// the renderers could not draw (a zero-width time bucket).
    fn check(&self) -> Result<(), String> {
        if !(self.duration_s.is_finite() && self.duration_s >= 0.0) {
            return Err(format!("duration_s {} is not a length of time", self.duration_s));
        }
        let histograms = || self.sources.iter().map(|s| &s.histogram).chain(self.others.iter().map(|o| &o.histogram));
        if histograms().any(|h| h.bucket_ms == 0) {
            return Err("a histogram has bucket_ms 0".into());
        }
        // Counts whose sums the report takes must have sums.
        let t = &self.totals;
        let totals = [t.table_full, t.conntrack_other, t.insert_failed, t.ruleset, t.undecodable, t.lost_events];
        let drops = self.sources.iter().map(|s| s.drops).chain(self.others.iter().map(|o| o.drops));
        let sums = [checked_sum(totals.into_iter()), checked_sum(drops)];
        if sums.iter().any(Option::is_none) || histograms().any(|h| checked_sum(h.counts.iter().copied()).is_none()) {
            return Err("its counts add up to more than 2^64".into());
        }
        Ok(())
    }

    /// When the recording started, as seconds since the epoch (0 if unknown).
    pub fn started_unix(&self) -> u64 {
        parse_rfc3339_utc(&self.started_at).unwrap_or(0)
    }
}

fn checked_sum(mut values: impl Iterator<Item = u64>) -> Option<u64> {
    values.try_fold(0u64, u64::checked_add)
}

/// Parses what [`rfc3339_utc`] writes.
pub fn parse_rfc3339_utc(text: &str) -> Option<u64> {
    let b = text.as_bytes();
    if b.len() != 20 || b[4] != b'-' || b[10] != b'T' || b[19] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| text.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    // Days from civil (H. Hinnant), the inverse of rfc3339_utc's.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()
}

/// Formats a time as RFC 3339 in UTC, to the second.
pub fn rfc3339_utc(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let secs = unix_secs % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", secs / 3600, secs / 60 % 60, secs % 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::SourceKey;

    #[test]
    fn dates() {
        for t in [0, 951_782_400, 1_795_627_384, 4_102_444_800] {
            assert_eq!(parse_rfc3339_utc(&rfc3339_utc(t)), Some(t));
        }
        assert_eq!(parse_rfc3339_utc("yesterday"), None);
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_utc(1_795_627_384), "2026-11-25T17:23:04Z");
    }

    #[test]
    fn file_has_the_documented_fields() {
        let row = SourceRow {
            key: SourceKey {
                netns: 4026532290,
                src: "198.18.0.3".parse().unwrap(),
                dport: 8080,
                proto: Protocol::Tcp,
                state: ConnState::SynSent,
                reason: Reason::TableFull,
            },
            drops: 3,
            error: 0,
            histogram: Histogram { bucket_ms: 1000, counts: vec![1, 2] },
        };
        let file = RecordFile {
            schema: SCHEMA.into(),
            tier: Tier::Tracepoint,
            kernel: "6.18.0".into(),
            hostname: "h".into(),
            started_at: rfc3339_utc(0),
            duration_s: 2.0,
            totals: Totals { table_full: 3, ..Default::default() },
            kernel_counters: vec![NetnsCounters::new(
                4026532290,
                Some("srv".into()),
                &ConntrackStats { drop: 3, entries: 64, ..Default::default() },
                Some(64),
                Some(Occupancy { entries: 64, max: 64 }),
            )],
            sources: vec![row.into()],
            approximate: None,
            others: vec![],
            conntrack_events: vec![],
            conntrack_others: vec![],
            lifetimes: vec![],
            occupancy: vec![],
            rate_histogram: vec![],
            flood: None,
            workloads: vec![NetnsWorkload {
                netns: 4026532290,
                workload: Workload {
                    kind: crate::workload::Kind::Container,
                    runtime: Some(crate::workload::Runtime::Podman),
                    id: Some("b4077c32".into()),
                    name: Some("srv".into()),
                    pod_namespace: None,
                },
            }],
            notes: vec![],
        };
        let json = serde_json::to_value(&file).unwrap();
        assert_eq!(json["schema"], "ctrace.drops.v2");
        assert_eq!(
            json["workloads"][0],
            serde_json::json!({"netns": 4026532290u32, "workload": {"kind": "container", "runtime": "podman", "id": "b4077c32", "name": "srv"}})
        );
        assert!(json["sources"][0].get("src_workload").is_none(), "absent when the source is not local");
        assert_eq!(json["tier"], "tracepoint");
        assert_eq!(json["totals"]["table_full"], 3);
        assert_eq!(json["totals"]["kernel"]["lost_events"], 0);
        assert_eq!(json["kernel_counters"][0]["drop"], 3);
        assert_eq!(json["kernel_counters"][0]["max"], 64);
        assert_eq!(json["kernel_counters"][0]["occupancy_peak"]["entries"], 64);
        let source = &json["sources"][0];
        assert_eq!(source["src"], "198.18.0.3");
        assert_eq!(source["proto"], "tcp");
        assert_eq!(source["state"], "SYN_SENT");
        assert_eq!(source["reason"], "table_full");
        assert_eq!(source["histogram"]["bucket_ms"], 1000);
        assert_eq!(source["histogram"]["counts"], serde_json::json!([1, 2]));
    }
}
