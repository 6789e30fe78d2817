//! Who fills the table, from the kernel's own table: `/proc/net/nf_conntrack`
//! of a namespace, counted by source and TCP state.
//!
//! This sees every entry, including those older than ctrace, on every tier.
//! Reading a big table is not free (about a second per million entries), so
//! it runs on its own thread, a few seconds apart, and stops after a bound.
//!
//! The kernel's listing is not a snapshot: it hands out a page of lines per
//! read and finds where to go on by counting entries from the start of the
//! hash table, which all namespaces share. Entries that leave meanwhile,
//! in any namespace, make it skip entries that stayed (seen on 6.1 and
//! 6.12: 668 of 987 lines while another namespace churned; not on 6.18).
//! So a listing short of the namespace's count is taken again, and the
//! census says how many entries the kernel counted.
use std::{
    collections::{BTreeMap, HashMap},
    fs::File,
    io::{BufRead, BufReader},
    net::IpAddr,
    path::PathBuf,
};

use serde::Serialize;

use crate::model::{ConnState, Protocol};

/// Entries read at most per census.
pub const MAX_ENTRIES: usize = 500_000;

/// One source's entries in one namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SourceEntries {
    pub netns: u32,
    pub src: IpAddr,
    pub proto: Protocol,
    pub entries: u64,
    /// Entries by TCP state (`NONE` for other protocols), most first.
    pub states: Vec<(ConnState, u64)>,
}

/// Entries to one destination port (a service), for one protocol.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PortEntries {
    pub proto: Protocol,
    pub dport: u16,
    pub entries: u64,
    /// Entries by TCP state, most first.
    pub states: Vec<(ConnState, u64)>,
}

/// Ports kept in [`Census::by_port`].
pub const TOP_PORTS: usize = 10;

/// A namespace's table, counted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Census {
    /// Entries listed.
    pub entries: u64,
    /// The namespace's entry count (`nf_conntrack_count`) read just after
    /// the listing: more than `entries` when the listing skipped some.
    pub kernel_entries: Option<u64>,
    /// True when the table had more than [`MAX_ENTRIES`] and the rest was not read.
    pub truncated: bool,
    pub by_state: BTreeMap<ConnState, u64>,
    /// By source, most entries first.
    pub by_source: Vec<SourceEntries>,
    /// The [`TOP_PORTS`] destination ports with most entries, most first.
    pub by_port: Vec<PortEntries>,
}

/// What the census reads of one table line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub src: IpAddr,
    pub dport: u16,
    pub proto: Protocol,
    pub state: ConnState,
}

fn state_named(word: &str) -> Option<ConnState> {
    Some(match word {
        "SYN_SENT" => ConnState::SynSent,
        "SYN_RECV" => ConnState::SynRecv,
        "ESTABLISHED" => ConnState::Established,
        "FIN_WAIT" => ConnState::FinWait,
        "CLOSE_WAIT" => ConnState::CloseWait,
        "LAST_ACK" => ConnState::LastAck,
        "TIME_WAIT" => ConnState::TimeWait,
        "CLOSE" => ConnState::Close,
        "SYN_SENT2" => ConnState::SynSent2,
        "NONE" => ConnState::None,
        _ => return None,
    })
}

/// Parses one line of /proc/net/nf_conntrack:
/// `ipv4 2 tcp 6 431999 ESTABLISHED src=.. dst=.. sport=.. dport=.. ...`.
/// The first `src=` and `dport=` are the original direction's.
pub fn parse_line(line: &str) -> Option<Entry> {
    let mut words = line.split_whitespace();
    let _l3 = words.next()?;
    let _l3num = words.next()?;
    let _l4 = words.next()?;
    let proto = Protocol::from_number(words.next()?.parse().ok()?);
    let _timeout = words.next()?;
    let (mut state, mut src) = (ConnState::None, None);
    for word in words {
        if let Some(addr) = word.strip_prefix("src=") {
            src = Some(addr.parse().ok()?);
        } else if let Some(port) = word.strip_prefix("dport=") {
            return Some(Entry { src: src?, dport: port.parse().ok()?, proto, state });
        } else if src.is_none() && proto == Protocol::Tcp {
            if let Some(s) = state_named(word) {
                state = s;
            }
        }
    }
    // Protocols without ports (ICMP has type/code/id instead).
    Some(Entry { src: src?, dport: 0, proto, state })
}

