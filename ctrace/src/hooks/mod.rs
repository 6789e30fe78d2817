//! Loading and attaching the kernel programs.
//!
//! One module per hook family, mirroring `ctrace-ebpf/src/hooks/`: each
//! resolves from BTF what its program needs. This module loads the embedded
//! object, attaches, and hands out the maps.
pub mod conntrack;
pub mod kfree_skb;
pub mod offline;
pub mod plan;
mod programs;

use std::{fmt, os::fd::AsFd as _, path::Path};

use anyhow::{bail, Context as _};
use aya::{
    maps::{Array, MapData, PerCpuArray, RingBuf},
    programs::BtfTracePoint,
    Ebpf, EbpfLoader,
};
use ctrace_common::{counter, ct_event, ring};

use self::programs::{attach_family, explain_load_error, explain_program_error, recursion_misses};
use crate::{
    btf::Btf,
    kallsyms::Kallsyms,
    model::{ConnState, CtTotals},
    privileges,
};

/// The kernel programs, built by build.rs and embedded in the binary.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ctrace"));

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// How ctrace sees conntrack. Every tier sees drops through the
/// `skb:kfree_skb` tracepoint; the kprobe tier adds conntrack's own paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, strum::IntoStaticStr)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum Tier {
    /// `tp_btf/kfree_skb` only: every packet netfilter drops.
    Tracepoint,
    /// Plus kprobes on conntrack's allocation, confirmation and deletion.
    Kprobe,
    /// The same hooks as fentry/fexit programs (conntrack built in).
    Fentry,
}

impl Tier {
    /// The name `--tier` and the record file use.
    pub fn name(self) -> &'static str {
        self.into()
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tier::Tracepoint => f.write_str("tracepoint (tp_btf/kfree_skb)"),
            Tier::Kprobe => f.write_str("kprobe (conntrack hooks + tp_btf/kfree_skb)"),
            Tier::Fentry => f.write_str("fentry (conntrack hooks + tp_btf/kfree_skb)"),
        }
    }
}

/// The tier the user asks for (`--tier`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TierChoice {
    /// The best that attaches here.
    #[default]
    Auto,
    Tracepoint,
    Kprobe,
    Fentry,
}

/// Which hooks to attach (the flags of record, live and serve).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::Args)]
pub struct HookChoice {
    /// Which hooks to use: auto picks the best that attaches (see `ctrace probes`).
    #[arg(long, value_enum, default_value = "auto")]
    pub tier: TierChoice,
    /// Also attribute invalid packets (the kernel's `invalid` counter) to
    /// sources: hooks nf_conntrack_in, which runs on every packet conntrack
    /// sees, so it costs on the fast path (hook tiers only; see
    /// docs/limitations.md).
    #[arg(long)]
    pub invalid: bool,
    /// Size of the ring buffer that carries records from the kernel, in
    /// KiB: a power of two from 4 (default 4096). A bigger one rides out
    /// longer bursts before records are lost; lost records are always
    /// counted and shown. Mostly for tests (a small ring loses records).
    #[arg(long = "ring-size", value_name = "KiB", value_parser = parse_ring_kib)]
    pub ring_kib: Option<u32>,
}

/// A ring-buffer size in KiB: the kernel wants a power-of-two number of pages.
fn parse_ring_kib(text: &str) -> Result<u32, String> {
    let kib: u32 = text.parse().map_err(|_| format!("`{text}` is not a number of KiB"))?;
    if !(4..=(1 << 20)).contains(&kib) || !kib.is_power_of_two() {
        return Err(format!("{kib} KiB: the ring buffer must be a power of two from 4 KiB to 1 GiB"));
    }
    Ok(kib)
}

/// One hook family: attached or not, and why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HookReport {
    pub hook: conntrack::HookFamily,
    /// The tier it runs on, or None when it is off.
    pub tier: Option<Tier>,
    /// What it attached to, or why it is off.
    pub detail: String,
}

