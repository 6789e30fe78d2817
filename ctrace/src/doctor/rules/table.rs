//! What fills the table: how full it is, the states and timeouts that
//! hold its slots, and services that need not be tracked at all.
use super::*;
use crate::model::{ConnState, Protocol};

/// A table close to its maximum, not yet dropping.
pub(super) fn near_full(evidence: &Evidence, ns: &NamespaceEvidence) -> Option<Finding> {
    let max = evidence.max?;
    if ns.delta().drop > 0 || ns.drops.get("table_full").is_some_and(|&n| n > 0) {
        return None; // the drops finding says it
    }
    let fullest = ns.entries.max(ns.peak);
    if share(fullest, max) < NEAR_FULL {
        return None;
    }
    let mut f = Finding::new(
        Severity::Warning,
        "near_full",
        Some(ns),
        format!("the table is {:.0}% full ({fullest} of {max})", 100.0 * share(fullest, max)),
    );
    let growth = ns.end.entries as f64 - ns.start.entries as f64;
    if growth > 0.0 {
        let per_s = growth / evidence.window_s.max(1e-3);
        f.evidence.push(format!(
            "growing by {per_s:.1} entries/s: full in about {:.0} s at this rate",
            max.saturating_sub(ns.entries) as f64 / per_s
        ));
    }
    raise_max(&mut f, evidence, max, fullest, 0);
    Some(f)
}

/// The timeout sysctl that holds entries of a state, with a shorter value
/// that is safe for most services.
fn timeout_for(state: ConnState, proto: Protocol) -> Option<(&'static str, u64)> {
    Some(match (proto, state) {
        (Protocol::Tcp, ConnState::TimeWait) => ("nf_conntrack_tcp_timeout_time_wait", 30),
        (Protocol::Tcp, ConnState::SynRecv) => ("nf_conntrack_tcp_timeout_syn_recv", 30),
        (Protocol::Tcp, ConnState::SynSent) => ("nf_conntrack_tcp_timeout_syn_sent", 30),
        (Protocol::Tcp, ConnState::CloseWait) => ("nf_conntrack_tcp_timeout_close_wait", 30),
        (Protocol::Tcp, ConnState::FinWait) => ("nf_conntrack_tcp_timeout_fin_wait", 30),
        (Protocol::Tcp, ConnState::Established) => ("nf_conntrack_tcp_timeout_established", 86_400),
        (Protocol::Udp, _) => ("nf_conntrack_udp_timeout", 10),
        _ => return None,
    })
}

/// Says so when the kernel's listing of the table gave fewer entries than
/// it counts (it skips entries when the table changes while it is read):
/// shares are then of the entries listed.
pub(super) fn short_listing(ns: &NamespaceEvidence) -> Option<String> {
    let census = ns.census.as_ref()?;
    crate::census::is_short(census.entries, census.kernel_entries).then(|| {
        format!(
            "the kernel listed {} of the {} entries it counts (its listing skips entries when the table changes \
             while it is read); shares are of the entries listed",
            census.entries,
            census.kernel_entries.unwrap_or_default()
        )
    })
}

