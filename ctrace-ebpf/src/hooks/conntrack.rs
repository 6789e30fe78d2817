//! Kprobe tier: conntrack's own allocation, eviction, confirmation and
//! deletion paths, for kernels where nf_conntrack is a module.
//!
//! - `__nf_conntrack_alloc` entry saves the flow's tuple (the fentry tier
//!   needs no entry program: its fexit sees the arguments); `early_drop`'s
//!   return says whether room was made; the allocation's return, when it
//!   failed, then tells a full table (nothing evicted) from a memory
//!   failure. A full table also marks this CPU, so the packet's kfree_skb
//!   record carries the kernel's own "table full".
//! - `nf_ct_delete` (or its split part) inside `early_drop` is an eviction;
//!   elsewhere a deletion.
//! - `__nf_conntrack_confirm` returning NF_ACCEPT with the entry now
//!   confirmed is an insertion; NF_DROP is a failed insertion.
//!
//! The thin entry points below only move arguments; the shared functions do
//! the work, so a fentry tier can reuse them.
use aya_ebpf::{
    helpers::{bpf_get_smp_processor_id, bpf_jiffies64, bpf_ktime_get_ns},
    macros::{fentry, fexit, kprobe, kretprobe, map},
    maps::PerCpuArray,
    programs::{FEntryContext, FExitContext, ProbeContext, RetProbeContext},
};
use ctrace_common::{counter, ct_event, kind, ConntrackEvent, ConntrackLayout, PACKED_TUPLE, PACKED_TUPLE_BYTES};

use crate::{
    maps::{count, emit, set_mark, ALLOC_FAILED_PENDING, INSERT_FAILED_PENDING, TABLE_FULL_PENDING},
    read::{self, Bytes},
    skb::{set_address, Access, Direct, Net, Probe, Skb, NFCT_PTRMASK},
    task,
};

#[unsafe(no_mangle)]
static CONNTRACK_LAYOUT: ConntrackLayout = ConntrackLayout {
    ct_tuple: 0,
    ct_status: 0,
    ct_timeout: 0,
    ct_tcp_state: 0,
    ct_net: 0,
    ct_zone: u32::MAX,
    tuple_src_addr: 0,
    tuple_src_port: 0,
    tuple_l3num: 0,
    tuple_dst_addr: 0,
    tuple_dst_port: 0,
    tuple_protonum: 0,
    ips_confirmed: 0,
    ips_dying: 0,
    ips_nat_clash: 0,
    net_gen: 0,
    net_generic_ptr: 0,
    cnet_count: 0,
    net_ct_count: u32::MAX,
    tuple_packed: 0,
    net_id_addr: 0,
    max_addr: 0,
};

/// The allocation in progress on this CPU: whose (the task key), its
/// arguments, and what early_drop said.
///
/// A per-CPU slot, not a map keyed by task: the allocation runs from entry
/// to return on one CPU, and nearly every one succeeds, so the common path
/// costs a slot write at entry (kprobe tier only) and a comparison at
/// return, no hash insert and delete (which were most of these programs'
/// time). Its limits are the other per-CPU marks': a softirq that
/// interrupts an allocation made in process context takes the slot (a map
/// keyed by task had the same limit: the softirq runs as the task it
/// interrupts); a task preempted inside the allocation (only on fully
/// preemptible kernels) finds the slot taken, or resumes on another CPU,
/// and its failure then goes unreported, as does any failure whose slot is
/// not its own.
#[repr(C)]
#[derive(Clone, Copy)]
struct Alloc {
    /// `task::key()` of the allocating task; 0 when the slot is free.
    task: u64,
    net: u64,
    tuple: u64,
    /// 0: early_drop not called; 1: it evicted; 2: it found nothing.
    early_drop: u8,
    /// Inside early_drop now: deletions are evictions.
    in_early_drop: u8,
    _pad: [u8; 6],
}

impl Alloc {
    /// A fresh slot for `task`: early_drop not called yet.
    #[inline(always)]
    fn new(task: u64, net: u64, tuple: u64) -> Self {
        Alloc { task, net, tuple, early_drop: 0, in_early_drop: 0, _pad: [0; 6] }
    }
}

