//! Guest kernels under qemu, for the hook tiers this machine cannot run
//! (no kprobes, fentry refused): `cargo xtask vm-run` and `vm-test`.
//!
//! A guest shares the host's `/` read-only over 9p with a tmpfs overlay on
//! top, so it sees the freshly built binaries and its writes vanish. Debian's
//! kernel packages are downloaded with apt and unpacked into a cache folder
//! (`~/.cache/ctrace/vm`, or `CTRACE_VM_CACHE`) that later runs reuse.
mod guest;
mod kernels;

pub use self::{guest::*, kernels::*};