/// One state (or UDP) holds most of a busy table: its timeout is what
/// to shorten.
pub(super) fn timeouts(evidence: &Evidence, ns: &NamespaceEvidence) -> Option<Finding> {
    let census = ns.census.as_ref()?;
    let max = evidence.max?;
    if census.entries == 0 || share(ns.entries, max) < BUSY {
        return None;
    }
    let tcp_states =
        census.by_state.iter().filter(|(s, _)| **s != ConnState::None).map(|(s, n)| (Protocol::Tcp, *s, *n));
    let (proto, state, held) =
        tcp_states.chain(std::iter::once((Protocol::Udp, ConnState::None, census.udp))).max_by_key(|(_, _, n)| *n)?;
    if share(held, census.entries) < DOMINANT_SHARE {
        return None;
    }
    let (sysctl, suggested) = timeout_for(state, proto)?;
    let short = sysctl.trim_start_matches("nf_conntrack_");
    let current = *ns.timeouts.get(short)?;
    if current <= suggested {
        return None;
    }
    let what = if proto == Protocol::Udp { "UDP".to_string() } else { state.as_str().to_string() };
    let severity = if share(ns.entries, max) >= NEAR_FULL { Severity::Warning } else { Severity::Info };
    let mut f = Finding::new(
        severity,
        "timeout_holds_slots",
        Some(ns),
        format!(
            "{what} entries hold {:.0}% of the table ({held} of {}), each for up to {current} s",
            100.0 * share(held, census.entries),
            census.entries
        ),
    );
    f.evidence.push(format!("{sysctl} = {current} s; table {} of {max}", ns.entries));
    f.evidence.extend(short_listing(ns));
    if state == ConnState::Established {
        f.evidence.push(
            "a shorter established timeout drops state of connections idle that long: keep it above the longest \
             idle period of your long-lived connections (or their keepalive interval)"
                .into(),
        );
    }
    let name = format!("net.netfilter.{sysctl}");
    f.fix.push(inside(ns, &format!("sysctl -w {name}={suggested}")));
    f.persist.push(if ns.exec_prefix.is_empty() {
        format!("echo '{name} = {suggested}' >> {SYSCTL_FILE}")
    } else {
        format!("set {name}={suggested} where the namespace is made (the sysctl is per namespace)")
    });
    f.settings.insert(name, suggested);
    Some(f)
}

/// A local service whose flows fill a busy table: stateless traffic
/// (DNS, health checks) need not be tracked at all.
pub(super) fn notrack(evidence: &Evidence, ns: &NamespaceEvidence) -> Option<Finding> {
    let census = ns.census.as_ref()?;
    let max = evidence.max?;
    if census.entries == 0 || ns.notrack_rules == Some(true) || share(ns.entries, max) < BUSY {
        return None;
    }
    // The port's share of what was listed, of the kernel's count.
    let estimate = |listed: u64| (share(listed, census.entries) * ns.entries as f64).round() as u64;
    let port = census.by_port.iter().find(|p| {
        p.dport != 0
            && estimate(p.entries).max(p.entries) >= NOTRACK_MIN_ENTRIES
            && share(p.entries, census.entries) >= DOMINANT_SHARE
            && ns.listens(p.proto, p.dport)
    })?;
    let proto = match port.proto {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        _ => return None,
    };
    let severity = if share(ns.entries, max) >= NEAR_FULL { Severity::Warning } else { Severity::Info };
    let mut f = Finding::new(
        severity,
        "notrack_candidate",
        Some(ns),
        format!(
            "{proto}/{} (a local service) holds {:.0}% of the table: it need not be tracked",
            port.dport,
            100.0 * share(port.entries, census.entries)
        ),
    );
    f.evidence.push(format!("{} of {} entries are to {proto} port {}", port.entries, census.entries, port.dport));
    f.evidence.extend(short_listing(ns));
    f.evidence.push(
        "untracked packets skip `ct state` matches: allow the port explicitly in both directions before this".into(),
    );
    if ns.notrack_rules.is_none() {
        f.evidence.push("whether notrack rules exist could not be read (no nft or iptables-save)".into());
    }
    let p = port.dport;
    f.fix.push(inside(ns, "nft add table inet ctrace_notrack"));
    f.fix.push(inside(ns, "nft add chain inet ctrace_notrack pre '{ type filter hook prerouting priority raw; }'"));
    f.fix.push(inside(ns, "nft add chain inet ctrace_notrack out '{ type filter hook output priority raw; }'"));
    f.fix.push(inside(ns, &format!("nft add rule inet ctrace_notrack pre {proto} dport {p} notrack")));
    f.fix.push(inside(ns, &format!("nft add rule inet ctrace_notrack out {proto} sport {p} notrack")));
    f.fix.push(format!(
        "or with iptables: {}; {}",
        inside(ns, &format!("iptables -t raw -A PREROUTING -p {proto} --dport {p} -j NOTRACK")),
        inside(ns, &format!("iptables -t raw -A OUTPUT -p {proto} --sport {p} -j NOTRACK"))
    ));
    f.persist.push("add the table to /etc/nftables.conf (or iptables-save > /etc/iptables/rules.v4)".into());
    Some(f)
}
