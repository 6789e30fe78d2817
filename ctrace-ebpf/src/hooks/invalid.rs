//! Invalid packets: those `nf_conntrack_in` leaves without an entry.
//!
//! No slow path serves here: the kernel counts an invalid packet in the middle
//! of `nf_conntrack_in`, so this family hooks that per-packet function's
//! return and is off unless asked for (`--invalid`). At the return, a packet
//! that still has no entry (`skb->_nfct == 0`; untracked packets carry a
//! nonzero marker) was one of three things, told apart by per-CPU marks left
//! by hooks that ran inside the call:
//! - the ICMP error handler rejected it (`error`: marked by the
//!   `nf_conntrack_icmpv*_error` returns),
//! - its entry could not be allocated (`drop`: marked by the table_full
//!   family's allocation return),
//! - otherwise it was invalid (`invalid`, and `drop` too when NF_DROP).
use aya_ebpf::{
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns},
    macros::{fexit, kprobe, kretprobe, map},
    maps::LruHashMap,
    programs::{FExitContext, ProbeContext, RetProbeContext},
};
use ctrace_common::{counter, ct_event, kind, ConntrackEvent};

use crate::{
    maps::{count, emit, recent, set_mark, take_mark, ALLOC_FAILED_PENDING, ICMP_ERROR_PENDING, INVALID_PENDING},
    skb::{self, Net, Skb},
    task,
};

const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
const DEPTH: usize = 4;

/// Packets inside `nf_conntrack_in` on one task, innermost last: a softirq
/// can run the function again on top of a task that is inside it. Entries
/// stay when the stack empties (no delete and re-insert per packet); the LRU
/// drops those of tasks that are gone.
#[repr(C)]
#[derive(Clone, Copy)]
struct Calls {
    depth: u64,
    skbs: [u64; DEPTH],
}

#[map]
static CALLS: LruHashMap<u64, Calls> = LruHashMap::with_max_entries(4096, 0);

#[kprobe]
pub fn ct_in(ctx: ProbeContext) -> u32 {
    let Some(skb) = ctx.arg::<u64>(0) else { return 0 };
    let key = task::key();
    match CALLS.get_ptr_mut(key) {
        Some(calls) => {
            // SAFETY: this task's map value.
            let calls = unsafe { &mut *calls };
            let depth = calls.depth as usize;
            if depth < DEPTH {
                calls.skbs[depth] = skb;
            }
            calls.depth += 1;
        }
        None => {
            let calls = Calls { depth: 1, skbs: [skb, 0, 0, 0] };
            let _ = CALLS.insert(key, calls, 0);
        }
    }
    0
}

#[kretprobe]
pub fn ct_in_ret(ctx: RetProbeContext) -> u32 {
    let key = task::key();
    let Some(calls) = CALLS.get_ptr_mut(key) else { return 0 };
    // SAFETY: this task's map value.
    let calls = unsafe { &mut *calls };
    if calls.depth == 0 {
        return 0;
    }
    calls.depth -= 1;
    let depth = calls.depth as usize;
    let skb = if depth < DEPTH { calls.skbs[depth] } else { 0 };
    if skb != 0 {
        let _ = on_return(skb, ctx.ret::<u64>() as u32);
    }
    0
}

#[kretprobe]
pub fn ct_icmp_error_ret(ctx: RetProbeContext) -> u32 {
    on_icmp_error_return(ctx.ret::<u64>() as i32);
    0
}

#[kretprobe]
pub fn ct_icmp6_error_ret(ctx: RetProbeContext) -> u32 {
    on_icmp_error_return(ctx.ret::<u64>() as i32);
    0
}

// nf_conntrack_in(skb, state) -> unsigned int
#[fexit(function = "nf_conntrack_in")]
pub fn ct_in_fexit(ctx: FExitContext) -> i32 {
    let _ = on_return(ctx.arg(0), ctx.arg::<u64>(2) as u32);
    0
}

// nf_conntrack_icmpv4_error(tmpl, skb, dataoff, state) -> int; the IPv6
// one has the same parameters.
#[fexit(function = "nf_conntrack_icmpv4_error")]
pub fn ct_icmp_error_fexit(ctx: FExitContext) -> i32 {
    on_icmp_error_return(ctx.arg::<u64>(4) as i32);
    0
}

#[fexit(function = "nf_conntrack_icmpv6_error")]
pub fn ct_icmp6_error_fexit(ctx: FExitContext) -> i32 {
    on_icmp_error_return(ctx.arg::<u64>(4) as i32);
    0
}

fn on_icmp_error_return(ret: i32) {
    if ret <= 0 {
        // SAFETY: no arguments.
        set_mark(&ICMP_ERROR_PENDING, unsafe { bpf_ktime_get_ns() });
    }
}

fn on_return(skb: u64, verdict: u32) -> Result<(), i64> {
    // Take the marks whatever happens, so none outlives its packet: the
    // previous packet's invalid mark too (an skb's address is soon reused).
    let icmp_error = recent(take_mark(&ICMP_ERROR_PENDING));
    let alloc_failed = recent(take_mark(&ALLOC_FAILED_PENDING));
    let _ = take_mark(&INVALID_PENDING);
    if verdict != NF_ACCEPT && verdict != NF_DROP {
        return Ok(());
    }
    let skb = Skb::probe(skb);
    if skb.nfct()? != 0 || icmp_error || (verdict == NF_DROP && alloc_failed) {
        return Ok(());
    }
    let nth = count(counter::CT_BASE + ct_event::INVALID as u32);
    if verdict == NF_ACCEPT {
        // Conntrack let it through: if netfilter drops it now, a rule did.
        set_mark(&INVALID_PENDING, skb.0);
    }
    let packet_layout = skb::layout();
    emit(counter::RINGBUF_FULL_CONNTRACK, nth, |record: &mut ConntrackEvent| {
        record.kind = kind::CONNTRACK;
        record.event = ct_event::INVALID;
        record.netns = skb.net(&packet_layout).and_then(Net::inum).unwrap_or(0);
        // SAFETY: plain helpers without arguments.
        record.ts_ns = unsafe { bpf_ktime_get_ns() };
        // SAFETY: as above.
        record.cpu = unsafe { bpf_get_smp_processor_id() };
        let _ = skb.headers(&packet_layout, record);
        Ok(())
    });
    Ok(())
}