/// Exact totals from the per-CPU counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KernelTotals {
    /// Packets freed with reason NETFILTER_DROP.
    pub netfilter_drops: u64,
    /// ... of which had no conntrack entry.
    pub netfilter_drops_no_entry: u64,
    /// Drop records the ring buffer had no room for.
    pub lost_events: u64,
    /// Conntrack event records it had no room for (hook tiers), counted
    /// apart so that decoded drops plus `lost_events` make the exact total.
    #[serde(default)]
    pub lost_conntrack_events: u64,
    /// Runs of ctrace's programs the kernel skipped because another BPF
    /// program was already running on that CPU (a softirq interrupting
    /// one, or a map syscall in progress): their events are missing and
    /// nothing else counts them. None where the kernel does not count such
    /// misses for a program ctrace attached (kprobes before Linux 6.7).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub program_misses: Option<u64>,
    /// Times the reader, idle, went to sleep until a record woke it, and
    /// records that woke it (see `Engine::drain`).
    #[serde(default)]
    pub reader_sleeps: u64,
    #[serde(default)]
    pub reader_woken: u64,
}

/// The ring buffer of event records.
pub type Events = RingBuf<MapData>;

/// The ring buffer registered with tokio, to await records.
pub fn poll_events(events: Events) -> anyhow::Result<tokio::io::unix::AsyncFd<Events>> {
    // SAFETY: the ring buffer owns its map fd, which stays open and the same
    // for as long as the AsyncFd holds it (until dropped or into_inner()).
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(events, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("cannot poll the ring buffer: {e}"))
}

/// Attached programs and their counters. Dropping it detaches everything.
pub struct Attached {
    pub tier: Tier,
    /// How the drop program knows netfilter's drops on this kernel.
    pub drop_test: kfree_skb::DropTest,
    /// Per hook family: attached or why not.
    pub hooks: Vec<HookReport>,
    /// The table-full family is attached: drops carry the kernel's own
    /// "table full" mark, and unmarked conntrack drops are not table-full.
    pub table_full_hooked: bool,
    /// The insert family attached: refused insertions are marked exactly.
    pub insert_hooked: bool,
    /// Linux 6.7+: nftables frees its own drops (see `classify`).
    pub engines_free_own_drops: bool,
    /// Raw TCP state values to states, from BTF.
    pub tcp_states: Vec<(u8, ConnState)>,
    /// What classification keeps of the kernel's symbols (the functions
    /// that free dropped packets); the table itself is not kept.
    pub symbols: crate::classify::Symbols,
    /// The kernel counts kprobe programs' skipped runs (Linux 6.7+).
    kprobe_misses_counted: bool,
    misses_at_detach: Option<Option<u64>>,
    counters: PerCpuArray<MapData, u64>,
    /// `ring::READER_ASLEEP_MAP`, and how often it was set.
    reader_asleep: Array<MapData, u32>,
    reader_sleeps: u64,
    ebpf: Option<Ebpf>,
}

/// Fills in what the plan needs to know of conntrack on this kernel (it
/// blocks every hook, hooked functions missing or with another prototype)
/// from its BTF and `has_function`; returns the layout when the hooks can
/// run. Shared by attaching and by the offline check of a kernel's files.
pub(crate) fn conntrack_facts(
    facts: &mut plan::KernelFacts,
    btf: &Btf,
    ct_btf: &Result<Option<std::borrow::Cow<'_, Btf>>, crate::btf::BtfError>,
    has_function: &dyn Fn(&str) -> bool,
) -> Option<ctrace_common::ConntrackLayout> {
    facts.blocker = conntrack_blocker(ct_btf);
    let mut layout = None;
    if let (None, Ok(Some(ct_btf))) = (&facts.blocker, ct_btf) {
        match conntrack::layout(ct_btf) {
            Ok(l) => layout = Some(l),
            Err(e) => facts.blocker = Some(format!("conntrack's layout cannot be read from BTF: {e}")),
        }
    }
    for hook in conntrack::FAMILIES.iter().flat_map(|f| f.hooks) {
        if !hook.part.is_empty() && has_function(&hook.part_symbol()) {
            facts.split.push(hook.function);
        }
        if !has_function(hook.function) {
            facts.missing.push(hook.function);
        } else if facts.built_in && btf.function_params(hook.function) != Some(hook.params) {
            facts.fentry_mismatch.push(hook.function);
        }
    }
    layout
}

