//! Loader side of the conntrack hooks (kprobe tier): where conntrack's types
//! are described (vmlinux or the module's split BTF), the layout the
//! programs read, and which kernel functions each hook family needs.
use std::{borrow::Cow, path::Path};

use ctrace_common::{ConntrackLayout, PACKED_TUPLE, PACKED_TUPLE_BYTES};

use crate::{
    btf::{Btf, BtfError},
    kallsyms::Kallsyms,
    model::ConnState,
};

/// One program of a family, in both tiers' forms.
#[derive(Debug, PartialEq, Eq)]
pub struct Hook {
    /// kprobe or kretprobe program.
    pub kprobe: &'static str,
    /// fentry or fexit program; empty when the fentry tier needs none (an
    /// fexit program sees the arguments too).
    pub fentry: &'static str,
    /// Runs on return (kretprobe / fexit).
    pub on_return: bool,
    pub function: &'static str,
    /// The parameter count the fexit program assumes (it reads the return
    /// value after the arguments); checked against BTF.
    pub params: usize,
    /// kprobe program for `FUNCTION.part.0`, where the compiler split the
    /// function (GCC's partial inlining: callers run its first test inline
    /// and call the rest, the part, directly); empty when the hook has none.
    pub part: &'static str,
}

impl Hook {
    /// The symbol of the function's split part.
    pub fn part_symbol(&self) -> String {
        format!("{}.part.0", self.function)
    }

    /// The symbol the kprobe goes on: the split part where the kernel has
    /// one (every call passes through it), else the function.
    pub fn kprobe_target(&self, split: &[&str]) -> String {
        if split.contains(&self.function) {
            self.part_symbol()
        } else {
            self.function.to_string()
        }
    }
}

/// The hook families, as `ctrace probes` and the record name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, strum::IntoStaticStr, strum::Display)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum HookFamily {
    /// The `skb:kfree_skb` tracepoint: every tier has it.
    Drops,
    TableFull,
    Insert,
    Delete,
    Invalid,
}

impl HookFamily {
    pub fn name(self) -> &'static str {
        self.into()
    }
}

/// A group of programs that only work together.
#[derive(Debug, PartialEq, Eq)]
pub struct Family {
    pub id: HookFamily,
    pub hooks: &'static [Hook],
    /// Runs on every packet conntrack sees: attached only when asked for.
    pub per_packet: bool,
    /// Works only when this family is attached too.
    pub needs: Option<HookFamily>,
}

const fn hook(
    kprobe: &'static str,
    fentry: &'static str,
    on_return: bool,
    function: &'static str,
    params: usize,
) -> Hook {
    Hook { kprobe, fentry, on_return, function, params, part: "" }
}

pub const FAMILIES: [Family; 4] = [
    Family {
        id: HookFamily::TableFull,
        hooks: &[
            hook("ct_alloc", "", false, "__nf_conntrack_alloc", 6),
            hook("ct_alloc_ret", "ct_alloc_fexit", true, "__nf_conntrack_alloc", 6),
            hook("ct_early_drop", "ct_early_drop_fentry", false, "early_drop", 2),
            hook("ct_early_drop_ret", "ct_early_drop_fexit", true, "early_drop", 2),
        ],
        per_packet: false,
        needs: None,
    },
    Family {
        id: HookFamily::Insert,
        hooks: &[
            hook("ct_confirm", "ct_confirm_fentry", false, "__nf_conntrack_confirm", 1),
            hook("ct_confirm_ret", "ct_confirm_fexit", true, "__nf_conntrack_confirm", 1),
        ],
        per_packet: false,
        needs: None,
    },
    Family {
        id: HookFamily::Delete,
        // 5.10 and 7.x split nf_ct_delete: early_drop and the gc call its
        // part after setting the dying bit themselves.
        hooks: &[Hook { part: "ct_delete_part", ..hook("ct_delete", "ct_delete_fentry", false, "nf_ct_delete", 3) }],
        per_packet: false,
        needs: None,
    },
    // Needs the table_full family: its allocation marks tell a full table's
    // NF_DROP from an invalid packet's.
    Family {
        id: HookFamily::Invalid,
        hooks: &[
            hook("ct_in", "", false, "nf_conntrack_in", 2),
            hook("ct_in_ret", "ct_in_fexit", true, "nf_conntrack_in", 2),
            hook("ct_icmp_error_ret", "ct_icmp_error_fexit", true, "nf_conntrack_icmpv4_error", 4),
            hook("ct_icmp6_error_ret", "ct_icmp6_error_fexit", true, "nf_conntrack_icmpv6_error", 4),
        ],
        per_packet: true,
        needs: Some(HookFamily::TableFull),
    },
];

