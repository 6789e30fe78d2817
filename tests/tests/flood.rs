//! A random-source SYN flood into a full table: the shape of most real
//! conntrack incidents, and the one that used to make `ctrace record` grow
//! without bound (a row per spoofed source: 3.6 GiB and a 2.1 GB file for a
//! 20-second flood).
use std::{
    collections::HashSet,
    io::{BufRead, BufReader},
    net::Ipv4Addr,
    process::{Command, Stdio},
};

use ctrace_tests::{
    ctrace_bin, peak_rss_kib, require_root, wait_for, Daemon, Lab, Recording, Spoofed, Sysctl, TempDir, FILL_TIMEOUT,
    HANG, SERVER,
};

const FILLER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const PORT: u16 = 8080;
const TABLE_MAX: u64 = 64;
const CAPACITY: usize = 1024;
/// About 17,000 distinct sources among 65,024 addresses: far more than
/// the rows kept.
const SYNS: u32 = 20_000;

#[test]
fn a_random_source_flood_keeps_the_record_bounded_and_its_totals_exact() {
    require_root();
    let lab = Lab::new("flood", &[FILLER]).expect("lab");
    lab.track_connections("ctrace_flood").unwrap();
    let _listener = lab.listen(PORT).expect("listener");
    let out = TempDir::new("flood");
    let path = out.0.join("r.json");
    let recording = Recording::start(&path, &["--capacity", &CAPACITY.to_string()]).expect("ctrace record");

    let flooded = flood_full_table(&lab, Spoofed::LabRange, 1);
    // A coarse guard: the rows are bounded, so memory is too.
    let peak_kib = recording.peak_rss_kib().expect("VmHWM of ctrace record");
    // On the tracepoint tier a drop is table_full if the table is at max
    // when ctrace reads the record (up to 50 ms later): keep the table
    // full until it has read them all.
    let record = recording.stop().expect("record");
    drop(flooded.table);
    let kernel_drops = flooded.drops;
    let size = std::fs::metadata(&path).unwrap().len();
    eprintln!(
        "kernel: {kernel_drops} drops of {} SYNs; record {size} bytes, ctrace peak RSS {peak_kib} KiB",
        flooded.sent
    );
    let report = Command::new(ctrace_bin()).arg("report").arg(&path).output().unwrap();
    eprintln!("{}", String::from_utf8_lossy(&report.stdout));

    let server = lab.server.inode();
    let sources = record["sources"].as_array().unwrap();
    assert!(sources.len() <= CAPACITY, "{} rows for --capacity {CAPACITY}", sources.len());
    let approximate = &record["approximate"];
    assert_eq!(approximate["capacity"], CAPACITY, "the record says it is approximate: {approximate}");
    assert!(approximate["evictions"].as_u64().unwrap() > 0);
    // Rows and others add up to the exact total, which is the kernel's.
    let in_rows: u64 = sources
        .iter()
        .filter(|s| s["netns"] == server && s["reason"] == "table_full")
        .map(|s| s["drops"].as_u64().unwrap())
        .sum();
    let others: u64 = record["others"]
        .as_array()
        .expect("others")
        .iter()
        .filter(|o| o["reason"] == "table_full")
        .map(|o| o["drops"].as_u64().unwrap())
        .sum();
    assert_eq!(record["totals"]["table_full"], kernel_drops, "exact total vs the namespace's drop counter");
    assert_eq!(in_rows + others, kernel_drops, "rows + others vs the kernel");
    assert_eq!(record["totals"]["lost_events"], 0);
    // Every row's error is within the stated bound, every histogram sums to its row.
    let bound = approximate["error_bound"].as_u64().unwrap();
    for s in sources {
        assert!(s["error"].as_u64().unwrap_or(0) <= bound, "{s}");
        let sum: u64 = s["histogram"]["counts"].as_array().unwrap().iter().map(|n| n.as_u64().unwrap()).sum();
        assert_eq!(sum, s["drops"].as_u64().unwrap(), "{s}");
        let src: Ipv4Addr = s["src"].as_str().unwrap().parse().unwrap();
        assert!(src.octets()[..2] == [198, 18] && src != SERVER, "a flood source: {src}");
    }
    // The flood summary: one destination with every drop, the distinct
    // sources within four standard errors of the addresses really sent,
    // the lab's /16 the only prefix that stands out, and the verdict.
    let flood = &record["flood"];
    let truth = distinct(Spoofed::LabRange, SYNS, 1);
    check_flood_summary(flood, kernel_drops, truth);
    assert_eq!(flood["prefixes"][0]["prefix"], "198.18.0.0/16", "{flood}");
    assert_eq!(flood["prefixes"].as_array().unwrap().len(), 1, "no /24 has 5% of 254: {flood}");

    // Coarse guards on what bounded rows imply (the unbounded record wrote a
    // row per source: about 17,000 here).
    assert!(size < 1 << 20, "the record is {size} bytes");
    assert!(peak_kib < 256 * 1024, "ctrace record peaked at {peak_kib} KiB");
}

