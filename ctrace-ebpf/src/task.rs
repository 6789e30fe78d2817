//! The running task, as the key that pairs a function's entry with its
//! return in the hooks' maps.
use aya_ebpf::helpers::{bpf_get_current_pid_tgid, bpf_get_smp_processor_id};

/// The current task's pid/tgid. Every CPU's idle task has pid 0, and a
/// softirq that interrupts one runs as it, so two CPUs handling packets at
/// once would share that key: pid 0 is keyed by CPU instead (an idle task
/// never migrates).
#[inline(always)]
pub fn key() -> u64 {
    let id = bpf_get_current_pid_tgid();
    if id as u32 != 0 {
        return id;
    }
    // SAFETY: no arguments.
    (1 << 63) | unsafe { bpf_get_smp_processor_id() } as u64
}
