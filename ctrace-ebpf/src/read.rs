//! Reading kernel memory at offsets known only at load time.
//!
//! rustc emits no CO-RE relocations, so every field is read with
//! bpf_probe_read_kernel at an offset the loader took from BTF.
use core::mem::MaybeUninit;

use aya_ebpf::helpers::{bpf_probe_read_kernel, bpf_probe_read_kernel_buf};

/// Reads a `T` at `base + offset`.
#[inline(always)]
pub fn at<T>(base: u64, offset: u32) -> Result<T, i64> {
    // SAFETY: bpf_probe_read_kernel checks the address; a bad one is an error.
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T).map_err(|e| e as i64) }
}

/// Fills `dst` from `src` (the slice's length a constant where inlined).
#[inline(always)]
pub fn bytes(src: u64, dst: &mut [u8]) -> Result<(), i64> {
    // SAFETY: as in `at`.
    unsafe { bpf_probe_read_kernel_buf(src as *const u8, dst).map_err(|e| e as i64) }
}

/// Kernel bytes on the stack, 8-aligned so that addresses are copied into
/// a record a word at a time rather than byte by byte. Not zeroed first
/// (LLVM makes that a `memset` call): only bytes that a `read` filled are
/// looked at, and the verifier refuses a program that reads any other
/// (uninitialised stack).
#[repr(C, align(8))]
pub struct Bytes<const N: usize>(MaybeUninit<[u8; N]>);

impl<const N: usize> Bytes<N> {
    #[inline(always)]
    pub fn new() -> Self {
        Bytes(MaybeUninit::uninit())
    }

    /// Reads the first `len` bytes at `src` (a constant at every call).
    #[inline(always)]
    pub fn read(&mut self, src: u64, len: usize) -> Result<(), i64> {
        debug_assert!(len <= N);
        // SAFETY: `len` bytes fit (constant lengths, checked above in debug
        // builds); the helper writes them all (zeros on a failed read).
        bytes(src, unsafe { core::slice::from_raw_parts_mut(self.0.as_mut_ptr() as *mut u8, len) })
    }

    /// The bytes from `at` as a `T` (`at` a multiple of its alignment).
    #[inline(always)]
    pub fn get<T: Copy>(&self, at: usize) -> T {
        debug_assert!(at.is_multiple_of(core::mem::align_of::<T>()) && at + core::mem::size_of::<T>() <= N);
        // SAFETY: in bounds and aligned (the buffer is 8-aligned); filled
        // by `read` (see the type).
        unsafe { core::ptr::read((self.0.as_ptr() as *const u8).add(at) as *const T) }
    }

    #[inline(always)]
    pub fn u8(&self, at: usize) -> u8 {
        self.get(at)
    }

    /// A big-endian (network order) u16 at `at`, even.
    #[inline(always)]
    pub fn be16(&self, at: usize) -> u16 {
        u16::from_be(self.get(at))
    }

    /// The four bytes at `at` (a multiple of 4), in memory order.
    #[inline(always)]
    pub fn word(&self, at: usize) -> u32 {
        self.get(at)
    }
}
