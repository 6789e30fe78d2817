//! Network namespaces and the kernel's own conntrack counters in each.
//!
//! `/proc/net/stat/nf_conntrack` is per namespace. A namespace is found by the
//! inode the kernel programs report, through `/run/netns/*` (named, possibly
//! without any process) or `/proc/<pid>/ns/net`. Its stat file is opened by a
//! short-lived thread that enters the namespace; the open file stays bound to
//! that namespace, so later reads need no further `setns`.
use std::{
    collections::HashMap,
    fs::{self, File},
    io,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use rustc_hash::FxHashMap;
use serde::Serialize;

use crate::model::Occupancy;

/// Counters of one namespace, summed over CPUs (`entries` is not per CPU).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ConntrackStats {
    pub entries: u64,
    pub invalid: u64,
    pub insert_failed: u64,
    pub drop: u64,
    pub early_drop: u64,
    pub clash_resolve: u64,
    /// Insertions refused because a hash chain was too long (5.17+; 0 before).
    pub chain_too_long: u64,
}

impl ConntrackStats {
    /// Parses the stat file: a header of column names, then one row of hex
    /// numbers per CPU. Columns are found by name, since kernels differ.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut lines = text.lines();
        let header: Vec<&str> = lines.next().ok_or("empty nf_conntrack stat file")?.split_whitespace().collect();
        let mut sums = vec![0u64; header.len()];
        let mut rows = 0;
        for line in lines.filter(|l| !l.trim().is_empty()) {
            let values: Vec<&str> = line.split_whitespace().collect();
            if values.len() != header.len() {
                return Err(format!("stat row has {} columns, header {}", values.len(), header.len()));
            }
            for (sum, value) in sums.iter_mut().zip(&values) {
                *sum += u64::from_str_radix(value, 16).map_err(|e| format!("bad stat value {value:?}: {e}"))?;
            }
            rows += 1;
        }
        let column = |name: &str| header.iter().position(|h| *h == name).map_or(0, |i| sums[i]);
        Ok(ConntrackStats {
            // Every row repeats the namespace-wide entry count.
            entries: column("entries") / rows.max(1),
            invalid: column("invalid"),
            insert_failed: column("insert_failed"),
            drop: column("drop"),
            early_drop: column("early_drop"),
            clash_resolve: column("clashres"),
            // The kernel prints its chaintoolong count under this header.
            chain_too_long: column("chainlength"),
        })
    }

    /// Counter changes from `start` to `self`; entries are a level, not a
    /// counter, so the end value is kept.
    pub fn delta_since(&self, start: &ConntrackStats) -> ConntrackStats {
        ConntrackStats {
            entries: self.entries,
            invalid: self.invalid.wrapping_sub(start.invalid),
            insert_failed: self.insert_failed.wrapping_sub(start.insert_failed),
            drop: self.drop.wrapping_sub(start.drop),
            early_drop: self.early_drop.wrapping_sub(start.early_drop),
            clash_resolve: self.clash_resolve.wrapping_sub(start.clash_resolve),
            chain_too_long: self.chain_too_long.wrapping_sub(start.chain_too_long),
        }
    }

    pub fn is_idle(&self) -> bool {
        *self == ConntrackStats::default()
    }
}

/// A namespace found on the system.
#[derive(Clone, Debug)]
pub struct Netns {
    /// `ip netns` name, or `pid N` of a process inside.
    pub name: String,
    path: PathBuf,
}

/// Lists namespaces: named ones first (their names are what people type),
/// then those only reachable through a process.
pub fn discover() -> HashMap<u32, Netns> {
    let mut found = HashMap::new();
    let mut add = |path: PathBuf, name: String| {
        if let Ok(meta) = fs::metadata(&path) {
            let inum = meta.ino() as u32;
            found.entry(inum).or_insert(Netns { name, path });
        }
    };
    for dir in ["/run/netns", "/var/run/netns"] {
        if let Ok(entries) = fs::read_dir(dir) {
            for entry in entries.flatten() {
                add(entry.path(), entry.file_name().to_string_lossy().into_owned());
            }
        }
    }
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let pid = entry.file_name().to_string_lossy().into_owned();
            if pid.bytes().all(|b| b.is_ascii_digit()) {
                add(entry.path().join("ns/net"), format!("pid {pid}"));
            }
        }
    }
    if let Ok(own) = fs::metadata("/proc/self/ns/net") {
        if let Some(ns) = found.get_mut(&(own.ino() as u32)) {
            if ns.name.starts_with("pid ") {
                ns.name = "host".into(); // ctrace's own, normally the initial namespace
            }
        }
    }
    found
}

