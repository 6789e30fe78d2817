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
use ctrace_common::{counter, drop_flags, kind, KfreeSkbLayout, PacketDrop};

use crate::{
    maps::{count, emit, recent, take_mark, INSERT_FAILED_PENDING, INVALID_PENDING, TABLE_FULL_PENDING},
    read,
    skb::{self, Access, Direct, Net, Probe, Skb, NFCT_PTRMASK},
};

// TP_PROTO(struct sk_buff *skb, void *location, enum skb_drop_reason reason, ...)
// The loader checks this argument order in BTF before loading.
#[btf_tracepoint(function = "kfree_skb")]
pub fn kfree_skb(ctx: BtfTracePointContext) -> i32 {
    let reason: u64 = ctx.arg(2);
    // Every freed packet of the machine comes here: compare the reason before
    // copying the rest of the layout.
    if reason as u32 != skb::netfilter_drop_reason() {
        return 0;
    }
    // The skb argument is BTF-typed: its fields are plain loads.
    let _ = on_netfilter_drop(&skb::layout(), Skb(ctx.arg(0), Direct), ctx.arg(1));
    0
}

// TP_PROTO(struct sk_buff *skb, void *location): kernels before the drop
// reason (before 5.17 unless backported, e.g. Debian 11's 5.10). On NF_DROP
// netfilter frees the packet inside nf_hook_slow, so the free location says
// it; the loader passes that function's code range.
#[btf_tracepoint(function = "kfree_skb")]
pub fn kfree_skb_location(ctx: BtfTracePointContext) -> i32 {
    let location: u64 = ctx.arg(1);
    let (start, end) = skb::drop_site();
    if location < start || location >= end {
        return 0;
    }
    // Through the helper: these verifiers do not keep the layout's offsets
    // known once copied to the stack, and refuse a direct load at them.
    let _ = on_netfilter_drop(&skb::layout(), Skb(ctx.arg(0), Probe), location);
    0
}

#[inline(always)]
fn on_netfilter_drop<A: Access>(layout: &KfreeSkbLayout, skb: Skb<A>, location: u64) -> Result<(), i64> {
    let nth = count(counter::NETFILTER_DROPS);
    let nfct = skb.nfct()?;
    let mut flags = 0;
    if nfct == 0 {
        count(counter::NETFILTER_DROPS_NO_ENTRY);
        if recent(take_mark(&TABLE_FULL_PENDING)) {
            flags |= drop_flags::TABLE_FULL;
        } else if take_mark(&INVALID_PENDING) == skb.0 {
            flags |= drop_flags::INVALID;
        }
    } else {
        flags |= drop_flags::CT_ATTACHED;
        if take_mark(&INSERT_FAILED_PENDING) == skb.0 {
            flags |= drop_flags::INSERT_FAILED;
        } else if layout.ips_confirmed != 0 {
            // Without the insert hooks, an unconfirmed entry is what tells
            // a refused insertion from a rule's drop (user space decides).
            let status: u64 = read::at(nfct & NFCT_PTRMASK, layout.ct_status).unwrap_or(u64::MAX);
            if status & layout.ips_confirmed as u64 == 0 {
                flags |= drop_flags::UNCONFIRMED;
            }
        }
    }

    // SAFETY: a plain helper without arguments.
    let ts_ns = unsafe { bpf_ktime_get_ns() };
    // SAFETY: as above.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let netns = skb.net(layout).and_then(Net::inum).unwrap_or(0);
    emit(counter::RINGBUF_FULL, nth, |record: &mut PacketDrop| {
        record.kind = kind::NETFILTER_DROP;
        record.flags = flags;
        record.location = location;
        record.ts_ns = ts_ns;
        record.cpu = cpu;
        record.netns = netns;
        if skb.headers(layout, record).is_err() {
            record.flags |= drop_flags::NO_HEADER;
        }
        Ok(())
    });
    Ok(())
}
