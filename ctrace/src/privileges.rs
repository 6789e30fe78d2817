//! What ctrace needs from the kernel's permission model, checked up front so
//! the user reads a sentence instead of an errno.
use anyhow::bail;

pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

/// The effective capability set, from `/proc/self/status`.
pub fn effective() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    parse_cap_eff(&status).unwrap_or(0)
}

pub fn parse_cap_eff(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line["CapEff:".len()..].trim(), 16).ok()
}

/// Names of the capabilities tracing needs that `caps` lacks. CAP_SYS_ADMIN
/// stands in for CAP_BPF and CAP_PERFMON (older kernels know only it).
pub fn missing_for_tracing(caps: u64) -> Vec<&'static str> {
    let has = |cap: u32| caps & (1 << cap) != 0;
    let mut missing = Vec::new();
    if !has(CAP_SYS_ADMIN) {
        if !has(CAP_BPF) {
            missing.push("CAP_BPF");
        }
        if !has(CAP_PERFMON) {
            missing.push("CAP_PERFMON");
        }
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    missing
}

pub fn require_tracing() -> anyhow::Result<()> {
    let missing = missing_for_tracing(effective());
    if !missing.is_empty() {
        bail!("ctrace needs root to load its kernel programs (missing {}); run it with sudo", missing.join(", "));
    }
    Ok(())
}

/// Entering other network namespaces to read their counters needs CAP_SYS_ADMIN.
pub fn can_enter_namespaces() -> bool {
    effective() & (1 << CAP_SYS_ADMIN) != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cap_eff() {
        let status = "Name:\tctrace\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(status), Some(0x1ff_ffff_ffff));
        assert_eq!(parse_cap_eff("Name: x\n"), None);
    }

    #[test]
    fn names_what_is_missing() {
        assert!(missing_for_tracing(u64::MAX).is_empty());
        assert_eq!(missing_for_tracing(0), ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"]);
        let bpf_perfmon_net = 1 << CAP_BPF | 1 << CAP_PERFMON | 1 << CAP_NET_ADMIN;
        assert!(missing_for_tracing(bpf_perfmon_net).is_empty());
        assert_eq!(missing_for_tracing(1 << CAP_SYS_ADMIN), ["CAP_NET_ADMIN"]);
    }
}
