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

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_SCTP: u8 = 132;
const IPPROTO_UDPLITE: u8 = 136;
/// `skb->network_header` when no header was set.
const HEADER_UNSET: u16 = u16::MAX;

/// A `struct sk_buff *`.
#[derive(Clone, Copy)]
pub struct Skb(pub u64);

impl Skb {
    /// `skb->_nfct`: the packet's conntrack entry, with its ctinfo in the
    /// low three bits; 0 when conntrack attached none.
    #[inline(always)]
    pub fn nfct(self) -> Result<u64, i64> {
        // SAFETY: as in `layout`.
        read::at(self.0, unsafe { core::ptr::read_volatile(&KFREE_SKB_LAYOUT.skb_nfct) })
    }

    /// The packet's network namespace: the device's for received packets,
    /// the socket's for locally generated ones that have no device yet.
    pub fn net(self, l: &KfreeSkbLayout) -> Result<Net, i64> {
        let dev: u64 = read::at(self.0, l.skb_dev)?;
        let net: u64 = if dev != 0 {
            read::at(dev, l.dev_net)?
        } else {
            let sk: u64 = read::at(self.0, l.skb_sk)?;
            if sk == 0 {
                return Err(0);
            }
            read::at(sk, l.sock_net)?
        };
        if net == 0 {
            return Err(0);
        }
        Ok(Net(net))
    }

    /// Fills family, protocol, addresses, ports and TCP flags from the
    /// packet's headers.
    pub fn headers(self, l: &KfreeSkbLayout, record: &mut PacketDrop) -> Result<(), i64> {
        let protocol = u16::from_be(read::at::<u16>(self.0, l.skb_protocol)?);
        let head: u64 = read::at(self.0, l.skb_head)?;
        let network_header: u16 = read::at(self.0, l.skb_network_header)?;
        if head == 0 || network_header == HEADER_UNSET {
            return Err(0);
        }
        let l3 = head + network_header as u64;
        let l4 = match protocol {
            ETH_P_IP => {
                let ip: [u8; 20] = read::at(l3, 0)?;
                record.family = family::INET;
                record.proto = ip[9];
                record.src[..4].copy_from_slice(&ip[12..16]);
                record.dst[..4].copy_from_slice(&ip[16..20]);
                let fragment_offset = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff;
                if fragment_offset != 0 {
                    return Ok(()); // no transport header in this fragment
                }
                l3 + ((ip[0] & 0x0f) as u64) * 4
            }
            ETH_P_IPV6 => {
                let ip: [u8; 40] = read::at(l3, 0)?;
                record.family = family::INET6;
                record.proto = ip[6]; // next header; extension headers are not walked
                record.src.copy_from_slice(&ip[8..24]);
                record.dst.copy_from_slice(&ip[24..40]);
                l3 + 40
            }
            _ => return Ok(()),
        };
        match record.proto {
            IPPROTO_TCP => {
                let tcp: [u8; 14] = read::at(l4, 0)?;
                record.sport = u16::from_be_bytes([tcp[0], tcp[1]]);
                record.dport = u16::from_be_bytes([tcp[2], tcp[3]]);
                record.tcp_flags = tcp[13];
            }
            IPPROTO_UDP | IPPROTO_SCTP | IPPROTO_UDPLITE => {
                let ports: [u8; 4] = read::at(l4, 0)?;
                record.sport = u16::from_be_bytes([ports[0], ports[1]]);
                record.dport = u16::from_be_bytes([ports[2], ports[3]]);
            }
            _ => {}
        }
        Ok(())
    }
}

/// A `struct net *`.
#[derive(Clone, Copy)]
pub struct Net(pub u64);

impl Net {
    /// `net->ns.inum`: the namespace's inode number, as /proc shows it.
    #[inline(always)]
    pub fn inum(self) -> Result<u32, i64> {
        // SAFETY: as in `layout`.
        read::at(self.0, unsafe { core::ptr::read_volatile(&KFREE_SKB_LAYOUT.net_inum) })
    }
}