/// Why no conntrack hook can run at all, if none can.
fn conntrack_blocker(ct_btf: &Result<Option<std::borrow::Cow<'_, Btf>>, crate::btf::BtfError>) -> Option<String> {
    match ct_btf {
        Ok(None) => Some(
            "nf_conntrack is not loaded yet (it loads with the first conntrack rule, or `modprobe nf_conntrack`); \
             restart ctrace once it is"
                .into(),
        ),
        Err(e) => Some(format!("conntrack's BTF cannot be read: {e}")),
        Ok(Some(_)) => None,
    }
}

/// Reads the kernel's BTF, or says plainly that it has none.
pub fn kernel_btf() -> anyhow::Result<Btf> {
    if !Path::new(VMLINUX_BTF).exists() {
        bail!(
            "this kernel has no BTF ({VMLINUX_BTF} is missing); ctrace needs a kernel built with \
             CONFIG_DEBUG_INFO_BTF=y (Linux 5.8 or newer)"
        );
    }
    Btf::from_file(VMLINUX_BTF).context("reading the kernel's BTF")
}

impl Attached {
    /// Loads the programs with this kernel's layout and attaches them: the
    /// drop tracepoint always, the conntrack hooks where `choice` allows and
    /// the kernel has them. The ring buffer is handed out separately.
    pub fn attach(btf: Btf, wanted: HookChoice) -> anyhow::Result<(Self, Events)> {
        let choice = wanted.tier;
        if OBJECT.is_empty() {
            bail!("this ctrace was built without its kernel programs (AYA_BUILD_SKIP was set); rebuild it");
        }
        privileges::require_tracing()?;
        // Read once: the drop site (older kernels), the hooks' function
        // names, classification locations.
        let kallsyms = Kallsyms::read();
        let drop_site = kallsyms
            .function_ranges(|name| (name == kfree_skb::DROP_SITE).then_some(()))
            .into_iter()
            .next()
            .map(|(range, ())| range);
        let (mut layout, drop_test) =
            kfree_skb::layout(&btf, drop_site).context("the tracepoint tier cannot run on this kernel")?;

        // The conntrack layout, when a hook tier is wanted and possible.
        let mut ct_layout = ctrace_common::ConntrackLayout::default();
        let mut tcp_states = Vec::new();
        let mut facts = plan::KernelFacts {
            built_in: conntrack::built_in(&kallsyms),
            kprobes: conntrack::kprobes_supported(),
            ..Default::default()
        };
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let engines_free_own_drops = crate::classify::engines_free_own_drops(&release);
        let ct_btf = conntrack::conntrack_btf(&btf, &kallsyms);
        // (With --tier tracepoint the plan turns every family off; the
        // layout still serves the drop program.)
        if let Some(ct) = conntrack_facts(&mut facts, &btf, &ct_btf, &|name| kallsyms.has_function(name)) {
            // Whether a dropped packet's entry was confirmed: read only where
            // classification can use it (a probe read per drop otherwise spent).
            if engines_free_own_drops {
                layout = kfree_skb::with_conntrack(layout, &ct);
            }
            if choice != TierChoice::Tracepoint {
                ct_layout = conntrack::with_symbol_addresses(ct, &kallsyms);
                if let Ok(Some(ct_btf)) = &ct_btf {
                    tcp_states = conntrack::tcp_states(ct_btf);
                }
            }
        }
        drop(ct_btf);
        let plans = plan::plan(&facts, choice, wanted.invalid).map_err(anyhow::Error::msg)?;
        let symbols = crate::classify::Symbols::new(&kallsyms);
        // The same 6.7 series made trace_call_bpf count skipped runs and
        // added `missed` to the kprobe link info: the field tells.
        let kprobe_misses_counted = btf.member_offset("bpf_link_info", "perf_event.kprobe.missed").is_ok();
        // Every use of the symbol table and of this BTF parse is above:
        // their megabytes go before aya parses the BTF again (the peak).
        drop(kallsyms);
        drop(btf);
        // EbpfLoader::new() parses the kernel's BTF itself, and aya offers
        // no way to borrow that parse for the program loads below: drop it
        // before making the one ctrace keeps, so that one parse is alive
        // at a time (two were the process's peak).
        let mut loader = EbpfLoader::new();
        loader.btf(None);
        let aya_btf = aya::Btf::from_sys_fs().context("reading the kernel's BTF")?;
        if let Some(kib) = wanted.ring_kib {
            loader.map_max_entries("EVENTS", kib * 1024);
        }
        let ring_bytes = wanted.ring_kib.map_or(ring::DEFAULT_BYTES, |kib| kib * 1024);
        let wakeup_bytes = ring::wakeup_bytes(ring_bytes);
        let mut ebpf = loader
            .btf(Some(&aya_btf))
            .override_global(kfree_skb::LAYOUT_GLOBAL, &layout, true)
            .override_global(conntrack::LAYOUT_GLOBAL, &ct_layout, true)
            .override_global(ring::WAKEUP_GLOBAL, &wakeup_bytes, true)
            .load(OBJECT)
            .map_err(explain_load_error)?;

        let program: &mut BtfTracePoint = ebpf
            .program_mut(drop_test.program())
            .context("the embedded object lacks a kfree_skb program")?
            .try_into()?;
        program
            .load(kfree_skb::TRACEPOINT, &aya_btf)
            .map_err(|e| explain_program_error(e, "loading the kfree_skb program"))?;
        program.attach().map_err(|e| explain_program_error(e, "attaching to the skb:kfree_skb tracepoint"))?;
        let mut hooks = vec![HookReport {
            hook: conntrack::HookFamily::Drops,
            tier: Some(Tier::Tracepoint),
            detail: drop_test.describe().into(),
        }];

        // The plan, applied: each family on the first of its tiers that loads.
        for plan in plans {
            let family = plan.family;
            if let Some(off) = plan.off.or_else(|| plan::unmet_need(family, &hooks)) {
                hooks.push(HookReport { hook: family.id, tier: None, detail: off });
                continue;
            }
            let mut whys = Vec::new();
            let mut attached = None;
            for step in plan.steps {
                match step {
                    plan::Step::Skip(tier, why) => whys.push(format!("{}: {why}", tier.name())),
                    plan::Step::Try(tier) => match attach_family(&mut ebpf, family, tier, &facts.split, &aya_btf) {
                        Ok(detail) => {
                            attached = Some((tier, detail));
                            break;
                        }
                        Err(why) => whys.push(format!("{}: {why}", tier.name())),
                    },
                }
            }
            let Some((tier, mut detail)) = attached else {
                hooks.push(HookReport { hook: family.id, tier: None, detail: whys.join("; ") });
                continue;
            };
            let fill_readable =
                ct_layout.max_addr != 0 && (ct_layout.net_id_addr != 0 || ct_layout.net_ct_count != u32::MAX);
            if family.id == conntrack::HookFamily::TableFull && !fill_readable {
                detail.push_str(
                    "; the table's fill at a refusal is not read (nf_conntrack_net_id or nf_conntrack_max \
                     not in /proc/kallsyms: kptr_restrict, or a kernel without CONFIG_KALLSYMS_ALL)",
                );
            }
            hooks.push(HookReport { hook: family.id, tier: Some(tier), detail });
        }
        let tier = plan::settle(choice, &hooks).map_err(anyhow::Error::msg)?;
        let hooked = |family| hooks.iter().any(|h| h.hook == family && h.tier.is_some());
        let table_full_hooked = hooked(conntrack::HookFamily::TableFull);
        let insert_hooked = hooked(conntrack::HookFamily::Insert);

        let events = RingBuf::try_from(ebpf.take_map("EVENTS").context("no EVENTS map")?)?;
        let counters = PerCpuArray::try_from(ebpf.take_map("COUNTERS").context("no COUNTERS map")?)?;
        let asleep = ebpf.take_map(ring::READER_ASLEEP_MAP).context("no READER_ASLEEP map")?;
        let reader_asleep = Array::try_from(asleep)?;
        let attached = Attached {
            drop_test,
            tier,
            hooks,
            table_full_hooked,
            insert_hooked,
            engines_free_own_drops,
            tcp_states,
            symbols,
            kprobe_misses_counted,
            misses_at_detach: None,
            counters,
            reader_asleep,
            reader_sleeps: 0,
            ebpf: Some(ebpf),
        };
        Ok((attached, events))
    }

