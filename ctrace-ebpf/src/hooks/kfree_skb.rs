//! Tracepoint tier: `tp_btf/kfree_skb`.
//!
//! Sees every freed packet, keeps only those freed with reason
//! NETFILTER_DROP, and records who sent them and whether conntrack had
//! attached an entry. A table-full drop happens before conntrack can attach
//! one, so "no entry" is what separates conntrack's own drops from rule drops;
//! user space refines the class with the free location and the namespace's
//! table occupancy.
use aya_ebpf::{
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use ctrace_common::{counter, drop_flags, family, kind, KfreeSkbLayout, PacketDrop};

use crate::{
    maps::{count, output, recent, take_mark, INSERT_FAILED_PENDING, TABLE_FULL_PENDING},
    read,
};

/// Filled in by the loader from the running kernel's BTF.
#[unsafe(no_mangle)]
pub(crate) static KFREE_SKB_LAYOUT: KfreeSkbLayout = KfreeSkbLayout {
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

/// `sk_buff._nfct`'s offset, for the conntrack hooks too (one definition).
#[inline(always)]
pub(crate) fn skb_nfct_offset() -> u32 {
    // SAFETY: a read-only global filled in by the loader.
    unsafe { core::ptr::read_volatile(&KFREE_SKB_LAYOUT.skb_nfct) }
}

/// `net.ns.inum`'s offset, for the conntrack hooks too.
#[inline(always)]
pub(crate) fn net_inum_offset() -> u32 {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(&KFREE_SKB_LAYOUT.net_inum) }
}

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_SCTP: u8 = 132;
const IPPROTO_UDPLITE: u8 = 136;
/// `skb->network_header` when no header was set.
const HEADER_UNSET: u16 = u16::MAX;

// TP_PROTO(struct sk_buff *skb, void *location, enum skb_drop_reason reason, ...)
// The loader checks this argument order in BTF before loading.
#[btf_tracepoint(function = "kfree_skb")]
pub fn kfree_skb(ctx: BtfTracePointContext) -> i32 {
    let reason: u64 = ctx.arg(2);
    // Every freed packet of the machine comes here: compare the reason before
    // copying the rest of the layout.
    // SAFETY: a read-only global; read_volatile keeps the compiler from
    // folding the placeholder value above into the code.
    let netfilter_drop = unsafe { core::ptr::read_volatile(&KFREE_SKB_LAYOUT.netfilter_drop_reason) };
    if reason as u32 != netfilter_drop {
        return 0;
    }
    // SAFETY: as above.
    let layout = unsafe { core::ptr::read_volatile(&KFREE_SKB_LAYOUT) };
    let skb: u64 = ctx.arg(0);
    let location: u64 = ctx.arg(1);
    let _ = on_netfilter_drop(&layout, skb, location);
    0
}

fn on_netfilter_drop(layout: &KfreeSkbLayout, skb: u64, location: u64) -> Result<(), i64> {
    count(counter::NETFILTER_DROPS);
    let nfct: u64 = read::at(skb, layout.skb_nfct)?;
    let mut flags = 0;
    if nfct == 0 {
        count(counter::NETFILTER_DROPS_NO_ENTRY);
        if recent(take_mark(&TABLE_FULL_PENDING)) {
            flags |= drop_flags::TABLE_FULL;
        }
    } else {
        flags |= drop_flags::CT_ATTACHED;
        if take_mark(&INSERT_FAILED_PENDING) == skb {
            flags |= drop_flags::INSERT_FAILED;
        }
    }

    let mut record = PacketDrop {
        kind: kind::NETFILTER_DROP,
        flags,
        location,
        // SAFETY: plain helpers without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        cpu: unsafe { bpf_get_smp_processor_id() },
        netns: netns_inum(layout, skb).unwrap_or(0),
        ..PacketDrop::default()
    };
    if read_headers(layout, skb, &mut record).is_err() {
        record.flags |= drop_flags::NO_HEADER;
    }

    output(record, counter::RINGBUF_FULL);
    Ok(())
}

/// The packet's network namespace: the device's for received packets, the
/// socket's for locally generated ones that have no device yet.
pub(crate) fn netns_inum(layout: &KfreeSkbLayout, skb: u64) -> Result<u32, i64> {
    let dev: u64 = read::at(skb, layout.skb_dev)?;
    let net: u64 = if dev != 0 {
        read::at(dev, layout.dev_net)?
    } else {
        let sk: u64 = read::at(skb, layout.skb_sk)?;
        if sk == 0 {
            return Err(0);
        }
        read::at(sk, layout.sock_net)?
    };
    if net == 0 {
        return Err(0);
    }
    read::at(net, layout.net_inum)
}

/// Fills family, protocol, addresses, ports and TCP flags from the packet.
pub(crate) fn read_headers(layout: &KfreeSkbLayout, skb: u64, record: &mut PacketDrop) -> Result<(), i64> {
    let protocol = u16::from_be(read::at::<u16>(skb, layout.skb_protocol)?);
    let head: u64 = read::at(skb, layout.skb_head)?;
    let network_header: u16 = read::at(skb, layout.skb_network_header)?;
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
