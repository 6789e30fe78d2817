//! The event model: what ctrace knows about an event once decoded.
//!
//! Aggregation, views and exports see only these types, never the raw kernel
//! records, so a change of record layout stops at `decode`.
use std::{fmt, net::IpAddr};

use serde::{Deserialize, Serialize};

/// A packet netfilter dropped, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DropEvent {
    /// CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// Network namespace inode (0: unknown).
    pub netns: u32,
    pub cpu: u32,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub proto: Protocol,
    pub tcp_flags: u8,
    pub state: ConnState,
    /// Conntrack had attached an entry to the packet.
    pub ct_attached: bool,
    /// ... and that entry was not yet confirmed (in the table).
    pub ct_unconfirmed: bool,
    /// The kernel program could read the packet's headers.
    pub header_read: bool,
    /// Kernel address of the code that freed the packet.
    pub location: u64,
    /// The conntrack hooks saw this packet's allocation fail on a full table.
    pub kernel_table_full: bool,
    /// The conntrack hooks saw this packet's entry refused at confirmation.
    pub kernel_insert_failed: bool,
    /// The invalid family saw conntrack find this packet invalid and let it
    /// through: a rule dropped it.
    pub kernel_invalid: bool,
}

/// An event of conntrack's own (kprobe tier).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, strum::IntoStaticStr)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum CtKind {
    TableFull,
    AllocFailed,
    EarlyDrop,
    Insert,
    InsertFailed,
    Delete,
    ClashResolved,
    /// A packet conntrack found invalid (the packet's tuple; no entry).
    Invalid,
}

impl CtKind {
    /// The name files and metrics use.
    pub fn name(self) -> &'static str {
        self.into()
    }
}

/// Conntrack events counted in the kernel (per-CPU counters: exact).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CtTotals {
    pub table_full: u64,
    pub alloc_failed: u64,
    pub early_drop: u64,
    pub insert: u64,
    pub insert_failed: u64,
    /// Absent from files written before ctrace counted it.
    #[serde(default)]
    pub clash_resolved: u64,
    pub delete: u64,
    /// Counted only with `--invalid`.
    #[serde(default)]
    pub invalid: u64,
}

impl CtTotals {
    /// Each count with its event name, in a fixed order.
    pub fn named(&self) -> [(&'static str, u64); 8] {
        [
            (CtKind::TableFull.name(), self.table_full),
            (CtKind::AllocFailed.name(), self.alloc_failed),
            (CtKind::EarlyDrop.name(), self.early_drop),
            (CtKind::Insert.name(), self.insert),
            (CtKind::InsertFailed.name(), self.insert_failed),
            (CtKind::ClashResolved.name(), self.clash_resolved),
            (CtKind::Delete.name(), self.delete),
            (CtKind::Invalid.name(), self.invalid),
        ]
    }
}

/// A conntrack event with the entry's original tuple.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CtEvent {
    pub kind: CtKind,
    pub ts_ns: u64,
    pub netns: u32,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub proto: Protocol,
    /// `enum tcp_conntrack` value; named with the kernel's BTF.
    pub raw_tcp_state: u8,
    pub zone: u16,
    /// The entry's kernel address (0: none); pairs insertion and deletion.
    pub entry: u64,
    /// For deletions and early drops: time since ctrace saw the entry
    /// inserted (0 if it did not). Set by [`crate::decode::Births`].
    pub lifetime_ns: u64,
    /// For table_full: the namespace's entry count and `nf_conntrack_max`
    /// when the kernel refused, as the hook read them (None if it could not).
    pub table: Option<Occupancy>,
}

/// Entries in a namespace's table and the maximum, sampled together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Occupancy {
    pub entries: u64,
    pub max: u64,
}

/// IP protocol, named where conntrack has a tracker for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Icmp,
    Tcp,
    Udp,
    Icmpv6,
    Sctp,
    Udplite,
    Other(u8),
}

impl Protocol {
    pub fn from_number(n: u8) -> Self {
        match n {
            1 => Protocol::Icmp,
            6 => Protocol::Tcp,
            17 => Protocol::Udp,
            58 => Protocol::Icmpv6,
            132 => Protocol::Sctp,
            136 => Protocol::Udplite,
            other => Protocol::Other(other),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Protocol::Icmp => f.write_str("icmp"),
            Protocol::Tcp => f.write_str("tcp"),
            Protocol::Udp => f.write_str("udp"),
            Protocol::Icmpv6 => f.write_str("icmpv6"),
            Protocol::Sctp => f.write_str("sctp"),
            Protocol::Udplite => f.write_str("udplite"),
            Protocol::Other(n) => write!(f, "ip-proto-{n}"),
        }
    }
}

impl Serialize for Protocol {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl std::str::FromStr for Protocol {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let named = [Protocol::Icmp, Protocol::Tcp, Protocol::Udp, Protocol::Icmpv6, Protocol::Sctp, Protocol::Udplite];
        if let Some(p) = named.into_iter().find(|p| p.to_string() == text) {
            return Ok(p);
        }
        text.strip_prefix("ip-proto-")
            .and_then(|n| n.parse().ok())
            .map(Protocol::Other)
            .ok_or_else(|| format!("unknown protocol `{text}`"))
    }
}