    /// Exact per-CPU counts of conntrack events by `ct_event` kind (index 0 unused).
    pub fn conntrack_totals(&self) -> anyhow::Result<CtTotals> {
        let sum = |event: u8| -> anyhow::Result<u64> {
            let index = counter::CT_BASE + event as u32;
            Ok(self.counters.get(&index, 0).context("reading the per-CPU counters")?.iter().sum())
        };
        Ok(CtTotals {
            table_full: sum(ct_event::TABLE_FULL)?,
            alloc_failed: sum(ct_event::ALLOC_FAILED)?,
            early_drop: sum(ct_event::EARLY_DROP)?,
            insert: sum(ct_event::INSERT)?,
            insert_failed: sum(ct_event::INSERT_FAILED)?,
            clash_resolved: sum(ct_event::CLASH_RESOLVED)?,
            delete: sum(ct_event::DELETE)?,
            invalid: sum(ct_event::INVALID)?,
        })
    }

    /// Tells the programs that the reader sleeps until a record wakes it.
    pub fn set_reader_asleep(&mut self) -> anyhow::Result<()> {
        self.reader_asleep.set(0, 1, 0).context("setting READER_ASLEEP")?;
        self.reader_sleeps += 1;
        Ok(())
    }

    /// Detaches the programs; the maps stay readable so the ring buffer can
    /// be drained and the counters read after the last event.
    pub fn detach(&mut self) {
        self.misses_at_detach = Some(self.program_misses());
        self.ebpf = None;
    }

