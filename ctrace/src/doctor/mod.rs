//! `ctrace doctor`: from who is dropped to what to change.
//!
//! Watches a short window through the same engine as `live` (drops and,
//! on the hook tiers, insertions), reads the kernel's counters, settings
//! and tables around it ([`evidence`]), and turns that into findings with
//! the exact fix ([`rules`]). It only reads and suggests; it changes nothing.
pub mod evidence;
pub mod report;
pub mod rules;

use std::{
    collections::HashMap,
    fs::File,
    net::IpAddr,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use rustc_hash::FxHashMap;
use serde::Serialize;
use tokio::{
    signal::unix::{signal, SignalKind},
    time::sleep,
};

use self::{
    evidence::{CensusSummary, EntrySize, Evidence, KernelLog, NamespaceEvidence, PortCount},
    rules::{Finding, Severity},
};
use crate::{
    aggregate::{flood::Distinct, SourceKey},
    engine::{monotonic_ns, Engine, Sink},
    hooks::{kernel_btf, HookChoice, Tier},
    model::{ConnState, CtEvent, CtKind, DropEvent, Protocol, Reason},
    netns::{self, ConntrackStats},
};

pub struct Options {
    pub window: Duration,
    /// Only this namespace (a name as `live` shows it, or an inode number).
    pub netns: Option<String>,
    pub json: bool,
    pub hooks: HookChoice,
}

/// The JSON document (schema `ctrace.doctor.v1`).
#[derive(Serialize)]
pub struct Report {
    pub schema: &'static str,
    /// `healthy`, `warning` or `critical`: the worst finding.
    pub status: &'static str,
    pub exit_code: u8,
    pub evidence: Evidence,
    pub findings: Vec<Finding>,
}

/// Runs the window and prints the report; returns the exit status.
pub async fn run(options: Options) -> anyhow::Result<u8> {
    let mut engine = Engine::start(options.hooks)?;
    let tier = engine.attached.tier;
    let start = engine.namespaces().snapshot_all();
    let mut peaks: HashMap<u32, u64> = start.iter().map(|(ns, s)| (*ns, s.entries)).collect();
    let mut seen = Seen::default();
    // Before saying it watches: a Ctrl-C from then on must end the window.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    eprintln!(
        "ctrace doctor: {tier} attached; watching for {} s (Ctrl-C ends the window early)",
        options.window.as_secs_f64()
    );
    let started = monotonic_ns();
    let mut each_second = tokio::time::interval(Duration::from_secs(1));
    let window = sleep(options.window);
    tokio::pin!(window);
    loop {
        tokio::select! {
            _ = each_second.tick() => {
                // Listed afresh each second (live and serve list every 5 s):
                // a namespace made during the window is sampled within a
                // second, before its table can fill and drain unseen (on
                // the hook tiers no drop makes ctrace look it up).
                for (ns, stats) in engine.namespaces().snapshot_all() {
                    let peak = peaks.entry(ns).or_default();
                    *peak = (*peak).max(stats.entries);
                }
            }
            woke = engine.wait() => {
                woke?;
                engine.drain(&mut seen);
            }
            _ = &mut window => break,
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    engine.stop(&mut seen);
    let window_s = (monotonic_ns() - started) as f64 / 1e9;
    let end = engine.namespaces().snapshot_all();
    let lost = engine.attached.totals().map(|t| t.lost_events).unwrap_or(0);
    if lost > 0 {
        eprintln!("ctrace doctor: {lost} drop records were lost (ring buffer full): per-source figures are short");
    }

    let mut evidence = machine_evidence(window_s, tier);
    for (inum, end_stats) in &end {
        let start_stats = start.get(inum).copied().unwrap_or_default();
        let name = engine.namespaces().name(*inum).unwrap_or("?").to_string();
        let wanted = match &options.netns {
            Some(want) => *want == name || *want == inum.to_string(),
            None => active(&start_stats, end_stats) || seen.namespaces.contains_key(inum),
        };
        if !wanted {
            continue;
        }
        let Some(path) = engine.namespaces().path(*inum) else { continue };
        let mut ns = namespace_evidence(*inum, name, &path, start_stats, *end_stats);
        ns.peak = peaks.get(inum).copied().unwrap_or(0).max(end_stats.entries);
        seen.fill(&mut ns, tier != Tier::Tracepoint);
        evidence.namespaces.push(ns);
    }
    if let Some(want) = &options.netns {
        if evidence.namespaces.is_empty() {
            anyhow::bail!("no network namespace named {want} has conntrack counters (see `ip netns` or `ctrace live`)");
        }
    }
    evidence.namespaces.sort_by(|a, b| b.delta().drop.cmp(&a.delta().drop).then(b.entries.cmp(&a.entries)));

    let findings = rules::diagnose(&evidence);
    let worst = findings.iter().map(|f| f.severity).max();
    let exit_code = Severity::exit_code(worst);
    let report = Report {
        schema: "ctrace.doctor.v1",
        status: match worst {
            Some(Severity::Critical) => "critical",
            Some(Severity::Warning) => "warning",
            _ => "healthy",
        },
        exit_code,
        evidence,
        findings,
    };
    if options.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report::text(&report));
    }
    Ok(exit_code)
}