/// The namespace a user named: its `ip netns` name, `host`, `pid N`, or
/// its inode number, among those `discover` found.
pub fn select(found: &HashMap<u32, Netns>, selector: &str) -> Option<u32> {
    if let Ok(inum) = selector.parse::<u32>() {
        return found.contains_key(&inum).then_some(inum);
    }
    found.iter().find(|(_, ns)| ns.name == selector).map(|(inum, _)| *inum)
}

/// An open `/proc/net/stat/nf_conntrack` of one namespace.
pub struct StatReader {
    file: File,
    /// The namespace's `nf_conntrack_count` (None where it would not open):
    /// the entry count alone, for the tracepoint tier's table samples,
    /// without formatting the stat file's line per CPU.
    count: Option<File>,
    /// The stat file's text, kept between reads.
    text: Vec<u8>,
}

/// Opens `/proc/net/<name>` of the namespace at `ns_path`, from a thread
/// that enters it (setns affects only the calling thread). The open file
/// stays bound to that namespace.
pub fn open_in(ns_path: &Path, name: &str) -> io::Result<File> {
    open_as_in(ns_path, &Path::new("/proc/thread-self/net").join(name))
}

/// Reads a file that depends on the reader's network namespace (a
/// `/proc/sys/net` sysctl, `/proc/thread-self/net/...`) as seen from the
/// namespace at `ns_path`.
pub fn read_in(ns_path: &Path, path: &Path) -> io::Result<String> {
    io::read_to_string(open_as_in(ns_path, path)?)
}

/// Opens `path` from a thread inside the namespace at `ns_path`.
fn open_as_in(ns_path: &Path, path: &Path) -> io::Result<File> {
    run_in(ns_path, || File::open(path))?
}

/// Runs `f` on a short-lived thread that enters the namespace at `ns_path`
/// (setns moves only the calling thread; files and sockets made there stay
/// bound to the namespace after the thread ends).
pub fn run_in<T: Send>(ns_path: &Path, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    let ns = File::open(ns_path)?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns on a valid namespace fd; only this
                // short-lived thread moves.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("namespace thread panicked")))
    })
}

impl StatReader {
    /// Opens the stat file of the namespace at `ns_path`, and its entry
    /// count (a sysctl file opened inside a namespace reads that one's).
    pub fn open(ns_path: &Path) -> io::Result<Self> {
        let (file, count) = run_in(ns_path, || {
            (File::open("/proc/thread-self/net/stat/nf_conntrack"), File::open(CONNTRACK_COUNT).ok())
        })?;
        Ok(StatReader { file: file?, count, text: Vec::new() })
    }

    /// The counters, summed over CPUs: the file read from offset 0, in as
    /// few reads as its size allows.
    pub fn read(&mut self) -> io::Result<ConntrackStats> {
        self.text.clear();
        let mut at = 0;
        loop {
            if self.text.len() == at {
                self.text.resize(at.max(2048) * 2, 0);
            }
            let n = std::os::unix::fs::FileExt::read_at(&self.file, &mut self.text[at..], at as u64)?;
            if n == 0 {
                break;
            }
            at += n;
        }
        self.text.truncate(at);
        let text = std::str::from_utf8(&self.text).map_err(io::Error::other)?;
        ConntrackStats::parse(text).map_err(io::Error::other)
    }

    /// The entries in the namespace's table now.
    pub fn entries(&mut self) -> io::Result<u64> {
        match self.count.as_ref().and_then(read_number) {
            Some(entries) => Ok(entries),
            None => Ok(self.read()?.entries),
        }
    }
}

const CONNTRACK_MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_max";
const CONNTRACK_COUNT: &str = "/proc/sys/net/netfilter/nf_conntrack_count";

