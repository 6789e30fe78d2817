//! The doctor's report as people read it: findings worst first, each with
//! its numbers and the commands that fix it, then the tables it looked at.
use std::fmt::Write as _;

use super::{rules::bytes, Report};

pub fn text(report: &Report) -> String {
    let e = &report.evidence;
    let mut out = String::new();
    let setting = |v: Option<u64>| v.map_or("?".to_string(), |v| v.to_string());
    let _ = writeln!(
        out,
        "ctrace doctor: {:.1} s watched ({} tier); nf_conntrack_max {}, buckets {}",
        e.window_s,
        e.tier,
        setting(e.max),
        setting(e.buckets)
    );
    if let Some(entry) = &e.entry_size {
        let _ = write!(out, "entry size {} B (from {})", entry.bytes, entry.source);
        if let Some(mem) = e.mem_total_bytes {
            let _ = write!(out, ", memory {}", bytes(mem));
        }
        out.push('\n');
    }
    if e.kernel_log.is_none() {
        out.push_str("kernel log: not readable (needs root or dmesg_restrict=0)\n");
    }
    out.push('\n');
    if report.findings.is_empty() {
        out.push_str("No findings.\n");
    }
    for f in &report.findings {
        let place = match (&f.namespace, f.netns) {
            (Some(name), Some(inum)) => format!("{name} ({inum})"),
            _ => "machine".to_string(),
        };
        let _ = writeln!(out, "{:<8} {place}: {}", f.severity.as_str().to_uppercase(), f.summary);
        for line in &f.evidence {
            let _ = writeln!(out, "  - {line}");
        }
        for (i, line) in f.fix.iter().enumerate() {
            let _ = writeln!(out, "  {} {line}", if i == 0 { "fix:    " } else { "        " });
        }
        for (i, line) in f.persist.iter().enumerate() {
            let _ = writeln!(out, "  {} {line}", if i == 0 { "persist:" } else { "        " });
        }
        out.push('\n');
    }
    if e.namespaces.is_empty() {
        out.push_str("No namespace had conntrack entries or moving counters in the window.\n\n");
    } else {
        let _ = writeln!(
            out,
            "{:<28} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8}",
            "NAMESPACE", "ENTRIES", "PEAK", "DROP", "EARLY", "INS_FAIL", "INVALID", "INSERTS"
        );
        for ns in &e.namespaces {
            let d = ns.delta();
            let name = format!("{} ({})", ns.name, ns.netns);
            let inserts = ns.inserts.map_or("-".to_string(), |n| n.to_string());
            let _ = writeln!(
                out,
                "{name:<28} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {inserts:>8}",
                ns.entries, ns.peak, d.drop, d.early_drop, d.insert_failed, d.invalid
            );
        }
        let _ = writeln!(out, "(counter changes over the window; INSERTS on the hook tiers only)\n");
    }
    let _ = writeln!(
        out,
        "status: {} (exit {}: 0 healthy, 1 warning, 2 critical). doctor changed nothing.",
        report.status, report.exit_code
    );
    out
}