/// A table at `TABLE_MAX` (held open by connections from the filler) and
/// a flood of `SYNS` SYNs into it, every one dropped; the table stays full
/// until `table` is dropped.
struct FullTableFlood {
    table: (Sysctl, Vec<socket2::Socket>),
    sent: u32,
    drops: u64,
}

fn flood_full_table(lab: &Lab, sources: Spoofed, seed: u32) -> FullTableFlood {
    let max = Sysctl::set("net.netfilter.nf_conntrack_max", &TABLE_MAX.to_string()).unwrap();
    let room = TABLE_MAX - lab.server.conntrack_stat().unwrap().entries;
    let held: Vec<_> = (0..room).map(|_| lab.connect(FILLER, PORT, FILL_TIMEOUT).expect("fill")).collect();
    let before = lab.server.conntrack_stat().unwrap();
    let (sent, _) = lab.syn_flood_random_sources(PORT, SYNS, sources, seed).unwrap();
    let after = wait_for("the kernel to drop every SYN", || {
        let stat = lab.server.conntrack_stat().unwrap();
        (stat.drop - before.drop >= u64::from(sent)).then_some(stat)
    });
    FullTableFlood { table: (max, held), sent, drops: after.drop - before.drop }
}

/// Distinct addresses among the first `count` a flood sends for `seed`.
fn distinct(sources: Spoofed, count: u32, seed: u32) -> u64 {
    sources.addresses(count, seed).0.into_iter().collect::<HashSet<_>>().len() as u64
}

/// A flood summary (record or live) against the kernel's drop count and the
/// distinct sources really sent: the flood's destination has every drop,
/// the estimates are within four standard errors, the verdict names it.
fn check_flood_summary(flood: &serde_json::Value, kernel_drops: u64, truth: u64) {
    let destination = flood_destination(flood).unwrap_or_else(|| panic!("no row for {SERVER}:{PORT}: {flood}"));
    assert_eq!(destination["drops"], kernel_drops, "{flood}");
    assert_eq!(destination["random_sources"], true, "{flood}");
    assert!(flood["drops"].as_u64().unwrap() >= kernel_drops, "{flood}");
    let error = flood["relative_error"].as_f64().unwrap();
    for estimate in [&flood["distinct_sources"], &destination["distinct_sources"]] {
        let estimate = estimate.as_u64().unwrap();
        let off = (estimate as f64 - truth as f64).abs() / truth as f64;
        assert!(off < 4.0 * error, "estimate {estimate} for {truth} distinct sources: {flood}");
    }
    let verdict = flood["verdict"].as_str().expect("a verdict");
    let named = format!("random-source flood to {SERVER}:{PORT}/tcp: {kernel_drops} drops from about ");
    assert!(verdict.starts_with(&named), "{verdict}");
}

/// The summary's row for the flood's destination.
fn flood_destination(flood: &serde_json::Value) -> Option<&serde_json::Value> {
    flood["destinations"]
        .as_array()?
        .iter()
        .find(|d| d["dst"] == SERVER.to_string() && d["dport"] == PORT && d["proto"] == "tcp")
}