/// The number a sysctl file holds, read at offset 0 (its current value).
fn read_number(file: &File) -> Option<u64> {
    let mut buf = [0u8; 32];
    let n = std::os::unix::fs::FileExt::read_at(file, &mut buf, 0).ok()?;
    std::str::from_utf8(&buf[..n]).ok()?.trim().parse().ok()
}

/// `nf_conntrack_max`: one value for all namespaces.
pub fn conntrack_max() -> Option<u64> {
    fs::read_to_string(CONNTRACK_MAX).ok().and_then(|s| s.trim().parse().ok())
}

/// `nf_conntrack_max` read again and again through one open file (a
/// sysctl file reads its current value at offset 0): the tracepoint tier
/// reads it with each table sample, ten times a second in a storm, and
/// each read opened the path again (a path walk, an open and a close).
#[derive(Default)]
struct MaxReader {
    file: Option<File>,
}

impl MaxReader {
    fn read(&mut self) -> Option<u64> {
        if self.file.is_none() {
            self.file = File::open(CONNTRACK_MAX).ok();
        }
        read_number(self.file.as_ref()?)
    }
}

/// The namespaces ctrace has seen, their stat files, and recent samples of
/// their occupancy. Looked up per drop on the tracepoint tier: Fx maps
/// (inode numbers come from the kernel, not from packets).
pub struct Namespaces {
    known: FxHashMap<u32, Netns>,
    readers: FxHashMap<u32, StatReader>,
    last_scan: Option<Instant>,
    /// The last sample of each namespace's fill: when (a record's
    /// CLOCK_MONOTONIC time) and whether it was full (None: unreadable).
    occupancy: FxHashMap<u32, (u64, Option<bool>)>,
    peaks: FxHashMap<u32, Occupancy>,
    legacy: FxHashMap<u32, (Instant, Option<bool>)>,
    max: MaxReader,
}

/// How long a look at a namespace's legacy x_tables stands.
const LEGACY_TTL: Duration = Duration::from_secs(1);

