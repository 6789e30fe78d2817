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
    /// An event of conntrack's own (kprobe/fentry tiers): [`super::ConntrackEvent`].
    pub const CONNTRACK: u8 = 2;
}

/// What a [`ConntrackEvent`] reports.
pub mod ct_event {
    /// Allocation refused: the table was full and early drop evicted nothing.
    pub const TABLE_FULL: u8 = 1;
    /// Allocation failed for another reason (memory).
    pub const ALLOC_FAILED: u8 = 2;
    /// An entry evicted by early drop to make room.
    pub const EARLY_DROP: u8 = 3;
    /// An entry confirmed into the table.
    pub const INSERT: u8 = 4;
    /// Confirmation refused (clash, chain too long, dying entry).
    pub const INSERT_FAILED: u8 = 5;
    /// An entry deleted (timeout, flush, ctnetlink, early drop excluded).
    pub const DELETE: u8 = 6;
    /// Confirmation met an entry with the same tuple and the kernel resolved
    /// the clash (the packet goes on with the existing entry, or the new one
    /// is kept for replies only): the kernel's `clash_resolve` counter.
    pub const CLASH_RESOLVED: u8 = 7;
    /// A packet `nf_conntrack_in` left without an entry because it was not
    /// valid for its protocol (the kernel's `invalid` counter). The tuple is
    /// the packet's; there is no entry, so no TCP state.
    pub const INVALID: u8 = 8;
}

/// Bits of [`PacketDrop::flags`].
pub mod drop_flags {
    /// The skb carried a conntrack entry (`skb->_nfct != 0`) when it was freed.
    pub const CT_ATTACHED: u8 = 1 << 0;
    /// The network header could not be read (the addresses are zero).
    pub const NO_HEADER: u8 = 1 << 1;
    /// The conntrack hooks saw this CPU's allocation fail on a full table
    /// just before this drop: the kernel itself says "table full".
    pub const TABLE_FULL: u8 = 1 << 2;
    /// The conntrack hooks saw this CPU's confirmation fail (insert_failed)
    /// just before this drop: conntrack, not a rule, dropped the packet.
    pub const INSERT_FAILED: u8 = 1 << 3;
    /// `nf_conntrack_in` found this packet invalid and accepted it (the
    /// invalid family saw it): whatever dropped it next was a rule.
    pub const INVALID: u8 = 1 << 4;
    /// The entry the packet carried was not confirmed (not yet in the
    /// table): the packet was dropped between conntrack's first look and
    /// the insertion, or at the insertion itself.
    pub const UNCONFIRMED: u8 = 1 << 5;
}

/// Address family values as the kernel spells them (`AF_INET`, `AF_INET6`).
pub mod family {
    pub const INET: u8 = 2;
    pub const INET6: u8 = 10;
}

/// One dropped packet, as seen by the kernel program.
///
/// Addresses are in network byte order (an IPv4 address fills the first four
/// bytes); ports are in host byte order. 72 bytes, no holes.
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

/// One event from conntrack's insertion, eviction and deletion paths: the
/// entry's original tuple and state. 80 bytes, no holes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConntrackEvent {
    /// Always [`kind::CONNTRACK`].
    pub kind: u8,
    /// A [`ct_event`] value.
    pub event: u8,
    /// `AF_INET` or `AF_INET6` (the tuple's l3num).
    pub family: u8,
    pub proto: u8,
    pub netns: u32,
    pub ts_ns: u64,
    /// The entry's address (`struct nf_conn *`; 0 when there is none, as
    /// in a refused allocation). User space pairs an insertion with the
    /// entry's deletion by it, for lifetimes.
    pub entry: u64,
    pub cpu: u32,
    /// Conntrack zone id (0 without zones).
    pub zone: u16,
    /// Raw `enum tcp_conntrack` value; user space names it from BTF.
    pub tcp_state: u8,
    pub _pad0: u8,
    pub sport: u16,
    pub dport: u16,
    /// For [`ct_event::TABLE_FULL`]: the namespace's entry count when the
    /// kernel refused the allocation (0 when unknown or another event).
    pub table_count: u32,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// For [`ct_event::TABLE_FULL`]: `nf_conntrack_max` then (0 when unknown).
    pub table_max: u32,
    pub _pad1: u32,
}