/// `ctrace live` during an `hping3 --rand-source`-like flood (any unicast
/// source address) names the destination and calls it a random-source
/// flood, with a distinct-source estimate close to the addresses sent.
#[test]
fn live_names_a_random_source_flood_and_its_destination() {
    require_root();
    let lab = Lab::new("floodlive", &[FILLER]).expect("lab");
    lab.track_connections("ctrace_floodlive").unwrap();
    lab.route_all_back().unwrap();
    let _listener = lab.listen(PORT).expect("listener");
    let mut live = Daemon::spawn(
        "ctrace live",
        Command::new(ctrace_bin())
            .args(["live", "--format", "jsonl", "--interval", "1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit()),
    )
    .unwrap();
    // One snapshot a line, read on a thread so that waits can time out.
    let (tx, snapshots) = std::sync::mpsc::channel::<serde_json::Value>();
    let stdout = live.child.stdout.take().expect("piped");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(serde_json::from_str(&line).expect("a JSON line")).is_err() {
                return;
            }
        }
    });
    // The first snapshot: attached, baselines read.
    snapshots.recv_timeout(HANG).expect("a first snapshot from ctrace live");
    // Idle, live stops draining on its timer and sleeps until a record
    // wakes it (the programs do, on the next record): the flood must.
    let started = std::time::Instant::now();
    let woken_before = loop {
        let snapshot = snapshots
            .recv_timeout(HANG.saturating_sub(started.elapsed()))
            .expect("ctrace live, idle, never went to sleep");
        if snapshot["kernel"]["reader_sleeps"].as_u64() >= Some(1) {
            break snapshot["kernel"]["reader_woken"].as_u64().expect("reader_woken");
        }
    };
    let (mut serve, port) = ctrace_tests::serve().expect("ctrace serve");

    let flooded = flood_full_table(&lab, Spoofed::Anywhere, 7);
    let kernel_drops = flooded.drops;
    // The table stays full until ctrace has counted every drop (on the
    // tracepoint tier it classifies by the occupancy it reads).
    let started = std::time::Instant::now();
    let snapshot = loop {
        live.check_running().unwrap();
        let snapshot = snapshots
            .recv_timeout(HANG.saturating_sub(started.elapsed()))
            .expect("ctrace live stopped printing snapshots");
        let counted = flood_destination(&snapshot["flood"]).and_then(|d| d["drops"].as_u64());
        if counted >= Some(kernel_drops) {
            break snapshot;
        }
    };
    // serve drains the ring before it answers: its counts are complete.
    let (status, metrics) = ctrace_tests::http_get(port, "/metrics").expect("scrape");
    let (live_kib, serve_kib) = (peak_rss_kib(live.child.id()), peak_rss_kib(serve.child.id()));
    serve.check_running().unwrap();
    drop(flooded.table);
    drop(live);
    drop(serve);
    assert_eq!(status, 200);
    let series = format!("{{netns=\"{}\",dst=\"{SERVER}\",dport=\"{PORT}\",proto=\"tcp\"}}", lab.server.inode());
    let sample = |family: &str| {
        let name = format!("{family}{series} ");
        metrics.lines().find_map(|l| l.strip_prefix(&name)).map(str::to_string)
    };
    assert_eq!(sample("ctrace_destination_drops_total"), Some(kernel_drops.to_string()), "{metrics}");
    assert_eq!(sample("ctrace_destination_random_source_flood"), Some("1".into()), "{metrics}");
    // Coarse guards: bounded state, bounded memory (live keeps 16,384 rows).
    for (what, kib) in [("live", live_kib), ("serve", serve_kib)] {
        let kib = kib.unwrap_or_else(|| panic!("VmHWM of ctrace {what}"));
        assert!(kib < 256 * 1024, "ctrace {what} peaked at {kib} KiB");
    }
    let flood = &snapshot["flood"];
    eprintln!("kernel: {kernel_drops} drops of {} SYNs; live: {}", flooded.sent, flood["verdict"]);
    check_flood_summary(flood, kernel_drops, distinct(Spoofed::Anywhere, SYNS, 7));
    assert_eq!(flood["prefixes"], serde_json::json!([]), "random sources share no prefix: {flood}");
    assert_eq!(snapshot["kernel"]["lost_events"], 0, "{snapshot}");
    assert!(
        snapshot["kernel"]["reader_woken"].as_u64() > Some(woken_before),
        "no record woke the sleeping reader: {}",
        snapshot["kernel"]
    );
    // Past the 16,384 rows a new source takes one on its second drop: every
    // drop is in a row shown, in the rows not shown, or declined, and with
    // more distinct sources than rows some were.
    let count = |v: &serde_json::Value| v.as_u64().unwrap_or_else(|| panic!("a count: {v}"));
    let shown: u64 = snapshot["top"].as_array().unwrap().iter().map(|r| count(&r["total"])).sum();
    let (others, declined) = (count(&snapshot["others"]), count(&snapshot["declined"]));
    assert_eq!(shown + others + declined, count(&snapshot["total_drops"]), "{snapshot}");
    assert!(declined > 0, "{} distinct sources, no drop declined a row", distinct(Spoofed::Anywhere, SYNS, 7));
}

/// A ring buffer far too small for a flood (16 KiB: about 200 records, and
/// below the smallest wake-up threshold, 64 KiB, so only the 50 ms drain
/// reads it): records are lost, every one is counted, and the totals still
/// add up to the kernel's.
#[test]
fn a_ring_too_small_for_a_flood_counts_every_lost_record() {
    require_root();
    let lab = Lab::new("floodring", &[FILLER]).expect("lab");
    lab.track_connections("ctrace_floodring").unwrap();
    let _listener = lab.listen(PORT).expect("listener");
    let out = TempDir::new("floodring");
    let path = out.0.join("r.json");
    let recording = Recording::start(&path, &["--ring-size", "16"]).expect("ctrace record");

    let flooded = flood_full_table(&lab, Spoofed::LabRange, 3);
    let record = recording.stop().expect("record");
    drop(flooded.table);
    let kernel_drops = flooded.drops;
    let totals = &record["totals"];
    let lost = totals["lost_events"].as_u64().unwrap();
    eprintln!("kernel: {kernel_drops} drops; ctrace decoded {} table_full, lost {lost}", totals["table_full"]);
    assert!(lost > 0, "a 16 KiB ring held a {}-SYN flood: {totals}", flooded.sent);
    assert_eq!(totals["kernel"]["lost_events"], lost, "{totals}");
    // The exact in-kernel count sees every drop, lost record or not.
    assert_eq!(totals["kernel"]["netfilter_drops"], kernel_drops, "{totals}");
    assert_eq!(totals["table_full"].as_u64().unwrap() + lost, kernel_drops, "decoded + lost vs the kernel: {totals}");
    let notes = record["notes"].to_string();
    assert!(notes.contains(&format!("{lost} events were lost")), "the record says so: {notes}");
}
