//! Would ctrace's hooks work on a kernel that is not running? Decided from
//! the kernel's files alone, with the same checks `Attached::attach` makes
//! before loading: the drop tracepoint's prototype and the `sk_buff` layout,
//! conntrack's layout, which hooked functions exist, and the plan per family
//! and tier. `ctrace kernel-check` prints it; `cargo xtask kernels` runs it
//! over Debian's kernel packages, so a kernel that renames or inlines a
//! hooked function is seen before a user meets it.
//!
//! What files cannot tell: whether the verifier accepts the programs, and
//! whether an fentry attach succeeds. "ok" means every check before loading
//! passes.
use std::borrow::Cow;

use serde::Serialize;

use super::{conntrack, kfree_skb, plan, Tier, TierChoice};
use crate::btf::Btf;

/// A kernel as its package ships it.
pub struct KernelFiles {
    /// vmlinux's `.BTF` section.
    pub vmlinux_btf: Vec<u8>,
    /// nf_conntrack.ko's `.BTF` section (split BTF; absent before 5.11, or
    /// where conntrack is built in).
    pub module_btf: Option<Vec<u8>>,
    /// The nf_conntrack module's function names (None: built in).
    pub module_functions: Option<Vec<String>>,
    /// CONFIG_KPROBES.
    pub kprobes: bool,
}

/// One hook family on one tier.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Verdict {
    pub hook: &'static str,
    pub tier: &'static str,
    pub ok: bool,
    /// What runs, or why not.
    pub detail: String,
}

pub fn check(files: &KernelFiles) -> anyhow::Result<Vec<Verdict>> {
    let btf = Btf::parse(&files.vmlinux_btf, None)?;
    let module: &[String] = files.module_functions.as_deref().unwrap_or(&[]);
    // A function exists in vmlinux when BTF describes it (pahole emits
    // functions that kept a symbol), in the module when its symbol table has it.
    let has_function = |name: &str| module.iter().any(|f| f == name) || btf.function_params(name).is_some();
    let mut verdicts = Vec::new();

    // The drop tracepoint: where no reason, the drop site must exist.
    let drop_site = has_function(kfree_skb::DROP_SITE).then_some(1..2);
    verdicts.push(match kfree_skb::layout(&btf, drop_site) {
        Ok((_, test)) => {
            Verdict { hook: "drops", tier: Tier::Tracepoint.name(), ok: true, detail: test.describe().into() }
        }
        Err(e) => Verdict { hook: "drops", tier: Tier::Tracepoint.name(), ok: false, detail: e.to_string() },
    });

    let mut facts =
        plan::KernelFacts { built_in: files.module_functions.is_none(), kprobes: files.kprobes, ..Default::default() };
    let ct_btf = match &files.module_btf {
        Some(bytes) => Btf::parse(bytes, Some(&btf)).map(|b| Some(Cow::Owned(b))),
        // Built in, or a module without BTF (5.10): vmlinux's types, if conntrack is there.
        None => Ok(has_function("nf_conntrack_in").then_some(Cow::Borrowed(&btf))),
    };
    super::conntrack_facts(&mut facts, &btf, &ct_btf, &has_function);
    let plans = plan::plan(&facts, TierChoice::Auto, true).map_err(anyhow::Error::msg)?;
    for family_plan in plans {
        let hook = family_plan.family.id.name();
        if let Some(off) = family_plan.off {
            for tier in [Tier::Fentry, Tier::Kprobe] {
                verdicts.push(Verdict { hook, tier: tier.name(), ok: false, detail: off.clone() });
            }
            continue;
        }
        for step in family_plan.steps {
            verdicts.push(match step {
                plan::Step::Try(tier) => Verdict {
                    hook,
                    tier: tier.name(),
                    ok: true,
                    detail: conntrack::describe(family_plan.family, tier, &facts.split),
                },
                plan::Step::Skip(tier, why) => Verdict { hook, tier: tier.name(), ok: false, detail: why },
            });
        }
    }
    Ok(verdicts)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The running kernel, as files: the same verdicts as the checks at
    /// attach time would give for the tracepoint.
    #[test]
    fn the_running_kernel_checks_out_for_the_tracepoint() {
        let Ok(vmlinux_btf) = std::fs::read("/sys/kernel/btf/vmlinux") else {
            eprintln!("SKIPPED: /sys/kernel/btf/vmlinux is missing: this kernel has no BTF");
            return;
        };
        let files = KernelFiles { vmlinux_btf, module_btf: None, module_functions: None, kprobes: false };
        let verdicts = check(&files).unwrap();
        assert_eq!(verdicts[0].hook, "drops");
        assert!(verdicts[0].ok, "{:?}", verdicts[0]);
        // No kprobes said: every conntrack family's kprobe tier says so.
        for v in verdicts.iter().filter(|v| v.tier == "kprobe") {
            assert!(!v.ok, "{v:?}");
        }
    }
}
