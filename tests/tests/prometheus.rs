//! `ctrace serve` scraped by a real Prometheus during a namespace storm: the
//! per-source counter Prometheus stores equals the kernel's ground truth.
use std::{net::Ipv4Addr, time::Duration};

use ctrace_tests::{
    http_get, nft_counter, now_unix, prometheus, require_root, serve, url_encode, wait_for, Lab, Sysctl, TempDir,
    FILL_TIMEOUT,
};

const FILLER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const STORM: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
const PORT: u16 = 8080;
const TABLE_MAX: u64 = 64;

/// The latest value and its timestamp of an instant query, if any.
fn query(prom_port: u16, promql: &str) -> Option<(f64, f64)> {
    let (status, body) = http_get(prom_port, &format!("/api/v1/query?query={}", url_encode(promql))).ok()?;
    if status != 200 {
        return None;
    }
    let json: serde_json::Value = serde_json::from_str(&body).ok()?;
    let sample = &json["data"]["result"][0]["value"];
    Some((sample[1].as_str()?.parse().ok()?, sample[0].as_f64()?))
}

#[test]
fn prometheus_scrapes_per_source_drops_equal_to_the_kernel() {
    require_root();
    let lab = Lab::new("prom", &[FILLER, STORM]).expect("lab");
    lab.count_syns("ctrace_prom", STORM).expect("rules");
    let dir = TempDir::new("prom");
    let _listener = lab.listen(PORT).expect("listener");

    let (mut ctrace, ctrace_port) = serve().expect("ctrace serve");

    // Prometheus scraping it every second, on its own port and storage.
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: ctrace\n    \
         static_configs:\n      - targets: ['127.0.0.1:{ctrace_port}']\n"
    );
    let (_prometheus, prom_port) = prometheus(&dir.0, &config);

    // The incident: a full table, then a storm from one source.
    let max = Sysctl::set("net.netfilter.nf_conntrack_max", &TABLE_MAX.to_string()).unwrap();
    let room = TABLE_MAX - lab.server.conntrack_stat().unwrap().entries;
    let held: Vec<_> = (0..room).map(|_| lab.connect(FILLER, PORT, FILL_TIMEOUT).expect("fill")).collect();
    let before_storm = lab.server.conntrack_stat().unwrap();
    for _ in 0..40 {
        assert!(lab.connect(STORM, PORT, Duration::from_millis(30)).is_err(), "SYN got through a full table");
    }
    // Every SYN dropped (the last may still wait in the softirq backlog
    // when connect gives up); from here on, a scrape sees them all.
    wait_for("the kernel to drop every storm SYN", || {
        (lab.server.conntrack_stat().unwrap().drop - before_storm.drop >= 40).then_some(())
    });
    let storm_end = now_unix();
    // On the tracepoint tier a drop is table_full if the table is at max
    // when ctrace reads the record (up to 50 ms later): keep the table
    // full until it has read them all (a scrape reads what is waiting first).
    http_get(ctrace_port, "/metrics").expect("a scrape of ctrace");
    drop(max);
    let truth = nft_counter(&lab.server, "inet", "ctrace_prom", "syn_storm").unwrap();
    let kernel_drop = lab.server.conntrack_stat().unwrap().drop;

    // Wait for a sample scraped after the storm had been counted: the
    // sample's own time (timestamp()), not the query's, which a delayed
    // scrape leaves behind. Asked first, so the value read next is from
    // that scrape or a later one.
    let per_source = format!("ctrace_source_drops_total{{src=\"{STORM}\",reason=\"table_full\",dport=\"{PORT}\"}}");
    let scraped = wait_for("a scrape after the storm", || {
        ctrace.check_running().unwrap();
        let (scraped_at, _) = query(prom_port, &format!("timestamp({per_source})"))?;
        if scraped_at <= storm_end {
            return None;
        }
        query(prom_port, &per_source).map(|(value, _)| value)
    });
    drop(held);
    eprintln!("ground truth {truth} SYNs from {STORM}; Prometheus has {scraped}");
    assert_eq!(scraped, truth as f64, "Prometheus's per-source counter vs the raw-table SYN counter");

    // The namespace's own counter comes through unchanged too.
    let netns = lab.server.inode();
    let (value, _) =
        query(prom_port, &format!("ctrace_conntrack_drop_total{{netns=\"{netns}\"}}")).expect("netns counter");
    assert_eq!(value, kernel_drop as f64, "ctrace_conntrack_drop_total vs the namespace's drop counter");
    let (value, _) =
        query(prom_port, &format!("ctrace_drops_total{{netns=\"{netns}\",reason=\"table_full\"}}")).unwrap();
    assert_eq!(value, truth as f64);
    // Where the conntrack hooks run, the filler's connections were counted as insertions.
    if let Some((inserts, _)) = query(prom_port, "ctrace_conntrack_events_total{event=\"insert\"}") {
        assert_eq!(inserts, TABLE_MAX as f64, "insertions: the 64 filling connections");
    }
}