impl ConntrackEvent {
    pub const SIZE: usize = core::mem::size_of::<Self>();
}

/// Kernel layout the conntrack hooks need, from BTF (vmlinux, or the
/// nf_conntrack module's split BTF). The `sk_buff` and `net` offsets they
/// share with the drop program are in [`KfreeSkbLayout`]. Offsets in bytes; `u32::MAX` marks a
/// field this kernel does not have.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConntrackLayout {
    /// `nf_conn.tuplehash[0].tuple` (the original direction).
    pub ct_tuple: u32,
    /// `nf_conn.status` (unsigned long).
    pub ct_status: u32,
    /// `nf_conn.timeout` (u32 jiffies when the entry expires).
    pub ct_timeout: u32,
    /// `nf_conn.proto.tcp.state` (u8).
    pub ct_tcp_state: u32,
    /// `nf_conn.ct_net.net` (struct net *).
    pub ct_net: u32,
    /// `nf_conn.zone.id` (u16), or u32::MAX.
    pub ct_zone: u32,
    /// Within `nf_conntrack_tuple`: `src.u3`, `src.u.all`, `src.l3num`,
    /// `dst.u3`, `dst.u.all`, `dst.protonum`.
    pub tuple_src_addr: u32,
    pub tuple_src_port: u32,
    pub tuple_l3num: u32,
    pub tuple_dst_addr: u32,
    pub tuple_dst_port: u32,
    pub tuple_protonum: u32,
    /// `IPS_CONFIRMED` mask of `enum ip_conntrack_status`.
    pub ips_confirmed: u32,
    /// `IPS_DYING` mask.
    pub ips_dying: u32,
    /// `IPS_NAT_CLASH` mask (an entry kept for replies after a clash), or 0.
    pub ips_nat_clash: u32,
    /// The table's fill at a refusal lives in `struct nf_conntrack_net`,
    /// the namespace's slot `net->gen->ptr[nf_conntrack_net_id]`:
    /// `net.gen`, `net_generic.ptr`, `nf_conntrack_net.count` (u32::MAX
    /// where this kernel has no such member).
    pub net_gen: u32,
    pub net_generic_ptr: u32,
    pub cnet_count: u32,
    /// Kernels before 5.13 keep the count in the namespace itself:
    /// `net.ct.count` (atomic_t), or u32::MAX.
    pub net_ct_count: u32,
    /// 1 when BTF lays the tuple's six fields out as every kernel so far
    /// has (see `PACKED_TUPLE`): the programs then read them in one
    /// [`PACKED_TUPLE_BYTES`] read instead of one read each.
    pub tuple_packed: u32,
    /// Kernel addresses (from kallsyms) of `nf_conntrack_net_id` and
    /// `nf_conntrack_max`; 0 when unknown (then the fill is not read).
    pub net_id_addr: u64,
    pub max_addr: u64,
}

/// The tuple layout the programs can read in one go, as offsets within
/// `struct nf_conntrack_tuple`: `src.u3` (16 bytes), `src.u.all`,
/// `src.l3num`, `dst.u3`, `dst.u.all`, `dst.protonum`. The loader sets
/// [`ConntrackLayout::tuple_packed`] only when BTF gives exactly these.
pub const PACKED_TUPLE: [u32; 6] = [0, 16, 18, 20, 36, 38];
/// Bytes that cover every field of [`PACKED_TUPLE`].
pub const PACKED_TUPLE_BYTES: usize = 40;

/// The ring buffer that carries every record.
pub mod ring {
    /// Its size unless `--ring-size` says otherwise.
    pub const DEFAULT_BYTES: u32 = 4 << 20;
    /// The global, in the kernel object, that holds the wake-up threshold:
    /// the programs wake the reader once this many bytes wait.
    pub const WAKEUP_GLOBAL: &str = "RING_WAKEUP_BYTES";
    /// The threshold never goes below this: a ring smaller than it is read
    /// only by the reader's timer.
    pub const MIN_WAKEUP_BYTES: u64 = 64 << 10;
    /// A one-entry array the reader sets to 1 before it stops draining on
    /// its timer (nothing came for a while); the next record sets it back
    /// to 0 and wakes the reader at once. An idle reader then sleeps
    /// instead of waking to find the ring empty.
    pub const READER_ASLEEP_MAP: &str = "READER_ASLEEP";