/// A namespace with anything in its table or any counter moving.
fn active(start: &ConntrackStats, end: &ConntrackStats) -> bool {
    let moved = ConntrackStats { entries: 0, ..end.delta_since(start) };
    end.entries > 0 || !moved.is_idle()
}

/// Settings and facts of the machine as a whole.
fn machine_evidence(window_s: f64, tier: Tier) -> Evidence {
    let read_u64 = |path: &str| std::fs::read_to_string(path).ok().and_then(|s| s.trim().parse().ok());
    Evidence {
        window_s,
        tier: tier.name().to_string(),
        max: netns::conntrack_max(),
        buckets: read_u64("/proc/sys/net/netfilter/nf_conntrack_buckets"),
        entry_size: entry_size(),
        mem_total_bytes: std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| evidence::mem_total(&m)),
        kernel_log: kernel_log(),
        namespaces: Vec::new(),
    }
}

/// The slab object size if readable (what the allocator really takes),
/// else `sizeof(struct nf_conn)` from the running kernel's BTF.
pub fn entry_size() -> Option<EntrySize> {
    if let Some(bytes) = std::fs::read_to_string("/proc/slabinfo").ok().and_then(|s| evidence::slab_object_size(&s)) {
        return Some(EntrySize { bytes, source: "slabinfo" });
    }
    let vmlinux = kernel_btf().ok()?;
    let module = std::fs::read(crate::hooks::conntrack::MODULE_BTF)
        .ok()
        .and_then(|bytes| crate::btf::Btf::parse(&bytes, Some(&vmlinux)).ok());
    let size = module.as_ref().unwrap_or(&vmlinux).struct_size("nf_conn")?;
    Some(EntrySize { bytes: size.into(), source: "btf" })
}

/// Reads what the kernel log still holds, without waiting for more.
fn kernel_log() -> Option<KernelLog> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut kmsg = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open("/dev/kmsg").ok()?;
    let mut records = Vec::new();
    let mut buf = vec![0u8; 8192];
    loop {
        match kmsg.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => records.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            // EPIPE: records were overwritten while reading; go on.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(_) => break, // EAGAIN: the end
        }
    }
    Some(evidence::table_full_lines(records.iter().map(String::as_str), monotonic_ns() / 1000))
}

/// What can be read of one namespace from inside it.
fn namespace_evidence(
    netns: u32,
    name: String,
    path: &Path,
    start: ConntrackStats,
    end: ConntrackStats,
) -> NamespaceEvidence {
    let exec_prefix = if name == "host" {
        String::new()
    } else if let Some(pid) = name.strip_prefix("pid ") {
        format!("nsenter --net=/proc/{pid}/ns/net ")
    } else {
        format!("ip netns exec {name} ")
    };
    let census = crate::census::spawn(netns, path.to_path_buf()).recv().ok().flatten().map(|c| CensusSummary {
        entries: c.entries,
        kernel_entries: c.kernel_entries,
        truncated: c.truncated,
        udp: c.by_source.iter().filter(|s| s.proto == Protocol::Udp).map(|s| s.entries).sum(),
        by_state: c.by_state,
        by_port: c.by_port,
    });
    let mut timeouts = std::collections::BTreeMap::new();
    for short in TIMEOUTS {
        let file = PathBuf::from("/proc/sys/net/netfilter").join(format!("nf_conntrack_{short}"));
        if let Some(secs) = netns::read_in(path, &file).ok().and_then(|s| s.trim().parse().ok()) {
            timeouts.insert(short.to_string(), secs);
        }
    }
    let mut listeners = Vec::new();
    for (proto, files) in [(Protocol::Tcp, ["tcp", "tcp6"]), (Protocol::Udp, ["udp", "udp6"])] {
        for file in files {
            let text = netns::read_in(path, &Path::new("/proc/thread-self/net").join(file)).unwrap_or_default();
            listeners.extend(evidence::listening_ports(proto, &text).into_iter().map(|port| (proto, port)));
        }
    }
    listeners.sort();
    listeners.dedup();
    let nft = run_inside(path, "nft", &["list", "ruleset"]);
    let iptables = run_inside(path, "iptables-save", &["-t", "raw"]);
    let notrack_rules = match (nft, iptables) {
        (None, None) => None,
        (nft, iptables) => {
            Some(nft.is_some_and(|l| evidence::has_notrack(&l)) || iptables.is_some_and(|l| evidence::has_notrack(&l)))
        }
    };
    NamespaceEvidence {
        netns,
        name,
        exec_prefix,
        entries: end.entries,
        peak: end.entries,
        start,
        end,
        census,
        timeouts,
        listeners,
        notrack_rules,
        ..Default::default()
    }
}