#[map]
static ALLOC: PerCpuArray<Alloc> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's allocation slot when it belongs to the current task.
#[inline(always)]
fn own_alloc(task: u64) -> Option<*mut Alloc> {
    ALLOC.get_ptr_mut(0).filter(|slot| {
        // SAFETY: this CPU's slot of a map value.
        unsafe { (**slot).task == task }
    })
}

/// The confirmation in progress on this CPU: whose, the packet and its new
/// entry. A per-CPU slot for the reasons, and with the limits, of
/// [`Alloc`]'s (a softirq run by `local_bh_enable` inside the confirmation
/// takes the slot, as it took a task-keyed map's entry).
#[repr(C)]
#[derive(Clone, Copy)]
struct Confirm {
    task: u64,
    skb: u64,
    ct: u64,
}

#[map]
static CONFIRM: PerCpuArray<Confirm> = PerCpuArray::with_max_entries(1, 0);

const NF_DROP: u64 = 0; // include/uapi/linux/netfilter.h
const NF_ACCEPT: u64 = 1;
const MAX_ERRNO: u64 = 4095;

fn layout() -> ConntrackLayout {
    // SAFETY: a read-only global filled in by the loader.
    unsafe { core::ptr::read_volatile(&CONNTRACK_LAYOUT) }
}

fn now() -> u64 {
    // SAFETY: no arguments.
    unsafe { bpf_ktime_get_ns() }
}

#[kprobe]
pub fn ct_alloc(ctx: ProbeContext) -> u32 {
    let (Some(net), Some(tuple)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(2)) else { return 0 };
    on_alloc_entry(net, tuple);
    0
}

#[kretprobe]
pub fn ct_alloc_ret(ctx: RetProbeContext) -> u32 {
    if alloc_failed(ctx.ret::<u64>()) {
        if let Some(alloc) = take_alloc() {
            on_alloc_failed(alloc.net, alloc.tuple, alloc.early_drop);
        }
    }
    0
}

#[kprobe]
pub fn ct_early_drop(_ctx: ProbeContext) -> u32 {
    on_early_drop_entry();
    0
}

#[kretprobe]
pub fn ct_early_drop_ret(ctx: RetProbeContext) -> u32 {
    on_early_drop_return(ctx.ret::<u64>() as u32 != 0);
    0
}

#[kprobe]
pub fn ct_delete(ctx: ProbeContext) -> u32 {
    if let Some(ct) = ctx.arg::<u64>(0) {
        let _ = on_delete(ct, Probe, Dying::Check);
    }
    0
}

/// `nf_ct_delete.part.0`, where the compiler split the function (5.10,
/// 7.x): its callers, early_drop and the gc among them, set the dying bit
/// inline and call the part only when they won it.
#[kprobe]
pub fn ct_delete_part(ctx: ProbeContext) -> u32 {
    if let Some(ct) = ctx.arg::<u64>(0) {
        let _ = on_delete(ct, Probe, Dying::SetByCaller);
    }
    0
}

#[kprobe]
pub fn ct_confirm(ctx: ProbeContext) -> u32 {
    if let Some(skb) = ctx.arg::<u64>(0) {
        let _ = on_confirm_entry(Skb::probe(skb));
    }
    0
}

#[kretprobe]
pub fn ct_confirm_ret(ctx: RetProbeContext) -> u32 {
    let _ = on_confirm_return(ctx.ret::<u64>() as u32 as u64, Skb::probe);
    0
}

// The fentry tier, where conntrack is built into vmlinux: the same work.
// fexit sees the arguments and then the return value; the loader checks each
// function's parameter count in BTF, so the indices below hold. Arguments
// the verifier knows by their BTF type (the entry being deleted, the packet
// being confirmed) are read with plain loads; pointers that reach a program
// as numbers (a map slot's, the entry found in `skb->_nfct`) still go
// through the helper.

