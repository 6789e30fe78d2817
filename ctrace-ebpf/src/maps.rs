//! Maps shared by all hooks.
use aya_ebpf::{
    macros::map,
    maps::{PerCpuArray, RingBuf},
};
use ctrace_common::counter;

/// One record per event. The loader may resize it; 4 MiB holds about 50,000
/// drop records, several seconds of a heavy storm if user space stalls.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

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