/// The namespace has legacy x_tables tables (`iptables-legacy`), whose rules
/// return their drops to the netfilter core. A file missing means the
/// family's module is not loaded: no tables of that family anywhere.
fn has_legacy_tables(ns_path: &Path) -> io::Result<bool> {
    run_in(ns_path, || {
        ["ip_tables_names", "ip6_tables_names"].iter().try_fold(false, |found, name| {
            match fs::read_to_string(Path::new("/proc/thread-self/net").join(name)) {
                Ok(tables) => Ok(found || !tables.trim().is_empty()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(found),
                Err(e) => Err(e),
            }
        })
    })?
}

/// How long a sample that found the table full stands for its state, and
/// one that could not read it (a namespace no process holds: looking again
/// per drop would cost a clock read and map lookups per drop).
const FULL_TTL_NS: u64 = 100_000_000;
/// How long one that found room does. A conntrack drop while the last
/// sample found room suggests the table has filled since: read again, at
/// most this often, rather than trust a sample from before the storm.
const ROOM_TTL_NS: u64 = 1_000_000;
/// How often an unknown inode may trigger a rescan of /proc.
const RESCAN_EVERY: Duration = Duration::from_millis(500);
/// How long a list of the namespaces stands for periodic samples. Listing
/// them looks at every process (a `stat` of each `/proc/PID/ns/net`): once
/// a second it was most of an idle `ctrace live`'s CPU time, and it grows
/// with the process count, thousands on a container host. A namespace
/// that drops is looked up at once (see [`RESCAN_EVERY`]); a new, quiet
/// one joins the samples within this.
const LIST_FOR: Duration = Duration::from_secs(5);

impl Default for Namespaces {
    fn default() -> Self {
        Self::new()
    }
}

impl Namespaces {
    pub fn new() -> Self {
        Namespaces {
            known: FxHashMap::default(),
            readers: FxHashMap::default(),
            last_scan: None,
            occupancy: FxHashMap::default(),
            peaks: FxHashMap::default(),
            legacy: FxHashMap::default(),
            max: MaxReader::default(),
        }
    }

    /// Finds the namespaces there are now and forgets those that are gone:
    /// an open stat file pins its namespace in the kernel, so keeping one
    /// would leak a deleted namespace (and a descriptor) per namespace
    /// that ever existed.
    fn rescan(&mut self) {
        let found = discover();
        self.known.retain(|inum, _| found.contains_key(inum));
        self.readers.retain(|inum, _| found.contains_key(inum));
        self.occupancy.retain(|inum, _| found.contains_key(inum));
        self.legacy.retain(|inum, _| found.contains_key(inum));
        for (inum, ns) in found {
            self.known.entry(inum).or_insert(ns);
        }
        self.last_scan = Some(Instant::now());
    }

    /// The path to enter a known namespace by.
    pub fn path(&self, inum: u32) -> Option<PathBuf> {
        self.known.get(&inum).map(|ns| ns.path.clone())
    }

    pub fn name(&self, inum: u32) -> Option<&str> {
        self.known.get(&inum).map(|ns| ns.name.as_str())
    }

    /// Current counters of one namespace, if it can be found.
    pub fn stats(&mut self, inum: u32) -> Option<ConntrackStats> {
        self.reader(inum)?.read().ok()
    }

    /// The namespace's stat reader, opened on first use.
    fn reader(&mut self, inum: u32) -> Option<&mut StatReader> {
        if !self.known.contains_key(&inum) && self.last_scan.is_none_or(|t| t.elapsed() >= RESCAN_EVERY) {
            self.rescan();
        }
        if !self.readers.contains_key(&inum) {
            let reader = StatReader::open(&self.known.get(&inum)?.path).ok()?;
            self.readers.insert(inum, reader);
        }
        self.readers.get_mut(&inum)
    }

    /// Counters of every namespace on the system (rescanning first).
    pub fn snapshot_all(&mut self) -> HashMap<u32, ConntrackStats> {
        self.rescan();
        self.snapshot_known()
    }

    /// Counters of every namespace, for a periodic sample: the list of
    /// namespaces is taken again only when older than [`LIST_FOR`].
    pub fn snapshot_recent(&mut self) -> HashMap<u32, ConntrackStats> {
        if self.last_scan.is_none_or(|t| t.elapsed() >= LIST_FOR) {
            self.rescan();
        }
        self.snapshot_known()
    }

    fn snapshot_known(&mut self) -> HashMap<u32, ConntrackStats> {
        let inums: Vec<u32> = self.known.keys().copied().collect();
        inums.into_iter().filter_map(|inum| Some((inum, self.stats(inum)?))).collect()
    }

    /// The fullest the namespace's table was seen while classifying drops.
    pub fn peak(&self, inum: u32) -> Option<Occupancy> {
        self.peaks.get(&inum).copied()
    }

    /// Does the namespace have legacy x_tables tables? Looked at most once
    /// a second per namespace, failures included (entering it takes a
    /// thread, and this runs per drop); None if it cannot be found or read.
    pub fn legacy_tables(&mut self, inum: u32) -> Option<bool> {
        if let Some((at, found)) = self.legacy.get(&inum) {
            if at.elapsed() < LEGACY_TTL {
                return *found;
            }
        }
        if !self.known.contains_key(&inum) && self.last_scan.is_none_or(|t| t.elapsed() >= RESCAN_EVERY) {
            self.rescan();
        }
        let found = self.known.get(&inum).and_then(|ns| has_legacy_tables(&ns.path).ok());
        self.legacy.insert(inum, (Instant::now(), found));
        found
    }

    /// Was the namespace's table at `nf_conntrack_max` just now? A full
    /// table is sampled at most every 100 ms per namespace, one with room
    /// every millisecond, in the records' time (`ts_ns`, the drop's: no
    /// clock is read per drop); None if it cannot be read.
    pub fn table_at_max(&mut self, inum: u32, ts_ns: u64) -> Option<bool> {
        if let Some(&(at, full)) = self.occupancy.get(&inum) {
            if ts_ns.wrapping_sub(at) < if full == Some(false) { ROOM_TTL_NS } else { FULL_TTL_NS } {
                return full;
            }
        }
        let entries = self.reader(inum).and_then(|r| r.entries().ok());
        let sample = entries.and_then(|entries| Some(Occupancy { entries, max: self.max.read()? }));
        let full = sample.map(|sample| sample.entries >= sample.max);
        self.occupancy.insert(inum, (ts_ns, full));
        if let Some(sample) = sample {
            let peak = self.peaks.entry(inum).or_insert(sample);
            if sample.entries > peak.entries {
                *peak = sample;
            }
        }
        full
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart
00000040  00000001 00000000 00000000 00000002 00000000 00000000 00000000 00000000 00000000 0000000a 00000000 00000000  00000000 00000000 00000000 00000000
00000040  00000000 00000000 00000000 00000001 00000000 00000000 00000004 00000000 00000003 00000005 00000002 00000000  00000000 00000000 00000000 00000000
";

    #[test]
    fn the_open_max_file_reads_what_a_fresh_open_does() {
        // Both None where conntrack is not loaded; read twice, since the
        // second read is the one that reuses the file.
        let mut max = MaxReader::default();
        assert_eq!(max.read(), conntrack_max());
        assert_eq!(max.read(), conntrack_max());
    }

    #[test]
    fn the_count_file_reads_the_stat_files_entries() {
        // This process's own namespace, entered as any other; skipped
        // (there is nothing to read) where conntrack is not loaded.
        let Ok(mut reader) = StatReader::open(Path::new("/proc/self/ns/net")) else {
            assert_eq!(conntrack_max(), None, "conntrack is loaded, yet the stat file did not open");
            return;
        };
        assert!(reader.count.is_some(), "nf_conntrack_count did not open");
        // Entries may come and go between reads: one of a few tries
        // sees the same count before, from the count file, and after.
        let same = (0..20).any(|_| {
            let before = reader.read().unwrap().entries;
            let count = reader.entries().unwrap();
            before == count && reader.read().unwrap().entries == count
        });
        assert!(same, "nf_conntrack_count never agreed with the stat file");
    }

    #[test]
    fn selects_a_namespace_by_name_or_inode() {
        let ns = |name: &str| Netns { name: name.into(), path: PathBuf::from("/proc/1/ns/net") };
        let found = HashMap::from([(4026531840, ns("host")), (4026532177, ns("web")), (4026532300, ns("pid 42"))]);
        assert_eq!(select(&found, "web"), Some(4026532177));
        assert_eq!(select(&found, "host"), Some(4026531840));
        assert_eq!(select(&found, "pid 42"), Some(4026532300));
        assert_eq!(select(&found, "4026532300"), Some(4026532300));
        assert_eq!(select(&found, "4026539999"), None, "an inode that is not there");
        assert_eq!(select(&found, "db"), None);
    }

    #[test]
    fn parses_and_sums_per_cpu_rows() {
        let stats = ConntrackStats::parse(SAMPLE).unwrap();
        assert_eq!(
            stats,
            ConntrackStats {
                entries: 64,
                invalid: 3,
                insert_failed: 3,
                drop: 15,
                early_drop: 2,
                clash_resolve: 1,
                chain_too_long: 4
            }
        );
    }

    #[test]
    fn older_kernels_without_some_columns() {
        let text = "entries searched found new invalid drop early_drop\n00000005 0 0 0 00000001 00000002 0\n";
        let stats = ConntrackStats::parse(text).unwrap();
        assert_eq!((stats.entries, stats.invalid, stats.drop, stats.clash_resolve), (5, 1, 2, 0));
    }

    #[test]
    fn rejects_garbage() {
        assert!(ConntrackStats::parse("").is_err());
        assert!(ConntrackStats::parse("entries drop\nzz 1\n").is_err());
        assert!(ConntrackStats::parse("entries drop\n1\n").is_err());
    }

    #[test]
    fn deltas() {
        let start = ConntrackStats { entries: 10, drop: 5, invalid: 1, ..Default::default() };
        let end = ConntrackStats { entries: 64, drop: 25, invalid: 1, early_drop: 3, ..Default::default() };
        let d = end.delta_since(&start);
        assert_eq!((d.entries, d.drop, d.invalid, d.early_drop), (64, 20, 0, 3));
    }
}
