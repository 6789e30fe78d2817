//! What the kernel's counters say: drops, evictions, refused and settled
//! insertions, long chains, invalid packets.
use super::*;
use crate::{
    aggregate::flood::{FLOOD_DISTINCT_RATIO, FLOOD_MIN_DROPS},
    model::Protocol,
};

/// Conntrack dropped packets: new flows never reached a socket.
pub(super) fn drops(evidence: &Evidence, ns: &NamespaceEvidence) -> Option<Finding> {
    let kernel = ns.delta().drop;
    let table_full = ns.drops.get("table_full").copied().unwrap_or(0);
    if kernel == 0 && table_full == 0 {
        return None;
    }
    let max = evidence.max.unwrap_or(0);
    let full = table_full > 0 || (max > 0 && ns.peak >= max);
    let summary = if full {
        format!("the table is full: conntrack dropped {kernel} packets of new flows in {:.0} s", evidence.window_s)
    } else {
        format!("conntrack dropped {kernel} packets in {:.0} s", evidence.window_s)
    };
    let mut f =
        Finding::new(Severity::Critical, if full { "table_full" } else { "conntrack_drops" }, Some(ns), summary);
    // ctrace attaches a moment before the counters' first read: under a
    // running storm the two counts differ by the drops in between.
    f.evidence.push(format!(
        "kernel drop counter +{kernel} ({:.1}/s); ctrace saw {} since attaching (table_full {table_full})",
        rate(kernel, evidence.window_s),
        ns.conntrack_drops()
    ));
    f.evidence.push(format!("entries {} of nf_conntrack_max {max} now, peak {}", ns.entries, ns.peak));
    if !ns.drop_sources.is_empty() {
        let top: Vec<String> = ns.drop_sources.iter().take(5).map(|(src, n)| format!("{src} {n}")).collect();
        f.evidence.push(format!("dropped sources: {}", top.join(", ")));
    }
    if !ns.drop_ports.is_empty() {
        f.evidence.push(format!("dropped to: {}", ports(&ns.drop_ports)));
    }
    let dropped = ns.conntrack_drops().max(kernel);
    let flood = dropped >= FLOOD_MIN_DROPS && ns.distinct_drop_sources as f64 >= FLOOD_DISTINCT_RATIO * dropped as f64;
    if flood {
        f.evidence.push(format!(
            "about {} distinct sources for {dropped} drops: a random-source flood; a bigger table only buys time \
             (the sources are spoofed): filter or rate-limit it upstream, or take the port out of tracking",
            ns.distinct_drop_sources
        ));
    }
    if full && max > 0 {
        let before_fix = f.evidence.len();
        let (suggested, capped) = raise_max(&mut f, evidence, max, ns.peak, dropped);
        if capped {
            f.evidence.insert(
                before_fix,
                format!(
                    "{suggested} is the most a table may take of this machine's memory ({:.1}%): free slots \
                     instead (see the timeout and NOTRACK findings)",
                    MEMORY_SHARE * 100.0
                ),
            );
        }
    }
    Some(f)
}

/// Early drops: the table was full and the kernel evicted unreplied
/// entries to admit new ones; those flows broke.
pub(super) fn early_drops(evidence: &Evidence, ns: &NamespaceEvidence) -> Option<Finding> {
    let n = ns.delta().early_drop;
    if n == 0 {
        return None;
    }
    let mut f = Finding::new(
        Severity::Warning,
        "early_drop",
        Some(ns),
        format!("the table was full: the kernel evicted {n} unreplied entries to admit new flows"),
    );
    f.evidence.push(format!("early_drop counter +{n} ({:.1}/s)", rate(n, evidence.window_s)));
    if let Some(max) = evidence.max {
        raise_max(&mut f, evidence, max, ns.peak, n);
    }
    Some(f)
}

/// Refused insertions: two packets of one new flow raced to create its
/// entry (the DNS A/AAAA race) or a hash chain was too long.
pub(super) fn insert_failed(evidence: &Evidence, ns: &NamespaceEvidence) -> Option<Finding> {
    let n = ns.delta().insert_failed;
    if n == 0 {
        return None;
    }
    // The hook tiers name refused insertions; the tracepoint tier sees them
    // as conntrack's drops.
    let dns = ns.insert_failed_ports.iter().chain(&ns.drop_ports).any(|p| p.proto == Protocol::Udp && p.port == 53);
    let mut f = Finding::new(
        Severity::Warning,
        if dns { "dns_insert_race" } else { "insert_failed" },
        Some(ns),
        if dns {
            format!("{n} DNS queries lost to the conntrack insertion race (parallel A and AAAA from one socket)")
        } else {
            format!("conntrack refused to insert {n} new entries")
        },
    );
    f.evidence.push(format!("insert_failed counter +{n} ({:.1}/s)", rate(n, evidence.window_s)));
    if !ns.insert_failed_ports.is_empty() {
        f.evidence.push(format!("refused to: {}", ports(&ns.insert_failed_ports)));
    }
    if dns {
        resolver_fixes(&mut f);
    } else {
        f.fix.push(
            "find who with `ctrace live --filter insert_failed`; if clashes are between parallel UDP flows of one \
             socket, separate them; if chains are long, raise the hash size (see sizing)"
                .into(),
        );
    }
    Some(f)
}

