//! `cargo xtask bench`: the figures the issues ask for, measured, never
//! asserted in tests.
//!
//! 1. Decode + classify + aggregate throughput on one core, synthetic
//!    records through the same path as ring-buffer records: a storm from a
//!    few sources, and a spoofed flood where every record is a new source.
//! 2. Peak RSS of `ctrace live --plain` fed 10 M distinct sources.
//! 3. CPU used during a real table-full storm in a namespace: `ctrace live`
//!    next to a bpftrace script that only counts drops per source. Both the
//!    process's own CPU time and the kernel programs' run time (bpf_stats)
//!    count, since per-packet work happens in the kernel.
//! 4. A random-source flood with record, live and serve running: memory,
//!    file size, lost events, totals; then the same flood with `ctrace
//!    live` alone and with the bpftrace script alone, for their CPU
//!    (flood.rs).
//! 5. The fixed cost: `ctrace live` and `ctrace serve` attached with no
//!    traffic, next to the bpftrace script.
use std::{
    net::Ipv4Addr,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use ctrace_tests::{Lab, Sysctl};

use crate::{figures::Figures, root, run};

pub fn bench(
    storm_secs: u64,
    storm_only: bool,
    flood_secs: u64,
    json: Option<&Path>,
    guests: bool,
    earlier: Option<&Path>,
) -> anyhow::Result<()> {
    if let Some(earlier) = earlier {
        anyhow::ensure!(earlier.is_file(), "--earlier {}: no such file", earlier.display());
    }
    run(Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())).args(["build", "--release"]))?;
    let bin = root().join("target/release/ctrace");
    let mut report = Vec::new();
    let mut figures = Figures::default();

    let synthetic_runs: &[(&str, u64, u64)] = if storm_only {
        &[]
    } else {
        &[
            ("throughput (storm, 100 sources)", 20_000_000, 100),
            ("throughput (spoofed flood, every record a new source)", 20_000_000, 20_000_000),
            ("memory (10 M distinct sources)", 10_000_000, 10_000_000),
        ]
    };
    for (i, (label, events, sources)) in synthetic_runs.iter().enumerate() {
        let line = synthetic(&bin, *events, *sources)?;
        if i == 0 {
            if let Some(rate) = events_per_s(&line) {
                figures.set("synthetic.events_per_s", rate);
            }
        }
        report.push(format!("{label}: {line}"));
    }
    if storm_only {
        figures.skip("synthetic.events_per_s", "--storm-only");
    }
    if guests {
        // ctrace's debug build: the guests see the host's files, and the
        // release build is above; either is the same programs.
        report.extend(crate::connections::in_guests(&bin, storm_secs.max(5), &mut figures)?);
        if let Some(earlier) = earlier {
            // Printed for comparison; the figures are the current build's.
            let lines = crate::connections::in_guests(earlier, storm_secs.max(5), &mut Figures::default())?;
            report.extend(lines.into_iter().map(|line| format!("earlier build: {line}")));
        }
    } else {
        for key in crate::figures::KEYS.iter().filter(|k| k.starts_with("connections.")) {
            figures.skip(key, "measured in guest kernels: cargo xtask bench --guests");
        }
    }

    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        report.push(attached_memory(&bin, &mut figures)?);
        report.extend(idle_cpu(&bin, earlier, &mut figures)?);
        if storm_secs > 0 {
            report.extend(storm_cpu(&bin, earlier, storm_secs, &mut figures)?);
        }
        if flood_secs > 0 {
            report.extend(crate::flood::flood(&bin, flood_secs, &mut figures)?);
            // Per tool as long as a storm runs per tool.
            report.extend(crate::flood::flood_cpu(&bin, earlier, storm_secs.max(5), &mut figures)?);
        }
    } else {
        report.push("storm CPU and flood memory: not measured: need root (namespaces, BPF)".into());
    }
    let machine = machine();
    println!("\nctrace benchmarks ({machine})");
    for line in report {
        println!("  {line}");
    }
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&figures.to_json(&machine))?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        println!("  figures written to {}", path.display());
    }
    Ok(())
}

/// The `N.NN M events/s` of a synthetic run's summary, per second.
fn events_per_s(line: &str) -> Option<f64> {
    let before = line.split(" M events/s").next()?;
    let millions: f64 = before.rsplit(' ').next()?.parse().ok()?;
    Some(millions * 1e6)
}

