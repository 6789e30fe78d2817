//! ctrace's kernel programs.
//!
//! Layout: `hooks/` has one module per hook family, each a thin entry point
//! over shared code; `skb` reads the packet and its namespace for every hook;
//! `maps` holds the maps every hook writes to; `task` keys a call's entry to
//! its return; `read` has the bounded kernel-memory reader.
#![no_std]
#![no_main]

mod hooks;
mod maps;
mod read;
mod skb;
mod task;

// bpf_probe_read_kernel is a GPL-only helper.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