/// The timeout sysctls read (without their `nf_conntrack_` prefix).
const TIMEOUTS: [&str; 10] = [
    "tcp_timeout_established",
    "tcp_timeout_syn_sent",
    "tcp_timeout_syn_recv",
    "tcp_timeout_fin_wait",
    "tcp_timeout_close_wait",
    "tcp_timeout_last_ack",
    "tcp_timeout_time_wait",
    "udp_timeout",
    "udp_timeout_stream",
    "icmp_timeout",
];

/// Runs a read-only command inside the namespace; its output, or None if
/// it is not installed or fails.
fn run_inside(ns_path: &Path, program: &str, args: &[&str]) -> Option<String> {
    let ns = File::open(ns_path).ok()?;
    let fd = ns.as_raw_fd();
    let mut command = Command::new(program);
    command.args(args).stdin(Stdio::null()).stderr(Stdio::null());
    // SAFETY: setns is async-signal-safe; the fd stays open in the child.
    unsafe {
        command.pre_exec(move || match libc::setns(fd, libc::CLONE_NEWNET) {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        });
    }
    let out = command.output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Tops kept per namespace for the report.
const TOP: usize = 5;

/// What the engine saw in the window, per namespace. Bounded: ports are
/// at most 2 x 65,536 per namespace, sources are a distinct-count sketch
/// plus a Space-Saving top list.
#[derive(Default)]
struct Seen {
    namespaces: FxHashMap<u32, SeenNamespace>,
}

#[derive(Default)]
struct SeenNamespace {
    drops: FxHashMap<Reason, u64>,
    drop_ports: FxHashMap<(Protocol, u16), u64>,
    insert_failed_ports: FxHashMap<(Protocol, u16), u64>,
    insert_ports: FxHashMap<(Protocol, u16), u64>,
    clash_ports: FxHashMap<(Protocol, u16), u64>,
    inserts: u64,
    distinct: Distinct,
    sources: Option<crate::aggregate::heavy::SpaceSaving<IpAddr>>,
}

impl Sink for Seen {
    fn on_drop(&mut self, key: &SourceKey, event: &DropEvent) {
        let ns = self.namespaces.entry(key.netns).or_default();
        *ns.drops.entry(key.reason).or_default() += 1;
        if key.reason == Reason::Ruleset {
            return;
        }
        *ns.drop_ports.entry((key.proto, key.dport)).or_default() += 1;
        if key.reason == Reason::InsertFailed {
            *ns.insert_failed_ports.entry((key.proto, key.dport)).or_default() += 1;
        }
        ns.distinct.add(&key.src);
        ns.sources.get_or_insert_with(|| crate::aggregate::heavy::SpaceSaving::new(64)).add(&key.src, event.ts_ns);
    }

    fn on_conntrack(&mut self, event: &CtEvent, _state: ConnState) {
        // Insertions and settled races: refused ones are counted where their
        // packet is dropped (on_drop), the kernel's counters give the rest.
        match event.kind {
            CtKind::Insert => {
                let ns = self.namespaces.entry(event.netns).or_default();
                ns.inserts += 1;
                *ns.insert_ports.entry((event.proto, event.dport)).or_default() += 1;
            }
            CtKind::ClashResolved => {
                let ns = self.namespaces.entry(event.netns).or_default();
                *ns.clash_ports.entry((event.proto, event.dport)).or_default() += 1;
            }
            _ => {}
        }
    }

    fn on_undecodable(&mut self) {}
}

impl Seen {
    fn fill(&self, ns: &mut NamespaceEvidence, hooks: bool) {
        let Some(seen) = self.namespaces.get(&ns.netns) else {
            if hooks {
                ns.inserts = Some(0);
            }
            return;
        };
        ns.drops = seen.drops.iter().map(|(r, n)| (r.as_str().to_string(), *n)).collect();
        ns.drop_ports = top_ports(&seen.drop_ports);
        ns.insert_failed_ports = top_ports(&seen.insert_failed_ports);
        ns.distinct_drop_sources = seen.distinct.estimate();
        if let Some(sources) = &seen.sources {
            let mut top: Vec<(IpAddr, u64)> = sources.iter().map(|c| (c.key, c.count)).collect();
            top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            top.truncate(TOP);
            ns.drop_sources = top;
        }
        if hooks {
            ns.inserts = Some(seen.inserts);
            ns.insert_ports = top_ports(&seen.insert_ports);
            ns.clash_ports = top_ports(&seen.clash_ports);
        }
    }
}

fn top_ports(counts: &FxHashMap<(Protocol, u16), u64>) -> Vec<PortCount> {
    let mut ports: Vec<PortCount> =
        counts.iter().map(|(&(proto, port), &count)| PortCount { proto, port, count }).collect();
    ports.sort_by(|a, b| b.count.cmp(&a.count).then((a.proto, a.port).cmp(&(b.proto, b.port))));
    ports.truncate(TOP);
    ports
}