    pub fn totals(&self) -> anyhow::Result<KernelTotals> {
        let sum = |index: u32| -> anyhow::Result<u64> {
            let values = self.counters.get(&index, 0).context("reading the per-CPU counters")?;
            Ok(values.iter().sum())
        };
        Ok(KernelTotals {
            netfilter_drops: sum(counter::NETFILTER_DROPS)?,
            netfilter_drops_no_entry: sum(counter::NETFILTER_DROPS_NO_ENTRY)?,
            lost_events: sum(counter::RINGBUF_FULL)?,
            lost_conntrack_events: sum(counter::RINGBUF_FULL_CONNTRACK)?,
            program_misses: self.program_misses(),
            reader_sleeps: self.reader_sleeps,
            reader_woken: sum(counter::READER_WOKEN)?,
        })
    }

    /// The kernel's count of skipped runs, summed over ctrace's programs
    /// (`recursion_misses` in each program's info), where it counts them
    /// all. After `detach`, the count taken then.
    fn program_misses(&self) -> Option<u64> {
        if let Some(at_detach) = self.misses_at_detach {
            return at_detach;
        }
        let kprobes = self.hooks.iter().any(|h| h.tier == Some(Tier::Kprobe));
        if kprobes && !self.kprobe_misses_counted {
            return None;
        }
        let mut total = 0;
        for (_, program) in self.ebpf.as_ref()?.programs() {
            // Programs of families that did not attach are not loaded.
            let Ok(fd) = program.fd() else { continue };
            total += recursion_misses(fd.as_fd()).ok()?;
        }
        Some(total)
    }
}