    /// The wake-up threshold for a ring of `ring_bytes`: an eighth of it.
    /// Each wake-up costs the reader a sleep and a switch back (tens of
    /// microseconds on a VM); an eighth leaves seven eighths of room for the
    /// reader to answer, and the reader drains on a short timer anyway.
    pub const fn wakeup_bytes(ring_bytes: u32) -> u64 {
        let eighth = ring_bytes as u64 / 8;
        if eighth > MIN_WAKEUP_BYTES {
            eighth
        } else {
            MIN_WAKEUP_BYTES
        }
    }
}

/// Indices into the per-CPU `COUNTERS` array. Summed over CPUs these are exact,
/// even when the ring buffer overflows and records are lost.
pub mod counter {
    /// Packets freed with reason NETFILTER_DROP.
    pub const NETFILTER_DROPS: u32 = 0;
    /// ... of which carried no conntrack entry.
    pub const NETFILTER_DROPS_NO_ENTRY: u32 = 1;
    /// Drop records that could not be reserved in the ring buffer (lost).
    pub const RINGBUF_FULL: u32 = 2;
    /// Conntrack events by kind: `CT_BASE + ct_event::X`.
    pub const CT_BASE: u32 = 3;
    /// Conntrack event records lost to a full ring buffer, apart from drop
    /// records so that decoded drops plus lost drops make the exact total.
    pub const RINGBUF_FULL_CONNTRACK: u32 = CT_BASE + 9;
    /// Records that found the reader asleep and woke it
    /// (`ring::READER_ASLEEP_MAP`).
    pub const READER_WOKEN: u32 = CT_BASE + 10;
    /// Number of counters.
    pub const COUNT: u32 = CT_BASE + 11;
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
    /// `nf_conn.status` and the `IPS_CONFIRMED` mask, from conntrack's BTF;
    /// the mask is 0 where conntrack's types are unknown (not loaded).
    pub ct_status: u32,
    pub ips_confirmed: u32,
    /// Kernels whose tracepoint has no drop reason: the code range of
    /// `nf_hook_slow` (from kallsyms), where netfilter frees a packet on
    /// NF_DROP. Zero where the reason is there.
    pub drop_site_start: u64,
    pub drop_site_end: u64,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: both are repr(C), contain only integers and byte arrays, and
    // have no implicit padding (checked by the size assertions in tests).
    unsafe impl aya::Pod for super::PacketDrop {}
    unsafe impl aya::Pod for super::KfreeSkbLayout {}
    unsafe impl aya::Pod for super::ConntrackEvent {}
    unsafe impl aya::Pod for super::ConntrackLayout {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_have_no_implicit_padding() {
        // Sum of field sizes equals the struct size: no hidden holes.
        assert_eq!(PacketDrop::SIZE, 1 + 1 + 1 + 1 + 4 + 8 + 8 + 4 + 2 + 2 + 16 + 16 + 1 + 7);
        assert_eq!(PacketDrop::SIZE % 8, 0);
        assert_eq!(core::mem::size_of::<KfreeSkbLayout>(), 12 * 4 + 2 * 8);
        assert_eq!(ConntrackEvent::SIZE, 1 + 1 + 1 + 1 + 4 + 8 + 8 + 4 + 2 + 1 + 1 + 2 + 2 + 4 + 16 + 16 + 4 + 4);
        assert_eq!(core::mem::size_of::<ConntrackLayout>(), 20 * 4 + 2 * 8);
    }

    #[test]
    fn the_reader_is_woken_at_an_eighth_of_the_ring_never_under_64_kib() {
        assert_eq!(ring::wakeup_bytes(ring::DEFAULT_BYTES), 512 << 10);
        assert_eq!(ring::wakeup_bytes(64 << 20), 8 << 20);
        assert_eq!(ring::wakeup_bytes(512 << 10), 64 << 10);
        // --ring-size 16 (the flood test's): above the whole ring, so only
        // the reader's timer reads it.
        assert_eq!(ring::wakeup_bytes(16 << 10), 64 << 10);
        assert_eq!(ring::wakeup_bytes(4 << 10), ring::MIN_WAKEUP_BYTES);
    }
}
