//! Deciding why netfilter dropped a packet, on the tracepoint tier.
//!
//! The tracepoint only says "NETFILTER_DROP". Three facts narrow it down:
//! - whether conntrack had attached an entry: conntrack's own drops on the
//!   new-flow path (table full, allocation failure) happen before it can;
//! - which function freed the packet: a verdict returned by a hook is freed
//!   by the netfilter core (`nf_hook_slow`), while the rule engines
//!   (`nft_do_chain`, `ipt_do_table`, ...) show up themselves on some kernels;
//! - whether the namespace's table was at `nf_conntrack_max`.
use std::ops::Range;

use rustc_hash::FxHashMap;

use crate::{
    aggregate::SourceKey,
    kallsyms::Kallsyms,
    model::{DropEvent, Reason},
    netns::Namespaces,
};

/// Who freed a dropped packet, from its `location`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FreedBy {
    /// The netfilter core, after a hook returned NF_DROP.
    NetfilterCore,
    /// A rule engine (nftables, x_tables).
    RuleEngine,
    /// Anything else, or the location could not be resolved.
    Unknown,
}

impl FreedBy {
    pub fn from_symbol(symbol: &str) -> Self {
        if symbol == "nf_hook_slow" || symbol == "nf_hook_slow_list" {
            FreedBy::NetfilterCore
        } else if symbol.starts_with("nft_") || symbol.ends_with("_do_table") {
            FreedBy::RuleEngine
        } else {
            FreedBy::Unknown
        }
    }
}

/// The reason for one drop.
///
/// `table_at_max`: the namespace's entry count was at `nf_conntrack_max`
/// (None: unknown). An entry attached, or a rule engine freeing the packet,
/// means a rule dropped it; otherwise conntrack did, and a full table says
/// why.
pub fn classify(ct_attached: bool, freed_by: FreedBy, table_at_max: Option<bool>) -> Reason {
    classify_with_hooks(ct_attached, freed_by, table_at_max, false)
}

/// [`classify`], plus the hooks' mark that conntrack refused the packet's
/// entry at confirmation (it carries that entry, so it would look like a
/// rule's drop otherwise).
pub fn classify_with_hooks(
    ct_attached: bool,
    freed_by: FreedBy,
    table_at_max: Option<bool>,
    insert_failed: bool,
) -> Reason {
    if insert_failed {
        return Reason::InsertFailed;
    }
    if ct_attached || freed_by == FreedBy::RuleEngine {
        return Reason::Ruleset;
    }
    match table_at_max {
        Some(true) => Reason::TableFull,
        _ => Reason::ConntrackOther,
    }
}

/// A packet the netfilter core freed carrying an entry conntrack had not yet
/// inserted: conntrack refused the insertion (`__nf_conntrack_confirm`
/// returned NF_DROP), where nothing else could have returned that verdict
/// to the core. From 6.7 nftables frees its own drops (`nft_do_chain`);
/// legacy x_tables (`iptables-legacy`) still return NF_DROP to the core,
/// so a namespace with such tables (or unknown: None) stays a rule's drop.
pub fn refused_at_confirmation(
    ct_unconfirmed: bool,
    freed_by: FreedBy,
    engines_free_own_drops: bool,
    legacy_tables: impl FnOnce() -> Option<bool>,
) -> bool {
    ct_unconfirmed && freed_by == FreedBy::NetfilterCore && engines_free_own_drops && legacy_tables() == Some(false)
}

/// Linux 6.7 and later: nftables frees the packets its rules drop itself,
/// so the core frees only what other hooks dropped. (Backports, such as
/// Debian's 6.1, are not recognised: there drops stay a rule's.)
pub fn engines_free_own_drops(release: &str) -> bool {
    let mut parts = release.trim().split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (6, 7)
}

