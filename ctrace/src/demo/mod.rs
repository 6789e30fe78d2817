//! `ctrace demo`: a real incident in namespaces the command makes itself,
//! so a user can see what `live`, `record` and `doctor` show before the
//! real one. Its traffic never leaves its two namespaces (198.18.0.0/16).
//!
//! `nf_conntrack_max` is one value for the machine (read-only inside a
//! child namespace) while the count is per namespace: the demo fills its
//! own table up to the real maximum and leaves every other namespace
//! alone. It lowers the maximum only when asked (`--lower-max`), restores
//! it on every exit, and leaves a state file so that `--cleanup` can
//! restore it after a SIGKILL.
pub mod lab;
pub mod traffic;

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{bail, Context};
use tokio::signal::unix::{signal, SignalKind};

use self::lab::{Lab, SERVER, SERVER_NS, SERVICE_PORT, STORM};
use crate::netns::{self, StatReader};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// The table held full by one client; two named clients' new
    /// connections are dropped (table_full).
    TableFull,
    /// Short connections pile up in TIME_WAIT, each holding its slot for
    /// the TIME_WAIT timeout.
    TimeWait,
    /// A full table and a SYN flood from random (spoofed) sources.
    SynFlood,
    /// Packets conntrack finds invalid (SYN+FIN), dropped by a
    /// `ct state invalid drop` rule.
    Invalid,
    /// DNS lookups whose A and AAAA queries leave one socket at the same
    /// moment from two CPUs: conntrack's insertion race (needs two CPUs).
    DnsRace,
}

impl Scenario {
    /// The name `--scenario` takes.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::TableFull => "table-full",
            Scenario::TimeWait => "time-wait",
            Scenario::SynFlood => "syn-flood",
            Scenario::Invalid => "invalid",
            Scenario::DnsRace => "dns-race",
        }
    }
}

pub struct Options {
    pub scenario: Scenario,
    pub duration: Duration,
    /// Go on although filling the table takes much kernel memory.
    pub yes: bool,
    pub lower_max: Option<u64>,
    pub record: Option<PathBuf>,
    /// After the traffic, keep the namespaces (and their tables) until
    /// Ctrl-C, to look at them.
    pub keep: bool,
}

/// What a run changed beyond its namespaces: read by `--cleanup`.
pub const STATE_FILE: &str = "/run/ctrace-demo.state";
/// Filling more kernel memory than this asks for `--yes`.
const ASK_ABOVE_BYTES: u64 = 256 << 20;
/// SYNs per second of the flood: enough to fill any table, and spread
/// over its 130,560 source addresses, most of a window's sources are seen
/// once, as in a flood from the whole address space.
const FLOOD_RATE: u32 = 10_000;
const MAX_SYSCTL: &str = "/proc/sys/net/netfilter/nf_conntrack_max";
/// DNS lookups per second of the race: with entries kept a second, a few
/// hundred in the table at most.
const LOOKUP_RATE: u32 = 200;

/// `nf_conntrack_max` lowered for the run, restored on drop.
struct LoweredMax {
    original: u64,
}

impl LoweredMax {
    fn set(to: u64, original: u64) -> anyhow::Result<Self> {
        std::fs::write(STATE_FILE, format!("nf_conntrack_max={original}\n"))
            .with_context(|| format!("cannot write {STATE_FILE}"))?;
        let lowered = LoweredMax { original };
        std::fs::write(MAX_SYSCTL, to.to_string()).context("cannot lower nf_conntrack_max")?;
        Ok(lowered)
    }
}

impl Drop for LoweredMax {
    fn drop(&mut self) {
        match std::fs::write(MAX_SYSCTL, self.original.to_string()) {
            Ok(()) => {
                eprintln!("ctrace demo: nf_conntrack_max restored to {}", self.original);
                let _ = std::fs::remove_file(STATE_FILE);
            }
            Err(err) => eprintln!(
                "ctrace demo: cannot restore nf_conntrack_max to {}: {err}; `ctrace demo --cleanup` retries",
                self.original
            ),
        }
    }
}

/// Removes what a killed demo left: its namespaces, and the maximum it lowered.
pub fn cleanup() -> anyhow::Result<()> {
    let mut said = false;
    if lab::exists() {
        if !lab::remove_namespaces() {
            bail!("the demo's namespaces could not all be removed");
        }
        eprintln!("ctrace demo: removed namespaces {SERVER_NS} and {}", lab::CLIENT_NS);
        said = true;
    }
    if let Ok(state) = std::fs::read_to_string(STATE_FILE) {
        if let Some(original) = state.lines().find_map(|l| l.strip_prefix("nf_conntrack_max=")) {
            std::fs::write(MAX_SYSCTL, original.trim()).context("cannot restore nf_conntrack_max")?;
            eprintln!("ctrace demo: nf_conntrack_max restored to {}", original.trim());
        }
        std::fs::remove_file(STATE_FILE).with_context(|| format!("cannot remove {STATE_FILE}"))?;
        said = true;
    }
    if !said {
        eprintln!("ctrace demo: nothing to clean up");
    }
    Ok(())
}

