//! `ctrace doctor` against real incidents in namespaces the tests make: it
//! must name the right finding with the kernel's own numbers, stay quiet
//! about a healthy namespace, and its advice, applied, must work.
use std::{net::Ipv4Addr, time::Duration};

use ctrace_tests::{
    doctor::{check_status, findings_for, namespace, Doctor},
    nft_counter, require_root, run, wait_for, wait_for_explained, Lab, Sysctl, TempDir, FILL_TIMEOUT, SERVER,
};

const FILLER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const STORM_A: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
const STORM_B: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 4);
const SERVICE_PORT: u16 = 8080;
const TABLE_MAX: u64 = 64;

/// Counts SYNs per source before conntrack (raw priority), and turns
/// conntrack on in the namespace.
const RULES: &str = "
table inet ctrace_doctor {
    counter syn_storm_a {}
    counter syn_storm_b {}
    chain raw {
        type filter hook prerouting priority raw; policy accept;
        ip saddr 198.18.0.3 tcp flags & (syn | ack) == syn counter name syn_storm_a
        ip saddr 198.18.0.4 tcp flags & (syn | ack) == syn counter name syn_storm_b
    }
    chain track {
        type filter hook input priority filter; policy accept;
        ct state new counter
    }
}
";

/// A namespace with a few live connections and nothing wrong: no warning
/// about it, and its entries are the kernel's.
#[test]
fn a_healthy_namespace_gets_no_warning() {
    require_root();
    let lab = Lab::new("dochealthy", &[FILLER]).expect("lab");
    lab.track_connections("ctrace_doctor").expect("conntrack on");
    let _listener = lab.listen(SERVICE_PORT).expect("listener");
    let held: Vec<_> = (0..5).map(|_| lab.connect(FILLER, SERVICE_PORT, FILL_TIMEOUT).expect("connect")).collect();
    let doctor = Doctor::start(&lab.server.name);
    let entries = lab.server.conntrack_stat().unwrap().entries;
    let (status, report) = doctor.stop();
    drop(held);

    assert_eq!(report["schema"], "ctrace.doctor.v1");
    check_status(status, &report);
    let netns = lab.server.inode();
    let ns = namespace(&report, netns);
    assert_eq!(ns["entries"], entries, "entries vs the kernel's: {ns:#}");
    assert_eq!(ns["census"]["entries"], entries, "the census counts the kernel's table: {ns:#}");
    let serious: Vec<_> = findings_for(&report, netns).into_iter().filter(|f| f["severity"] != "info").collect();
    assert!(serious.is_empty(), "a healthy namespace got warnings: {serious:#?}");
    assert_eq!(report["evidence"]["namespaces"].as_array().unwrap().len(), 1, "--netns shows one namespace");
}

