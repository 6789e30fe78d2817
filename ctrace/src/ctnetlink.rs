//! A namespace's conntrack table through ctnetlink, conntrack's netlink
//! dump (what `conntrack -L` uses), for the census.
//!
//! The dump resumes each batch at a hash bucket and the entry it stopped
//! at, so entries that leave meanwhile do not make it skip the ones that
//! stayed, as `/proc/net/nf_conntrack` does on kernels before 6.18. It needs
//! `nf_conntrack_netlink`; ctrace uses it only where it is already there
//! (loaded, or built in), since asking the kernel for it would load it, and
//! with it conntrack's event machinery, behind the user's back.
//!
//! The netlink numbers below are the kernel's user-space ABI
//! (`linux/netfilter/nfnetlink*.h`, `nf_conntrack_tcp.h`): fixed, unlike the
//! internal layouts the kernel programs read from BTF.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use crate::{
    census::Entry,
    model::{ConnState, Protocol},
};

const NETLINK_NETFILTER: i32 = 12;
/// `NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET`.
const CT_GET: u16 = (1 << 8) | 1;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_TYPE_MASK: u16 = 0x3fff;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_PROTOINFO: u16 = 4;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTOINFO_TCP: u16 = 1;
const CTA_PROTOINFO_TCP_STATE: u16 = 1;

/// ctnetlink is there without loading anything: a loaded module, a
/// built-in one, or a kernel that cannot load modules at all.
pub fn available() -> bool {
    if Path::new("/sys/module/nf_conntrack_netlink").exists() || !Path::new("/proc/modules").exists() {
        return true;
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    std::fs::read_to_string(format!("/lib/modules/{}/modules.builtin", release.trim()))
        .is_ok_and(|list| list.lines().any(|l| l.ends_with("/nf_conntrack_netlink.ko")))
}

/// Dumps the table of the calling thread's network namespace, handing each
/// entry to `each`; stops after `limit` entries (returns whether it did).
pub fn dump(limit: usize, mut each: impl FnMut(Entry)) -> io::Result<bool> {
    // SAFETY: plain socket calls on an fd owned below.
    let raw = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, NETLINK_NETFILTER) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut request = Vec::with_capacity(20);
    request.extend_from_slice(&20u32.to_ne_bytes());
    request.extend_from_slice(&CT_GET.to_ne_bytes());
    request.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    request.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    request.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    request.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]); // nfgenmsg: every family, v0
                                                                  // SAFETY: a valid buffer on our socket (the kernel is the default peer).
    if unsafe { libc::send(socket.as_raw_fd(), request.as_ptr().cast(), request.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 1 << 16];
    let mut seen = 0;
    loop {
        // SAFETY: a valid buffer of that length.
        let n = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        for message in messages(&buf[..n as usize]) {
            match message {
                Message::Done => return Ok(false),
                Message::Error(errno) => return Err(io::Error::from_raw_os_error(errno)),
                Message::Entry(entry) => {
                    if seen == limit {
                        return Ok(true);
                    }
                    seen += 1;
                    each(entry);
                }
                Message::Other => {}
            }
        }
    }
}

#[derive(Debug, PartialEq)]
enum Message {
    Entry(Entry),
    Done,
    Error(i32),
    Other,
}

/// The netlink messages in one datagram.
fn messages(mut data: &[u8]) -> impl Iterator<Item = Message> + '_ {
    std::iter::from_fn(move || {
        let len = u32::from_ne_bytes(data.get(..4)?.try_into().ok()?) as usize;
        if len < 16 || len > data.len() {
            return None;
        }
        let kind = u16::from_ne_bytes([data[4], data[5]]);
        let payload = &data[16..len];
        data = &data[align(len).min(data.len())..];
        Some(match kind {
            NLMSG_DONE => Message::Done,
            NLMSG_ERROR => {
                let code = payload.get(..4).map_or(0, |b| i32::from_ne_bytes(b.try_into().unwrap()));
                if code == 0 {
                    Message::Other // an acknowledgement
                } else {
                    Message::Error(-code)
                }
            }
            // IPCTNL_MSG_CT_NEW: one entry, after the 4-byte nfgenmsg.
            k if k == 1 << 8 => payload.get(4..).and_then(entry).map_or(Message::Other, Message::Entry),
            _ => Message::Other,
        })
    })
}

fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// The attributes in `data`: (type without flags, value).
fn attributes(mut data: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = u16::from_ne_bytes(data.get(..2)?.try_into().ok()?) as usize;
        if len < 4 || len > data.len() {
            return None;
        }
        let kind = u16::from_ne_bytes([data[2], data[3]]) & NLA_TYPE_MASK;
        let value = &data[4..len];
        data = &data[align(len).min(data.len())..];
        Some((kind, value))
    })
}

fn nested(data: &[u8], kind: u16) -> Option<&[u8]> {
    attributes(data).find(|(k, _)| *k == kind).map(|(_, v)| v)
}