/// Turns decoded drops into aggregation keys, looking up the facts that
/// [`classify`] needs. Shared by `record` and `live`.
pub struct Classifier {
    symbols: Symbols,
    pub namespaces: Namespaces,
    /// The conntrack hooks mark table-full drops in the kernel: no sampling.
    table_full_hooked: bool,
    refusals: Refusals,
}

/// How refused insertions are told from rule drops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusals {
    /// The insert hooks mark each one.
    Hooked,
    /// From unconfirmed entries (see [`refused_at_confirmation`]): no
    /// insert hooks, and the kernel's rule engines free their own drops.
    Inferred,
    /// They cannot be told apart: counted as `ruleset`.
    AsRuleset,
}

impl Classifier {
    pub fn new(symbols: Symbols, namespaces: Namespaces) -> Self {
        Classifier { symbols, namespaces, table_full_hooked: false, refusals: Refusals::AsRuleset }
    }

    /// Trust the kernel's table-full mark (the kprobe tier's hooks are on).
    pub fn with_table_full_hooks(mut self, hooked: bool) -> Self {
        self.table_full_hooked = hooked;
        self
    }

    /// How refused insertions are told on this kernel: marked by the insert
    /// hooks, or inferred where the rule engines free their own drops.
    pub fn with_refusals(mut self, insert_hooked: bool, engines_free_own_drops: bool) -> Self {
        self.refusals = match (insert_hooked, engines_free_own_drops) {
            (true, _) => Refusals::Hooked,
            (false, true) => Refusals::Inferred,
            (false, false) => Refusals::AsRuleset,
        };
        self
    }

    /// How refused insertions are told from rule drops, where the insert
    /// hooks do not mark them (for the record's notes).
    pub fn refusals_note(&self) -> Option<&'static str> {
        match self.refusals {
            Refusals::Hooked => None,
            Refusals::Inferred => Some(
                "insert_failed without the insert hooks: a drop freed by the netfilter core with an entry not yet \
                 inserted (nftables frees its own drops on this kernel); in namespaces with legacy x_tables tables \
                 these stay ruleset, as do drops by other hooks between conntrack and the insertion",
            ),
            Refusals::AsRuleset => Some(
                "refused insertions count as ruleset without the insert hooks: before 6.7 nftables' drops are freed \
                 by the netfilter core too, so the two look alike",
            ),
        }
    }

    pub fn symbols_resolved(&self) -> bool {
        !self.symbols.is_empty()
    }

    pub fn key(&mut self, event: &DropEvent) -> SourceKey {
        let freed_by = self.symbols.freed_by(event.location);
        // Occupancy matters only for conntrack's own drops: read it only then.
        // An invalid packet conntrack let through, then dropped: by a rule,
        // wherever it was freed (kernels before 6.7 free rule drops in the core).
        // (The kernel's own "table full" mark wins: conntrack dropped it.)
        let freed_by = if event.kernel_invalid && !event.kernel_table_full { FreedBy::RuleEngine } else { freed_by };
        let table_at_max = if event.ct_attached || freed_by == FreedBy::RuleEngine {
            None
        } else if self.table_full_hooked {
            Some(event.kernel_table_full)
        } else {
            self.namespaces.table_at_max(event.netns, event.ts_ns)
        };
        let namespaces = &mut self.namespaces;
        let insert_failed = event.kernel_insert_failed
            || refused_at_confirmation(event.ct_unconfirmed, freed_by, self.refusals == Refusals::Inferred, || {
                namespaces.legacy_tables(event.netns)
            });
        SourceKey {
            netns: event.netns,
            src: event.src,
            dport: event.dport,
            proto: event.proto,
            state: event.state,
            reason: classify_with_hooks(event.ct_attached, freed_by, table_at_max, insert_failed),
        }
    }
}

