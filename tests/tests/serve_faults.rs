//! `ctrace serve` when clients misbehave during an incident.
use std::net::{Ipv4Addr, TcpStream};

use ctrace_tests::{http_get, require_root, serve, wait_for, Lab, Sysctl, FILL_TIMEOUT};

const FILLER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const STORM: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
const PORT: u16 = 8080;
const TABLE_MAX: u64 = 64;
const SYN: u8 = 0x02;
/// More SYNs than the 4 MiB ring buffer holds records (about 52,000): if
/// nobody drained it during the storm, records would be lost.
const STORM_SYNS: u32 = 70_000;

/// The value of the first sample whose line starts with `name{` or `name `
/// and contains every one of `labels`.
fn sample(body: &str, name: &str, labels: &[&str]) -> Option<f64> {
    body.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .find(|l| labels.iter().all(|label| l.contains(label)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// 100 clients connect to `serve` and send nothing (a stuck scraper, a
/// port scan) while a flood of SYNs hits a full table. The engine must go
/// on draining the ring buffer: no event lost, and once a scrape gets
/// through, its count equals the kernel's.
#[test]
fn idle_clients_do_not_stall_the_engine() {
    require_root();
    let lab = Lab::new("idle", &[FILLER, STORM]).expect("lab");
    lab.track_connections("ctrace_idle").unwrap();
    let _listener = lab.listen(PORT).expect("listener");

    let (mut ctrace, port) = serve().expect("ctrace serve");

    // Connected, silent, held through the storm.
    let idle: Vec<TcpStream> = (0..100)
        .map(|i| TcpStream::connect(("127.0.0.1", port)).unwrap_or_else(|e| panic!("client {i}: {e}")))
        .collect();

    let max = Sysctl::set("net.netfilter.nf_conntrack_max", &TABLE_MAX.to_string()).unwrap();
    let room = TABLE_MAX - lab.server.conntrack_stat().unwrap().entries;
    let held: Vec<_> = (0..room).map(|_| lab.connect(FILLER, PORT, FILL_TIMEOUT).expect("fill")).collect();
    let before = lab.server.conntrack_stat().unwrap();
    let sent = lab.tcp_raw(STORM, PORT, SYN, STORM_SYNS).unwrap();
    let after = wait_for("the kernel to drop every SYN", || {
        let stat = lab.server.conntrack_stat().unwrap();
        (stat.drop - before.drop >= sent as u64).then_some(stat)
    });
    let kernel_drops = after.drop - before.drop;
    ctrace.check_running().unwrap();

    // A scraper retries when turned away (the idle clients may hold every
    // slot until their time to send a request runs out).
    let body = wait_for("a scrape to be answered", || match http_get(port, "/metrics") {
        Ok((200, body)) => Some(body),
        _ => None,
    });
    // Only now: on the tracepoint tier a drop is table_full if the table is
    // at max when ctrace reads the record, which a scrape makes it do.
    drop(max);
    drop(idle);
    drop(held);
    let lost = sample(&body, "ctrace_lost_events_total", &[]).expect("ctrace_lost_events_total");
    let storm = sample(&body, "ctrace_source_drops_total", &[&format!("src=\"{STORM}\""), "reason=\"table_full\""])
        .expect("the storm source's series");
    eprintln!("kernel: {kernel_drops} drops of {sent} SYNs; ctrace: {storm} from {STORM}, {lost} lost");
    assert_eq!(lost, 0.0, "the ring buffer was not drained while clients were idle");
    assert_eq!(storm, kernel_drops as f64, "ctrace's per-source count vs the namespace's drop counter");
    assert_eq!(kernel_drops, sent as u64, "every SYN was dropped (kernel)");
}