/// States most first, ties by state.
fn sorted(states: BTreeMap<ConnState, u64>) -> Vec<(ConnState, u64)> {
    let mut states: Vec<(ConnState, u64)> = states.into_iter().collect();
    states.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    states
}

/// Counts a table's lines.
pub fn count(netns: u32, lines: impl Iterator<Item = String>) -> Census {
    let mut census = Census::default();
    let mut sources: HashMap<(IpAddr, Protocol), BTreeMap<ConnState, u64>> = HashMap::new();
    let mut ports: HashMap<(Protocol, u16), BTreeMap<ConnState, u64>> = HashMap::new();
    for (i, line) in lines.enumerate() {
        if i >= MAX_ENTRIES {
            census.truncated = true;
            break;
        }
        let Some(Entry { src, dport, proto, state }) = parse_line(&line) else { continue };
        census.entries += 1;
        *census.by_state.entry(state).or_default() += 1;
        *sources.entry((src, proto)).or_default().entry(state).or_default() += 1;
        *ports.entry((proto, dport)).or_default().entry(state).or_default() += 1;
    }
    census.by_source = sources
        .into_iter()
        .map(|((src, proto), states)| {
            let states = sorted(states);
            SourceEntries { netns, src, proto, entries: states.iter().map(|s| s.1).sum(), states }
        })
        .collect();
    census.by_source.sort_by(|a, b| b.entries.cmp(&a.entries).then(a.src.cmp(&b.src)));
    census.by_port = ports
        .into_iter()
        .map(|((proto, dport), states)| {
            let states = sorted(states);
            PortEntries { proto, dport, entries: states.iter().map(|s| s.1).sum(), states }
        })
        .collect();
    census.by_port.sort_by(|a, b| b.entries.cmp(&a.entries).then((a.proto, a.dport).cmp(&(b.proto, b.dport))));
    census.by_port.truncate(TOP_PORTS);
    census
}

/// Listings taken at most per census when they come out short.
const LISTINGS: usize = 3;

/// A listing is complete enough when it misses at most this share of the
/// kernel's count (a busy table changes while it is read).
const SHORT_SHARE: f64 = 0.02;

/// Whether a listing of `listed` entries is short of the kernel's count.
pub fn is_short(listed: u64, kernel: Option<u64>) -> bool {
    kernel.is_some_and(|kernel| (listed as f64) < kernel as f64 * (1.0 - SHORT_SHARE))
}

/// Reads a namespace's table on a thread that enters it; the result comes
/// back on the returned channel. None if the namespace cannot be entered.
pub fn spawn(netns: u32, ns_path: PathBuf) -> std::sync::mpsc::Receiver<Option<Census>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let census = crate::netns::run_in(&ns_path, || take(netns)).ok().flatten();
        let _ = tx.send(census);
    });
    rx
}

