//! Who fills the table, from the kernel's own table: `/proc/net/nf_conntrack`
//! of a namespace, counted by source and TCP state.
//!
//! This sees every entry, including those older than ctrace, on every tier.
//! Reading a big table is not free (about a second per million entries), so
//! it runs on its own thread, a few seconds apart, and stops after a bound.
use std::{
    collections::{BTreeMap, HashMap},
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

/// A namespace's table, counted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Census {
    pub entries: u64,
    /// True when the table had more than [`MAX_ENTRIES`] and the rest was not read.
    pub truncated: bool,
    pub by_state: BTreeMap<ConnState, u64>,
    /// By source, most entries first.
    pub by_source: Vec<SourceEntries>,
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
/// The first `src=` is the original direction's source.
pub fn parse_line(line: &str) -> Option<(IpAddr, Protocol, ConnState)> {
    let mut words = line.split_whitespace();
    let _l3 = words.next()?;
    let _l3num = words.next()?;
    let _l4 = words.next()?;
    let proto = Protocol::from_number(words.next()?.parse().ok()?);
    let _timeout = words.next()?;
    let mut state = ConnState::None;
    for word in words {
        if let Some(addr) = word.strip_prefix("src=") {
            return Some((addr.parse().ok()?, proto, state));
        }
        if proto == Protocol::Tcp {
            if let Some(s) = state_named(word) {
                state = s;
            }
        }
    }
    None
}

/// Counts a table's lines.
pub fn count(netns: u32, lines: impl Iterator<Item = String>) -> Census {
    let mut census = Census::default();
    let mut sources: HashMap<(IpAddr, Protocol), BTreeMap<ConnState, u64>> = HashMap::new();
    for (i, line) in lines.enumerate() {
        if i >= MAX_ENTRIES {
            census.truncated = true;
            break;
        }
        let Some((src, proto, state)) = parse_line(&line) else { continue };
        census.entries += 1;
        *census.by_state.entry(state).or_default() += 1;
        *sources.entry((src, proto)).or_default().entry(state).or_default() += 1;
    }
    census.by_source = sources
        .into_iter()
        .map(|((src, proto), states)| {
            let mut states: Vec<(ConnState, u64)> = states.into_iter().collect();
            states.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            SourceEntries { netns, src, proto, entries: states.iter().map(|s| s.1).sum(), states }
        })
        .collect();
    census.by_source.sort_by(|a, b| b.entries.cmp(&a.entries).then(a.src.cmp(&b.src)));
    census
}

/// Reads a namespace's table on a thread that enters it; the result comes
/// back on the returned channel. None if the namespace cannot be entered.
pub fn spawn(netns: u32, ns_path: PathBuf) -> std::sync::mpsc::Receiver<Option<Census>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let census = crate::netns::open_in(&ns_path, "nf_conntrack")
            .ok()
            .map(|file| count(netns, BufReader::new(file).lines().map_while(Result::ok)));
        let _ = tx.send(census);
    });
    rx
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
    }

    #[test]
    fn unknown_lines_are_skipped() {
        assert_eq!(parse_line("garbage"), None);
        assert_eq!(parse_line(""), None);
        let (src, proto, state) = parse_line(TABLE.lines().nth(3).unwrap()).unwrap();
        assert_eq!((src.to_string(), proto, state), ("198.18.0.6".into(), Protocol::Udp, ConnState::None));
    }
}