/// One entry: the original direction's source, destination port and
/// protocol, and the TCP state.
fn entry(data: &[u8]) -> Option<Entry> {
    let tuple = nested(data, CTA_TUPLE_ORIG)?;
    let ip = nested(tuple, CTA_TUPLE_IP)?;
    let src = attributes(ip).find_map(|(kind, value)| match kind {
        CTA_IP_V4_SRC => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(value).ok()?))),
        CTA_IP_V6_SRC => Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(value).ok()?))),
        _ => None,
    })?;
    let proto_attrs = nested(tuple, CTA_TUPLE_PROTO)?;
    let proto = Protocol::from_number(*nested(proto_attrs, CTA_PROTO_NUM)?.first()?);
    let dport = nested(proto_attrs, CTA_PROTO_DST_PORT)
        .and_then(|v| Some(u16::from_be_bytes(v.get(..2)?.try_into().ok()?)))
        .unwrap_or(0);
    let state = nested(data, CTA_PROTOINFO)
        .and_then(|info| nested(info, CTA_PROTOINFO_TCP))
        .and_then(|tcp| nested(tcp, CTA_PROTOINFO_TCP_STATE))
        .and_then(|v| v.first())
        .map_or(ConnState::None, |&s| tcp_state(s));
    Some(Entry { src, dport, proto, state })
}

/// `enum tcp_conntrack` (uapi).
fn tcp_state(value: u8) -> ConnState {
    match value {
        1 => ConnState::SynSent,
        2 => ConnState::SynRecv,
        3 => ConnState::Established,
        4 => ConnState::FinWait,
        5 => ConnState::CloseWait,
        6 => ConnState::LastAck,
        7 => ConnState::TimeWait,
        8 => ConnState::Close,
        9 => ConnState::SynSent2,
        _ => ConnState::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(value);
        out.resize(align(out.len()), 0);
        out
    }

    fn nest(kind: u16, parts: &[Vec<u8>]) -> Vec<u8> {
        attr(kind | 0x8000, &parts.concat())
    }

    fn message(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((16 + payload.len()) as u32).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&[0; 10]);
        out.extend_from_slice(payload);
        out.resize(align(out.len()), 0);
        out
    }

    /// A TCP entry as the kernel sends it: nested tuples, then the state.
    fn tcp_entry(src: [u8; 4], dport: u16, state: u8) -> Vec<u8> {
        let tuple = nest(
            CTA_TUPLE_ORIG,
            &[
                nest(CTA_TUPLE_IP, &[attr(CTA_IP_V4_SRC, &src), attr(2, &[198, 18, 1, 1])]),
                nest(
                    CTA_TUPLE_PROTO,
                    &[attr(CTA_PROTO_NUM, &[6]), attr(2, &40000u16.to_be_bytes()), attr(3, &dport.to_be_bytes())],
                ),
            ],
        );
        let info = nest(CTA_PROTOINFO, &[nest(CTA_PROTOINFO_TCP, &[attr(CTA_PROTOINFO_TCP_STATE, &[state])])]);
        let status = attr(3, &8u32.to_be_bytes());
        message(1 << 8, &[vec![2, 0, 0, 0], tuple, status, info].concat())
    }

    #[test]
    fn entries_done_and_errors_are_read_from_a_datagram() {
        let mut datagram = tcp_entry([198, 18, 0, 2], 8080, 7);
        datagram.extend(tcp_entry([198, 18, 0, 3], 443, 3));
        datagram.extend(message(NLMSG_DONE, &0u32.to_ne_bytes()));
        let read: Vec<Message> = messages(&datagram).collect();
        let expected = |src: [u8; 4], dport, state| {
            Message::Entry(Entry { src: IpAddr::from(src), dport, proto: Protocol::Tcp, state })
        };
        assert_eq!(
            read,
            [
                expected([198, 18, 0, 2], 8080, ConnState::TimeWait),
                expected([198, 18, 0, 3], 443, ConnState::Established),
                Message::Done
            ]
        );
        let error = message(NLMSG_ERROR, &(-libc::EPERM).to_ne_bytes());
        assert_eq!(messages(&error).collect::<Vec<_>>(), [Message::Error(libc::EPERM)]);
    }

    #[test]
    fn truncated_or_odd_input_is_skipped_never_panicked_on() {
        let whole = tcp_entry([198, 18, 0, 2], 8080, 7);
        for cut in 0..whole.len() {
            let _ = messages(&whole[..cut]).count();
            let _ = entry(&whole[20..cut.max(20)]);
        }
        // An entry without a state (UDP) is NONE; a port-less protocol, port 0.
        let udp = nest(
            CTA_TUPLE_ORIG,
            &[nest(CTA_TUPLE_IP, &[attr(CTA_IP_V4_SRC, &[198, 18, 0, 6])]), nest(CTA_TUPLE_PROTO, &[attr(1, &[17])])],
        );
        let e = entry(&udp).unwrap();
        assert_eq!((e.proto, e.dport, e.state), (Protocol::Udp, 0, ConnState::None));
    }
}
