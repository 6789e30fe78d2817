//! The machine as a whole: the table's size against its hash and memory,
//! and the kernel log.
use super::*;

/// Hash size and memory: one setting for the whole machine.
pub(super) fn sizing(evidence: &Evidence) -> Vec<Finding> {
    let mut findings = Vec::new();
    let Some(max) = evidence.max else { return findings };
    if let Some(buckets) = evidence.buckets {
        if buckets < max / 4 {
            let hashsize = (max / 2).max(1);
            let mut f = Finding::new(
                Severity::Warning,
                "hash_too_small",
                None,
                format!("{buckets} hash buckets for up to {max} entries: chains of {} at full", max / buckets.max(1)),
            );
            f.evidence.push("every lookup walks a chain; keep buckets between max/4 and max/2".into());
            f.fix.push(format!("echo {hashsize} > /sys/module/nf_conntrack/parameters/hashsize"));
            f.persist.push(format!(
                "echo 'options nf_conntrack hashsize={hashsize}' > /etc/modprobe.d/nf_conntrack.conf (built-in \
                 conntrack: nf_conntrack.hashsize={hashsize} on the kernel command line)"
            ));
            f.settings.insert("nf_conntrack.hashsize".into(), hashsize);
            findings.push(f);
        }
    }
    if let (Some(entry), Some(mem)) = (&evidence.entry_size, evidence.mem_total_bytes) {
        let full = max.saturating_mul(entry.bytes);
        let severity = if share(full, mem) > 2.0 * MEMORY_SHARE { Severity::Warning } else { Severity::Info };
        let mut f = Finding::new(
            severity,
            "table_memory",
            None,
            format!(
                "a full table takes {} ({:.1}% of {} memory) per namespace that fills it",
                bytes(full),
                100.0 * share(full, mem),
                bytes(mem)
            ),
        );
        f.evidence.push(format!("{max} entries of {} B (from {})", entry.bytes, entry.source));
        findings.push(f);
    }
    findings
}

/// What the kernel logged (the one trace it leaves by itself).
pub(super) fn kernel_log(evidence: &Evidence) -> Option<Finding> {
    let log = evidence.kernel_log.as_ref()?;
    if log.lines == 0 {
        return None;
    }
    let mut f = Finding::new(
        Severity::Info,
        "kernel_log",
        None,
        format!("the kernel log has {} \"nf_conntrack: table full, dropping packet\" lines", log.lines),
    );
    if let Some(ago) = log.last_ago_s {
        f.evidence.push(format!("the latest {ago:.0} s ago (the kernel rate-limits them: drops are many more)"));
    }
    f.evidence.push("the line names no namespace: the per-namespace findings say which table it was".into());
    Some(f)
}
