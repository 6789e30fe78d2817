//! The packet and its namespace, as every hook reads them: a socket
//! buffer's fields at the offsets the loader took from BTF, behind typed
//! pointers, so that a hook says what it reads (`skb.nfct()`,
//! `net.inum()`) rather than where (`read::at(skb, offset)`).
use ctrace_common::{family, KfreeSkbLayout, PacketDrop};

use crate::read;

/// Filled in by the loader from the running kernel's BTF (the name is the
/// loader's `kfree_skb::LAYOUT_GLOBAL`; the tracepoint tier needs it first).
#[unsafe(no_mangle)]
static KFREE_SKB_LAYOUT: KfreeSkbLayout = KfreeSkbLayout {
    netfilter_drop_reason: u32::MAX,
    skb_head: 0,
    skb_network_header: 0,
    skb_protocol: 0,
    skb_nfct: 0,
    skb_dev: 0,
    skb_sk: 0,
    dev_net: 0,
    sock_net: 0,
    net_inum: 0,
    ct_status: 0,
    ips_confirmed: 0,
    drop_site_start: 0,
    drop_site_end: 0,
};

/// The whole layout: read once per event, where several fields are used.
#[inline(always)]
pub fn layout() -> KfreeSkbLayout {
    // SAFETY: a read-only global; read_volatile keeps the compiler from
    // folding the placeholder values above into the code.
    unsafe { core::ptr::read_volatile(&KFREE_SKB_LAYOUT) }
}

/// `SKB_DROP_REASON_NETFILTER_DROP` in this kernel: compared before
/// anything else is read, on every packet the machine frees.
#[inline(always)]
pub fn netfilter_drop_reason() -> u32 {
    // SAFETY: as in `layout`.
    unsafe { core::ptr::read_volatile(&KFREE_SKB_LAYOUT.netfilter_drop_reason) }
}

/// The code range where netfilter frees NF_DROP packets (kernels without
/// a drop reason): checked before anything else is read.
#[inline(always)]
pub fn drop_site() -> (u64, u64) {
    // SAFETY: as in `layout`.
    unsafe {
        (
            core::ptr::read_volatile(&KFREE_SKB_LAYOUT.drop_site_start),
            core::ptr::read_volatile(&KFREE_SKB_LAYOUT.drop_site_end),
        )
    }
}

/// `skb->_nfct` without its ctinfo bits: the `struct nf_conn *`.
pub const NFCT_PTRMASK: u64 = !7;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_SCTP: u8 = 132;
const IPPROTO_UDPLITE: u8 = 136;
/// `skb->network_header` when no header was set.
const HEADER_UNSET: u16 = u16::MAX;

/// How a hook reaches the kernel's structures from the pointer it holds.
pub trait Access: Copy {
    fn at<T: Copy>(base: u64, offset: u32) -> Result<T, i64>;
}

/// Through `bpf_probe_read_kernel`: any address (a kprobe's arguments are
/// plain numbers to the verifier).
#[derive(Clone, Copy)]
pub struct Probe;

impl Access for Probe {
    #[inline(always)]
    fn at<T: Copy>(base: u64, offset: u32) -> Result<T, i64> {
        read::at(base, offset)
    }
}

/// Plain loads, for pointers the verifier knows by their BTF type (a
/// `tp_btf` program's arguments, and the pointers loaded from them): it
/// checks each load against BTF and makes it fault-safe (a bad pointer
/// reads 0), with no helper call. The offsets are constants to it: they
/// come from the frozen read-only layout.
#[derive(Clone, Copy)]
pub struct Direct;

impl Access for Direct {
    #[inline(always)]
    fn at<T: Copy>(base: u64, offset: u32) -> Result<T, i64> {
        // SAFETY: see above; the verifier refuses the program otherwise.
        Ok(unsafe { core::ptr::read((base + offset as u64) as *const T) })
    }
}

/// A `struct sk_buff *`, read with `A`.
#[derive(Clone, Copy)]
pub struct Skb<A: Access = Probe>(pub u64, pub A);

impl Skb<Probe> {
    /// A raw address (a kprobe's argument, a map value).
    pub fn probe(addr: u64) -> Self {
        Skb(addr, Probe)
    }
}

impl<A: Access> Skb<A> {
    /// `skb->_nfct`: the packet's conntrack entry, with its ctinfo in the
    /// low three bits; 0 when conntrack attached none.
    #[inline(always)]
    pub fn nfct(self) -> Result<u64, i64> {
        // SAFETY: as in `layout`.
        A::at(self.0, unsafe { core::ptr::read_volatile(&KFREE_SKB_LAYOUT.skb_nfct) })
    }

