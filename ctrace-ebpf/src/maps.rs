//! Maps shared by all hooks.
use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, PerCpuArray, RingBuf},
};
use ctrace_common::{counter, ring};

/// One record per event. The loader may resize it; 4 MiB holds about 50,000
/// drop records, several seconds of a heavy storm if user space stalls.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(ring::DEFAULT_BYTES, 0);

/// Wake the reader once this much is waiting (set by the loader from the
/// ring's size: `ring::wakeup_bytes`). Waking it per record costs an
/// irq_work (a self-IPI, a VM exit under virtualisation) on every event and
/// made the program 50 times slower in a storm; user space also drains the
/// buffer on a short timer, so nothing waits long below the threshold.
#[unsafe(no_mangle)]
static RING_WAKEUP_BYTES: u64 = ring::wakeup_bytes(ring::DEFAULT_BYTES);

/// The reader is asleep until a record wakes it (`ring::READER_ASLEEP_MAP`).
/// Shared, not per-CPU: the reader writes it; between its writes every
/// CPU reads its own cached copy.
#[map]
pub static READER_ASLEEP: Array<u32> = Array::with_max_entries(1, 0);

/// Takes the reader's "asleep" flag: whether this record must wake it.
/// Two CPUs may both see it set and both wake the reader: one wake-up too
/// many, never one too few.
#[inline(always)]
fn take_reader_asleep() -> bool {
    match READER_ASLEEP.get_ptr_mut(0) {
        // SAFETY: the map's one value, a u32.
        Some(flag) => unsafe {
            if *flag == 0 {
                return false;
            }
            *flag = 0;
            true
        },
        None => false,
    }
}

/// How often (in one CPU's records) a storm's records ask how much is
/// waiting: the question reads the reader's position, a cache line the
/// reader keeps moving, so asking on every record costs (measured: ~10% of
/// the drop program).
const WAKEUP_CHECK_EVERY: u64 = 16;

