//! Maps shared by all hooks.
use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    macros::map,
    maps::{PerCpuArray, RingBuf},
};
use ctrace_common::counter;

/// One record per event. The loader may resize it; 4 MiB holds about 50,000
/// drop records, several seconds of a heavy storm if user space stalls.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

/// Wake the reader once this much is waiting. Waking it per record costs an
/// irq_work (a self-IPI, a VM exit under virtualisation) on every event and
/// made the program 50 times slower in a storm; user space also drains the
/// buffer on a short timer, so nothing waits long below the threshold.
const WAKEUP_BYTES: u64 = 64 << 10;

/// Flags for submitting a record: wake the reader only in batches.
#[inline(always)]
pub fn submit_flags() -> u64 {
    if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

/// Exact per-CPU event counters, indexed by `ctrace_common::counter`.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Adds one to a per-CPU counter. Per-CPU slots need no atomics: a program
/// runs to completion on one CPU.
#[inline(always)]
pub fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: the pointer is this CPU's slot of a map value.
        unsafe { *slot += 1 };
    }
}
