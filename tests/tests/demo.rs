//! `ctrace demo`: each scenario makes its incident for real, `doctor`
//! names it with the kernel's numbers, and nothing is left behind, also
//! after a SIGKILL and `--cleanup`.
//!
//! The demo lowers nf_conntrack_max (machine-wide) for its run, so these
//! tests run one at a time like every privileged test here.
use std::{
    mem::ManuallyDrop,
    path::Path,
    process::{Child, Command, ExitStatus},
    sync::mpsc,
};

use ctrace_tests::{
    ctrace_bin,
    doctor::{check_status, findings_for, namespace, Doctor},
    kfree_skb_has_reason, require_root, spawn_reading_stderr, wait_for, ConntrackStat, Netns, HANG,
};
use serde_json::Value;

const SERVER_NS: &str = "ctrace-demo-srv";
const CLIENT_NS: &str = "ctrace-demo-cli";
const STATE_FILE: &str = "/run/ctrace-demo.state";
const LOWER_MAX: &str = "256";

fn conntrack_max() -> String {
    ctrace_tests::ensure_conntrack_loaded();
    std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max").unwrap().trim().to_string()
}

fn nothing_left(max_before: &str) {
    assert!(!Path::new("/run/netns").join(SERVER_NS).exists(), "{SERVER_NS} left behind");
    assert!(!Path::new("/run/netns").join(CLIENT_NS).exists(), "{CLIENT_NS} left behind");
    assert!(!Path::new(STATE_FILE).exists(), "{STATE_FILE} left behind");
    assert_eq!(conntrack_max(), max_before, "nf_conntrack_max not restored");
}

/// The demo namespace's counters (read, not owned: the demo removes it).
fn demo_stat() -> ConntrackStat {
    let ns = ManuallyDrop::new(Netns { name: SERVER_NS.to_string() });
    ns.conntrack_stat().expect("demo namespace counters")
}

/// A running `ctrace demo`; killed and cleaned up on drop if still running.
struct Demo {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Demo {
    fn start(args: &[&str]) -> Self {
        let (child, lines) = spawn_reading_stderr(Command::new(ctrace_bin()).arg("demo").args(args), "demo");
        Demo { child, lines }
    }

    /// Waits for a line of the demo's containing `text`.
    fn wait_for_line(&mut self, text: &str) -> String {
        loop {
            match self.lines.recv_timeout(HANG) {
                Ok(line) if line.contains(text) => return line,
                Ok(_) => {}
                Err(_) => panic!("the demo never said {text:?} (exit {:?})", self.child.try_wait()),
            }
        }
    }

    fn interrupt(&mut self) -> ExitStatus {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        self.child.wait().expect("wait for the demo")
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if Path::new("/run/netns").join(SERVER_NS).exists() || Path::new(STATE_FILE).exists() {
            let _ = Command::new(ctrace_bin()).args(["demo", "--cleanup"]).status();
        }
    }
}

/// Runs `scenario` with doctor watching from before it starts, until the
/// traffic stops; returns doctor's report, its exit status and the demo
/// namespace's counters (the kernel's) at that point.
fn scenario_under_doctor(scenario: &str, duration: &str) -> (ExitStatus, Value, ConntrackStat, u32) {
    scenario_under_doctor_with(&["--scenario", scenario, "--duration", duration, "--lower-max", LOWER_MAX], &[])
}

/// As [`scenario_under_doctor`], with the demo's and doctor's arguments as given.
fn scenario_under_doctor_with(args: &[&str], doctor_args: &[&str]) -> (ExitStatus, Value, ConntrackStat, u32) {
    let max_before = conntrack_max();
    // doctor resolves --netns at the end of its window: the namespace is
    // made after it starts, so it sees the whole incident.
    let doctor = Doctor::start_with(SERVER_NS, doctor_args);
    let mut demo = Demo::start(&[args, &["--keep"]].concat());
    demo.wait_for_line("traffic stopped");
    // Packets still queued when the senders stopped: until the counters rest.
    let mut last = demo_stat();
    let stat = wait_for("the demo namespace's counters to stop moving", || {
        let now = demo_stat();
        let rested = now == last;
        last = now;
        rested.then_some(now)
    });
    let inode = ManuallyDrop::new(Netns { name: SERVER_NS.to_string() }).inode();
    let (status, report) = doctor.stop();
    assert!(demo.interrupt().success(), "the demo failed");
    nothing_left(&max_before);
    check_status(status, &report);
    (status, report, stat, inode)
}

fn finding<'a>(report: &'a Value, netns: u32, id: &str) -> &'a Value {
    let found = findings_for(report, netns);
    found.into_iter().find(|f| f["id"] == id).unwrap_or_else(|| panic!("no {id} finding in {report:#}"))
}