/// What a family attached on a tier goes on, for `probes` and the record:
/// "kprobes on nf_ct_delete.part.0".
pub fn describe(family: &Family, tier: super::Tier, split: &[&str]) -> String {
    let mut symbols: Vec<String> = family
        .hooks
        .iter()
        .filter(|h| tier != super::Tier::Fentry || !h.fentry.is_empty())
        .map(|h| if tier == super::Tier::Fentry { h.function.to_string() } else { h.kprobe_target(split) })
        .collect();
    symbols.dedup();
    let kind = if tier == super::Tier::Fentry { "fentry/fexit" } else { "kprobes" };
    format!("{kind} on {}", symbols.join(", "))
}

pub const LAYOUT_GLOBAL: &str = "CONNTRACK_LAYOUT";
pub const MODULE_BTF: &str = "/sys/kernel/btf/nf_conntrack";

/// conntrack is built into vmlinux (fentry can attach to it with aya 0.14).
/// conntrack is part of vmlinux, not a module. kallsyms tells (a module's
/// functions carry `[nf_conntrack]`); where it is not loaded, the module's
/// BTF file (kernels before 5.11 have none, so it is not asked first).
pub fn built_in(kallsyms: &Kallsyms) -> bool {
    match kallsyms.function_in_module("nf_conntrack_in") {
        Some(in_module) => !in_module,
        None => !Path::new(MODULE_BTF).exists(),
    }
}

/// conntrack's types: the module's split BTF when it is a module, else
/// vmlinux when it is built in. None when it is not loaded (vmlinux may
/// still describe `struct nf_conn`: the functions are what tell).
/// (Borrowed when built in: vmlinux's parse is megabytes, not copied.)
pub fn conntrack_btf<'a>(vmlinux: &'a Btf, kallsyms: &Kallsyms) -> Result<Option<Cow<'a, Btf>>, BtfError> {
    if Path::new(MODULE_BTF).exists() {
        let bytes = std::fs::read(MODULE_BTF).map_err(|source| BtfError::Read { path: MODULE_BTF.into(), source })?;
        return Btf::parse(&bytes, Some(vmlinux)).map(|b| Some(Cow::Owned(b)));
    }
    Ok(kallsyms.has_function("nf_conntrack_in").then_some(Cow::Borrowed(vmlinux)))
}

/// Every offset and mask the conntrack programs use.
pub fn layout(btf: &Btf) -> Result<ConntrackLayout, BtfError> {
    let tuple = btf.member_offset("nf_conn", "tuplehash")? + btf.member_offset("nf_conntrack_tuple_hash", "tuple")?;
    let mask = |name: &str| btf.enum_value("ip_conntrack_status", name).map(|v| v as u32);
    let mut layout = ConntrackLayout {
        ct_tuple: tuple,
        ct_status: btf.member_offset("nf_conn", "status")?,
        ct_timeout: btf.member_offset("nf_conn", "timeout")?,
        ct_tcp_state: btf.member_offset("nf_conn", "proto.tcp.state")?,
        ct_net: btf.member_offset("nf_conn", "ct_net.net")?,
        // Zones are optional (CONFIG_NF_CONNTRACK_ZONES).
        ct_zone: btf.member_offset("nf_conn", "zone.id").unwrap_or(u32::MAX),
        tuple_src_addr: btf.member_offset("nf_conntrack_tuple", "src.u3")?,
        tuple_src_port: btf.member_offset("nf_conntrack_tuple", "src.u.all")?,
        tuple_l3num: btf.member_offset("nf_conntrack_tuple", "src.l3num")?,
        tuple_dst_addr: btf.member_offset("nf_conntrack_tuple", "dst.u3")?,
        tuple_dst_port: btf.member_offset("nf_conntrack_tuple", "dst.u.all")?,
        tuple_protonum: btf.member_offset("nf_conntrack_tuple", "dst.protonum")?,
        ips_confirmed: mask("IPS_CONFIRMED")?,
        ips_dying: mask("IPS_DYING")?,
        // Kernels before 5.7 have no NAT clash entries.
        ips_nat_clash: mask("IPS_NAT_CLASH").unwrap_or(0),
        // The table's fill at a refusal is a bonus: u32::MAX where unknown.
        net_gen: btf.member_offset("net", "gen").unwrap_or(u32::MAX),
        net_generic_ptr: btf.member_offset("net_generic", "ptr").unwrap_or(u32::MAX),
        cnet_count: btf.member_offset("nf_conntrack_net", "count").unwrap_or(u32::MAX),
        net_ct_count: btf.member_offset("net", "ct.count").unwrap_or(u32::MAX),
        tuple_packed: 0,
        net_id_addr: 0,
        max_addr: 0,
    };
    let tuple_size = btf.struct_size("nf_conntrack_tuple").unwrap_or(0);
    layout.tuple_packed = u32::from(tuple_is_packed(&layout, tuple_size));
    Ok(layout)
}

/// Whether the tuple's fields sit where [`PACKED_TUPLE`] says, inside a
/// struct at least [`PACKED_TUPLE_BYTES`] long.
fn tuple_is_packed(l: &ConntrackLayout, tuple_size: u32) -> bool {
    let offsets =
        [l.tuple_src_addr, l.tuple_src_port, l.tuple_l3num, l.tuple_dst_addr, l.tuple_dst_port, l.tuple_protonum];
    offsets == PACKED_TUPLE && tuple_size as usize >= PACKED_TUPLE_BYTES
}

