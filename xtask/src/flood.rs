//! The random-source flood of the issues, measured: a SYN flood from any
//! unicast address (as `hping3 --rand-source` sends) into a namespace whose
//! 1,024-entry table it keeps full, with `ctrace record`, `ctrace live` and
//! `ctrace serve` all running. Reports each one's peak memory, the record's
//! size, lost events and totals against the kernel, and what live and serve
//! say about the flood. Root only; everything is undone on return.
use std::{
    io::{BufRead, BufReader},
    net::Ipv4Addr,
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::{bench, figures::Figures};
use ctrace_tests::{
    free_port, http_get, peak_rss_kib, wait_for, Daemon, Lab, Recording, Spoofed, Sysctl, TempDir, FILL_TIMEOUT, HANG,
};

const PORT: u16 = 8080;
const TABLE_MAX: u64 = 1024;

pub fn flood(bin: &Path, secs: u64, figures: &mut Figures) -> anyhow::Result<Vec<String>> {
    // The test helpers start the ctrace they are pointed at.
    std::env::set_var("CTRACE_BIN", bin);
    let filler = Ipv4Addr::new(198, 18, 0, 2);
    let lab = Lab::new("bflood", &[filler])?;
    lab.track_connections("ctrace_bflood")?;
    lab.route_all_back()?;
    let _listener = lab.listen(PORT)?;
    let dir = TempDir::new("bflood");
    let path = dir.0.join("flood.json");

    let recording = Recording::start(&path, &[])?;
    let (mut live, snapshots) = live(bin)?;
    let port = free_port();
    let mut serve = Daemon::spawn(
        "ctrace serve",
        Command::new(bin).args(["serve", "--listen", &format!("127.0.0.1:{port}")]).stderr(Stdio::null()),
    )?;
    wait_for("ctrace serve to answer", || http_get(port, "/metrics").ok().filter(|(status, _)| *status == 200));

    let max = Sysctl::set("net.netfilter.nf_conntrack_max", &TABLE_MAX.to_string())?;
    let room = TABLE_MAX - lab.server.conntrack_stat()?.entries;
    let held: Vec<_> = (0..room).map(|_| lab.connect(filler, PORT, FILL_TIMEOUT)).collect::<Result<_, _>>()?;
    let before = lab.server.conntrack_stat()?;
    let started = Instant::now();
    let (mut sent, mut seed) = (0u64, 1);
    while started.elapsed() < Duration::from_secs(secs) {
        let (n, next) = lab.syn_flood_random_sources(PORT, 20_000, Spoofed::Anywhere, seed)?;
        (sent, seed) = (sent + u64::from(n), next);
    }
    let flood_s = started.elapsed().as_secs_f64();
    let after = wait_for("the kernel to drop every SYN", || {
        let stat = lab.server.conntrack_stat().ok()?;
        (stat.drop - before.drop >= sent).then_some(stat)
    });
    let drops = after.drop - before.drop;

    // Every reader has counted every drop before the table empties (the
    // tracepoint tier reads occupancy when it classifies).
    let snapshot = wait_for_snapshot(&snapshots, drops)?;
    let (_, metrics) = http_get(port, "/metrics")?;
    let live_kib = peak_rss_kib(live.child.id()).unwrap_or(0);
    let serve_kib = peak_rss_kib(serve.child.id()).unwrap_or(0);
    live.check_running()?;
    serve.check_running()?;
    drop((live, serve));
    // The record's peak includes writing the file: watch it until it exits.
    let pid = recording.pid().context("ctrace record exited")?;
    let watcher = std::thread::spawn(move || {
        let mut peak = 0;
        while let Some(kib) = peak_rss_kib(pid) {
            peak = peak.max(kib);
            std::thread::sleep(Duration::from_millis(20));
        }
        peak
    });
    let record = recording.stop()?;
    let record_kib = watcher.join().unwrap_or(0);
    drop(max);
    drop(held);

    figures.set("flood.drops_per_s", drops as f64 / flood_s);
    figures.set("flood.ctrace.lost_events", record["totals"]["lost_events"].as_f64().unwrap_or(f64::NAN));
    let size = std::fs::metadata(&path)?.len();
    let totals = &record["totals"];
    let flood = &snapshot["flood"];
    let sample = |name: &str| {
        metrics.lines().find(|l| l.starts_with(name)).and_then(|l| l.rsplit(' ').next()).unwrap_or("?").to_string()
    };
    Ok(vec![
        format!(
            "random-source flood, {flood_s:.0} s: {sent} SYNs ({:.0}/s), {drops} dropped by the kernel",
            sent as f64 / flood_s
        ),
        format!(
            "  record: peak RSS {} MiB, file {:.1} MB, {} rows, lost {}, table_full {} vs kernel {drops}",
            record_kib / 1024,
            size as f64 / 1e6,
            record["sources"].as_array().map_or(0, Vec::len),
            totals["lost_events"],
            totals["table_full"]
        ),
        format!(
            "  live:   peak RSS {} MiB, lost {}; {}",
            live_kib / 1024,
            snapshot["kernel"]["lost_events"],
            flood["verdict"].as_str().unwrap_or("no verdict")
        ),
        format!(
            "  serve:  peak RSS {} MiB, lost {}, distinct sources {}, random-source flag {}",
            serve_kib / 1024,
            sample("ctrace_lost_events_total"),
            sample("ctrace_distinct_sources"),
            sample("ctrace_destination_random_source_flood{")
        ),
    ])
}

/// The same flood with one tool at a time: `ctrace live --plain`, then the
/// bpftrace script, each's process CPU and kernel program time (bpf_stats).
pub fn flood_cpu(bin: &Path, earlier: Option<&Path>, secs: u64, figures: &mut Figures) -> anyhow::Result<Vec<String>> {
    let filler = Ipv4Addr::new(198, 18, 0, 2);
    let lab = Lab::new("bfcpu", &[filler])?;
    lab.track_connections("ctrace_bfcpu")?;
    lab.route_all_back()?;
    let _listener = lab.listen(PORT)?;
    let _stats = Sysctl::set("kernel.bpf_stats_enabled", "1")?;
    let _tracefs = bench::Tracefs::ensure();
    let _max = Sysctl::set("net.netfilter.nf_conntrack_max", &TABLE_MAX.to_string())?;
    let room = TABLE_MAX - lab.server.conntrack_stat()?.entries;
    let _held: Vec<_> = (0..room).map(|_| lab.connect(filler, PORT, FILL_TIMEOUT)).collect::<Result<_, _>>()?;
    let mut lines = Vec::new();
    if !bench::bpftrace_installed() {
        figures.skip("flood.bpftrace.cpu_share", "bpftrace is not installed");
        figures.skip("flood.bpftrace.machine_ns_per_drop", "bpftrace is not installed");
    }
    let seed = std::cell::Cell::new(1);
    // Batches short enough that the pace sends in 30-40 ms bursts.
    let flood = || {
        let (n, next) = lab.syn_flood_random_sources(PORT, 4_000, Spoofed::Anywhere, seed.get())?;
        seed.set(next);
        Ok(u64::from(n))
    };
    let probe = bench::measure(None, &lab, bench::PROBE_SECS, None, flood)?;
    let pace = bench::pace_of(&probe);
    lines.push(bench::pace_line("random-source flood", &probe, pace));
    let baseline = bench::measure(None, &lab, secs, pace, flood)?;
    lines.push(baseline.line("random-source flood CPU", "table-full drops", "SYNs"));
    figures.set("flood.off.machine_ns_per_drop", baseline.machine_ns_per_drop());
    let run = bench::Run { what: "flood", dropped: "table-full drops", sent: "SYNs", secs, pace };
    let mut tools = bench::compared_tools(bin, earlier);
    for rounds in bench::in_rounds(&mut tools, &lab, &run, flood, figures, &mut lines)? {
        let [share, machine] = match rounds.key {
            Some("ctrace") => ["flood.ctrace.cpu_share", "flood.ctrace.machine_ns_per_drop"],
            Some(_) => ["flood.bpftrace.cpu_share", "flood.bpftrace.machine_ns_per_drop"],
            None => continue,
        };
        figures.set(share, rounds.median(bench::Measured::cpu_share));
        figures.set(machine, rounds.median(bench::Measured::machine_ns_per_drop));
    }
    if !bench::perf_installed() {
        bench::skip_sampled("flood", figures);
    }
    Ok(lines)
}

/// `ctrace live --format jsonl`, once it prints its first snapshot; later
/// snapshots arrive on the channel.
fn live(bin: &Path) -> anyhow::Result<(Daemon, mpsc::Receiver<serde_json::Value>)> {
    let mut live = Daemon::spawn(
        "ctrace live",
        Command::new(bin)
            .args(["live", "--format", "jsonl", "--interval", "1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    )?;
    let (tx, snapshots) = mpsc::channel();
    let stdout = live.child.stdout.take().context("piped")?;
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let Ok(snapshot) = serde_json::from_str(&line) else { return };
            if tx.send(snapshot).is_err() {
                return;
            }
        }
    });
    snapshots.recv_timeout(HANG).context("ctrace live printed no snapshot")?;
    Ok((live, snapshots))
}

/// The first snapshot that has counted `drops` drops.
fn wait_for_snapshot(snapshots: &mpsc::Receiver<serde_json::Value>, drops: u64) -> anyhow::Result<serde_json::Value> {
    let started = Instant::now();
    loop {
        let snapshot = snapshots
            .recv_timeout(HANG.saturating_sub(started.elapsed()))
            .context("ctrace live stopped printing snapshots")?;
        if snapshot["flood"]["drops"].as_u64() >= Some(drops) {
            return Ok(snapshot);
        }
    }
}