#[fexit(function = "__nf_conntrack_alloc")]
pub fn ct_alloc_fexit(ctx: FExitContext) -> i32 {
    if alloc_failed(ctx.arg(6)) {
        let early_drop = take_alloc().map_or(0, |alloc| alloc.early_drop);
        on_alloc_failed(ctx.arg(0), ctx.arg(2), early_drop);
    }
    0
}

#[fentry(function = "early_drop")]
pub fn ct_early_drop_fentry(_ctx: FEntryContext) -> i32 {
    on_early_drop_entry();
    0
}

#[fexit(function = "early_drop")]
pub fn ct_early_drop_fexit(ctx: FExitContext) -> i32 {
    on_early_drop_return(ctx.arg::<u64>(2) as u32 != 0);
    0
}

#[fentry(function = "nf_ct_delete")]
pub fn ct_delete_fentry(ctx: FEntryContext) -> i32 {
    let _ = on_delete(ctx.arg(0), Direct, Dying::Check);
    0
}

#[fentry(function = "__nf_conntrack_confirm")]
pub fn ct_confirm_fentry(ctx: FEntryContext) -> i32 {
    let _ = on_confirm_entry(Skb(ctx.arg(0), Direct));
    0
}

#[fexit(function = "__nf_conntrack_confirm")]
pub fn ct_confirm_fexit(ctx: FExitContext) -> i32 {
    let _ = on_confirm_return(ctx.arg::<u64>(1) as u32 as u64, |_| Skb(ctx.arg(0), Direct));
    0
}

fn on_alloc_entry(net: u64, tuple: u64) {
    if let Some(slot) = ALLOC.get_ptr_mut(0) {
        // SAFETY: this CPU's slot.
        unsafe { *slot = Alloc::new(task::key(), net, tuple) };
    }
}

/// Takes the slot for this task when the allocation's entry did not (the
/// fentry tier has no entry program: its fexit sees the arguments), keeping
/// the entry's arguments when it did.
fn on_early_drop_entry() {
    let task = task::key();
    let Some(slot) = ALLOC.get_ptr_mut(0) else { return };
    // SAFETY: this CPU's slot.
    unsafe {
        if (*slot).task != task {
            *slot = Alloc::new(task, 0, 0);
        }
        (*slot).in_early_drop = 1;
    }
}

fn on_early_drop_return(evicted: bool) {
    if let Some(alloc) = own_alloc(task::key()) {
        // SAFETY: as above.
        unsafe {
            (*alloc).in_early_drop = 0;
            (*alloc).early_drop = if evicted { 1 } else { 2 };
        }
    }
}

/// An error pointer: the allocation failed. Checked first, so that the
/// common path (allocated) costs a comparison. The slot is then left as it
/// is: every allocation's entry, and every early_drop, rewrites it.
#[inline(always)]
fn alloc_failed(ret: u64) -> bool {
    ret >= u64::MAX - MAX_ERRNO
}

/// This task's slot, taken: what early_drop said (0 when it was not
/// called), and the arguments the allocation's entry saved.
fn take_alloc() -> Option<Alloc> {
    let slot = own_alloc(task::key())?;
    // SAFETY: this CPU's slot, copied out, then freed.
    unsafe {
        let alloc = *slot;
        (*slot).task = 0;
        Some(alloc)
    }
}

/// A failed allocation: a full table where early_drop found nothing to
/// evict, else a memory failure.
fn on_alloc_failed(net: u64, tuple: u64, early_drop: u8) {
    let event = if early_drop == 2 { ct_event::TABLE_FULL } else { ct_event::ALLOC_FAILED };
    if event == ct_event::TABLE_FULL {
        set_mark(&TABLE_FULL_PENDING, now());
    }
    set_mark(&ALLOC_FAILED_PENDING, now());
    let l = layout();
    let nth = count(counter::CT_BASE + event as u32);
    emit(counter::RINGBUF_FULL_CONNTRACK, nth, |record: &mut ConntrackEvent| {
        fill_event(record, &l, event, tuple, net, 0, Probe)?;
        if event == ct_event::TABLE_FULL {
            (record.table_count, record.table_max) = table_fill(&l, net).unwrap_or((0, 0));
        }
        Ok(())
    });
}

