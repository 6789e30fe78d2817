//! A random-source SYN flood (sources anywhere in IPv4, as
//! `hping3 --rand-source` sends) into a full table while `ctrace record` runs,
//! for measuring: drops/s reached, the record's size, ctrace's peak memory,
//! lost events, and totals against the kernel.
//!
//! CTRACE_BIN=target/release/ctrace cargo run -p ctrace-tests --example flood -- SECONDS OUTPUT.json [RECORD ARGS...]
//!
//! Root only. Everything is undone on exit (namespaces, nf_conntrack_max).
use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use ctrace_tests::{peak_rss_kib, require_root, wait_for, Lab, Recording, Spoofed, Sysctl, FILL_TIMEOUT};

fn main() -> anyhow::Result<()> {
    require_root();
    let args: Vec<String> = std::env::args().collect();
    let (Some(seconds), Some(output)) = (args.get(1).and_then(|s| s.parse::<u64>().ok()), args.get(2)) else {
        anyhow::bail!("usage: flood SECONDS OUTPUT.json [ctrace record arguments]");
    };
    let extra: Vec<&str> = args[3..].iter().map(String::as_str).collect();
    let filler = Ipv4Addr::new(198, 18, 0, 2);
    let lab = Lab::new("flood", &[filler])?;
    lab.track_connections("ctrace_flood")?;
    lab.route_all_back()?;
    let _listener = lab.listen(8080)?;
    let path = std::path::Path::new(output);
    let recording = Recording::start(path, &extra)?;
    let max = Sysctl::set("net.netfilter.nf_conntrack_max", "1024")?;
    let room = 1024 - lab.server.conntrack_stat()?.entries;
    let held: Vec<_> = (0..room).map(|_| lab.connect(filler, 8080, FILL_TIMEOUT)).collect::<Result<_, _>>()?;
    let before = lab.server.conntrack_stat()?;
    let started = Instant::now();
    let mut sent = 0u64;
    let mut seed = 1;
    while started.elapsed() < Duration::from_secs(seconds) {
        let (n, next) = lab.syn_flood_random_sources(8080, 20_000, Spoofed::Anywhere, seed)?;
        (sent, seed) = (sent + u64::from(n), next);
    }
    let flood_s = started.elapsed().as_secs_f64();
    let after = wait_for("the kernel to drop every SYN", || {
        let stat = lab.server.conntrack_stat().ok()?;
        (stat.drop - before.drop >= sent).then_some(stat)
    });
    // The peak includes writing the file, after the flood: watch until exit.
    let pid = recording.pid().expect("running");
    let watcher = std::thread::spawn(move || {
        let mut peak = 0;
        while let Some(kib) = peak_rss_kib(pid) {
            peak = peak.max(kib);
            std::thread::sleep(Duration::from_millis(20));
        }
        peak
    });
    let record = recording.stop()?;
    let peak_kib = watcher.join().unwrap_or(0);
    // Only now: on the tracepoint tier a drop is table_full if the table is
    // at max when ctrace reads the record.
    drop(max);
    drop(held);
    let drops = after.drop - before.drop;
    let size = std::fs::metadata(path)?.len();
    println!("flood: {sent} SYNs in {flood_s:.1} s ({:.0}/s); kernel drops {drops}", sent as f64 / flood_s);
    println!(
        "record: {size} bytes, {} rows; ctrace peak RSS {} KiB",
        record["sources"].as_array().map_or(0, Vec::len),
        peak_kib
    );
    let others: u64 = record["others"].as_array().map_or(0, |o| o.iter().filter_map(|o| o["drops"].as_u64()).sum());
    let rows: u64 = record["sources"].as_array().map_or(0, |s| s.iter().filter_map(|s| s["drops"].as_u64()).sum());
    println!(
        "totals: table_full {} (rows {rows} + others {others}), lost {}, kernel drop {drops}; approximate {}",
        record["totals"]["table_full"], record["totals"]["lost_events"], record["approximate"]
    );
    Ok(())
}
