//! Ring-buffer bytes -> the event model.
//!
//! Records come from the kernel, but a mismatched object or a future record
//! kind must not crash an incident tool: every length is checked, tags are
//! matched, and anything unknown is an error the caller counts.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ctrace_common::{drop_flags, family, kind, PacketDrop};
use thiserror::Error;

use crate::model::{ConnState, DropEvent, Protocol};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("empty record")]
    Empty,
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
    #[error("record of kind {kind} has {len} bytes, expected {expected}")]
    BadLength { kind: u8, len: usize, expected: usize },
}

/// Decodes one ring-buffer record.
pub fn decode(bytes: &[u8]) -> Result<DropEvent, DecodeError> {
    let tag = *bytes.first().ok_or(DecodeError::Empty)?;
    match tag {
        kind::NETFILTER_DROP => {
            if bytes.len() != PacketDrop::SIZE {
                return Err(DecodeError::BadLength { kind: tag, len: bytes.len(), expected: PacketDrop::SIZE });
            }
            // SAFETY: the length was checked, PacketDrop is plain old data, and
            // read_unaligned makes no alignment assumption about the buffer.
            let raw = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<PacketDrop>()) };
            Ok(DropEvent::from_raw(&raw))
        }
        other => Err(DecodeError::UnknownKind(other)),
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
            header_read: raw.flags & drop_flags::NO_HEADER == 0,
            location: raw.location,
        }
    }
}

fn v4(bytes: &[u8; 16]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
}

/// The bytes of a record, as the kernel lays them out (tests, benchmarks).
pub fn encode(raw: &PacketDrop) -> [u8; PacketDrop::SIZE] {
    // SAFETY: PacketDrop is repr(C) plain old data without implicit padding.
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
        let event = decode(&encode(&syn_v4())).unwrap();
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
        let event = decode(&encode(&raw)).unwrap();
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
    fn decodes_from_unaligned_buffers() {
        let mut buf = [0u8; PacketDrop::SIZE + 1];
        buf[1..].copy_from_slice(&encode(&syn_v4()));
        assert_eq!(decode(&buf[1..]).unwrap().dport, 8080);
    }
}