/// What takes the A/AAAA race away: the two queries from separate sockets
/// (separate flows), or not over UDP.
fn resolver_fixes(f: &mut Finding) {
    f.fix.push(
        "glibc clients: add `options single-request-reopen` to /etc/resolv.conf (A and AAAA from separate sockets)"
            .into(),
    );
    f.fix.push(
        "musl clients (Alpine), which ignore it: `options use-vc` (DNS over TCP), or a node-local DNS cache".into(),
    );
    f.persist.push("the resolver options in the image or pod spec (Kubernetes: dnsConfig.options)".into());
}

/// Insertion races the kernel settled (`clashres`): two packets of one new
/// flow both made an entry and the second found the first. Nothing was
/// lost here, but these are the races that cost a query where the kernel
/// cannot settle them (before 5.6 with NAT to different backends; always
/// for TCP): named, so that a rising `insert_failed` is understood.
pub(super) fn clashes_resolved(evidence: &Evidence, ns: &NamespaceEvidence) -> Option<Finding> {
    let n = ns.delta().clash_resolve;
    if n == 0 {
        return None;
    }
    let is_dns = |proto: Protocol, port: u16| proto == Protocol::Udp && port == 53;
    // The hook tiers name the raced ports; on the tracepoint tier the table
    // says whose flows these are likely to be.
    let dns = if ns.clash_ports.is_empty() {
        ns.census.as_ref().and_then(|c| c.by_port.first()).is_some_and(|p| is_dns(p.proto, p.dport))
    } else {
        ns.clash_ports.iter().any(|p| is_dns(p.proto, p.port))
    };
    let mut f = Finding::new(
        Severity::Info,
        if dns { "dns_race_resolved" } else { "clash_resolved" },
        Some(ns),
        if dns {
            format!("{n} DNS lookups raced their A and AAAA queries through conntrack; the kernel settled every race")
        } else {
            format!("{n} new flows raced two packets through conntrack; the kernel settled every race")
        },
    );
    f.evidence.push(format!("clashres counter +{n} ({:.1}/s), insert_failed +{}", rate(n, evidence.window_s), {
        ns.delta().insert_failed
    }));
    if !ns.clash_ports.is_empty() {
        f.evidence.push(format!("raced to: {}", ports(&ns.clash_ports)));
    } else if dns {
        f.evidence.push("the table's entries are mostly to udp/53 (this tier does not see which flows raced)".into());
    }
    f.evidence.push(
        "no packet was lost to them here; where the kernel cannot settle a race (TCP, or UDP through NAT to \
         different backends before Linux 5.6) it refuses the entry and the packet is dropped (insert_failed)"
            .into(),
    );
    if dns {
        resolver_fixes(&mut f);
    }
    Some(f)
}

/// Insertions refused because their hash chain was too long: too few
/// buckets for the entries (or a hash skewed by the traffic).
pub(super) fn chains_too_long(evidence: &Evidence, ns: &NamespaceEvidence) -> Option<Finding> {
    let n = ns.delta().chain_too_long;
    if n == 0 {
        return None;
    }
    let mut f = Finding::new(
        Severity::Warning,
        "chains_too_long",
        Some(ns),
        format!("conntrack refused {n} new entries because their hash chain was too long"),
    );
    f.evidence.push(format!(
        "chaintoolong counter +{n} ({:.1}/s); buckets {}, max {}",
        rate(n, evidence.window_s),
        evidence.buckets.map_or("?".into(), |b| b.to_string()),
        evidence.max.map_or("?".into(), |m| m.to_string())
    ));
    if let Some(max) = evidence.max {
        let hashsize = (max / 2).max(evidence.buckets.unwrap_or(0) * 2);
        f.fix.push(format!("echo {hashsize} > /sys/module/nf_conntrack/parameters/hashsize"));
        f.persist.push(format!("echo 'options nf_conntrack hashsize={hashsize}' > /etc/modprobe.d/nf_conntrack.conf"));
        f.settings.insert("nf_conntrack.hashsize".into(), hashsize);
    }
    Some(f)
}

/// Packets conntrack could not make sense of.
pub(super) fn invalid(evidence: &Evidence, ns: &NamespaceEvidence) -> Option<Finding> {
    let n = ns.delta().invalid;
    if n == 0 {
        return None;
    }
    let mut f = Finding::new(
        Severity::Info,
        "invalid",
        Some(ns),
        format!("conntrack found {n} packets invalid ({:.1}/s)", rate(n, evidence.window_s)),
    );
    f.evidence.push(
        "invalid packets are dropped only by rules that match `ct state invalid`; out-of-window TCP (asymmetric \
         routes, lost state) is the usual cause"
            .into(),
    );
    f.fix.push("see who sends them: ctrace live --invalid".into());
    f.fix.push(inside(
        ns,
        "sysctl -w net.netfilter.nf_conntrack_tcp_be_liberal=1  # only if out-of-window TCP is expected",
    ));
    Some(f)
}