#[test]
fn table_full_demo_is_named_with_the_kernels_drops() {
    require_root();
    let (status, report, stat, netns) = scenario_under_doctor("table-full", "2");
    assert_eq!(status.code(), Some(2), "critical");
    let ns = namespace(&report, netns);
    // The namespace is younger than the window: its counters are totals.
    assert_eq!(ns["end"]["drop"], stat.drop, "doctor's end counters are the kernel's: {ns:#}");
    assert!(stat.drop > 0, "the demo made no drops");
    let conntrack: u64 = ["table_full", "conntrack_other"].iter().map(|r| ns["drops"][r].as_u64().unwrap_or(0)).sum();
    assert_eq!(conntrack, stat.drop, "every drop attributed: {ns:#}");
    // The hook tiers see the table refuse; the tracepoint tier samples the
    // table, which early drops keep moving around its maximum.
    if report["evidence"]["tier"] != "tracepoint" {
        assert_eq!(ns["drops"]["table_full"], stat.drop, "hook tiers: every drop is table_full: {ns:#}");
    }
    let f = finding(&report, netns, "table_full");
    assert_eq!(f["severity"], "critical");
    let sources: Vec<&str> = ns["drop_sources"].as_array().unwrap().iter().map(|s| s[0].as_str().unwrap()).collect();
    assert_eq!(sources.len(), 2, "the two named storm sources: {sources:?}");
    assert!(sources.contains(&"198.18.0.3") && sources.contains(&"198.18.0.4"), "{sources:?}");
    assert_eq!(ns["peak"].as_u64().unwrap().to_string(), LOWER_MAX);
}

#[test]
fn time_wait_demo_gets_the_time_wait_timeout_finding() {
    require_root();
    let (_, report, stat, netns) = scenario_under_doctor("time-wait", "3");
    let f = finding(&report, netns, "timeout_holds_slots");
    assert_eq!(f["settings"]["net.netfilter.nf_conntrack_tcp_timeout_time_wait"], 30, "{f:#}");
    let census = &namespace(&report, netns)["census"];
    let time_wait = census["by_state"]["TIME_WAIT"].as_u64().unwrap();
    assert!(time_wait * 2 >= census["entries"].as_u64().unwrap(), "TIME_WAIT holds most of the table: {census:#}");
    eprintln!("time-wait demo: {time_wait} TIME_WAIT entries, table {} (kernel)", stat.entries);
}

#[test]
fn syn_flood_demo_is_named_a_random_source_flood() {
    require_root();
    let (status, report, stat, netns) = scenario_under_doctor("syn-flood", "2");
    assert_eq!(status.code(), Some(2));
    let ns = namespace(&report, netns);
    assert_eq!(ns["end"]["drop"], stat.drop);
    let f = finding(&report, netns, "table_full");
    let evidence: Vec<&str> = f["evidence"].as_array().unwrap().iter().map(|e| e.as_str().unwrap()).collect();
    assert!(evidence.iter().any(|e| e.contains("random-source flood")), "{evidence:#?}");
    eprintln!("syn-flood demo: {} drops, about {} distinct sources", stat.drop, ns["distinct_drop_sources"]);
}

#[test]
fn invalid_demo_matches_the_kernels_invalid_counter() {
    require_root();
    // Before the drop reason (5.10), a rule's drop is freed where
    // conntrack's are: only the invalid hooks tell them apart.
    let doctor_args: &[&str] = if kfree_skb_has_reason() {
        &[]
    } else {
        eprintln!("this kernel's kfree_skb has no drop reason: doctor runs with --invalid to tell the rule's drops");
        &["--invalid"]
    };
    let demo_args = ["--scenario", "invalid", "--duration", "2", "--lower-max", LOWER_MAX];
    let (_, report, stat, netns) = scenario_under_doctor_with(&demo_args, doctor_args);
    assert!(stat.invalid > 0, "no invalid packets");
    let ns = namespace(&report, netns);
    assert_eq!(ns["end"]["invalid"], stat.invalid, "{ns:#}");
    let f = finding(&report, netns, "invalid");
    assert!(f["summary"].as_str().unwrap().contains(&format!("found {} packets invalid", stat.invalid)), "{f:#}");
    // The demo's `ct state invalid drop` rule dropped each one.
    assert_eq!(ns["drops"]["ruleset"], stat.invalid, "{ns:#}");
}