/// The namespace's entry count and `nf_conntrack_max`, read where the
/// kernel keeps them: `nf_ct_pernet(net)->count` (before 5.13
/// `net->ct.count`) and the global.
fn table_fill(l: &ConntrackLayout, net: u64) -> Result<(u32, u32), i64> {
    if l.max_addr == 0 {
        return Err(0);
    }
    let count: u32 = if l.net_id_addr != 0 {
        let id: u32 = read::at(l.net_id_addr, 0)?;
        let generic: u64 = read::at(net, l.net_gen)?;
        let pernet: u64 = read::at(generic + l.net_generic_ptr as u64 + 8 * id as u64, 0)?;
        read::at(pernet, l.cnet_count)?
    } else if l.net_ct_count != u32::MAX {
        read::at(net, l.net_ct_count)?
    } else {
        return Err(0);
    };
    let max: u32 = read::at(l.max_addr, 0)?;
    Ok((count, max))
}

/// Whether the hooked function still has to win the entry's dying bit.
#[derive(PartialEq)]
enum Dying {
    /// `nf_ct_delete`: an entry already dying is not deleted again.
    Check,
    /// Its split part: the caller set the bit, so it is always set here.
    SetByCaller,
}

fn on_delete<A: Access>(ct: u64, access: A, dying: Dying) -> Result<(), i64> {
    let l = layout();
    if dying == Dying::Check {
        let status: u64 = A::at(ct, l.ct_status)?;
        if status & l.ips_dying as u64 != 0 {
            return Ok(()); // already on its way out: this call deletes nothing
        }
    }
    // Inside early_drop, an entry found expired is reaped as any expiry
    // (the kernel does not count it as an early drop); only a live one is
    // evicted.
    // SAFETY: this CPU's slot, read.
    let in_early_drop = own_alloc(task::key()).is_some_and(|a| unsafe { (*a).in_early_drop } == 1);
    let evicting = in_early_drop && !expired::<A>(ct, &l)?;
    let event = if evicting { ct_event::EARLY_DROP } else { ct_event::DELETE };
    let net: u64 = A::at(ct, l.ct_net)?;
    emit_event(&l, event, ct + l.ct_tuple as u64, net, ct, access);
    Ok(())
}

/// `nf_ct_is_expired`: the entry's timeout (jiffies, 32 bits) has passed.
fn expired<A: Access>(ct: u64, l: &ConntrackLayout) -> Result<bool, i64> {
    let timeout: u32 = A::at(ct, l.ct_timeout)?;
    // SAFETY: no arguments.
    let now = unsafe { bpf_jiffies64() } as u32;
    Ok(timeout.wrapping_sub(now) as i32 <= 0)
}

fn on_confirm_entry<A: Access>(skb: Skb<A>) -> Result<(), i64> {
    let nfct = skb.nfct()?;
    if let Some(slot) = CONFIRM.get_ptr_mut(0) {
        // SAFETY: this CPU's slot.
        unsafe { *slot = Confirm { task: task::key(), skb: skb.0, ct: nfct & NFCT_PTRMASK } };
    }
    Ok(())
}