/// Drop locations named by the kernel's symbols: the address ranges of the
/// functions that free dropped packets (a few hundred, kept from kallsyms at
/// start-up), and a cache per address, since a storm has only a handful of
/// distinct locations. (An Fx map: looked up per drop, keyed by kernel
/// addresses, not by anything a packet carries.)
#[derive(Clone)]
pub struct Symbols {
    /// Sorted by start.
    sites: Vec<(Range<u64>, FreedBy)>,
    hidden: bool,
    cache: FxHashMap<u64, FreedBy>,
    /// The previous drop's location and answer: a storm's drops come from
    /// one place, over and over.
    last: (u64, FreedBy),
}

impl Symbols {
    pub fn new(kallsyms: &Kallsyms) -> Self {
        let sites =
            kallsyms.function_ranges(|name| Some(FreedBy::from_symbol(name)).filter(|k| *k != FreedBy::Unknown));
        Symbols { sites, hidden: kallsyms.addresses_hidden(), cache: FxHashMap::default(), last: (0, FreedBy::Unknown) }
    }

    /// No symbols: every location is Unknown (synthetic feeds, tests).
    pub fn unresolved() -> Self {
        Symbols { sites: Vec::new(), hidden: true, cache: FxHashMap::default(), last: (0, FreedBy::Unknown) }
    }

    /// No location can be resolved (kallsyms unreadable or hidden): the
    /// classification then relies on the other facts.
    pub fn is_empty(&self) -> bool {
        self.hidden
    }