    /// The packet's network namespace: the device's for received packets,
    /// the socket's for locally generated ones that have no device yet.
    #[inline(always)]
    pub fn net(self, l: &KfreeSkbLayout) -> Result<Net<A>, i64> {
        let dev: u64 = A::at(self.0, l.skb_dev)?;
        let net: u64 = if dev != 0 {
            A::at(dev, l.dev_net)?
        } else {
            let sk: u64 = A::at(self.0, l.skb_sk)?;
            if sk == 0 {
                return Err(0);
            }
            A::at(sk, l.sock_net)?
        };
        if net == 0 {
            return Err(0);
        }
        Ok(Net(net, self.1))
    }

    /// Fills family, protocol, addresses, ports and TCP flags from the
    /// packet's headers (the packet's bytes through the helper: their
    /// offset is the packet's own).
    pub fn headers(self, l: &KfreeSkbLayout, record: &mut PacketDrop) -> Result<(), i64> {
        let protocol = u16::from_be(A::at::<u16>(self.0, l.skb_protocol)?);
        let head: u64 = A::at(self.0, l.skb_head)?;
        let network_header: u16 = A::at(self.0, l.skb_network_header)?;
        if head == 0 || network_header == HEADER_UNSET {
            return Err(0);
        }
        let l3 = head + network_header as u64;
        // One read for both headers where the IP header has no options
        // (nearly always); a read that would cross into unmapped memory
        // (a header at the very end of a page) falls back to one each.
        match protocol {
            ETH_P_IP => {
                if let Ok(bytes) = read::at::<[u8; 20 + L4_BYTES]>(l3, 0) {
                    return match ipv4(record, &bytes[..20]) {
                        Some(20) => {
                            transport(record, &bytes[20..]);
                            Ok(())
                        }
                        Some(l4) => l4_at(record, l3 + l4),
                        None => Ok(()),
                    };
                }
                let ip: [u8; 20] = read::at(l3, 0)?;
                match ipv4(record, &ip) {
                    Some(l4) => l4_at(record, l3 + l4),
                    None => Ok(()),
                }
            }
            ETH_P_IPV6 => {
                if let Ok(bytes) = read::at::<[u8; 40 + L4_BYTES]>(l3, 0) {
                    ipv6(record, &bytes[..40]);
                    transport(record, &bytes[40..]);
                    return Ok(());
                }
                let ip: [u8; 40] = read::at(l3, 0)?;
                ipv6(record, &ip);
                l4_at(record, l3 + 40)
            }
            _ => Ok(()),
        }
    }
}

/// The transport header bytes a record needs (TCP's flags are byte 13).
const L4_BYTES: usize = 14;

/// Family, protocol and addresses from an IPv4 header; the transport
/// header's offset, or None when this fragment has none.
#[inline(always)]
fn ipv4(record: &mut PacketDrop, ip: &[u8]) -> Option<u64> {
    record.family = family::INET;
    record.proto = ip[9];
    record.src[..4].copy_from_slice(&ip[12..16]);
    record.dst[..4].copy_from_slice(&ip[16..20]);
    let fragment_offset = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff;
    if fragment_offset != 0 {
        return None;
    }
    Some(((ip[0] & 0x0f) as u64) * 4)
}

#[inline(always)]
fn ipv6(record: &mut PacketDrop, ip: &[u8]) {
    record.family = family::INET6;
    record.proto = ip[6]; // next header; extension headers are not walked
    record.src.copy_from_slice(&ip[8..24]);
    record.dst.copy_from_slice(&ip[24..40]);
}

/// Reads the transport header at `l4` for [`transport`].
#[inline(always)]
fn l4_at(record: &mut PacketDrop, l4: u64) -> Result<(), i64> {
    let bytes: [u8; L4_BYTES] = read::at(l4, 0)?;
    transport(record, &bytes);
    Ok(())
}

/// Ports and TCP flags from the first [`L4_BYTES`] of the transport header.
#[inline(always)]
fn transport(record: &mut PacketDrop, l4: &[u8]) {
    match record.proto {
        IPPROTO_TCP => {
            record.sport = u16::from_be_bytes([l4[0], l4[1]]);
            record.dport = u16::from_be_bytes([l4[2], l4[3]]);
            record.tcp_flags = l4[13];
        }
        IPPROTO_UDP | IPPROTO_SCTP | IPPROTO_UDPLITE => {
            record.sport = u16::from_be_bytes([l4[0], l4[1]]);
            record.dport = u16::from_be_bytes([l4[2], l4[3]]);
        }
        _ => {}
    }
}

/// A `struct net *`, read with `A`.
#[derive(Clone, Copy)]
pub struct Net<A: Access = Probe>(pub u64, pub A);

impl Net<Probe> {
    /// A raw address (read from a conntrack entry).
    pub fn probe(addr: u64) -> Self {
        Net(addr, Probe)
    }
}

impl<A: Access> Net<A> {
    /// `net->ns.inum`: the namespace's inode number, as /proc shows it.
    #[inline(always)]
    pub fn inum(self) -> Result<u32, i64> {
        // SAFETY: as in `layout`.
        A::at(self.0, unsafe { core::ptr::read_volatile(&KFREE_SKB_LAYOUT.net_inum) })
    }
}