/// Memory of the real process, attached and idle: its peak while starting
/// (BTF and kallsyms parsed) and what it holds two seconds after.
fn attached_memory(bin: &Path, figures: &mut Figures) -> anyhow::Result<String> {
    // The test helpers start the ctrace they are pointed at.
    std::env::set_var("CTRACE_BIN", bin);
    let dir = ctrace_tests::TempDir::new("bench-rss");
    let recording = ctrace_tests::Recording::start(&dir.0.join("idle.json"), &[])?;
    let pid = recording.pid().context("ctrace record exited")?;
    std::thread::sleep(Duration::from_secs(2));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |field: &str| -> Option<f64> {
        let line = status.lines().find(|l| l.starts_with(field))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    let (peak, steady) = (kib("VmHWM:").context("VmHWM")?, kib("VmRSS:").context("VmRSS")?);
    recording.stop()?;
    figures.set("rss.attached_peak_kib", peak);
    figures.set("rss.attached_steady_kib", steady);
    Ok(format!(
        "memory of `ctrace record`, attached and idle: peak {:.1} MiB, {:.1} MiB two seconds after attaching",
        peak / 1024.0,
        steady / 1024.0
    ))
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpu}, {} CPUs, kernel {}", std::thread::available_parallelism().map_or(0, |n| n.get()), kernel.trim())
}

/// Runs the synthetic feed and returns its summary line.
fn synthetic(bin: &Path, events: u64, sources: u64) -> anyhow::Result<String> {
    let out = Command::new(bin)
        .args([
            "live",
            "--plain",
            "--synthetic-events",
            &events.to_string(),
            "--synthetic-sources",
            &sources.to_string(),
        ])
        .stdout(Stdio::null())
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("synthetic run failed: {stderr}");
    }
    let line = stderr.lines().find(|l| l.starts_with("synthetic:")).context("no summary line")?;
    Ok(line.trim_start_matches("synthetic: ").to_string())
}

/// How long each tool sits attached and idle for its fixed cost.
const IDLE_SECS: u64 = 20;

/// The fixed cost of leaving a tool attached when nothing is dropped: its
/// process's CPU over [`IDLE_SECS`] with no traffic (kernel programs do not
/// run then). A fleet's `serve` pays this all day; so does a `live` left
/// open. Read from the process's CPU-time clock, in ns, as every process
/// figure of the bench is.
fn idle_cpu(bin: &Path, earlier: Option<&Path>, figures: &mut Figures) -> anyhow::Result<Vec<String>> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut serve = Command::new(bin);
    serve.args(["serve", "--listen", &format!("127.0.0.1:{port}")]);
    let mut tools: Vec<(&'static str, Option<&'static str>, Command)> = compared_tools(bin, earlier);
    tools.insert(1, ("ctrace serve", Some("serve"), serve));
    let _tracefs = Tracefs::ensure();
    let mut lines = Vec::new();
    for (name, key, mut cmd) in tools {
        let tool = start(name, &mut cmd)?;
        // Past start-up: the first workload scan and the freeing after it.
        std::thread::sleep(Duration::from_secs(2));
        let (cpu0, wall0) = (process_cpu_ns(tool.child.id())?, Instant::now());
        std::thread::sleep(Duration::from_secs(IDLE_SECS));
        let share = (process_cpu_ns(tool.child.id())? - cpu0) as f64 / wall0.elapsed().as_nanos() as f64;
        drop(tool);
        lines.push(format!("idle, attached, {IDLE_SECS} s, no traffic: {name}: {:.2} % of a core", 100.0 * share));
        match key {
            Some("ctrace") => figures.set("idle.ctrace.cpu_share", share),
            Some("serve") => figures.set("idle.serve.cpu_share", share),
            Some("bpftrace") => figures.set("idle.bpftrace.cpu_share", share),
            _ => {}
        }
    }
    if !bpftrace_installed() {
        figures.skip("idle.bpftrace.cpu_share", "bpftrace is not installed");
    }
    Ok(lines)
}

/// CPU time a process has used so far, all its threads (ended ones too), ns.
fn process_cpu_ns(pid: u32) -> anyhow::Result<u64> {
    let mut clock: libc::clockid_t = 0;
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out-pointers; the clock is the process's CPU-time clock.
    let ok = unsafe {
        libc::clock_getcpuclockid(pid as libc::pid_t, &mut clock) == 0 && libc::clock_gettime(clock, &mut ts) == 0
    };
    anyhow::ensure!(ok, "no CPU-time clock for process {pid}: {}", std::io::Error::last_os_error());
    Ok(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// CPU time the whole machine spent busy, all CPUs together: user, system,
/// irq and softirq time (not idle, iowait or steal), in seconds. This is
/// where a tool's cost shows in full: a classic tracepoint fills its event
/// record before the program runs, which bpf_stats does not count.
fn machine_busy_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().filter(|l| l.starts_with("cpu ")).context("/proc/stat format")?;
    let ticks: Vec<f64> = line.split_whitespace().skip(1).map(str::parse).collect::<Result<_, _>>()?;
    anyhow::ensure!(ticks.len() >= 7, "/proc/stat: too few fields");
    // user nice system idle iowait irq softirq ...
    let busy = ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6];
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(busy / hz)
}

