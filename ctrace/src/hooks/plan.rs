//! Which conntrack hooks to try, on which tier, in which order: decided
//! from what the kernel offers and what the user asked for, before anything
//! is loaded. Pure, so that every fallback is unit-tested; `Attached::attach`
//! gathers the facts, applies the plan (a family that fails to load on one
//! tier goes on to its next step) and settles the tier with [`settle`].
use super::{
    conntrack::{Family, HookFamily, FAMILIES},
    HookReport, Tier, TierChoice,
};

/// What the running kernel offers the conntrack hooks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelFacts {
    /// Why no conntrack hook can run at all (conntrack not loaded, its BTF
    /// or layout unreadable); None when they can.
    pub blocker: Option<String>,
    /// conntrack is built into vmlinux: aya 0.14 fentry-attaches only there.
    pub built_in: bool,
    /// The kernel has kprobes.
    pub kprobes: bool,
    /// Hooked functions missing from /proc/kallsyms (inlined, or renamed
    /// such as `.constprop.0`).
    pub missing: Vec<&'static str>,
    /// Hooked functions whose vmlinux BTF prototype is not the one the
    /// fentry/fexit programs assume (checked where conntrack is built in).
    pub fentry_mismatch: Vec<&'static str>,
    /// Hooked functions the compiler split (`NAME.part.0` exists, and the
    /// hook has a program for it): their kprobe goes on the part.
    pub split: Vec<&'static str>,
}

/// One tier for one family: tried, or left out with the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Try(Tier),
    Skip(Tier, String),
}

/// What to do with one family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FamilyPlan {
    pub family: &'static Family,
    /// Why the family stays off; None: follow the steps.
    pub off: Option<String>,
    /// Tiers in the order to try them (fentry first: it costs less).
    pub steps: Vec<Step>,
}

/// The plan for every conntrack family, or why the tier asked for cannot
/// run at all.
pub fn plan(facts: &KernelFacts, choice: TierChoice, invalid: bool) -> Result<Vec<FamilyPlan>, String> {
    if let (TierChoice::Kprobe | TierChoice::Fentry, Some(why)) = (choice, &facts.blocker) {
        return Err(format!("the conntrack hooks cannot run: {why}"));
    }
    Ok(FAMILIES
        .iter()
        .map(|family| {
            let off = if choice == TierChoice::Tracepoint {
                Some("off: --tier tracepoint".to_string())
            } else if let Some(why) = &facts.blocker {
                Some(why.clone())
            } else if family.per_packet && !invalid {
                Some("runs on every packet conntrack sees; --invalid turns it on".to_string())
            } else {
                None
            };
            let steps = if off.is_some() { Vec::new() } else { steps(facts, choice, family) };
            FamilyPlan { family, off, steps }
        })
        .collect())
}

fn steps(facts: &KernelFacts, choice: TierChoice, family: &Family) -> Vec<Step> {
    let not_a_function = family.hooks.iter().find(|h| facts.missing.contains(&h.function)).map(|h| {
        format!("`{}` is not a function in this kernel (inlined, or renamed such as .constprop.0)", h.function)
    });
    let mut steps = Vec::new();
    if matches!(choice, TierChoice::Auto | TierChoice::Fentry) {
        let mismatch = family.hooks.iter().find(|h| facts.fentry_mismatch.contains(&h.function)).map(|h| {
            format!(
                "`{}` in vmlinux BTF is missing or has another signature than the {} parameters expected",
                h.function, h.params
            )
        });
        let split = family.hooks.iter().find(|h| facts.split.contains(&h.function)).map(|h| {
            format!(
                "`{}` is split by the compiler: callers that inline its first test call `{}`, which has no BTF \
                 for fentry",
                h.function,
                h.part_symbol()
            )
        });
        steps.push(if !facts.built_in {
            Step::Skip(Tier::Fentry, "conntrack is a module (aya 0.14 cannot fentry-attach to module functions)".into())
        } else if let Some(why) = not_a_function.clone().or(mismatch).or(split) {
            Step::Skip(Tier::Fentry, why)
        } else {
            Step::Try(Tier::Fentry)
        });
    }
    if matches!(choice, TierChoice::Auto | TierChoice::Kprobe) {
        steps.push(if !facts.kprobes {
            Step::Skip(
                Tier::Kprobe,
                "this kernel has no kprobes (/sys/bus/event_source/devices/kprobe is missing)".into(),
            )
        } else if let Some(why) = not_a_function {
            Step::Skip(Tier::Kprobe, why)
        } else {
            Step::Try(Tier::Kprobe)
        });
    }
    steps
}

