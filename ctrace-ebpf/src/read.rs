//! Reading kernel memory at offsets known only at load time.
//!
//! rustc emits no CO-RE relocations, so every field is read with
//! bpf_probe_read_kernel at an offset the loader took from BTF.
use aya_ebpf::helpers::bpf_probe_read_kernel;

/// Reads a `T` at `base + offset`.
#[inline(always)]
pub fn at<T>(base: u64, offset: u32) -> Result<T, i64> {
    // SAFETY: bpf_probe_read_kernel checks the address; a bad one is an error.
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T).map_err(|e| e as i64) }
}