/// `packet` gives the packet being confirmed, from the address saved at
/// entry (the fexit program has it as its typed argument).
fn on_confirm_return<A: Access>(ret: u64, packet: impl FnOnce(u64) -> Skb<A>) -> Result<(), i64> {
    let Some(slot) = CONFIRM.get_ptr_mut(0) else { return Ok(()) };
    // SAFETY: this CPU's slot: copied out, and freed when it is this task's.
    let Confirm { task, skb, ct } = unsafe { *slot };
    if task != task::key() {
        return Ok(());
    }
    // SAFETY: as above.
    unsafe { (*slot).task = 0 };
    if ct == 0 {
        return Ok(());
    }
    let l = layout();
    let (event, ct) = match ret {
        NF_ACCEPT => {
            // A clash resolved to the entry already in the table swaps the
            // packet's entry (the new one is freed); one resolved by keeping
            // the new entry for replies marks it IPS_NAT_CLASH.
            let now_attached = packet(skb).nfct()? & NFCT_PTRMASK;
            if now_attached != ct && now_attached != 0 {
                (ct_event::CLASH_RESOLVED, now_attached)
            } else {
                let status: u64 = read::at(ct, l.ct_status)?;
                if status & l.ips_confirmed as u64 == 0 {
                    return Ok(()); // a reply-direction packet: nothing to confirm
                }
                if status & l.ips_nat_clash as u64 != 0 {
                    (ct_event::CLASH_RESOLVED, ct)
                } else {
                    (ct_event::INSERT, ct)
                }
            }
        }
        NF_DROP => {
            set_mark(&INSERT_FAILED_PENDING, skb);
            (ct_event::INSERT_FAILED, ct)
        }
        _ => return Ok(()),
    };
    let net: u64 = read::at(ct, l.ct_net)?;
    emit_event(&l, event, ct + l.ct_tuple as u64, net, ct, Probe);
    Ok(())
}

/// Fills an event's record from the tuple; `ct` (0 if none) gives the TCP
/// state and zone and is the record's `entry`. All three are read with `A`.
#[inline(always)]
fn fill_event<A: Access>(
    record: &mut ConntrackEvent,
    l: &ConntrackLayout,
    event: u8,
    tuple: u64,
    net: u64,
    ct: u64,
    access: A,
) -> Result<(), i64> {
    record.kind = kind::CONNTRACK;
    record.event = event;
    record.ts_ns = now();
    // SAFETY: no arguments.
    record.cpu = unsafe { bpf_get_smp_processor_id() };
    record.entry = ct;
    if l.tuple_packed != 0 && !A::DIRECT {
        // One helper call where BTF says the fields lie as PACKED_TUPLE does.
        let [src, sport, l3num, dst, dport, protonum] = PACKED_TUPLE.map(|offset| offset as usize);
        // The addresses are copied a word at a time.
        const { assert!(PACKED_TUPLE[0].is_multiple_of(4) && PACKED_TUPLE[3].is_multiple_of(4)) };
        let mut t = Bytes::<PACKED_TUPLE_BYTES>::new();
        t.read(tuple, PACKED_TUPLE_BYTES)?;
        set_address(&mut record.src, [t.word(src), t.word(src + 4), t.word(src + 8), t.word(src + 12)]);
        set_address(&mut record.dst, [t.word(dst), t.word(dst + 4), t.word(dst + 8), t.word(dst + 12)]);
        record.sport = t.be16(sport);
        record.dport = t.be16(dport);
        record.family = t.get::<u16>(l3num) as u8;
        record.proto = t.u8(protonum);
    } else {
        record.family = A::at::<u16>(tuple, l.tuple_l3num)? as u8;
        record.proto = A::at(tuple, l.tuple_protonum)?;
        set_address(&mut record.src, A::at(tuple, l.tuple_src_addr)?);
        set_address(&mut record.dst, A::at(tuple, l.tuple_dst_addr)?);
        record.sport = u16::from_be(A::at(tuple, l.tuple_src_port)?);
        record.dport = u16::from_be(A::at(tuple, l.tuple_dst_port)?);
    }
    if net != 0 {
        record.netns = Net(net, access).inum().unwrap_or(0);
    }
    if ct != 0 {
        record.tcp_state = A::at(ct, l.ct_tcp_state).unwrap_or(0);
        if l.ct_zone != u32::MAX {
            record.zone = A::at(ct, l.ct_zone).unwrap_or(0);
        }
    }
    Ok(())
}

/// Counts a conntrack event and writes its record (see [`fill_event`]).
#[inline(always)]
fn emit_event<A: Access>(l: &ConntrackLayout, event: u8, tuple: u64, net: u64, ct: u64, access: A) {
    let nth = count(counter::CT_BASE + event as u32);
    emit(counter::RINGBUF_FULL_CONNTRACK, nth, |record| fill_event(record, l, event, tuple, net, ct, access));
}