/// CPU seconds a process has used so far ([`process_cpu_ns`] in seconds).
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    Ok(process_cpu_ns(pid)? as f64 / 1e9)
}

/// Loaded programs: (id, run_time_ns, run_cnt, name), from bpftool.
pub fn bpf_programs() -> anyhow::Result<Vec<(u64, u64, u64, String)>> {
    let out = Command::new("bpftool").args(["-j", "prog", "show"]).output().context("bpftool")?;
    let progs: serde_json::Value = serde_json::from_slice(&out.stdout).context("bpftool JSON")?;
    Ok(progs
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    let n = |k: &str| p[k].as_u64().unwrap_or(0);
                    (n("id"), n("run_time_ns"), n("run_cnt"), p["name"].as_str().unwrap_or("?").to_string())
                })
                .collect()
        })
        .unwrap_or_default())
}

pub struct Tool {
    name: &'static str,
    child: Child,
    programs: Vec<u64>,
}

impl Drop for Tool {
    fn drop(&mut self) {
        // SIGINT first: both tools detach cleanly on it.
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn start(name: &'static str, cmd: &mut Command) -> anyhow::Result<Tool> {
    let before: Vec<u64> = bpf_programs()?.iter().map(|p| p.0).collect();
    let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().with_context(|| format!("start {name}"))?;
    let mut tool = Tool { name, child, programs: Vec::new() };
    let deadline = Instant::now() + Duration::from_secs(60);
    // Attached once the set of new programs has stopped growing for a second
    // (ctrace attaches hook family by family).
    let mut stable_since = Instant::now();
    while tool.programs.is_empty() || stable_since.elapsed() < Duration::from_secs(1) {
        if Instant::now() > deadline {
            bail!("{name} did not finish loading its BPF programs within 60 s");
        }
        std::thread::sleep(Duration::from_millis(200));
        let now: Vec<u64> = bpf_programs()?.iter().map(|p| p.0).filter(|id| !before.contains(id)).collect();
        if now.len() != tool.programs.len() {
            tool.programs = now;
            stable_since = Instant::now();
        }
    }
    Ok(tool)
}

const BPFTRACE: &str = "tracepoint:skb:kfree_skb /args->reason == 12/ { \
    $skb = (struct sk_buff *)args->skbaddr; \
    $ip = (struct iphdr *)($skb->head + $skb->network_header); \
    @drops[ntop($ip->saddr)] = count(); }";

/// Mounts tracefs (bpftrace needs it) for the bench's duration.
pub struct Tracefs(bool);

impl Tracefs {
    pub fn ensure() -> Self {
        if Path::new("/sys/kernel/tracing/events").exists() {
            return Tracefs(false);
        }
        let ok = Command::new("mount")
            .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
            .status()
            .is_ok_and(|s| s.success());
        Tracefs(ok)
    }
}

impl Drop for Tracefs {
    fn drop(&mut self) {
        if self.0 {
            let _ = Command::new("umount").arg("/sys/kernel/tracing").status();
        }
    }
}

fn storm_cpu(bin: &Path, earlier: Option<&Path>, secs: u64, figures: &mut Figures) -> anyhow::Result<Vec<String>> {
    const FILLER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
    const PORT: u16 = 8080;
    let storm: Vec<Ipv4Addr> = (10..18).map(|i| Ipv4Addr::new(198, 18, 0, i)).collect();
    let mut addrs = vec![FILLER];
    addrs.extend(&storm);
    let lab = Lab::new("bench", &addrs)?;
    lab.track_connections("ctrace_bench")?;
    let _listener = lab.listen(PORT)?;
    let _stats = Sysctl::set("kernel.bpf_stats_enabled", "1")?;
    let _tracefs = Tracefs::ensure();
    let max = 256u64;
    let _max = Sysctl::set("net.netfilter.nf_conntrack_max", &max.to_string())?;
    let room = max - lab.server.conntrack_stat()?.entries;
    let _held: Vec<_> =
        (0..room).map(|_| lab.connect(FILLER, PORT, Duration::from_secs(2))).collect::<Result<_, _>>()?;

    let mut lines = Vec::new();
    // Each tool with the key its figures go under (None: printed only).
    let mut tools = compared_tools(bin, earlier);
    // The per-packet invalid hook, where hooks attach: what it adds per packet.
    if Path::new("/sys/bus/event_source/devices/kprobe").exists() {
        let mut with_invalid = Command::new(bin);
        with_invalid.args(["live", "--plain", "--invalid"]);
        tools.insert(1, ("ctrace live --plain --invalid", None, with_invalid));
    } else {
        lines.push("storm CPU, --invalid: not measured: no kprobes here (run the bench in a guest kernel)".into());
    }
    if !bpftrace_installed() {
        lines.push("storm CPU, bpftrace: not measured: bpftrace is not installed (apt-get install bpftrace)".into());
        for key in [
            "storm.bpftrace.kernel_ns_per_drop",
            "storm.bpftrace.cpu_share",
            "storm.bpftrace.drops_per_s",
            "storm.bpftrace.machine_ns_per_drop",
        ] {
            figures.skip(key, "bpftrace is not installed");
        }
    }
    lines.push(quit_latency(bin, &lab, &storm, PORT)?);
    let storm_traffic = || Ok(storm.iter().map(|src| lab.syn_burst(*src, PORT, 200)).sum());
    let probe = measure(None, &lab, PROBE_SECS, None, storm_traffic)?;
    let pace = pace_of(&probe);
    lines.push(pace_line("storm", &probe, pace));
    let baseline = measure(None, &lab, secs, pace, storm_traffic)?;
    lines.push(baseline.line("storm CPU", "table-full drops", "SYNs"));
    figures.set("storm.off.machine_ns_per_drop", baseline.machine_ns_per_drop());
    let run = Run { what: "storm", dropped: "table-full drops", sent: "SYNs", secs, pace };
    for rounds in in_rounds(&mut tools, &lab, &run, storm_traffic, figures, &mut lines)? {
        let keys = match rounds.key {
            Some("ctrace") => [
                "storm.ctrace.kernel_ns_per_drop",
                "storm.ctrace.cpu_share",
                "storm.ctrace.drops_per_s",
                "storm.ctrace.machine_ns_per_drop",
            ],
            Some(_) => [
                "storm.bpftrace.kernel_ns_per_drop",
                "storm.bpftrace.cpu_share",
                "storm.bpftrace.drops_per_s",
                "storm.bpftrace.machine_ns_per_drop",
            ],
            None => continue,
        };
        figures.set(keys[0], rounds.median(Measured::kernel_ns_per_drop));
        figures.set(keys[1], rounds.median(Measured::cpu_share));
        figures.set(keys[2], rounds.median(|m| m.drops as f64 / m.wall));
        figures.set(keys[3], rounds.median(Measured::machine_ns_per_drop));
    }
    if !perf_installed() {
        lines.push(format!("storm CPU, sampled: not measured: {NO_PERF}"));
        skip_sampled("storm", figures);
    }
    Ok(lines)
}

/// Rounds of every tool's run, in turn (A B C, A B C, ...). This VM's
/// speed drifts within minutes by more than the tools differ (bpftrace's
/// program read 448 and 586 ns per drop in two runs an hour apart, and
/// ctrace's, unchanged, 265 and 301 in one): each figure is the median of
/// a tool's rounds, and no tool has all its rounds in one stretch.
pub const ROUNDS: usize = 3;

/// One stretch of traffic as the tools are compared on it.
pub struct Run {
    /// "storm" or "flood": the lines' and the sampled figures' name.
    pub what: &'static str,
    pub dropped: &'static str,
    pub sent: &'static str,
    pub secs: u64,
    pub pace: Pace,
}

/// A tool's runs, one a round.
pub struct Rounds {
    pub key: Option<&'static str>,
    pub runs: Vec<Measured>,
}

impl Rounds {
    /// The median of `figure` over the rounds.
    pub fn median(&self, figure: impl Fn(&Measured) -> f64) -> f64 {
        let mut values: Vec<f64> = self.runs.iter().map(figure).collect();
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    }
}

/// Runs each tool on `run`'s traffic for [`ROUNDS`] rounds, started
/// afresh each time; the first round also samples it with perf (the
/// sampled figures are set here). Prints every run.
pub fn in_rounds(
    tools: &mut [(&'static str, Option<&'static str>, Command)],
    lab: &Lab,
    run: &Run,
    traffic: impl FnMut() -> anyhow::Result<u64> + Copy,
    figures: &mut Figures,
    lines: &mut Vec<String>,
) -> anyhow::Result<Vec<Rounds>> {
    let what = format!("{} CPU", if run.what == "storm" { "storm" } else { "random-source flood" });
    let mut all: Vec<Rounds> = tools.iter().map(|(_, key, _)| Rounds { key: *key, runs: Vec::new() }).collect();
    for round in 1..=ROUNDS {
        for ((name, key, cmd), rounds) in tools.iter_mut().zip(&mut all) {
            let tool = start(name, cmd)?;
            let m = measure(Some(&tool), lab, run.secs, run.pace, traffic)?;
            lines.push(format!("round {round}/{ROUNDS}: {}", m.line(&what, run.dropped, run.sent)));
            lines.push(format!("  per program: {}", m.per_program.join("; ")));
            if round == 1 && perf_installed() {
                let sampled = sampled(&tool, lab, run.secs, run.pace, traffic)?;
                lines.push(sampled.line(&what));
                if key.is_some() {
                    let [ns, share] = sampled_keys(run.what, *key);
                    figures.set(ns, sampled.ns_per_drop());
                    figures.set(share, sampled.cpu_share());
                }
            }
            rounds.runs.push(m);
        }
    }
    for ((name, _, _), rounds) in tools.iter().zip(&all) {
        lines.push(format!(
            "{what}, {name}, median of {ROUNDS} rounds: {:.0} ns/drop in its programs, {:.2}% of a core in all",
            rounds.median(Measured::kernel_ns_per_drop),
            100.0 * rounds.median(Measured::cpu_share)
        ));
    }
    Ok(all)
}

/// Seconds of unpaced traffic with no tool, to find the pace.
pub const PROBE_SECS: u64 = 3;

/// Says what the traffic was paced at, and what the probe reached.
pub fn pace_line(what: &str, probe: &Measured, pace: Pace) -> String {
    format!(
        "{what} paced at {:.0} packets/s for every run below: two thirds of the {:.0}/s reached with no tool",
        pace.unwrap_or(0.0),
        probe.sent as f64 / probe.wall
    )
}

/// The tools compared, each with the key its figures go under (None:
/// printed only): ctrace, an earlier ctrace build if given, bpftrace.
pub fn compared_tools(bin: &Path, earlier: Option<&Path>) -> Vec<(&'static str, Option<&'static str>, Command)> {
    let mut live = Command::new(bin);
    live.args(["live", "--plain"]);
    let mut tools = vec![("ctrace live --plain", Some("ctrace"), live)];
    if let Some(earlier) = earlier {
        let mut before = Command::new(earlier);
        before.args(["live", "--plain"]);
        tools.push(("earlier ctrace build, live --plain", None, before));
    }
    if bpftrace_installed() {
        let mut bt = Command::new("bpftrace");
        bt.args(["-e", BPFTRACE]);
        tools.push(("bpftrace (count per source)", Some("bpftrace"), bt));
    }
    tools
}

/// The baseline's name in the bench's lines.
pub const NO_TOOL: &str = "no tool (baseline)";

pub fn bpftrace_installed() -> bool {
    Command::new("bpftrace").arg("--version").output().is_ok()
}

/// One tool's cost over a stretch of traffic: its process's CPU time, its
/// kernel programs' run time (bpf_stats must be on), and the whole
/// machine's busy time (traffic, kernel and tool together).
pub struct Measured {
    pub name: &'static str,
    pub drops: u64,
    pub sent: u64,
    pub wall: f64,
    pub cpu: f64,
    pub machine: f64,
    pub run_ns: u64,
    pub runs: u64,
    pub per_program: Vec<String>,
}

impl Measured {
    /// Process and kernel programs together, as a share of one core.
    pub fn cpu_share(&self) -> f64 {
        (self.cpu + self.run_ns as f64 / 1e9) / self.wall
    }

    pub fn kernel_ns_per_drop(&self) -> f64 {
        self.run_ns as f64 / self.drops.max(1) as f64
    }

    /// The machine's busy time per drop: the same traffic with no tool
    /// gives the baseline, and the difference is the tool's whole cost.
    pub fn machine_ns_per_drop(&self) -> f64 {
        self.machine * 1e9 / self.drops.max(1) as f64
    }

    pub fn line(&self, what: &str, dropped: &str, sent: &str) -> String {
        format!(
            "{what}, {}: {} {dropped} ({} {sent}) in {:.1} s ({:.0}/s); process {:.3} s CPU ({:.1}% of a core); \
             kernel programs {:.3} s over {} runs ({:.0} ns/run, {:.0} ns/drop); total {:.1}% of a core; \
             machine busy {:.0} ns/drop",
            self.name,
            self.drops,
            self.sent,
            self.wall,
            self.drops as f64 / self.wall,
            self.cpu,
            100.0 * self.cpu / self.wall,
            self.run_ns as f64 / 1e9,
            self.runs,
            if self.runs == 0 { 0.0 } else { self.run_ns as f64 / self.runs as f64 },
            self.kernel_ns_per_drop(),
            100.0 * self.cpu_share(),
            self.machine_ns_per_drop()
        )
    }
}

/// The rate traffic is sent at, packets per second (None: as fast as the
/// machine goes).
///
/// A share of a core is per wall second, so tools compare only at one drop
/// rate: unpaced, the traffic generator shares the two CPUs with the tool,
/// and each tool's run reached another rate (in one run, 63,534 drops/s
/// with ctrace and 57,259 with bpftrace). Paced below what the machine
/// reaches with any tool attached, every tool sees the same storm.
pub type Pace = Option<f64>;

/// The pace for the tools' runs: two thirds of the rate `probe` (a run
/// with no tool) reached, leaving room for the slowest tool to keep it.
pub fn pace_of(probe: &Measured) -> Pace {
    Some(probe.sent as f64 / probe.wall * 2.0 / 3.0)
}

/// How long to wait before the next batch: until the `sent` packets sent
/// in `elapsed` are due at `pace`.
fn early_by(pace: Pace, elapsed: Duration, sent: u64) -> Option<Duration> {
    Duration::from_secs_f64(sent as f64 / pace?).checked_sub(elapsed).filter(|d| !d.is_zero())
}

/// Sleeps until the `sent` packets sent since `started` are due at `pace`.
fn keep_pace(pace: Pace, started: Instant, sent: u64) {
    if let Some(early) = early_by(pace, started.elapsed(), sent) {
        std::thread::sleep(early);
    }
}

/// Runs `traffic` (each call sends a batch, returning how many packets)
/// for `secs` at `pace` with `tool` attached (None: no tool, the
/// baseline), and measures it; drops are the server namespace's `drop`
/// counter.
pub fn measure(
    tool: Option<&Tool>,
    lab: &Lab,
    secs: u64,
    pace: Pace,
    mut traffic: impl FnMut() -> anyhow::Result<u64>,
) -> anyhow::Result<Measured> {
    let progs_before = bpf_programs()?;
    let process_cpu = || tool.map_or(Ok(0.0), |t| cpu_seconds(t.child.id()));
    let cpu_before = process_cpu()?;
    let machine_before = machine_busy_seconds()?;
    let drops_before = lab.server.conntrack_stat()?.drop;
    let started = Instant::now();
    let mut sent = 0;
    while started.elapsed() < Duration::from_secs(secs) {
        keep_pace(pace, started, sent);
        sent += traffic()?;
    }
    let wall = started.elapsed().as_secs_f64();
    let machine = machine_busy_seconds()? - machine_before;
    let drops = lab.server.conntrack_stat()?.drop - drops_before;
    let cpu = process_cpu()? - cpu_before;
    let programs: &[u64] = tool.map_or(&[], |t| &t.programs);
    let (mut run_ns, mut runs) = (0u64, 0u64);
    let mut per_program = Vec::new();
    for (id, ns, cnt, name) in &bpf_programs()? {
        if programs.contains(id) {
            let (ns0, cnt0) = progs_before.iter().find(|p| p.0 == *id).map_or((0, 0), |p| (p.1, p.2));
            let (ns, cnt) = (ns - ns0, cnt - cnt0);
            run_ns += ns;
            runs += cnt;
            if cnt > 0 {
                per_program.push(format!("{name} {cnt} runs, {:.0} ns/run", ns as f64 / cnt as f64));
            }
        }
    }
    Ok(Measured { name: tool.map_or(NO_TOOL, |t| t.name), drops, sent, wall, cpu, machine, run_ns, runs, per_program })
}

/// Frames through which the kernel enters a tracing program: a `tp_btf`
/// program's dispatcher (`bpf_trace_run<N>`), a classic tracepoint's
/// perf handler (`perf_trace_<event>`, which fills the event record before
/// the program runs), and the kprobe and classic dispatch to BPF.
const HOOK_FRAMES: &[&str] = &["bpf_trace_run", "perf_trace_", "trace_call_bpf"];

/// The kernel's time in the tools' hooks over a stretch of traffic,
/// sampled by `perf record -a` with bpf_stats off: the program, its helpers
/// and the tracepoint's own machinery, which bpf_stats leaves out for a
/// classic tracepoint (bpftrace's) and counts for a `tp_btf` one (ctrace's).
pub struct Sampled {
    pub name: &'static str,
    /// Sampled kernel time in the hooks, and how many samples.
    pub hook_s: f64,
    pub samples: u64,
    /// The tool's process CPU over the same stretch.
    pub cpu: f64,
    pub drops: u64,
    pub wall: f64,
}

impl Sampled {
    pub fn ns_per_drop(&self) -> f64 {
        self.hook_s * 1e9 / self.drops.max(1) as f64
    }

    /// Process and hooks together, as a share of one core.
    pub fn cpu_share(&self) -> f64 {
        (self.cpu + self.hook_s) / self.wall
    }

    pub fn line(&self, what: &str) -> String {
        format!(
            "{what}, {}, sampled by perf (bpf_stats off): {} drops in {:.1} s; hooks {:.3} s ({} samples, {:.0} ns/drop); \
             process {:.3} s; total {:.1}% of a core",
            self.name,
            self.drops,
            self.wall,
            self.hook_s,
            self.samples,
            self.ns_per_drop(),
            self.cpu,
            100.0 * self.cpu_share()
        )
    }
}

/// The keys of a sampled run's figures, for `ctrace` or `bpftrace`.
pub fn sampled_keys(run: &str, tool: Option<&str>) -> [&'static str; 2] {
    match (run, tool) {
        ("storm", Some("ctrace")) => ["storm.ctrace.sampled_ns_per_drop", "storm.ctrace.sampled_cpu_share"],
        ("storm", _) => ["storm.bpftrace.sampled_ns_per_drop", "storm.bpftrace.sampled_cpu_share"],
        (_, Some("ctrace")) => ["flood.ctrace.sampled_ns_per_drop", "flood.ctrace.sampled_cpu_share"],
        _ => ["flood.bpftrace.sampled_ns_per_drop", "flood.bpftrace.sampled_cpu_share"],
    }
}

/// Says why a run's sampled figures are missing: perf is not installed.
pub fn skip_sampled(run: &str, figures: &mut Figures) {
    for tool in ["ctrace", "bpftrace"] {
        for key in sampled_keys(run, Some(tool)) {
            figures.skip(key, NO_PERF);
        }
    }
}

const NO_PERF: &str = "perf is not installed (apt-get install linux-perf)";

pub fn perf_installed() -> bool {
    Command::new("perf").arg("--version").output().is_ok_and(|o| o.status.success())
}

/// Runs `traffic` for `secs` at `pace` under `perf record -a -g` and sums
/// the sampled time whose call chain passes through a [`HOOK_FRAMES`] frame.
pub fn sampled(
    tool: &Tool,
    lab: &Lab,
    secs: u64,
    pace: Pace,
    mut traffic: impl FnMut() -> anyhow::Result<u64>,
) -> anyhow::Result<Sampled> {
    let _stats = Sysctl::set("kernel.bpf_stats_enabled", "0")?;
    let dir = ctrace_tests::TempDir::new("bench-perf");
    let data = dir.0.join("perf.data");
    // To a file, not a pipe nobody reads while it runs (a full pipe would
    // stall perf); shown if it fails.
    let log = dir.0.join("perf.log");
    let mut perf = Command::new("perf")
        .args(["record", "-a", "-g", "-F", "4999", "-o"])
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("perf record")?;
    // perf says nothing when it starts; its file appears once it has.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !data.exists() {
        anyhow::ensure!(Instant::now() < deadline, "perf record did not start within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let cpu_before = cpu_seconds(tool.child.id())?;
    let drops_before = lab.server.conntrack_stat()?.drop;
    let started = Instant::now();
    let mut sent = 0;
    while started.elapsed() < Duration::from_secs(secs) {
        keep_pace(pace, started, sent);
        sent += traffic()?;
    }
    let wall = started.elapsed().as_secs_f64();
    let drops = lab.server.conntrack_stat()?.drop - drops_before;
    let cpu = cpu_seconds(tool.child.id())? - cpu_before;
    // SAFETY: signalling our own child; SIGINT makes perf write its file.
    unsafe { libc::kill(perf.id() as i32, libc::SIGINT) };
    let status = perf.wait()?;
    // perf writes its file on SIGINT, then ends by the signal.
    use std::os::unix::process::ExitStatusExt;
    anyhow::ensure!(
        status.success() || status.signal() == Some(libc::SIGINT),
        "perf record failed ({status}): {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let script = Command::new("perf").args(["script", "-F", "period,ip,sym", "-i"]).arg(&data).output()?;
    anyhow::ensure!(script.status.success(), "perf script: {}", String::from_utf8_lossy(&script.stderr));
    let (hook_ns, samples) = hook_time(&String::from_utf8_lossy(&script.stdout));
    Ok(Sampled { name: tool.name, hook_s: hook_ns as f64 / 1e9, samples, cpu, drops, wall })
}

/// Sums the periods (ns of cpu-clock) of the samples in `perf script -F
/// period,ip,sym` output whose chain has a [`HOOK_FRAMES`] frame; and how
/// many there were.
fn hook_time(script: &str) -> (u64, u64) {
    let (mut ns, mut samples) = (0, 0);
    for sample in script.split("\n\n") {
        let mut lines = sample.lines().filter(|l| !l.trim().is_empty());
        let Some(period) = lines.next().and_then(|l| l.trim().parse::<u64>().ok()) else { continue };
        let in_hook = lines.any(|frame| {
            let symbol = frame.split_whitespace().nth(1).unwrap_or("");
            HOOK_FRAMES.iter().any(|f| symbol.starts_with(f))
        });
        if in_hook {
            ns += period;
            samples += 1;
        }
    }
    (ns, samples)
}

/// Time from pressing `q` in the terminal UI to the process's exit, measured
/// while a storm runs (the view must not be starved by events).
fn quit_latency(bin: &Path, lab: &Lab, storm: &[Ipv4Addr], port: u16) -> anyhow::Result<String> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let socket = format!("ctrace-bench-{}", std::process::id());
    let tmux = |args: &[&str]| Command::new("tmux").args(["-L", &socket]).args(args).output();
    let pid_file = std::env::temp_dir().join(format!("ctrace-bench-{}.pid", std::process::id()));
    let command = format!("echo $$ > {}; exec {} live", pid_file.display(), bin.display());
    tmux(&["new-session", "-d", "-s", "q", "-x", "150", "-y", "50", "sh", "-c", &command])?;
    let storming = AtomicBool::new(true);
    let result = std::thread::scope(|scope| {
        scope.spawn(|| {
            while storming.load(Ordering::Relaxed) {
                for src in storm {
                    lab.syn_burst(*src, port, 100);
                }
            }
        });
        let measured = (|| {
            std::thread::sleep(Duration::from_secs(2));
            let pid: u32 = std::fs::read_to_string(&pid_file)?.trim().parse()?;
            let pressed = Instant::now();
            tmux(&["send-keys", "-t", "q", "q"])?;
            let running = || std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z"));
            while running() {
                if pressed.elapsed() > Duration::from_secs(10) {
                    bail!("ctrace live did not exit within 10 s of q");
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(pressed.elapsed())
        })();
        storming.store(false, Ordering::Relaxed);
        measured
    });
    let _ = tmux(&["kill-server"]);
    let _ = std::fs::remove_file(&pid_file);
    let elapsed = result?;
    Ok(format!("quit latency: q to exit of ctrace live during a storm: {:.0} ms", elapsed.as_secs_f64() * 1e3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_figure_is_the_median_of_its_rounds_and_batches_wait_until_due() {
        let run = |cpu: f64| Measured {
            name: NO_TOOL,
            drops: 1000,
            sent: 1000,
            wall: 1.0,
            cpu,
            machine: 0.0,
            run_ns: 0,
            runs: 0,
            per_program: Vec::new(),
        };
        let rounds = Rounds { key: None, runs: vec![run(0.03), run(0.01), run(0.02)] };
        assert_eq!(rounds.median(Measured::cpu_share), 0.02);
        assert_eq!(pace_of(&run(0.0)), Some(1000.0 * 2.0 / 3.0));
        // 1,000 packets at 10,000/s are due 100 ms after the start.
        let ms = Duration::from_millis;
        assert_eq!(early_by(Some(10_000.0), ms(40), 1000), Some(ms(60)));
        assert_eq!(early_by(Some(10_000.0), ms(100), 1000), None);
        assert_eq!(early_by(Some(10_000.0), ms(150), 1000), None);
        assert_eq!(early_by(None, ms(0), 1000), None);
    }

    #[test]
    fn hook_time_counts_the_samples_whose_chain_enters_a_hook() {
        let script = "    200040 \n\tffffffff8100 pv_native_safe_halt\n\tffffffff8101 do_idle\n\n    \
                      200040 \n\tffffffff8102 bpf_ringbuf_submit\n\tffffffffa000 bpf_prog_1151170cddffabc8_kfree_skb\n\t\
                      ffffffff8103 bpf_trace_run4\n\tffffffff8104 sk_skb_reason_drop\n\n    \
                      100000 \n\tffffffff8105 htab_map_update_elem_in_place\n\tffffffff8106 trace_call_bpf\n\t\
                      ffffffff8107 perf_trace_kfree_skb\n\n    \
                      300000 \n\tffffffff8108 kfree_skbmem\n\tffffffff8104 sk_skb_reason_drop\n";
        assert_eq!(hook_time(script), (300040, 2));
        assert_eq!(hook_time(""), (0, 0));
    }
}