/// Adds the kernel addresses the table-fill read needs, from
/// /proc/kallsyms (root, and kptr_restrict below 2). Left 0, the programs
/// do not read the fill.
pub fn with_symbol_addresses(mut layout: ConntrackLayout, kallsyms: &Kallsyms) -> ConntrackLayout {
    let address = |wanted: &str| kallsyms.data_address(wanted);
    if [layout.net_gen, layout.net_generic_ptr, layout.cnet_count].iter().all(|o| *o != u32::MAX) {
        layout.net_id_addr = address("nf_conntrack_net_id").unwrap_or(0);
        layout.max_addr = address("nf_conntrack_max").unwrap_or(0);
    } else if layout.net_ct_count != u32::MAX {
        // Before 5.13: the count is in `struct net`, no slot to look up.
        layout.max_addr = address("nf_conntrack_max").unwrap_or(0);
    }
    layout
}

/// Raw `enum tcp_conntrack` values to states, by name (values differ
/// between kernels only in theory, but they are never assumed).
pub fn tcp_states(btf: &Btf) -> Vec<(u8, ConnState)> {
    let names = [
        ("TCP_CONNTRACK_NONE", ConnState::None),
        ("TCP_CONNTRACK_SYN_SENT", ConnState::SynSent),
        ("TCP_CONNTRACK_SYN_RECV", ConnState::SynRecv),
        ("TCP_CONNTRACK_ESTABLISHED", ConnState::Established),
        ("TCP_CONNTRACK_FIN_WAIT", ConnState::FinWait),
        ("TCP_CONNTRACK_CLOSE_WAIT", ConnState::CloseWait),
        ("TCP_CONNTRACK_LAST_ACK", ConnState::LastAck),
        ("TCP_CONNTRACK_TIME_WAIT", ConnState::TimeWait),
        ("TCP_CONNTRACK_CLOSE", ConnState::Close),
        ("TCP_CONNTRACK_SYN_SENT2", ConnState::SynSent2),
    ];
    names.iter().filter_map(|(name, state)| Some((btf.enum_value("tcp_conntrack", name).ok()? as u8, *state))).collect()
}

pub fn kprobes_supported() -> bool {
    Path::new("/sys/bus/event_source/devices/kprobe").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KALLSYMS: &str = "\
ffffffffc0a10000 b nf_conntrack_net_id\t[nf_conntrack]
ffffffffc0a10010 d nf_conntrack_max\t[nf_conntrack]
";

    #[test]
    fn table_fill_addresses_from_kallsyms() {
        let kallsyms = Kallsyms::parse(KALLSYMS.into());
        let known = ConntrackLayout {
            net_gen: 8,
            net_generic_ptr: 0,
            cnet_count: 0,
            net_ct_count: u32::MAX,
            ..Default::default()
        };
        let l = with_symbol_addresses(known, &kallsyms);
        assert_eq!((l.net_id_addr, l.max_addr), (0xffffffffc0a10000, 0xffffffffc0a10010));
        // kptr_restrict: addresses read as zero, so the fill is not read.
        let hidden: String = KALLSYMS.lines().map(|l| format!("0000000000000000{}\n", &l[16..])).collect();
        let l = with_symbol_addresses(known, &Kallsyms::parse(hidden));
        assert_eq!((l.net_id_addr, l.max_addr), (0, 0));
        // A kernel with neither count: no addresses either.
        let neither = ConntrackLayout { cnet_count: u32::MAX, net_ct_count: u32::MAX, ..known };
        let l = with_symbol_addresses(neither, &kallsyms);
        assert_eq!((l.net_id_addr, l.max_addr), (0, 0));
        // 5.10: the count in `struct net`, only the maximum's address needed.
        let l = with_symbol_addresses(ConntrackLayout { net_ct_count: 0x1c0, ..neither }, &kallsyms);
        assert_eq!((l.net_id_addr, l.max_addr), (0, 0xffffffffc0a10010));
    }

    #[test]
    fn the_tuple_is_read_in_one_go_only_where_btf_lays_it_out_so() {
        let [src_addr, src_port, l3num, dst_addr, dst_port, protonum] = PACKED_TUPLE;
        let packed = ConntrackLayout {
            tuple_src_addr: src_addr,
            tuple_src_port: src_port,
            tuple_l3num: l3num,
            tuple_dst_addr: dst_addr,
            tuple_dst_port: dst_port,
            tuple_protonum: protonum,
            ..Default::default()
        };
        assert!(tuple_is_packed(&packed, 40));
        assert!(!tuple_is_packed(&packed, 38), "a shorter struct: the read would run past it");
        let moved = ConntrackLayout { tuple_l3num: 20, tuple_dst_addr: 24, ..packed };
        assert!(!tuple_is_packed(&moved, 44), "any other layout: one read per field");
    }
}
