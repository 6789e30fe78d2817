//! The packet and its namespace, as every hook reads them: a socket
//! buffer's fields at the offsets the loader took from BTF, behind typed
//! pointers, so that a hook says what it reads (`skb.nfct()`,
//! `net.inum()`) rather than where (`read::at(skb, offset)`).
use ctrace_common::{family, ConntrackEvent, KfreeSkbLayout, PacketDrop};

use crate::read::{self, Bytes};

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
    /// Plain loads: several small reads cost less than one helper call.
    const DIRECT: bool;
    fn at<T: Copy>(base: u64, offset: u32) -> Result<T, i64>;
}

/// Through `bpf_probe_read_kernel`: any address (a kprobe's arguments are
/// plain numbers to the verifier).
#[derive(Clone, Copy)]
pub struct Probe;

impl Access for Probe {
    const DIRECT: bool = false;

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
    const DIRECT: bool = true;

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
    #[inline(always)]
    pub fn headers(self, l: &KfreeSkbLayout, record: &mut impl Packet) -> Result<(), i64> {
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
        let mut bytes = Headers::new();
        match protocol {
            ETH_P_IP => {
                if bytes.read(l3, IPV4_BYTES + L4_BYTES).is_ok() {
                    return match ipv4(record, &bytes) {
                        Some(IPV4_BYTES) => {
                            transport(record, &bytes, IPV4_BYTES);
                            Ok(())
                        }
                        Some(l4) => l4_at(record, l3 + l4 as u64),
                        None => Ok(()),
                    };
                }
                bytes.read(l3, IPV4_BYTES)?;
                match ipv4(record, &bytes) {
                    Some(l4) => l4_at(record, l3 + l4 as u64),
                    None => Ok(()),
                }
            }
            ETH_P_IPV6 => {
                if bytes.read(l3, IPV6_BYTES + L4_BYTES).is_ok() {
                    ipv6(record, &bytes);
                    transport(record, &bytes, IPV6_BYTES);
                    return Ok(());
                }
                bytes.read(l3, IPV6_BYTES)?;
                ipv6(record, &bytes);
                l4_at(record, l3 + IPV6_BYTES as u64)
            }
            _ => Ok(()),
        }
    }
}

/// An IPv4 header without options, and an IPv6 header.
const IPV4_BYTES: usize = 20;
const IPV6_BYTES: usize = 40;
/// The transport header bytes a record needs (TCP's flags are byte 13).
const L4_BYTES: usize = 14;

/// Room for the largest single read: an IPv6 header and the transport bytes.
type Headers = Bytes<{ IPV6_BYTES + L4_BYTES }>;

/// Stores an address given as words in packet order.
#[inline(always)]
pub fn set_address(address: &mut [u8; 16], words: [u32; 4]) {
    // SAFETY: a record's addresses sit at 8-aligned offsets of an 8-aligned
    // struct (`PacketDrop` and `ConntrackEvent` both hold u64 fields).
    unsafe { core::ptr::write(address.as_mut_ptr() as *mut [u32; 4], words) }
}

/// Family, protocol and addresses from an IPv4 header; the transport
/// header's offset, or None when this fragment has none.
#[inline(always)]
fn ipv4(record: &mut impl Packet, ip: &Headers) -> Option<usize> {
    record.set_l3(family::INET, ip.u8(9), [ip.word(12), 0, 0, 0], [ip.word(16), 0, 0, 0]);
    let fragment_offset = ip.be16(6) & 0x1fff;
    if fragment_offset != 0 {
        return None;
    }
    Some((ip.u8(0) & 0x0f) as usize * 4)
}

#[inline(always)]
fn ipv6(record: &mut impl Packet, ip: &Headers) {
    record.set_l3(
        family::INET6,
        ip.u8(6), // next header; extension headers are not walked
        [ip.word(8), ip.word(12), ip.word(16), ip.word(20)],
        [ip.word(24), ip.word(28), ip.word(32), ip.word(36)],
    );
}

/// Reads the transport header at `l4` for [`transport`].
#[inline(always)]
fn l4_at(record: &mut impl Packet, l4: u64) -> Result<(), i64> {
    let mut bytes = Headers::new();
    bytes.read(l4, L4_BYTES)?;
    transport(record, &bytes, 0);
    Ok(())
}

/// Ports and TCP flags from the [`L4_BYTES`] of the transport header at `at`.
#[inline(always)]
fn transport(record: &mut impl Packet, bytes: &Headers, at: usize) {
    match record.proto() {
        IPPROTO_TCP => {
            record.set_ports(bytes.be16(at), bytes.be16(at + 2));
            record.set_tcp_flags(bytes.u8(at + 13));
        }
        IPPROTO_UDP | IPPROTO_SCTP | IPPROTO_UDPLITE => record.set_ports(bytes.be16(at), bytes.be16(at + 2)),
        _ => {}
    }
}

/// A record that carries what a packet's headers say.
pub trait Packet {
    /// Family, protocol, and the addresses as words in packet order.
    fn set_l3(&mut self, family: u8, proto: u8, src: [u32; 4], dst: [u32; 4]);
    fn proto(&self) -> u8;
    fn set_ports(&mut self, sport: u16, dport: u16);
    fn set_tcp_flags(&mut self, _flags: u8) {}
}

/// The fields both records name alike.
macro_rules! packet_fields {
    () => {
        #[inline(always)]
        fn set_l3(&mut self, family: u8, proto: u8, src: [u32; 4], dst: [u32; 4]) {
            (self.family, self.proto) = (family, proto);
            set_address(&mut self.src, src);
            set_address(&mut self.dst, dst);
        }

        #[inline(always)]
        fn proto(&self) -> u8 {
            self.proto
        }

        #[inline(always)]
        fn set_ports(&mut self, sport: u16, dport: u16) {
            (self.sport, self.dport) = (sport, dport);
        }
    };
}

impl Packet for PacketDrop {
    packet_fields!();

    #[inline(always)]
    fn set_tcp_flags(&mut self, flags: u8) {
        self.tcp_flags = flags;
    }
}

impl Packet for ConntrackEvent {
    packet_fields!();
}

/// A `struct net *`, read with `A`.
#[derive(Clone, Copy)]
pub struct Net<A: Access = Probe>(pub u64, pub A);

impl<A: Access> Net<A> {
    /// `net->ns.inum`: the namespace's inode number, as /proc shows it.
    #[inline(always)]
    pub fn inum(self) -> Result<u32, i64> {
        // SAFETY: as in `layout`.
        A::at(self.0, unsafe { core::ptr::read_volatile(&KFREE_SKB_LAYOUT.net_inum) })
    }
}