    /// Who freed a packet dropped at `addr`.
    pub fn freed_by(&mut self, addr: u64) -> FreedBy {
        if self.last.0 == addr && addr != 0 {
            return self.last.1;
        }
        if let Some(known) = self.cache.get(&addr) {
            self.last = (addr, *known);
            return *known;
        }
        let i = self.sites.partition_point(|(range, _)| range.start <= addr);
        let freed_by = match i.checked_sub(1).map(|i| &self.sites[i]) {
            Some((range, kind)) if range.contains(&addr) => *kind,
            _ => FreedBy::Unknown,
        };
        self.cache.insert(addr, freed_by);
        self.last = (addr, freed_by);
        freed_by
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conntrack_drops_need_no_entry_and_the_core_freeing_them() {
        use FreedBy::*;
        assert_eq!(classify(false, NetfilterCore, Some(true)), Reason::TableFull);
        assert_eq!(classify(false, NetfilterCore, Some(false)), Reason::ConntrackOther);
        assert_eq!(classify(false, NetfilterCore, None), Reason::ConntrackOther);
        assert_eq!(classify(false, Unknown, Some(true)), Reason::TableFull);
        // `ct state invalid drop` in nftables: no entry, freed by the rule engine.
        assert_eq!(classify(false, RuleEngine, Some(true)), Reason::Ruleset);
        assert_eq!(classify(true, NetfilterCore, Some(true)), Reason::Ruleset);
        assert_eq!(classify_with_hooks(true, NetfilterCore, None, true), Reason::InsertFailed);
    }

    /// Kernels before 6.7 free a rule's drop in the core too: a packet the
    /// invalid family saw conntrack let through is a rule's drop, not
    /// conntrack's, even with no entry and the core freeing it.
    #[test]
    fn an_invalid_packet_conntrack_accepted_was_dropped_by_a_rule() {
        let drop = |flags| {
            let raw = ctrace_common::PacketDrop {
                kind: ctrace_common::kind::NETFILTER_DROP,
                family: ctrace_common::family::INET,
                proto: 6,
                tcp_flags: 0x03,
                flags,
                ..Default::default()
            };
            DropEvent::from_raw(&raw)
        };
        let mut classifier = Classifier::new(Symbols::unresolved(), Namespaces::new()).with_table_full_hooks(true);
        assert_eq!(classifier.key(&drop(0)).reason, Reason::ConntrackOther, "no entry, no mark: conntrack's");
        assert_eq!(classifier.key(&drop(ctrace_common::drop_flags::INVALID)).reason, Reason::Ruleset);
        assert_eq!(classifier.key(&drop(ctrace_common::drop_flags::TABLE_FULL)).reason, Reason::TableFull);
        let both = ctrace_common::drop_flags::TABLE_FULL | ctrace_common::drop_flags::INVALID;
        assert_eq!(classifier.key(&drop(both)).reason, Reason::TableFull, "the kernel's table-full mark wins");
    }

    #[test]
    fn an_unconfirmed_entry_freed_by_the_core_is_a_refused_insertion_only_where_nothing_else_can_be() {
        use FreedBy::*;
        let no_legacy = || Some(false);
        assert!(refused_at_confirmation(true, NetfilterCore, true, no_legacy));
        // A confirmed entry: the flow existed, a rule (or another hook) dropped it.
        assert!(!refused_at_confirmation(false, NetfilterCore, true, no_legacy));
        // nftables freed it: its rule.
        assert!(!refused_at_confirmation(true, RuleEngine, true, no_legacy));
        assert!(!refused_at_confirmation(true, Unknown, true, no_legacy));
        // Before 6.7 nftables returns NF_DROP to the core too.
        assert!(!refused_at_confirmation(true, NetfilterCore, false, no_legacy));
        // Legacy x_tables in the namespace, or unknown: a rule could have.
        assert!(!refused_at_confirmation(true, NetfilterCore, true, || Some(true)));
        assert!(!refused_at_confirmation(true, NetfilterCore, true, || None));
        // The namespace is looked at only when everything else says so.
        assert!(!refused_at_confirmation(false, NetfilterCore, true, || unreachable!()));

        assert!(engines_free_own_drops("6.7.0"));
        assert!(engines_free_own_drops("6.18.44-fc-v657"));
        assert!(engines_free_own_drops("7.2.13+deb14-amd64"));
        assert!(!engines_free_own_drops("6.1.0-56-amd64"));
        assert!(!engines_free_own_drops("5.10.0-32-amd64"));
        assert!(!engines_free_own_drops(""));
    }

    #[test]
    fn drop_locations_name_who_freed_the_packet() {
        let mut syms = Symbols::new(&Kallsyms::parse(
            "ffffffff81f2af50 T nf_hook_slow\n\
             ffffffff81f2b100 T nf_hook_slow_list\n\
             ffffffff81f653d0 T nft_do_chain\n\
             ffffffff81f65e00 t nft_other\n\
             ffffffff81f66000 t ip_rcv\n"
                .into(),
        ));
        assert!(!syms.is_empty());
        assert_eq!(syms.freed_by(0xffffffff81f2af50 + 0x7d), FreedBy::NetfilterCore);
        assert_eq!(syms.freed_by(0xffffffff81f653d0 + 0x10), FreedBy::RuleEngine);
        assert_eq!(syms.freed_by(0x1000), FreedBy::Unknown);
        assert_eq!(syms.freed_by(0xffffffff81f66000 + 0x10), FreedBy::Unknown, "past the last kept function");
        // Asked again, in runs and alternating (the remembered last answer,
        // then the cache): the same answers.
        for addr in [0xffffffff81f653d0 + 0x10, 0xffffffff81f653d0 + 0x10, 0xffffffff81f2af50 + 0x7d, 0, 0] {
            let mut fresh = Symbols { cache: FxHashMap::default(), last: (0, FreedBy::Unknown), ..syms.clone() };
            assert_eq!(syms.freed_by(addr), fresh.freed_by(addr), "{addr:#x}");
        }
        assert_eq!(FreedBy::from_symbol("ipt_do_table"), FreedBy::RuleEngine);
        assert_eq!(FreedBy::from_symbol("ip_rcv"), FreedBy::Unknown);
    }

    #[test]
    fn restricted_kallsyms_resolves_nothing() {
        let syms = Symbols::new(&Kallsyms::parse("0000000000000000 T nf_hook_slow\n".into()));
        assert!(syms.is_empty());
    }
}
