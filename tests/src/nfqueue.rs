//! A minimal NFQUEUE listener (nfnetlink_queue over raw netlink): it holds
//! packets that a `queue` rule hands it and releases them when told.
//!
//! Holding packets is how the tests make insertion clashes happen on
//! purpose: two packets of one new flow, both queued after conntrack gave
//! each its own unconfirmed entry, then released one after the other. The
//! second one's confirmation finds the first one's entry: a clash, every
//! time, with no race to win.
use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_VERDICT: u16 = 1;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_COPY_META: u8 = 1;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NF_ACCEPT: u32 = 1;

/// One bound queue. The socket belongs to the namespace it was made in.
pub struct Queue {
    fd: OwnedFd,
    number: u16,
}

impl Queue {
    /// Binds queue `number` in the calling thread's network namespace
    /// (needs CAP_NET_ADMIN there); packets come as metadata only.
    pub fn bind(number: u16) -> anyhow::Result<Self> {
        // SAFETY: plain socket(2); the fd is owned at once.
        let raw = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, NETLINK_NETFILTER) };
        if raw < 0 {
            return Err(io::Error::last_os_error()).context("netlink socket");
        }
        // SAFETY: raw is a fresh descriptor nobody else owns.
        let queue = Queue { fd: unsafe { OwnedFd::from_raw_fd(raw) }, number };
        let command = [NFQNL_CFG_CMD_BIND, 0, 0, libc::AF_INET as u8];
        queue.request(NFQNL_MSG_CONFIG, &[(NFQA_CFG_CMD, &command)]).context("binding the queue")?;
        let mut params = 0u32.to_be_bytes().to_vec();
        params.push(NFQNL_COPY_META);
        queue.request(NFQNL_MSG_CONFIG, &[(NFQA_CFG_PARAMS, &params)]).context("setting the copy mode")?;
        Ok(queue)
    }

    /// Waits until `count` packets are held, or fails after `timeout`;
    /// returns their ids in arrival order.
    pub fn hold(&self, count: usize, timeout: Duration) -> anyhow::Result<Vec<u32>> {
        let deadline = Instant::now() + timeout;
        let mut ids = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        while ids.len() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("only {} of {count} packets reached the queue", ids.len());
            }
            let n = self.recv(&mut buf, left)?;
            for (kind, payload) in messages(&buf[..n]) {
                if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET {
                    if let Some(hdr) = attributes(&payload[4..]).find(|(t, _)| *t == NFQA_PACKET_HDR) {
                        ids.push(u32::from_be_bytes(hdr.1[..4].try_into()?));
                    }
                }
            }
        }
        Ok(ids)
    }

    /// Lets a held packet go on through the hooks after the queue rule.
    pub fn accept(&self, id: u32) -> anyhow::Result<()> {
        let mut verdict = NF_ACCEPT.to_be_bytes().to_vec();
        verdict.extend_from_slice(&id.to_be_bytes());
        self.send(NFQNL_MSG_VERDICT, 0, &[(NFQA_VERDICT_HDR, &verdict)])
    }

    fn request(&self, kind: u16, attrs: &[(u16, &[u8])]) -> anyhow::Result<()> {
        self.send(kind, NLM_F_ACK, attrs)?;
        let mut buf = vec![0u8; 4096];
        let n = self.recv(&mut buf, Duration::from_secs(2))?;
        for (kind, payload) in messages(&buf[..n]) {
            if kind == NLMSG_ERROR {
                let errno = i32::from_ne_bytes(payload[..4].try_into()?);
                if errno != 0 {
                    return Err(io::Error::from_raw_os_error(-errno).into());
                }
                return Ok(());
            }
        }
        bail!("no acknowledgement from nfnetlink_queue")
    }

    fn send(&self, kind: u16, flags: u16, attrs: &[(u16, &[u8])]) -> anyhow::Result<()> {
        let mut msg = Vec::with_capacity(64);
        msg.extend_from_slice(&0u32.to_ne_bytes()); // length, filled in below
        msg.extend_from_slice(&((NFNL_SUBSYS_QUEUE << 8) | kind).to_ne_bytes());
        msg.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes()); // sequence
        msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        msg.extend_from_slice(&[libc::AF_UNSPEC as u8, 0]); // nfgenmsg: family, version
        msg.extend_from_slice(&self.number.to_be_bytes());
        for (kind, value) in attrs {
            msg.extend_from_slice(&(4 + value.len() as u16).to_ne_bytes());
            msg.extend_from_slice(&kind.to_ne_bytes());
            msg.extend_from_slice(value);
            msg.resize(msg.len().next_multiple_of(4), 0);
        }
        let len = msg.len() as u32;
        msg[..4].copy_from_slice(&len.to_ne_bytes());
        // SAFETY: sending from a live buffer of the stated length.
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error()).context("netlink send");
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8], timeout: Duration) -> anyhow::Result<usize> {
        let mut poll = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut poll, 1, timeout.as_millis().max(1) as i32) };
        if ready < 0 {
            return Err(io::Error::last_os_error()).context("poll");
        }
        if ready == 0 {
            return Ok(0);
        }
        // SAFETY: receiving into a live buffer of its own length.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error()).context("netlink recv");
        }
        Ok(n as usize)
    }
}

/// Netlink messages in a datagram: (type, payload after the 16-byte header).
fn messages(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let length = |b: &[u8]| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
    records(buf, 16, length).map(|(head, body)| (u16::from_ne_bytes([head[4], head[5]]), body))
}

/// Attributes after the nfgenmsg header: (type without flag bits, value).
fn attributes(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let length = |b: &[u8]| u16::from_ne_bytes([b[0], b[1]]) as usize;
    records(buf, 4, length).map(|(head, value)| (u16::from_ne_bytes([head[2], head[3]]) & 0x3fff, value))
}

/// Length-prefixed records padded to 4 bytes, as netlink nests them:
/// (header, body). Stops at the first record that does not fit.
fn records(mut buf: &[u8], header: usize, length: fn(&[u8]) -> usize) -> impl Iterator<Item = (&[u8], &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < header {
            return None;
        }
        let len = length(buf);
        if len < header || len > buf.len() {
            return None;
        }
        let record = (&buf[..header], &buf[header..len]);
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
        Some(record)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_messages_and_attributes() {
        // One packet message: nlmsghdr, nfgenmsg, a 7-byte packet header attribute.
        let mut msg = Vec::new();
        msg.extend_from_slice(&32u32.to_ne_bytes());
        msg.extend_from_slice(&((NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET).to_ne_bytes());
        msg.extend_from_slice(&[0; 10]);
        msg.extend_from_slice(&[0, 0, 0, 7]);
        msg.extend_from_slice(&11u16.to_ne_bytes());
        msg.extend_from_slice(&NFQA_PACKET_HDR.to_ne_bytes());
        msg.extend_from_slice(&[0, 0, 0, 42, 8, 0, 1, 0]);
        let all: Vec<_> = messages(&msg).collect();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].0, 0x300);
        let attrs: Vec<_> = attributes(&all[0].1[4..]).collect();
        assert_eq!(attrs, vec![(NFQA_PACKET_HDR, &[0u8, 0, 0, 42, 8, 0, 1][..])]);
        assert!(messages(&msg[..10]).next().is_none(), "a short buffer is not a message");
    }
}
