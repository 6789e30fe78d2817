//! Loading and attaching the kernel programs.
//!
//! One module per hook family, mirroring `ctrace-ebpf/src/hooks/`: each
//! resolves from BTF what its program needs. This module loads the embedded
//! object, attaches, and hands out the maps.
pub mod kfree_skb;

use std::{fmt, io, path::Path};

use anyhow::{bail, Context as _};
use aya::{
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{BtfTracePoint, ProgramError},
    Ebpf, EbpfError, EbpfLoader,
};
use ctrace_common::counter;

use crate::{btf::Btf, privileges};

/// The kernel programs, built by build.rs and embedded in the binary.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ctrace"));

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// How ctrace sees drops. More tiers (fentry, kprobe) come with the
/// conntrack hooks; the tracepoint tier works wherever BTF does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// `tp_btf/kfree_skb`: every packet netfilter drops.
    Tracepoint,
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tier::Tracepoint => f.write_str("tracepoint (tp_btf/kfree_skb)"),
        }
    }
}

/// Exact totals from the per-CPU counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KernelTotals {
    /// Packets freed with reason NETFILTER_DROP.
    pub netfilter_drops: u64,
    /// ... of which had no conntrack entry.
    pub netfilter_drops_no_entry: u64,
    /// Records the ring buffer had no room for.
    pub lost_events: u64,
}

/// The ring buffer of event records.
pub type Events = RingBuf<MapData>;

/// Attached programs and their counters. Dropping it detaches everything.
pub struct Attached {
    pub tier: Tier,
    counters: PerCpuArray<MapData, u64>,
    ebpf: Option<Ebpf>,
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
    /// Loads the programs with this kernel's layout and attaches them.
    /// The ring buffer is handed out separately, to be polled on its own.
    pub fn attach(btf: &Btf) -> anyhow::Result<(Self, Events)> {
        if OBJECT.is_empty() {
            bail!("this ctrace was built without its kernel programs (AYA_BUILD_SKIP was set); rebuild it");
        }
        privileges::require_tracing()?;
        let layout = kfree_skb::layout(btf).context("the tracepoint tier cannot run on this kernel")?;
        let aya_btf = aya::Btf::from_sys_fs().context("reading the kernel's BTF")?;

        let mut ebpf = EbpfLoader::new()
            .btf(Some(&aya_btf))
            .override_global(kfree_skb::LAYOUT_GLOBAL, &layout, true)
            .load(OBJECT)
            .map_err(explain_load_error)?;

        let program: &mut BtfTracePoint =
            ebpf.program_mut(kfree_skb::PROGRAM).context("the embedded object has no kfree_skb program")?.try_into()?;
        program
            .load(kfree_skb::TRACEPOINT, &aya_btf)
            .map_err(|e| explain_program_error(e, "loading the kfree_skb program"))?;
        program.attach().map_err(|e| explain_program_error(e, "attaching to the skb:kfree_skb tracepoint"))?;

        let events = RingBuf::try_from(ebpf.take_map("EVENTS").context("no EVENTS map")?)?;
        let counters = PerCpuArray::try_from(ebpf.take_map("COUNTERS").context("no COUNTERS map")?)?;
        Ok((Attached { tier: Tier::Tracepoint, counters, ebpf: Some(ebpf) }, events))
    }

    /// Detaches the programs; the maps stay readable so the ring buffer can
    /// be drained and the counters read after the last event.
    pub fn detach(&mut self) {
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
        })
    }
}

fn is_permission_error(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES))
}

/// Turns a load failure into a sentence about what is missing.
fn explain_load_error(err: EbpfError) -> anyhow::Error {
    if let EbpfError::MapError(aya::maps::MapError::CreateError { io_error, .. }) = &err {
        if is_permission_error(io_error) {
            return anyhow::anyhow!(
                "the kernel refused to create BPF maps ({io_error}): run ctrace as root, or grant \
                 CAP_BPF and CAP_PERFMON"
            );
        }
    }
    anyhow::Error::new(err).context("loading ctrace's kernel programs")
}

fn explain_program_error(err: ProgramError, doing: &str) -> anyhow::Error {
    let message = match &err {
        ProgramError::LoadError { io_error, .. } if is_permission_error(io_error) => {
            // The verifier log, if any, stays in the chain below.
            Some(format!("the kernel refused to load a tracing program ({io_error}): run ctrace as root, or grant CAP_BPF and CAP_PERFMON"))
        }
        ProgramError::SyscallError(e) if is_permission_error(&e.io_error) => {
            Some(format!("the kernel refused {doing} ({}): run ctrace as root", e.io_error))
        }
        _ => None,
    };
    let err = anyhow::Error::new(err).context(doing.to_string());
    match message {
        Some(message) => err.context(message),
        None => err,
    }
}
