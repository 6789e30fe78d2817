//! From evidence to findings: what is wrong, the numbers that show it, and
//! the exact change that fixes it. Pure functions of [`Evidence`].
use std::collections::BTreeMap;

use serde::Serialize;

use super::evidence::{Evidence, NamespaceEvidence, PortCount};

mod counters;
mod machine;
mod table;
#[cfg(test)]
mod tests;

use self::{counters::*, machine::*, table::*};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, strum::IntoStaticStr)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    /// The exit status: 0 healthy (info at most), 1 warnings, 2 critical.
    pub fn exit_code(worst: Option<Severity>) -> u8 {
        match worst {
            None | Some(Severity::Info) => 0,
            Some(Severity::Warning) => 1,
            Some(Severity::Critical) => 2,
        }
    }
}

/// One thing doctor found.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Finding {
    pub severity: Severity,
    /// Stable name of the rule (`table_full`, `timeout_holds_slots`, ...).
    pub id: &'static str,
    /// The namespace it is about; None for the machine as a whole.
    pub netns: Option<u32>,
    pub namespace: Option<String>,
    pub summary: String,
    /// The numbers that show it.
    pub evidence: Vec<String>,
    /// Commands that fix it now.
    pub fix: Vec<String>,
    /// What keeps the fix across reboots.
    pub persist: Vec<String>,
    /// The settings the fix changes, with their suggested values
    /// (sysctl names, or `nf_conntrack.hashsize`), for tools to apply.
    pub settings: BTreeMap<String, u64>,
}

impl Finding {
    fn new(severity: Severity, id: &'static str, ns: Option<&NamespaceEvidence>, summary: String) -> Self {
        Finding {
            severity,
            id,
            netns: ns.map(|n| n.netns),
            namespace: ns.map(|n| n.name.clone()),
            summary,
            evidence: Vec::new(),
            fix: Vec::new(),
            persist: Vec::new(),
            settings: BTreeMap::new(),
        }
    }
}

/// A table this full (share of max) is worth a warning.
pub const NEAR_FULL: f64 = 0.9;
/// A state or port holding this share of a busy table is what fills it.
pub const DOMINANT_SHARE: f64 = 0.5;
/// A table this full makes what fills it worth a warning (else info).
pub const BUSY: f64 = 0.5;
/// Entries a port needs before it is called a NOTRACK candidate.
pub const NOTRACK_MIN_ENTRIES: u64 = 100;
/// The share of the machine's memory a full table may take before doctor
/// warns, and the most a suggested maximum may take.
pub const MEMORY_SHARE: f64 = 0.125;
/// Where sysctl settings are made persistent.
pub const SYSCTL_FILE: &str = "/etc/sysctl.d/90-conntrack.conf";

/// Every finding, worst first.
pub fn diagnose(evidence: &Evidence) -> Vec<Finding> {
    let mut findings = Vec::new();
    findings.extend(sizing(evidence));
    findings.extend(kernel_log(evidence));
    for ns in &evidence.namespaces {
        findings.extend(drops(evidence, ns));
        findings.extend(early_drops(evidence, ns));
        findings.extend(insert_failed(evidence, ns));
        findings.extend(clashes_resolved(evidence, ns));
        findings.extend(chains_too_long(evidence, ns));
        findings.extend(invalid(evidence, ns));
        findings.extend(near_full(evidence, ns));
        findings.extend(timeouts(evidence, ns));
        findings.extend(notrack(evidence, ns));
    }
    findings.sort_by_key(|f| std::cmp::Reverse(f.severity));
    findings
}

fn rate(count: u64, window_s: f64) -> f64 {
    count as f64 / window_s.max(1e-3)
}

fn share(part: u64, whole: u64) -> f64 {
    part as f64 / whole.max(1) as f64
}

/// Bytes for people: KiB, MiB, GiB.
pub fn bytes(n: u64) -> String {
    let n = n as f64;
    match n {
        n if n >= (1u64 << 30) as f64 => format!("{:.1} GiB", n / (1u64 << 30) as f64),
        n if n >= (1u64 << 20) as f64 => format!("{:.1} MiB", n / (1u64 << 20) as f64),
        n => format!("{:.0} KiB", n / 1024.0),
    }
}

/// A new maximum: room for the peak plus every flow refused in the window
/// (each drop stands for a flow that wanted a slot; retransmissions make
/// this generous), with a quarter to spare, at least double the present
/// one, a power of two; capped by [`MEMORY_SHARE`] of the machine's memory.
/// Returns the value and whether the cap cut it.
pub fn suggested_max(max: u64, peak: u64, refused: u64, entry: Option<u64>, mem_total: Option<u64>) -> (u64, bool) {
    let wanted = (peak.max(max) + refused).saturating_mul(5) / 4;
    let target = wanted.max(max.saturating_mul(2)).max(1).next_power_of_two();
    match (entry, mem_total) {
        (Some(entry), Some(mem)) if entry > 0 => {
            let cap = ((mem as f64 * MEMORY_SHARE) as u64 / entry).max(1);
            let cap = if cap.is_power_of_two() { cap } else { cap.next_power_of_two() / 2 };
            if target > cap {
                (cap.max(max), true)
            } else {
                (target, false)
            }
        }
        _ => (target, false),
    }
}

/// The command that runs `command` in the namespace.
fn inside(ns: &NamespaceEvidence, command: &str) -> String {
    format!("{}{command}", ns.exec_prefix)
}

/// Adds the fix for a new maximum ([`suggested_max`] for this peak and
/// these refused flows) when it is above the present one. Returns the
/// suggestion and whether the memory cap cut it.
fn raise_max(finding: &mut Finding, evidence: &Evidence, max: u64, peak: u64, refused: u64) -> (u64, bool) {
    let entry = evidence.entry_size.as_ref().map(|e| e.bytes);
    let (suggested, capped) = suggested_max(max, peak, refused, entry, evidence.mem_total_bytes);
    if suggested > max {
        max_fix(finding, evidence, suggested);
    }
    (suggested, capped)
}

fn max_fix(finding: &mut Finding, evidence: &Evidence, suggested: u64) {
    finding.fix.push(format!("sysctl -w net.netfilter.nf_conntrack_max={suggested}"));
    finding.persist.push(format!("echo 'net.netfilter.nf_conntrack_max = {suggested}' >> {SYSCTL_FILE}"));
    finding.settings.insert("net.netfilter.nf_conntrack_max".into(), suggested);
    if let Some(entry) = &evidence.entry_size {
        finding.evidence.push(format!(
            "a table of {suggested} entries takes up to {} of kernel memory ({} B per entry, from {}){}",
            bytes(suggested * entry.bytes),
            entry.bytes,
            entry.source,
            evidence
                .mem_total_bytes
                .map(|m| format!(", {:.1}% of {}", 100.0 * share(suggested * entry.bytes, m), bytes(m)))
                .unwrap_or_default()
        ));
    }
    if let Some(buckets) = evidence.buckets {
        if buckets < suggested / 4 {
            let hashsize = suggested / 2;
            finding.fix.push(format!("echo {hashsize} > /sys/module/nf_conntrack/parameters/hashsize"));
            finding
                .persist
                .push(format!("echo 'options nf_conntrack hashsize={hashsize}' > /etc/modprobe.d/nf_conntrack.conf"));
            finding.settings.insert("nf_conntrack.hashsize".into(), hashsize);
        }
    }
}

fn ports(list: &[PortCount]) -> String {
    let shown: Vec<String> = list.iter().take(5).map(|p| format!("{}/{} {}", p.proto, p.port, p.count)).collect();
    shown.join(", ")
}