impl<'de> Deserialize<'de> for Protocol {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// A connection's TCP state, spelled as `conntrack -L` spells it. The
/// tracepoint tier only ever implies SYN_SENT or ESTABLISHED; the others are
/// the states the conntrack hooks read from entries.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    strum::IntoStaticStr,
    strum::Display,
)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[strum(serialize_all = "SCREAMING_SNAKE_CASE")]
pub enum ConnState {
    /// Not TCP, or a TCP packet that would open no entry.
    None,
    SynSent,
    SynRecv,
    Established,
    FinWait,
    CloseWait,
    LastAck,
    TimeWait,
    Close,
    SynSent2,
    /// The packet had an entry whose state this tier cannot read.
    Unknown,
}

impl ConnState {
    /// The state a packet is in or would open.
    ///
    /// A dropped packet without an entry never got one: its state is the one
    /// conntrack would have given the new entry. A SYN opens `SYN_SENT`; a
    /// bare ACK is picked up mid-stream as `ESTABLISHED` (with the default
    /// `nf_conntrack_tcp_loose=1`); anything else opens nothing (`NONE`).
    pub fn implied(proto: Protocol, tcp_flags: u8, ct_attached: bool) -> Self {
        const SYN: u8 = 0x02;
        const RST: u8 = 0x04;
        const ACK: u8 = 0x10;
        if proto != Protocol::Tcp {
            return ConnState::None;
        }
        if ct_attached {
            return ConnState::Unknown;
        }
        match tcp_flags & (SYN | RST | ACK) {
            SYN => ConnState::SynSent,
            ACK => ConnState::Established,
            _ => ConnState::None,
        }
    }
}

impl ConnState {
    /// The name `conntrack -L` prints (and the record's JSON holds).
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// Why a packet was dropped, as far as ctrace can tell.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    strum::IntoStaticStr,
    strum::Display,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum Reason {
    /// Conntrack could not create an entry while its namespace's table was
    /// at `nf_conntrack_max`.
    TableFull,
    /// Conntrack dropped the packet for another reason (allocation failure,
    /// a tracker's verdict), or the table's occupancy was unknown.
    ConntrackOther,
    /// Conntrack refused to insert the packet's new entry (a clash it could
    /// not resolve, a chain too long): hook tiers only.
    InsertFailed,
    /// A rule (nftables/iptables) dropped the packet.
    Ruleset,
}

impl Reason {
    /// Every reason, in the order views list them.
    pub const ALL: [Reason; 4] = [Reason::TableFull, Reason::ConntrackOther, Reason::InsertFailed, Reason::Ruleset];

    /// Its place in [`Reason::ALL`], for arrays kept per reason.
    pub fn index(self) -> usize {
        match self {
            Reason::TableFull => 0,
            Reason::ConntrackOther => 1,
            Reason::InsertFailed => 2,
            Reason::Ruleset => 3,
        }
    }

    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn implied_states() {
        let tcp = Protocol::Tcp;
        assert_eq!(ConnState::implied(tcp, 0x02, false), ConnState::SynSent);
        assert_eq!(ConnState::implied(tcp, 0x10, false), ConnState::Established);
        assert_eq!(ConnState::implied(tcp, 0x18, false), ConnState::Established); // PSH|ACK
        assert_eq!(ConnState::implied(tcp, 0x12, false), ConnState::None); // SYN|ACK
        assert_eq!(ConnState::implied(tcp, 0x04, false), ConnState::None); // RST
        assert_eq!(ConnState::implied(tcp, 0x02, true), ConnState::Unknown);
        assert_eq!(ConnState::implied(Protocol::Udp, 0, false), ConnState::None);
    }

    #[test]
    fn a_reasons_index_is_its_place_in_all() {
        for (i, reason) in Reason::ALL.into_iter().enumerate() {
            assert_eq!(reason.index(), i, "{reason}");
        }
    }

    #[test]
    fn names_match_conntrack() {
        assert_eq!(ConnState::SynSent.to_string(), "SYN_SENT");
        assert_eq!(ConnState::TimeWait.to_string(), "TIME_WAIT");
        assert_eq!(ConnState::SynSent2.to_string(), "SYN_SENT2");
        // The displayed name is the JSON name, for every state.
        use ConnState::*;
        for state in
            [None, SynSent, SynRecv, Established, FinWait, CloseWait, LastAck, TimeWait, Close, SynSent2, Unknown]
        {
            assert_eq!(serde_json::to_value(state).unwrap(), state.as_str(), "{state:?}");
        }
        assert_eq!(Protocol::from_number(6).to_string(), "tcp");
        assert_eq!(Protocol::from_number(47).to_string(), "ip-proto-47");
        assert_eq!(serde_json::to_string(&Reason::TableFull).unwrap(), "\"table_full\"");
        for p in [6, 17, 1, 58, 132, 136, 47] {
            let proto = Protocol::from_number(p);
            assert_eq!(proto.to_string().parse::<Protocol>().unwrap(), proto);
        }
        assert!("bogus".parse::<Protocol>().is_err());
    }
}
