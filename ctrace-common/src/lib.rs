//! Records shared by ctrace's kernel programs and its loader.
//!
//! Every type here crosses the user/kernel boundary, so each is `#[repr(C)]`
//! with explicit padding and no implicit holes: the bytes the kernel writes are
//! exactly the bytes the loader reads. Each type is defined once, here.
#![no_std]

/// Tag of a ring-buffer record (the first byte of every record).
///
/// Numbers are fixed forever: a new kind gets a new number.
pub mod kind {
    /// A packet freed with reason `SKB_DROP_REASON_NETFILTER_DROP`
    /// (seen from the `skb:kfree_skb` tracepoint).
    pub const NETFILTER_DROP: u8 = 1;
}

/// Bits of [`PacketDrop::flags`].
pub mod drop_flags {
    /// The skb carried a conntrack entry (`skb->_nfct != 0`) when it was freed.
    pub const CT_ATTACHED: u8 = 1 << 0;
    /// The network header could not be read (the addresses are zero).
    pub const NO_HEADER: u8 = 1 << 1;
}

/// Address family values as the kernel spells them (`AF_INET`, `AF_INET6`).
pub mod family {
    pub const INET: u8 = 2;
    pub const INET6: u8 = 10;
}

/// One dropped packet, as seen by the kernel program.
///
/// Addresses are in network byte order (an IPv4 address fills the first four
/// bytes); ports are in host byte order. 64 bytes, no holes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketDrop {
    /// Always [`kind::NETFILTER_DROP`].
    pub kind: u8,
    /// [`family::INET`], [`family::INET6`], or 0 for a non-IP packet.
    pub family: u8,
    /// IP protocol number (`IPPROTO_TCP` = 6, ...); 0 when unknown.
    pub proto: u8,
    /// [`drop_flags`] bits.
    pub flags: u8,
    /// Inode number of the packet's network namespace; 0 when unknown.
    pub netns: u32,
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// Address of the function that freed the packet (`location` argument).
    pub location: u64,
    /// CPU the drop happened on.
    pub cpu: u32,
    pub sport: u16,
    pub dport: u16,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// TCP header flags byte (FIN=0x01, SYN=0x02, RST=0x04, ACK=0x10); 0 otherwise.
    pub tcp_flags: u8,
    pub _pad: [u8; 7],
}

impl PacketDrop {
    pub const SIZE: usize = core::mem::size_of::<Self>();
}

/// Indices into the per-CPU `COUNTERS` array. Summed over CPUs these are exact,
/// even when the ring buffer overflows and records are lost.
pub mod counter {
    /// Packets freed with reason NETFILTER_DROP.
    pub const NETFILTER_DROPS: u32 = 0;
    /// ... of which carried no conntrack entry.
    pub const NETFILTER_DROPS_NO_ENTRY: u32 = 1;
    /// Records that could not be reserved in the ring buffer (lost events).
    pub const RINGBUF_FULL: u32 = 2;
    /// Number of counters.
    pub const COUNT: u32 = 3;
}

/// Kernel layout the `kfree_skb` program needs, read from the running kernel's
/// BTF by the loader and passed in as the read-only global `KFREE_SKB_LAYOUT`.
///
/// All offsets are in bytes from the start of the named struct.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KfreeSkbLayout {
    /// Value of `SKB_DROP_REASON_NETFILTER_DROP` in `enum skb_drop_reason`.
    pub netfilter_drop_reason: u32,
    /// `sk_buff.head` (unsigned char *).
    pub skb_head: u32,
    /// `sk_buff.network_header` (u16).
    pub skb_network_header: u32,
    /// `sk_buff.protocol` (__be16).
    pub skb_protocol: u32,
    /// `sk_buff._nfct` (unsigned long).
    pub skb_nfct: u32,
    /// `sk_buff.dev` (struct net_device *).
    pub skb_dev: u32,
    /// `sk_buff.sk` (struct sock *).
    pub skb_sk: u32,
    /// `net_device.nd_net.net` (struct net *).
    pub dev_net: u32,
    /// `sock.__sk_common.skc_net.net` (struct net *).
    pub sock_net: u32,
    /// `net.ns.inum` (unsigned int).
    pub net_inum: u32,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: both are repr(C), contain only integers and byte arrays, and
    // have no implicit padding (checked by the size assertions in tests).
    unsafe impl aya::Pod for super::PacketDrop {}
    unsafe impl aya::Pod for super::KfreeSkbLayout {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_have_no_implicit_padding() {
        // Sum of field sizes equals the struct size: no hidden holes.
        assert_eq!(PacketDrop::SIZE, 1 + 1 + 1 + 1 + 4 + 8 + 8 + 4 + 2 + 2 + 16 + 16 + 1 + 7);
        assert_eq!(PacketDrop::SIZE % 8, 0);
        assert_eq!(core::mem::size_of::<KfreeSkbLayout>(), 10 * 4);
    }
}
