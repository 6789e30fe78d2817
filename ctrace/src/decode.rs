//! Ring-buffer bytes -> the event model.
//!
//! Records come from the kernel, but a mismatched object or a future record
//! kind must not crash an incident tool: every length is checked, tags are
//! matched, and anything unknown is an error the caller counts.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ctrace_common::{ct_event, drop_flags, family, kind, ConntrackEvent, PacketDrop};
use thiserror::Error;

use crate::model::{ConnState, CtEvent, CtKind, DropEvent, Occupancy, Protocol};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("empty record")]
    Empty,
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
    #[error("unknown conntrack event {0}")]
    UnknownEvent(u8),
    #[error("record of kind {kind} has {len} bytes, expected {expected}")]
    BadLength { kind: u8, len: usize, expected: usize },
}

/// A decoded ring-buffer record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    Drop(DropEvent),
    Conntrack(CtEvent),
}

/// Reads a `T` from exactly `T`'s size of bytes.
fn read_exact<T: Copy>(tag: u8, bytes: &[u8]) -> Result<T, DecodeError> {
    let expected = std::mem::size_of::<T>();
    if bytes.len() != expected {
        return Err(DecodeError::BadLength { kind: tag, len: bytes.len(), expected });
    }
    // SAFETY: the length was checked, T is plain old data (a ctrace-common
    // record), and read_unaligned makes no alignment assumption.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// Decodes one ring-buffer record.
pub fn decode(bytes: &[u8]) -> Result<Record, DecodeError> {
    let tag = *bytes.first().ok_or(DecodeError::Empty)?;
    match tag {
        kind::NETFILTER_DROP => Ok(Record::Drop(DropEvent::from_raw(&read_exact::<PacketDrop>(tag, bytes)?))),
        kind::CONNTRACK => {
            let raw = read_exact::<ConntrackEvent>(tag, bytes)?;
            let kind = match raw.event {
                ct_event::TABLE_FULL => CtKind::TableFull,
                ct_event::ALLOC_FAILED => CtKind::AllocFailed,
                ct_event::EARLY_DROP => CtKind::EarlyDrop,
                ct_event::INSERT => CtKind::Insert,
                ct_event::INSERT_FAILED => CtKind::InsertFailed,
                ct_event::DELETE => CtKind::Delete,
                ct_event::CLASH_RESOLVED => CtKind::ClashResolved,
                ct_event::INVALID => CtKind::Invalid,
                other => return Err(DecodeError::UnknownEvent(other)),
            };
            let (src, dst) = addresses(raw.family, &raw.src, &raw.dst);
            Ok(Record::Conntrack(CtEvent {
                kind,
                ts_ns: raw.ts_ns,
                netns: raw.netns,
                src,
                dst,
                sport: raw.sport,
                dport: raw.dport,
                proto: Protocol::from_number(raw.proto),
                raw_tcp_state: raw.tcp_state,
                zone: raw.zone,
                entry: raw.entry,
                lifetime_ns: 0,
                table: (raw.table_max != 0)
                    .then_some(Occupancy { entries: raw.table_count as u64, max: raw.table_max as u64 }),
            }))
        }
        other => Err(DecodeError::UnknownKind(other)),
    }
}

/// When ctrace saw each live entry inserted, by the entry's address, for
/// lifetimes at its deletion. Kept here rather than in a kernel map: the
/// kernel programs then do no hash work per connection. At most
/// [`Births::CAPACITY`] entries: beyond that a new entry's birth is not
/// kept, and its deletion carries no lifetime (as for an entry inserted
/// before ctrace started).
#[derive(Default)]
pub struct Births {
    born: rustc_hash::FxHashMap<u64, u64>,
}

impl Births {
    /// 16 bytes each (about 4.5 MiB at most, with the map's overhead).
    pub const CAPACITY: usize = 1 << 17;

    /// Notes an insertion, or gives a deletion its lifetime. A kernel
    /// address is reused once its entry is freed, so a deletion forgets
    /// the address and the next insertion there starts afresh.
    pub fn pair(&mut self, event: &mut CtEvent) {
        if event.entry == 0 {
            return;
        }
        match event.kind {
            CtKind::Insert if self.born.len() < Self::CAPACITY || self.born.contains_key(&event.entry) => {
                self.born.insert(event.entry, event.ts_ns);
            }
            CtKind::Delete | CtKind::EarlyDrop => {
                if let Some(born) = self.born.remove(&event.entry) {
                    // At least 1 ns: 0 means "not seen inserted".
                    event.lifetime_ns = event.ts_ns.saturating_sub(born).max(1);
                }
            }
            _ => {}
        }
    }

    pub fn len(&self) -> usize {
        self.born.len()
    }

    pub fn is_empty(&self) -> bool {
        self.born.is_empty()
    }
}

fn addresses(fam: u8, src: &[u8; 16], dst: &[u8; 16]) -> (IpAddr, IpAddr) {
    match fam {
        family::INET => (v4(src), v4(dst)),
        family::INET6 => (IpAddr::V6(Ipv6Addr::from(*src)), IpAddr::V6(Ipv6Addr::from(*dst))),
        _ => (IpAddr::V4(Ipv4Addr::UNSPECIFIED), IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
    }
}

impl DropEvent {
    pub fn from_raw(raw: &PacketDrop) -> Self {
        let (src, dst) = match raw.family {
            family::INET => (v4(&raw.src), v4(&raw.dst)),
            family::INET6 => (IpAddr::V6(Ipv6Addr::from(raw.src)), IpAddr::V6(Ipv6Addr::from(raw.dst))),
            _ => (IpAddr::V4(Ipv4Addr::UNSPECIFIED), IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        };
        let proto = Protocol::from_number(raw.proto);
        let ct_attached = raw.flags & drop_flags::CT_ATTACHED != 0;
        DropEvent {
            ts_ns: raw.ts_ns,
            netns: raw.netns,
            cpu: raw.cpu,
            src,
            dst,
            sport: raw.sport,
            dport: raw.dport,
            proto,
            tcp_flags: raw.tcp_flags,
            state: ConnState::implied(proto, raw.tcp_flags, ct_attached),
            ct_attached,
            ct_unconfirmed: ct_attached && raw.flags & drop_flags::UNCONFIRMED != 0,
            header_read: raw.flags & drop_flags::NO_HEADER == 0,
            kernel_table_full: raw.flags & drop_flags::TABLE_FULL != 0,
            kernel_insert_failed: raw.flags & drop_flags::INSERT_FAILED != 0,
            kernel_invalid: raw.flags & drop_flags::INVALID != 0,
            location: raw.location,
        }
    }
}

fn v4(bytes: &[u8; 16]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
}

/// The TCP state of a conntrack event's entry, by the raw value to state
/// table read from BTF (`hooks::conntrack::tcp_states`). Allocation
/// failures have no entry, other protocols no TCP state.
pub fn event_state(tcp_states: &[(u8, ConnState)], ev: &CtEvent) -> ConnState {
    match (ev.proto, ev.kind) {
        (
            Protocol::Tcp,
            CtKind::EarlyDrop | CtKind::Insert | CtKind::InsertFailed | CtKind::ClashResolved | CtKind::Delete,
        ) => tcp_states.iter().find(|(raw, _)| *raw == ev.raw_tcp_state).map_or(ConnState::Unknown, |(_, s)| *s),
        _ => ConnState::None,
    }
}

/// The bytes of a record, as the kernel lays them out (tests, benchmarks).
pub fn encode(raw: &PacketDrop) -> [u8; PacketDrop::SIZE] {
    // SAFETY: PacketDrop is repr(C) plain old data without implicit padding.
    unsafe { std::mem::transmute_copy(raw) }
}

/// The bytes of a conntrack record, as the kernel lays them out.
#[cfg(test)]
pub fn encode_conntrack(raw: &ConntrackEvent) -> [u8; ConntrackEvent::SIZE] {
    // SAFETY: as above.
    unsafe { std::mem::transmute_copy(raw) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn syn_v4() -> PacketDrop {
        let mut raw = PacketDrop {
            kind: kind::NETFILTER_DROP,
            family: family::INET,
            proto: 6,
            netns: 4026532000,
            ts_ns: 123,
            location: 0xffff_ffff_8100_0000,
            cpu: 1,
            sport: 40000,
            dport: 8080,
            tcp_flags: 0x02,
            ..Default::default()
        };
        raw.src[..4].copy_from_slice(&[198, 18, 0, 3]);
        raw.dst[..4].copy_from_slice(&[198, 18, 1, 1]);
        raw
    }

    #[test]
    fn round_trips_an_ipv4_syn() {
        let Record::Drop(event) = decode(&encode(&syn_v4())).unwrap() else { panic!("not a drop") };
        assert_eq!(event.src, "198.18.0.3".parse::<IpAddr>().unwrap());
        assert_eq!(event.dst, "198.18.1.1".parse::<IpAddr>().unwrap());
        assert_eq!((event.sport, event.dport, event.proto), (40000, 8080, Protocol::Tcp));
        assert_eq!(event.state, ConnState::SynSent);
        assert!(!event.ct_attached);
        assert!(event.header_read);
        assert_eq!((event.netns, event.ts_ns, event.cpu), (4026532000, 123, 1));
    }

    #[test]
    fn round_trips_ipv6_and_flags() {
        let mut raw = syn_v4();
        raw.family = family::INET6;
        raw.proto = 17;
        raw.tcp_flags = 0;
        raw.flags = drop_flags::CT_ATTACHED;
        let src: Ipv6Addr = "2001:db8::1".parse().unwrap();
        raw.src = src.octets();
        let Record::Drop(event) = decode(&encode(&raw)).unwrap() else { panic!("not a drop") };
        assert_eq!(event.src, IpAddr::V6(src));
        assert_eq!(event.proto, Protocol::Udp);
        assert_eq!(event.state, ConnState::None);
        assert!(event.ct_attached);
    }

    #[test]
    fn bad_records_are_errors() {
        assert_eq!(decode(&[]), Err(DecodeError::Empty));
        assert_eq!(decode(&[99, 0, 0]), Err(DecodeError::UnknownKind(99)));
        let bytes = encode(&syn_v4());
        assert!(matches!(decode(&bytes[..10]), Err(DecodeError::BadLength { .. })));
        let mut long = bytes.to_vec();
        long.push(0);
        assert!(matches!(decode(&long), Err(DecodeError::BadLength { .. })));
    }

    #[test]
    fn round_trips_conntrack_events() {
        let mut raw = ConntrackEvent {
            kind: kind::CONNTRACK,
            event: ct_event::EARLY_DROP,
            family: family::INET,
            proto: 6,
            netns: 7,
            ts_ns: 5,
            entry: 0xffff_8880_0000_1000,
            tcp_state: 7,
            sport: 1234,
            dport: 80,
            ..Default::default()
        };
        raw.src[..4].copy_from_slice(&[198, 18, 0, 9]);
        let Record::Conntrack(ev) = decode(&encode_conntrack(&raw)).unwrap() else { panic!("not conntrack") };
        assert_eq!(ev.kind, CtKind::EarlyDrop);
        assert_eq!(ev.src.to_string(), "198.18.0.9");
        assert_eq!((ev.sport, ev.dport, ev.raw_tcp_state, ev.entry), (1234, 80, 7, 0xffff_8880_0000_1000));
        assert_eq!(ev.lifetime_ns, 0, "a lifetime comes from pairing, not decoding");
        assert_eq!(ev.table, None, "no fill: not a refusal");
        raw.table_count = 64;
        raw.table_max = 64;
        let Record::Conntrack(ev) = decode(&encode_conntrack(&raw)).unwrap() else { panic!("not conntrack") };
        assert_eq!(ev.table, Some(Occupancy { entries: 64, max: 64 }));
        // Every event number the kernel programs write has a name.
        for (event, kind) in [
            (ct_event::TABLE_FULL, CtKind::TableFull),
            (ct_event::ALLOC_FAILED, CtKind::AllocFailed),
            (ct_event::INSERT, CtKind::Insert),
            (ct_event::INSERT_FAILED, CtKind::InsertFailed),
            (ct_event::DELETE, CtKind::Delete),
            (ct_event::CLASH_RESOLVED, CtKind::ClashResolved),
            (ct_event::INVALID, CtKind::Invalid),
        ] {
            raw.event = event;
            let Record::Conntrack(ev) = decode(&encode_conntrack(&raw)).unwrap() else { panic!("not conntrack") };
            assert_eq!(ev.kind, kind);
            let serialized = serde_json::to_value(kind).unwrap();
            assert_eq!(serialized, kind.name(), "file and metric names agree");
        }
        raw.event = 99;
        assert_eq!(decode(&encode_conntrack(&raw)), Err(DecodeError::UnknownEvent(99)));
        let bytes = encode_conntrack(&raw);
        assert!(matches!(decode(&bytes[..40]), Err(DecodeError::BadLength { .. })));
    }

    #[test]
    fn decodes_from_unaligned_buffers() {
        let mut buf = [0u8; PacketDrop::SIZE + 1];
        buf[1..].copy_from_slice(&encode(&syn_v4()));
        assert!(matches!(decode(&buf[1..]), Ok(Record::Drop(e)) if e.dport == 8080));
    }

    fn event(kind: CtKind, entry: u64, ts_ns: u64) -> CtEvent {
        CtEvent {
            kind,
            ts_ns,
            netns: 1,
            src: IpAddr::V4(Ipv4Addr::new(198, 18, 0, 9)),
            dst: IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)),
            sport: 1234,
            dport: 80,
            proto: Protocol::Tcp,
            raw_tcp_state: 0,
            zone: 0,
            entry,
            lifetime_ns: 0,
            table: None,
        }
    }

    #[test]
    fn births_pair_insertions_with_deletions() {
        let mut births = Births::default();
        let mut paired = |kind, entry, ts| {
            let mut ev = event(kind, entry, ts);
            births.pair(&mut ev);
            ev.lifetime_ns
        };
        assert_eq!(paired(CtKind::Insert, 0x1000, 100), 0);
        assert_eq!(paired(CtKind::Insert, 0x2000, 150), 0);
        assert_eq!(paired(CtKind::EarlyDrop, 0x1000, 2_100), 2_000);
        assert_eq!(paired(CtKind::Delete, 0x1000, 3_000), 0, "deleted once: the address is forgotten");
        assert_eq!(paired(CtKind::Delete, 0x3000, 3_000), 0, "never seen inserted");
        // The address reused by a new entry: its own lifetime.
        assert_eq!(paired(CtKind::Insert, 0x1000, 5_000), 0);
        assert_eq!(paired(CtKind::Delete, 0x1000, 5_000), 1, "same instant: still seen inserted");
        // Events that neither insert nor delete leave the births alone.
        assert_eq!(paired(CtKind::InsertFailed, 0x2000, 6_000), 0);
        assert_eq!(paired(CtKind::Delete, 0x2000, 7_150), 7_000);
        assert_eq!(paired(CtKind::TableFull, 0, 8_000), 0);
        assert!(births.is_empty());
    }

    #[test]
    fn births_are_bounded() {
        let mut births = Births::default();
        for entry in 1..=(Births::CAPACITY as u64 + 10) {
            births.pair(&mut event(CtKind::Insert, entry << 8, 1));
        }
        assert_eq!(births.len(), Births::CAPACITY);
        let mut late = event(CtKind::Delete, (Births::CAPACITY as u64 + 10) << 8, 9);
        births.pair(&mut late);
        assert_eq!(late.lifetime_ns, 0, "inserted past the bound: no lifetime");
        let mut early = event(CtKind::Delete, 1 << 8, 9);
        births.pair(&mut early);
        assert_eq!(early.lifetime_ns, 8);
    }
}