/// The DNS race: the demo's lookups send A and AAAA from one socket on two
/// CPUs at once; the kernel's clashres (and insert_failed, where it cannot
/// settle one) counts the races, and doctor reports exactly that. No
/// lowered maximum: the lookups' entries leave on their own.
#[test]
fn dns_race_demo_is_named_with_the_kernels_clash_count() {
    require_root();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        eprintln!("NOT EXERCISED: the race needs two CPUs and this machine has {cpus}");
        let out = Command::new(ctrace_bin()).args(["demo", "--scenario", "dns-race", "--duration", "1"]).output();
        let out = out.expect("ctrace demo");
        assert!(String::from_utf8_lossy(&out.stderr).contains("needs two CPUs"), "the demo says why it cannot race");
        return;
    }
    let (_, report, stat, netns) = scenario_under_doctor_with(&["--scenario", "dns-race", "--duration", "3"], &[]);
    let races = stat.clash_resolve + stat.insert_failed;
    eprintln!(
        "dns-race demo: kernel clashres {}, insert_failed {}, drop {}; tier {}",
        stat.clash_resolve, stat.insert_failed, stat.drop, report["evidence"]["tier"]
    );
    assert!(races > 0, "no lookup raced in 3 s on {cpus} CPUs");
    let ns = namespace(&report, netns);
    // The namespace is younger than the window: its counters are totals.
    assert_eq!(ns["end"]["clash_resolve"], stat.clash_resolve, "{ns:#}");
    assert_eq!(ns["end"]["insert_failed"], stat.insert_failed, "{ns:#}");
    if stat.clash_resolve > 0 {
        let hooks = report["evidence"]["tier"] != "tracepoint";
        let id = if hooks { "dns_race_resolved" } else { "clash_resolved" };
        let found = findings_for(&report, netns);
        let f = found
            .iter()
            .find(|f| f["id"] == "dns_race_resolved" || f["id"] == id)
            .unwrap_or_else(|| panic!("no race finding: {found:#?}"));
        assert_eq!(f["severity"], "info");
        assert!(f["evidence"][0].as_str().unwrap().starts_with(&format!("clashres counter +{}", stat.clash_resolve)));
        if hooks {
            // The hooks saw each settled race, on the DNS port.
            let raced = format!("raced to: udp/53 {}", stat.clash_resolve);
            assert_eq!(f["evidence"][1], raced.as_str(), "{f:#}");
        }
    }
    if stat.insert_failed > 0 {
        assert_eq!(finding(&report, netns, "dns_insert_race")["severity"], "warning");
    }
}

/// SIGKILL leaves the namespaces and the lowered maximum; `--cleanup`
/// removes and restores them; a second `--cleanup` has nothing to do.
#[test]
fn a_killed_demo_is_cleaned_up_by_cleanup() {
    require_root();
    let max_before = conntrack_max();
    let mut demo = Demo::start(&["--scenario", "table-full", "--lower-max", LOWER_MAX, "--duration", "600"]);
    demo.wait_for_line("running table-full");
    demo.child.kill().expect("SIGKILL");
    demo.child.wait().unwrap();
    assert!(Path::new("/run/netns").join(SERVER_NS).exists(), "the kill left the namespace (as expected)");
    assert_eq!(conntrack_max(), LOWER_MAX);
    let refused = Command::new(ctrace_bin()).args(["demo", "--duration", "1"]).output().unwrap();
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--cleanup"), "a second demo says how to clean up");
    let cleanup = Command::new(ctrace_bin()).args(["demo", "--cleanup"]).output().unwrap();
    assert!(cleanup.status.success(), "{}", String::from_utf8_lossy(&cleanup.stderr));
    nothing_left(&max_before);
    let again = Command::new(ctrace_bin()).args(["demo", "--cleanup"]).output().unwrap();
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("nothing to clean up"));
}