/// A table-full storm from named clients: critical, with the kernel's drop
/// count and each source's SYNs exact; then doctor's suggested maximum,
/// applied as it says, lets the same storm through with no drop.
#[test]
fn a_full_table_is_critical_and_the_suggested_max_stops_the_drops() {
    require_root();
    let lab = Lab::new("docfull", &[FILLER, STORM_A, STORM_B]).expect("lab");
    let rules = TempDir::new("docrules");
    let rules_file = rules.0.join("rules.nft");
    std::fs::write(&rules_file, RULES).unwrap();
    lab.server.exec("nft", &["-f", rules_file.to_str().unwrap()]).expect("nft rules");
    let _listener = lab.listen(SERVICE_PORT).expect("listener");
    let netns = lab.server.inode();

    let doctor = Doctor::start(&lab.server.name);
    let before = lab.server.conntrack_stat().unwrap();
    let max = Sysctl::set("net.netfilter.nf_conntrack_max", &TABLE_MAX.to_string()).expect("sysctl");
    let room = TABLE_MAX - before.entries;
    let held: Vec<_> = (0..room).map(|_| lab.connect(FILLER, SERVICE_PORT, FILL_TIMEOUT).expect("fill")).collect();
    assert_eq!(lab.server.conntrack_stat().unwrap().entries, TABLE_MAX, "table not full");
    let storm = storm(&lab);
    let after = wait_for("the kernel to drop every storm SYN", || {
        let stat = lab.server.conntrack_stat().unwrap();
        (stat.drop - before.drop >= storm).then_some(stat)
    });
    // Keep the table full until doctor has read every drop (tracepoint
    // tier: a drop is table_full if the table is at max when it is read).
    let (status, report) = doctor.stop();
    let kernel_drops = after.drop - before.drop;
    let syn = |name| nft_counter(&lab.server, "inet", "ctrace_doctor", name).unwrap();
    let syns = syn("syn_storm_a") + syn("syn_storm_b");
    eprintln!("ground truth: {syns} storm SYNs, namespace drop counter +{kernel_drops}");

    assert_eq!(status.code(), Some(2), "a full table is critical: {report:#}");
    check_status(status, &report);
    let ns = namespace(&report, netns);
    assert_eq!(ns["end"]["drop"].as_u64().unwrap() - ns["start"]["drop"].as_u64().unwrap(), kernel_drops);
    assert_eq!(ns["drops"]["table_full"], syns, "ctrace's table_full drops vs the raw table's SYNs: {ns:#}");
    assert_eq!(ns["peak"], TABLE_MAX);
    let found = findings_for(&report, netns);
    let full = found.iter().find(|f| f["id"] == "table_full").unwrap_or_else(|| panic!("no table_full: {found:#?}"));
    assert_eq!(full["severity"], "critical");
    assert!(full["evidence"][0].as_str().unwrap().contains(&format!("+{kernel_drops} ")), "{full:#}");
    let sources = ns["drop_sources"].as_array().unwrap();
    for src in [STORM_A, STORM_B] {
        assert!(sources.iter().any(|s| s[0] == src.to_string()), "{src} not among the dropped sources: {ns:#}");
    }
    let suggested = full["settings"]["net.netfilter.nf_conntrack_max"].as_u64().expect("a suggested max");
    let fix = format!("sysctl -w net.netfilter.nf_conntrack_max={suggested}");
    assert_eq!(full["fix"][0], fix);

    // The advice, as written (the guard above restores the old value).
    run("sh", &["-c", &fix]).expect("apply the suggested max");
    let before = lab.server.conntrack_stat().unwrap();
    let storm_again = storm_held(&lab);
    let after = lab.server.conntrack_stat().unwrap();
    assert_eq!(after.drop - before.drop, 0, "drops with the suggested max {suggested}");
    assert_eq!(after.entries, TABLE_MAX + storm_again.len() as u64, "every storm flow has its entry");
    drop((storm_again, held, max));
}

/// 50 SYNs from two sources that conntrack must drop; returns how many.
fn storm(lab: &Lab) -> u64 {
    (0..50)
        .map(|round| {
            let src = if round % 5 < 3 { STORM_A } else { STORM_B };
            let result = lab.connect(src, SERVICE_PORT, Duration::from_millis(50));
            assert!(result.is_err(), "a connection got through a full table");
        })
        .count() as u64
}

/// The same 50 connections, now expected to open; held open.
fn storm_held(lab: &Lab) -> Vec<socket2::Socket> {
    (0..50)
        .map(|round| {
            let src = if round % 5 < 3 { STORM_A } else { STORM_B };
            lab.connect(src, SERVICE_PORT, FILL_TIMEOUT)
                .unwrap_or_else(|e| panic!("connection {round} to {SERVER} failed with the suggested max: {e}"))
        })
        .collect()
}

/// The namespace's TIME_WAIT entries from the kernel's own table: each
/// one's client port and the seconds it has left.
fn time_wait_entries(lab: &Lab) -> Vec<(u16, u64)> {
    let table = lab.server.proc_net("nf_conntrack").expect("table");
    table
        .lines()
        .filter(|l| l.split_whitespace().nth(5) == Some("TIME_WAIT"))
        .filter_map(|l| {
            let left = l.split_whitespace().nth(4)?.parse().ok()?;
            let sport = l.split_whitespace().find_map(|w| w.strip_prefix("sport="))?.parse().ok()?;
            Some((sport, left))
        })
        .collect()
}