/// Why a family whose plan said go cannot run because a family it needs
/// did not attach.
pub fn unmet_need(family: &Family, reports: &[HookReport]) -> Option<String> {
    let needed = family.needs?;
    let attached = reports.iter().any(|r| r.hook == needed && r.tier.is_some());
    (!attached).then(|| match needed {
        HookFamily::TableFull => {
            "needs the table_full hooks, which tell a full table's drops from invalid packets".to_string()
        }
        other => format!("needs the {other} hooks, which did not attach"),
    })
}

/// The tier ctrace runs on (the best one any family attached on), or why
/// the tier asked for cannot run here.
pub fn settle(choice: TierChoice, reports: &[HookReport]) -> Result<Tier, String> {
    let on = |tier: Tier| reports.iter().any(|r| r.tier == Some(tier));
    let wanted = match choice {
        TierChoice::Kprobe => Some(Tier::Kprobe),
        TierChoice::Fentry => Some(Tier::Fentry),
        TierChoice::Auto | TierChoice::Tracepoint => None,
    };
    if let Some(wanted) = wanted.filter(|&t| !on(t)) {
        let whys: Vec<String> = reports
            .iter()
            .filter(|r| r.hook != HookFamily::Drops)
            .map(|r| format!("{}: {}", r.hook, r.detail))
            .collect();
        return Err(format!("the {} tier cannot run here: {}", wanted.name(), whys.join("; ")));
    }
    Ok([Tier::Fentry, Tier::Kprobe].into_iter().find(|&t| on(t)).unwrap_or(Tier::Tracepoint))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn built_in() -> KernelFacts {
        KernelFacts { built_in: true, kprobes: true, ..Default::default() }
    }

    fn module() -> KernelFacts {
        KernelFacts { built_in: false, kprobes: true, ..Default::default() }
    }

    fn of(plans: &[FamilyPlan], id: HookFamily) -> &FamilyPlan {
        plans.iter().find(|p| p.family.id == id).unwrap()
    }

    fn report(hook: HookFamily, tier: Option<Tier>) -> HookReport {
        HookReport { hook, tier, detail: if tier.is_some() { "on".into() } else { "why not".into() } }
    }

    #[test]
    fn auto_tries_fentry_then_kprobes_where_conntrack_is_built_in() {
        let plans = plan(&built_in(), TierChoice::Auto, false).unwrap();
        let p = of(&plans, HookFamily::TableFull);
        assert_eq!((p.off.as_deref(), &p.steps[..]), (None, &[Step::Try(Tier::Fentry), Step::Try(Tier::Kprobe)][..]));
        // The per-packet family only with --invalid.
        let invalid = of(&plans, HookFamily::Invalid);
        assert!(invalid.off.as_deref().unwrap().contains("--invalid"));
        assert!(invalid.steps.is_empty());
        let plans = plan(&built_in(), TierChoice::Auto, true).unwrap();
        assert_eq!(of(&plans, HookFamily::Invalid).steps.len(), 2);
    }

    #[test]
    fn a_module_skips_fentry_with_the_reason() {
        let plans = plan(&module(), TierChoice::Auto, false).unwrap();
        for p in &plans[..3] {
            assert!(matches!(&p.steps[0], Step::Skip(Tier::Fentry, why) if why.contains("module")), "{p:?}");
            assert_eq!(p.steps[1], Step::Try(Tier::Kprobe));
        }
        // Asked for kprobes: fentry is not even considered.
        let plans = plan(&module(), TierChoice::Kprobe, false).unwrap();
        assert_eq!(of(&plans, HookFamily::Insert).steps, [Step::Try(Tier::Kprobe)]);
    }

    #[test]
    fn a_missing_or_different_function_rules_out_what_it_must() {
        let facts = KernelFacts { missing: vec!["__nf_conntrack_alloc"], ..built_in() };
        let plans = plan(&facts, TierChoice::Auto, false).unwrap();
        let p = of(&plans, HookFamily::TableFull);
        assert!(p.steps.iter().all(|s| matches!(s, Step::Skip(_, why) if why.contains("not a function"))), "{p:?}");
        assert_eq!(of(&plans, HookFamily::Insert).steps[0], Step::Try(Tier::Fentry), "other families unaffected");
        // Another prototype: only fentry is ruled out (kprobes read registers).
        let facts = KernelFacts { fentry_mismatch: vec!["nf_ct_delete"], ..built_in() };
        let plans = plan(&facts, TierChoice::Auto, false).unwrap();
        let p = of(&plans, HookFamily::Delete);
        assert!(matches!(&p.steps[0], Step::Skip(Tier::Fentry, why) if why.contains("signature")));
        assert_eq!(p.steps[1], Step::Try(Tier::Kprobe));
        // No kprobes in the kernel at all.
        let facts = KernelFacts { kprobes: false, ..module() };
        let plans = plan(&facts, TierChoice::Auto, false).unwrap();
        assert!(
            matches!(&of(&plans, HookFamily::Insert).steps[1], Step::Skip(Tier::Kprobe, why) if why.contains("no kprobes"))
        );
    }

    /// 5.10 and 7.x call `nf_ct_delete.part.0` from early_drop and the gc:
    /// the kprobe goes on the part, which fentry cannot reach.
    #[test]
    fn a_split_function_is_hooked_at_its_part_by_kprobes_only() {
        let facts = KernelFacts { split: vec!["nf_ct_delete"], ..built_in() };
        let plans = plan(&facts, TierChoice::Auto, false).unwrap();
        let p = of(&plans, HookFamily::Delete);
        assert!(matches!(&p.steps[0], Step::Skip(Tier::Fentry, why) if why.contains("nf_ct_delete.part.0")), "{p:?}");
        assert_eq!(p.steps[1], Step::Try(Tier::Kprobe));
        assert_eq!(of(&plans, HookFamily::Insert).steps[0], Step::Try(Tier::Fentry), "other families unaffected");
        let delete = p.family;
        assert_eq!(
            crate::hooks::conntrack::describe(delete, Tier::Kprobe, &facts.split),
            "kprobes on nf_ct_delete.part.0"
        );
        assert_eq!(crate::hooks::conntrack::describe(delete, Tier::Kprobe, &[]), "kprobes on nf_ct_delete");
        let table_full = of(&plans, HookFamily::TableFull).family;
        assert_eq!(
            crate::hooks::conntrack::describe(table_full, Tier::Fentry, &facts.split),
            "fentry/fexit on __nf_conntrack_alloc, early_drop"
        );
    }

    #[test]
    fn a_blocker_turns_every_family_off_or_refuses_a_named_tier() {
        let facts = KernelFacts { blocker: Some("nf_conntrack is not loaded yet".into()), ..module() };
        let plans = plan(&facts, TierChoice::Auto, true).unwrap();
        assert!(plans.iter().all(|p| p.off.as_deref() == Some("nf_conntrack is not loaded yet") && p.steps.is_empty()));
        for choice in [TierChoice::Kprobe, TierChoice::Fentry] {
            let err = plan(&facts, choice, false).unwrap_err();
            assert_eq!(err, "the conntrack hooks cannot run: nf_conntrack is not loaded yet");
        }
        let plans = plan(&built_in(), TierChoice::Tracepoint, true).unwrap();
        assert!(plans.iter().all(|p| p.off.as_deref() == Some("off: --tier tracepoint")));
    }

    #[test]
    fn invalid_needs_the_table_full_family_attached() {
        let invalid = FAMILIES.iter().find(|f| f.id == HookFamily::Invalid).unwrap();
        let insert = FAMILIES.iter().find(|f| f.id == HookFamily::Insert).unwrap();
        let without = [report(HookFamily::Drops, Some(Tier::Tracepoint)), report(HookFamily::TableFull, None)];
        assert!(unmet_need(invalid, &without).unwrap().contains("table_full"));
        let with = [report(HookFamily::TableFull, Some(Tier::Kprobe))];
        assert_eq!(unmet_need(invalid, &with), None);
        assert_eq!(unmet_need(insert, &without), None, "needs nothing");
    }

    #[test]
    fn the_tier_is_the_best_attached_and_a_named_tier_must_attach() {
        let drops = report(HookFamily::Drops, Some(Tier::Tracepoint));
        assert_eq!(settle(TierChoice::Auto, std::slice::from_ref(&drops)), Ok(Tier::Tracepoint));
        let mixed = [
            drops.clone(),
            report(HookFamily::TableFull, Some(Tier::Kprobe)),
            report(HookFamily::Insert, Some(Tier::Fentry)),
        ];
        assert_eq!(settle(TierChoice::Auto, &mixed), Ok(Tier::Fentry));
        let kprobes =
            [drops.clone(), report(HookFamily::TableFull, Some(Tier::Kprobe)), report(HookFamily::Delete, None)];
        assert_eq!(settle(TierChoice::Kprobe, &kprobes), Ok(Tier::Kprobe));
        let err = settle(TierChoice::Fentry, &kprobes).unwrap_err();
        assert_eq!(
            err, "the fentry tier cannot run here: table_full: on; delete: why not",
            "the drops hook is not a reason"
        );
    }
}