/// Lists the table of the calling thread's namespace, again when the
/// listing is short of the kernel's count; the fullest listing is kept.
fn take(netns: u32) -> Option<Census> {
    let mut fullest: Option<Census> = None;
    for _ in 0..LISTINGS {
        let file = File::open("/proc/thread-self/net/nf_conntrack").ok()?;
        let mut census = count(netns, BufReader::new(file).lines().map_while(Result::ok));
        census.kernel_entries = std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count")
            .ok()
            .and_then(|s| s.trim().parse().ok());
        let done = census.truncated || !is_short(census.entries, census.kernel_entries);
        if fullest.as_ref().is_none_or(|f| census.entries > f.entries) {
            fullest = Some(census);
        }
        if done {
            break;
        }
    }
    fullest
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "\
ipv4     2 tcp      6 431999 ESTABLISHED src=198.18.0.2 dst=198.18.1.1 sport=40000 dport=8080 src=198.18.1.1 dst=198.18.0.2 sport=8080 dport=40000 [ASSURED] mark=0 zone=0 use=2
ipv4     2 tcp      6 431999 ESTABLISHED src=198.18.0.2 dst=198.18.1.1 sport=40001 dport=8080 src=198.18.1.1 dst=198.18.0.2 sport=8080 dport=40001 [ASSURED] mark=0 zone=0 use=2
ipv4     2 tcp      6 100 TIME_WAIT src=198.18.0.2 dst=198.18.1.1 sport=40002 dport=8080 src=198.18.1.1 dst=198.18.0.2 sport=8080 dport=40002 [ASSURED] mark=0 zone=0 use=2
ipv4     2 udp      17 29 src=198.18.0.6 dst=198.18.1.1 sport=5000 dport=9 [UNREPLIED] src=198.18.1.1 dst=198.18.0.6 sport=9 dport=5000 mark=0 zone=0 use=2
ipv6     10 tcp      6 50 SYN_RECV src=2001:db8::1 dst=2001:db8::2 sport=1 dport=2 src=2001:db8::2 dst=2001:db8::1 sport=2 dport=1 mark=0 zone=0 use=2
garbage
";

    #[test]
    fn counts_entries_by_source_and_state() {
        let census = count(7, TABLE.lines().map(String::from));
        assert_eq!(census.entries, 5);
        assert!(!census.truncated);
        assert_eq!(census.by_state[&ConnState::Established], 2);
        assert_eq!(census.by_state[&ConnState::TimeWait], 1);
        assert_eq!(census.by_state[&ConnState::None], 1);
        let top = &census.by_source[0];
        assert_eq!((top.src.to_string(), top.entries), ("198.18.0.2".into(), 3));
        assert_eq!(top.states, [(ConnState::Established, 2), (ConnState::TimeWait, 1)]);
        // Ties go by address: IPv4 before IPv6.
        assert_eq!(
            (census.by_source[1].src.to_string(), census.by_source[1].proto),
            ("198.18.0.6".into(), Protocol::Udp)
        );
        assert_eq!(census.by_source[2].states, [(ConnState::SynRecv, 1)]);
        let port = &census.by_port[0];
        assert_eq!((port.proto, port.dport, port.entries), (Protocol::Tcp, 8080, 3));
        assert_eq!(port.states, [(ConnState::Established, 2), (ConnState::TimeWait, 1)]);
        assert_eq!(census.by_port.len(), 3);
    }

    #[test]
    fn unknown_lines_are_skipped() {
        assert_eq!(parse_line("garbage"), None);
        assert_eq!(parse_line(""), None);
        let entry = parse_line(TABLE.lines().nth(3).unwrap()).unwrap();
        assert_eq!(
            (entry.src.to_string(), entry.dport, entry.proto, entry.state),
            ("198.18.0.6".into(), 9, Protocol::Udp, ConnState::None)
        );
        let icmp = "ipv4     2 icmp     1 29 src=198.18.0.2 dst=198.18.1.1 type=8 code=0 id=7 src=198.18.1.1 \
                    dst=198.18.0.2 type=0 code=0 id=7 mark=0 use=1";
        assert_eq!(parse_line(icmp).map(|e| (e.dport, e.proto)), Some((0, Protocol::Icmp)));
    }

    #[test]
    fn a_listing_is_short_when_it_misses_more_than_two_percent() {
        assert!(is_short(94, Some(120)));
        assert!(!is_short(118, Some(120)), "within 2%: a busy table moves while it is read");
        assert!(!is_short(120, Some(120)));
        assert!(!is_short(130, Some(120)), "entries added while reading");
        assert!(!is_short(0, None), "no count to compare with");
        assert!(is_short(0, Some(1)));
    }
}