/// Flags for submitting a record: wake the reader only in batches.
#[inline(always)]
fn submit_flags() -> u64 {
    // SAFETY: a read-only global; read_volatile keeps the compiler from
    // folding the default into the code.
    if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= unsafe { core::ptr::read_volatile(&RING_WAKEUP_BYTES) } {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

/// Reserves a record in the ring buffer and lets `fill` write it in place,
/// from a zeroed start: a record built on the stack and then copied came
/// out of LLVM as byte-by-byte moves through stack slots. The record is
/// given up if `fill` fails, and counted in `lost` when the buffer is full.
/// Only every [`WAKEUP_CHECK_EVERY`]th record looks at whether to wake the
/// reader: `nth` is this CPU's count of the event the record is for, as
/// [`count`] returns it (the reader also drains on a timer, so a quiet tail
/// is not left waiting).
#[inline(always)]
pub fn emit<T: Record>(lost: u32, nth: u64, fill: impl FnOnce(&mut T) -> Result<(), i64>) {
    match EVENTS.reserve::<T>(0) {
        Some(mut entry) => {
            let slot = entry.as_mut_ptr();
            // SAFETY: the reserved slot is T's size and 8-aligned (ring
            // records are); once zeroed it is a valid T (see `Record`).
            let filled = fill(unsafe {
                zero(slot);
                &mut *slot
            });
            if filled.is_err() {
                entry.discard(BPF_RB_NO_WAKEUP as u64);
                return;
            }
            let flags = if take_reader_asleep() {
                count(counter::READER_WOKEN);
                BPF_RB_FORCE_WAKEUP as u64
            } else if nth.is_multiple_of(WAKEUP_CHECK_EVERY) {
                submit_flags()
            } else {
                BPF_RB_NO_WAKEUP as u64
            };
            entry.submit(flags);
        }
        None => {
            count(lost);
        }
    }
}

/// A ring record: plain integers and byte arrays, valid when all zero, a
/// whole number of words long.
///
/// # Safety
/// Implement only for such types.
pub unsafe trait Record: 'static {}

// SAFETY: both are repr(C) structs of integers and byte arrays, 72 and 80 bytes.
unsafe impl Record for ctrace_common::PacketDrop {}
unsafe impl Record for ctrace_common::ConntrackEvent {}

/// Zeroes a record a word at a time. The stores are volatile so that LLVM
/// does not merge them into a `memset`, which the BPF backend turns into a
/// call to a byte-loop subprogram (measured: a quarter of the drop
/// program's time).
///
/// # Safety
/// `slot` is valid for writes of `T` and 8-aligned.
#[inline(always)]
unsafe fn zero<T: Record>(slot: *mut T) {
    const { assert!(core::mem::size_of::<T>().is_multiple_of(8)) };
    let words = slot as *mut u64;
    for i in 0..core::mem::size_of::<T>() / 8 {
        // SAFETY: within the slot, by the caller's promise.
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
}

/// Exact per-CPU event counters, indexed by `ctrace_common::counter`.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Adds one to a per-CPU counter and returns this CPU's new count (0 if
/// the slot is missing). Per-CPU slots need no atomics: a program runs to
/// completion on one CPU.
#[inline(always)]
pub fn count(index: u32) -> u64 {
    match COUNTERS.get_ptr_mut(index) {
        // SAFETY: the pointer is this CPU's slot of a map value.
        Some(slot) => unsafe {
            *slot += 1;
            *slot
        },
        None => 0,
    }
}

// Per-CPU marks: one hook notes what it saw for the hook that runs next on
// this CPU for the same packet (a program runs to completion on one CPU, and
// the packet paths involved run with bottom halves off). A mark holds a
// value (a time, or the packet's address), 0 when clear; taking it clears it,
// so it speaks of one packet only.

/// This CPU's conntrack allocation just failed on a full table (the time);
/// read by the kfree_skb program for the packet that is then dropped.
#[map]
pub static TABLE_FULL_PENDING: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The packet whose confirmation just failed on this CPU (its address);
/// read by the kfree_skb program when conntrack drops it.
#[map]
pub static INSERT_FAILED_PENDING: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// An allocation failed (full table or memory) inside `nf_conntrack_in`
/// (the time): its NF_DROP is the kernel's `drop`, not an invalid packet.
#[map]
pub static ALLOC_FAILED_PENDING: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The ICMP error handler rejected the packet inside `nf_conntrack_in`
/// (the time): the kernel counts it as `error`, not `invalid`.
#[map]
pub static ICMP_ERROR_PENDING: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The packet `nf_conntrack_in` just found invalid and accepted (its
/// address); read by the kfree_skb program when a rule then drops it.
#[map]
pub static INVALID_PENDING: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Sets this CPU's mark to `value` (nonzero).
#[inline(always)]
pub fn set_mark(mark: &PerCpuArray<u64>, value: u64) {
    if let Some(slot) = mark.get_ptr_mut(0) {
        // SAFETY: this CPU's slot.
        unsafe { *slot = value };
    }
}

/// Takes this CPU's mark: its value, 0 if it was clear.
#[inline(always)]
pub fn take_mark(mark: &PerCpuArray<u64>) -> u64 {
    let Some(slot) = mark.get_ptr_mut(0) else { return 0 };
    // SAFETY: as above.
    unsafe { core::mem::replace(&mut *slot, 0) }
}

/// A time mark set within the last second. The packet it speaks of follows
/// within microseconds on bare metal; the margin is for emulated CPUs that
/// stall (qemu TCG on a busy host). An older mark was left by a path that
/// never reached its reader (an allocation for ctnetlink, say).
#[inline(always)]
pub fn recent(marked_ns: u64) -> bool {
    // SAFETY: no arguments.
    marked_ns != 0 && unsafe { bpf_ktime_get_ns() }.saturating_sub(marked_ns) < 1_000_000_000
}