/// Runs a thread inside a namespace until it returns.
fn spawn_in(ns: &'static str, f: impl FnOnce() + Send + 'static) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        if let Err(err) = lab::in_ns(ns, f) {
            eprintln!("ctrace demo: {err:#}");
        }
    })
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    // First: a Ctrl-C during set-up must still end in the clean-up below.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("ctrace demo creates network namespaces and may change nf_conntrack_max: run it as root");
    }
    if lab::exists() || Path::new(STATE_FILE).exists() {
        bail!(
            "a demo is running, or a killed one left {SERVER_NS} or {STATE_FILE} behind: \
             `sudo ctrace demo --cleanup` removes them"
        );
    }
    if netns::conntrack_max().is_none() {
        // Its first rule would load it anyway; the maximum is needed first.
        eprintln!("ctrace demo: loading nf_conntrack (modprobe nf_conntrack)");
        let loaded = std::process::Command::new("modprobe").arg("nf_conntrack").status();
        if !loaded.is_ok_and(|s| s.success()) {
            bail!("nf_conntrack is not loaded and `modprobe nf_conntrack` failed");
        }
    }
    let original = netns::conntrack_max().context("nf_conntrack loaded but nf_conntrack_max is unreadable")?;
    let scenario = options.scenario;
    let fills = matches!(scenario, Scenario::TableFull | Scenario::SynFlood);
    let _lowered = match options.lower_max {
        Some(to) if to >= original => bail!("--lower-max {to} is not below nf_conntrack_max {original}"),
        Some(to) => {
            eprintln!(
                "ctrace demo: lowering nf_conntrack_max from {original} to {to} for the demo: it applies to every \
                 namespace on this machine until the demo ends (restored on exit; `--cleanup` after a kill)"
            );
            Some(LoweredMax::set(to, original)?)
        }
        None => None,
    };
    let max = netns::conntrack_max().unwrap_or(original);
    if fills {
        let entry = crate::doctor::entry_size().map_or(320, |e| e.bytes);
        let cost = max * entry;
        if cost > ASK_ABOVE_BYTES && !options.yes {
            bail!(
                "filling the demo's table to nf_conntrack_max {max} takes about {} of kernel memory ({entry} B per \
                 entry) until the demo ends: run again with --yes, or with --lower-max N (e.g. 4096)",
                crate::doctor::rules::bytes(cost)
            );
        }
    }

    // The fill's entries stay for the whole run; the lookups' leave after a
    // second, as a resolver's do once answered.
    let udp_timeout_s = if scenario == Scenario::DnsRace { 1 } else { 3600 };
    let lab = Lab::create(scenario == Scenario::Invalid, udp_timeout_s)?;
    let server_path = lab::ns_path(SERVER_NS);
    let mut counters = StatReader::open(&server_path).context("reading the demo namespace's counters")?;
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let listener = lab::in_ns(SERVER_NS, || traffic::listen(SERVICE_PORT))??;

    let record = match &options.record {
        Some(path) => Some(start_record(path)?),
        None => None,
    };

    if fills {
        eprintln!("ctrace demo: filling {SERVER_NS}'s table to {max} entries (UDP flows from {})", lab::FILLER);
        let mut reader = StatReader::open(&server_path)?;
        let stop_fill = stop.clone();
        lab::in_ns(lab::CLIENT_NS, move || {
            traffic::fill_udp(max, || reader.read().map_or(0, |s| s.entries), &stop_fill)
        })??;
    }
    let before = counters.read()?;
    let mut workers = Vec::new();
    let what = match scenario {
        Scenario::TableFull => {
            let (stop, sent) = (stop.clone(), sent.clone());
            workers.push(spawn_in(lab::CLIENT_NS, move || traffic::syn_storm(&STORM, SERVICE_PORT, 50, &stop, &sent)));
            format!("new connections from {} and {} to {SERVER}:{SERVICE_PORT}, 50/s each", STORM[0], STORM[1])
        }
        Scenario::TimeWait => {
            let stop_accept = stop.clone();
            workers.push(std::thread::spawn(move || traffic::accept_and_close(listener, &stop_accept)));
            let (stop, sent) = (stop.clone(), sent.clone());
            workers.push(spawn_in(lab::CLIENT_NS, move || {
                traffic::short_connections(lab::FILLER, SERVICE_PORT, &stop, &sent)
            }));
            format!("short connections from {} to {SERVER}:{SERVICE_PORT}, closed at both ends", lab::FILLER)
        }
        Scenario::SynFlood => {
            let (stop, sent) = (stop.clone(), sent.clone());
            workers.push(spawn_in(lab::CLIENT_NS, move || {
                let syn = traffic::SYN;
                if let Err(err) = traffic::forged(traffic::spoofed, SERVICE_PORT, syn, FLOOD_RATE, &stop, &sent) {
                    eprintln!("ctrace demo: raw socket: {err}");
                }
            }));
            format!(
                "a SYN flood to {SERVER}:{SERVICE_PORT}, {FLOOD_RATE}/s, from random sources in 198.18.2.0-198.19.255.255"
            )
        }
        Scenario::Invalid => {
            let (stop, sent) = (stop.clone(), sent.clone());
            workers.push(spawn_in(lab::CLIENT_NS, move || {
                let flags = traffic::SYN | traffic::FIN;
                if let Err(err) = traffic::forged(|_| lab::ODD, SERVICE_PORT, flags, 100, &stop, &sent) {
                    eprintln!("ctrace demo: raw socket: {err}");
                }
            }));
            format!("SYN+FIN packets from {} to {SERVER}:{SERVICE_PORT}, 100/s", lab::ODD)
        }
        Scenario::DnsRace => {
            let sink = lab::in_ns(SERVER_NS, || traffic::udp_sink(lab::DNS_PORT))??;
            let (stop, sent) = (stop.clone(), sent.clone());
            workers.push(spawn_in(lab::CLIENT_NS, move || {
                if let Err(err) = traffic::parallel_queries(lab::RESOLVER, lab::DNS_PORT, LOOKUP_RATE, &stop, &sent) {
                    eprintln!("ctrace demo: parallel queries: {err}");
                }
                // SAFETY: our sink's fd, closed once the queries stopped.
                unsafe { libc::close(sink) };
            }));
            format!(
                "DNS lookups from {} to {SERVER}:{}, {LOOKUP_RATE}/s, each sending A and AAAA from one socket on two \
                 CPUs at once",
                lab::RESOLVER,
                lab::DNS_PORT
            )
        }
    };
    eprintln!(
        "ctrace demo: running {} in namespace {SERVER_NS} for {} s: {what}\n\
         ctrace demo: watch it with `sudo ctrace live --filter ns={SERVER_NS}` or \
         `sudo ctrace doctor --netns {SERVER_NS}` (Ctrl-C ends the demo)",
        scenario.name(),
        options.duration.as_secs_f64()
    );

    let interrupted = tokio::select! {
        _ = tokio::time::sleep(options.duration) => false,
        _ = sigint.recv() => true,
        _ = sigterm.recv() => true,
    };
    stop.store(true, Ordering::Relaxed);
    // SAFETY: our listening fd: shutting it down ends a blocked accept.
    unsafe {
        libc::shutdown(listener, libc::SHUT_RDWR);
    }
    for worker in workers {
        let _ = worker.join();
    }
    // SAFETY: our fd, no longer used.
    unsafe { libc::close(listener) };
    let after = counters.read()?.delta_since(&before);
    eprintln!(
        "ctrace demo: {} packets sent; {SERVER_NS}: {} entries of {max}, drop +{}, early_drop +{}, \
         insert_failed +{}, invalid +{}, clashres +{}",
        sent.load(Ordering::Relaxed),
        after.entries,
        after.drop,
        after.early_drop,
        after.insert_failed,
        after.invalid,
        after.clash_resolve
    );
    if options.keep && !interrupted {
        eprintln!("ctrace demo: traffic stopped; {SERVER_NS} and its table kept until Ctrl-C");
        tokio::select! {
            _ = sigint.recv() => {}
            _ = sigterm.recv() => {}
        }
    }
    if let Some(mut child) = record {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        child.wait()?;
    }
    drop(counters);
    drop(lab);
    eprintln!("ctrace demo: removed {SERVER_NS} and {}", lab::CLIENT_NS);
    Ok(())
}

/// `ctrace record` of the demo, started before any traffic.
fn start_record(path: &Path) -> anyhow::Result<std::process::Child> {
    use std::io::{BufRead, BufReader};
    let exe = std::env::current_exe().context("cannot find the ctrace binary")?;
    let mut child = std::process::Command::new(exe)
        .args(["record", "--output"])
        .arg(path)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("cannot start ctrace record")?;
    let stderr = child.stderr.take().context("record's stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    for line in lines.by_ref() {
        let line = line?;
        eprintln!("{line}");
        if line.contains("attached") {
            // Its later lines go on to the terminal.
            std::thread::spawn(move || lines.map_while(Result::ok).for_each(|l| eprintln!("{l}")));
            return Ok(child);
        }
    }
    bail!("ctrace record ended before attaching: {:?}", child.wait()?)
}