/// Short connections, closed at both ends (the server closes its end at
/// once): their entries go to TIME_WAIT. Returns their client ports, each
/// once: the kernel may give a port again to a later connection, whose
/// entry is then the same one (a CI run waited forever for 5 entries of 4
/// ports).
fn short_connections(lab: &Lab, count: usize) -> Vec<u16> {
    let mut ports: Vec<u16> = (0..count)
        .map(|_| {
            let socket = lab.connect(FILLER, SERVICE_PORT, FILL_TIMEOUT).expect("connect");
            let port = socket.local_addr().unwrap().as_socket().unwrap().port();
            socket.shutdown(std::net::Shutdown::Both).expect("shutdown");
            port
        })
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// A TIME_WAIT pile-up: doctor names the timeout and the shorter value;
/// applied with its own command, new entries hold their slot that long.
#[test]
fn a_time_wait_pile_up_gets_a_shorter_timeout_that_works() {
    require_root();
    const PILE: usize = 120;
    let lab = Lab::new("doctw", &[FILLER]).expect("lab");
    lab.track_connections("ctrace_doctor").expect("conntrack on");
    let listener = std::sync::Arc::new(lab.listen(SERVICE_PORT).expect("listener"));
    let accepting = listener.clone();
    let closer = std::thread::spawn(move || {
        while let Ok((socket, _)) = accepting.accept() {
            drop(socket)
        }
    });
    // The kernel's garbage collector (6.1, 6.12) evicts closing and
    // TIME_WAIT entries, counting no early_drop, while a namespace holds
    // more than max / 100 * 95 entries, in integer arithmetic: 95 for any
    // maximum from 100 to 199. With 128 (and 132) it cut the pile of 120 to
    // 94 in CI guests. 200 puts that line at 190.
    const MAX: u64 = 200;
    let max = Sysctl::set("net.netfilter.nf_conntrack_max", &MAX.to_string()).expect("sysctl");
    // A long TIME_WAIT timeout (the namespace's own, gone with it): the pile
    // must not start to expire before doctor reads it, however slowly a
    // loaded guest makes 120 connections and attaches (the default 120 s
    // ran out in a 6.12 guest sharing 2 cores with another).
    const LONG: u64 = 3600;
    lab.server.exec("sysctl", &["-qw", &format!("net.netfilter.nf_conntrack_tcp_timeout_time_wait={LONG}")]).unwrap();
    let pile_ports = short_connections(&lab, PILE);
    let pile = wait_for_explained(
        "the closed connections to reach TIME_WAIT",
        // What doctor's warning needs (90% of the table in one state), not
        // every connection's fate: one that ends otherwise (a CI guest once
        // kept one out of TIME_WAIT) must not hang the test.
        || {
            let entries = time_wait_entries(&lab);
            (entries.len() >= pile_ports.len() - 4).then_some(entries)
        },
        || {
            let table = lab.server.proc_net("nf_conntrack").unwrap_or_default();
            let missing: Vec<&str> =
                table.lines().filter(|l| l.split_whitespace().nth(5) != Some("TIME_WAIT")).collect();
            format!("{} ports; entries not in TIME_WAIT: {missing:#?}", pile_ports.len())
        },
    );
    assert!(pile.iter().all(|&(_, left)| left > 30), "the pile holds its slots longer than 30 s: {pile:?}");

    let doctor = Doctor::start(&lab.server.name);
    let (status, report) = doctor.stop();
    check_status(status, &report);
    let netns = lab.server.inode();
    let found = findings_for(&report, netns);
    let f = found
        .iter()
        .find(|f| f["id"] == "timeout_holds_slots")
        .unwrap_or_else(|| panic!("no timeout finding: {found:#?}"));
    // A warning once the table is 90% full (the kernel's count), else information.
    let entries = namespace(&report, netns)["entries"].as_u64().unwrap();
    assert_eq!(f["severity"], if entries * 10 >= MAX * 9 { "warning" } else { "info" }, "{f:#}");
    let name = "net.netfilter.nf_conntrack_tcp_timeout_time_wait";
    assert_eq!(f["settings"][name], 30);
    let fix = format!("ip netns exec {} sysctl -w {name}=30", lab.server.name);
    assert_eq!(f["fix"][0], fix);
    assert!(f["evidence"][0].as_str().unwrap().contains(&format!("= {LONG} s")), "{f:#}");

    // The advice, as written: entries made from now on leave within 30 s.
    run("sh", &["-c", &fix]).expect("apply the timeout");
    let new_ports = short_connections(&lab, 5);
    let after = wait_for("the new connections to reach TIME_WAIT", || {
        let entries = time_wait_entries(&lab);
        let new: Vec<u64> =
            entries.iter().filter(|(sport, _)| new_ports.contains(sport)).map(|&(_, left)| left).collect();
        (new.len() == new_ports.len()).then_some(new)
    });
    assert!(after.iter().all(|&left| left <= 30), "new TIME_WAIT entries hold at most 30 s: {after:?}");
    eprintln!(
        "TIME_WAIT entries: {} before the fix with {}-{} s left (timeout {LONG} s); {} after it with {:?} s left",
        pile.len(),
        pile.iter().map(|e| e.1).min().unwrap(),
        pile.iter().map(|e| e.1).max().unwrap(),
        after.len(),
        after
    );
    // The report's NOTRACK advice for the port, its nft commands run as
    // printed: new connections to it work and make no entry at all. The
    // kernel's /proc listing of the table can skip entries when other
    // namespaces' entries leave meanwhile (6.1, 6.12): the finding then
    // rests on the port's share of what was listed, and says so. A listing
    // that stayed short is reported, with the evidence, not failed; with a
    // complete listing the finding must be there.
    let ns = namespace(&report, netns);
    let census = &ns["census"];
    let listed = census["entries"].as_u64().unwrap();
    let counted = census["kernel_entries"].as_u64().expect("the kernel's count beside the census");
    let Some(notrack) = found.iter().find(|f| f["id"] == "notrack_candidate") else {
        assert!(listed != counted, "no notrack finding with a complete listing; namespace evidence: {ns:#}");
        eprintln!("NOT EXERCISED: no notrack finding from a listing of {listed} of {counted} entries: {ns:#}");
        listener.shutdown(std::net::Shutdown::Read).expect("shut the listener");
        closer.join().expect("closer thread");
        return;
    };
    let says_short =
        notrack["evidence"].as_array().unwrap().iter().any(|e| e.as_str().unwrap().contains("the kernel listed"));
    assert_eq!(says_short, listed * 50 < counted * 49, "listed {listed} of {counted}: {notrack:#}");
    let commands: Vec<&str> = notrack["fix"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .filter(|c| c.starts_with("ip netns exec") && c.contains(" nft "))
        .collect();
    assert_eq!(commands.len(), 5, "table, two chains, two rules: {notrack:#}");
    for command in &commands {
        run("sh", &["-c", command]).unwrap_or_else(|e| panic!("{command}: {e:#}"));
    }
    // The kernel may give a new connection a client port of the pile, whose
    // entry (3600 s) is still there: only fresh ports can tell.
    let untracked: Vec<u16> =
        short_connections(&lab, 10).into_iter().filter(|p| !pile_ports.contains(p) && !new_ports.contains(p)).collect();
    assert!(!untracked.is_empty(), "every new connection reused a port of the pile");
    let table = lab.server.proc_net("nf_conntrack").expect("table");
    let in_table = |ports: &[u16]| -> Vec<u16> {
        ports.iter().copied().filter(|p| table.contains(&format!("sport={p} dport={SERVICE_PORT}"))).collect()
    };
    assert_eq!(in_table(&new_ports), new_ports, "the connections before the rules are found in the table");
    let tracked = in_table(&untracked);
    assert!(tracked.is_empty(), "connections tracked despite the notrack rules: {tracked:?}");
    eprintln!("notrack applied: {} new connections, none in the table", untracked.len());

    // Wakes the accept loop (shutting a listener down ends its accept).
    listener.shutdown(std::net::Shutdown::Read).expect("shut the listener");
    closer.join().expect("closer thread");
    drop(max);
}
