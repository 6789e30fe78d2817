//! `ctrace live` as a person uses it: in a real terminal (tmux, fixed size)
//! during a table-full storm, read off the screen, driven by keys.
use std::{
    net::Ipv4Addr,
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use ctrace_tests::{ctrace_bin, require_root, Lab, Sysctl, FILL_TIMEOUT, HANG};

const FILLER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const STORM_A: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
const STORM_B: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 4);
const PORT: u16 = 8080;
const TABLE_MAX: u64 = 64;

/// A tmux server of our own, killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(command: &str) -> Self {
        let tmux = Tmux { socket: format!("ctrace-test-{}", std::process::id()) };
        tmux.run(&["new-session", "-d", "-s", "live", "-x", "150", "-y", "50", command]);
        tmux
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux").args(["-L", &self.socket]).args(args).output().expect("tmux");
        assert!(out.status.success(), "tmux {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "live"])
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "live"];
        args.extend_from_slice(keys);
        self.run(&args);
    }

    /// Waits until the screen satisfies `pred`, returning it. Only a hang
    /// fails: attaching takes seconds under an emulated CPU.
    fn wait_for(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let started = Instant::now();
        loop {
            let screen = self.screen();
            if pred(&screen) {
                eprintln!("screen shows {what} after {:.1} s", started.elapsed().as_secs_f64());
                return screen;
            }
            assert!(started.elapsed() < HANG, "waited {HANG:?} for {what}: a hang; screen:\n{screen}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux").args(["-L", &self.socket, "kill-server"]).output();
    }
}

/// Rows of the top table, in screen order.
fn top_rows(screen: &str) -> Vec<&str> {
    screen.lines().skip_while(|l| !l.starts_with("SOURCE")).skip(1).take_while(|l| l.contains("198.18.")).collect()
}

#[test]
fn live_view_shows_the_storm_and_answers_keys() {
    require_root();
    assert!(Command::new("tmux").arg("-V").output().is_ok(), "tmux is not installed: run `cargo xtask setup`");
    let lab = Lab::new("live", &[FILLER, STORM_A, STORM_B]).expect("lab");
    lab.track_connections("ctrace_live").unwrap();
    let _listener = lab.listen(PORT).expect("listener");

    // ctrace starts first, so the conntrack hooks (where the kernel has them)
    // see the table being filled.
    let bin = ctrace_bin();
    let tmux = Tmux::start(&format!("sh -c '{} live; echo ctrace-exit=$?; sleep 60'", bin.display()));
    tmux.wait_for("ctrace to attach", |s| s.contains("TOP DROPPED"));
    let max = Sysctl::set("net.netfilter.nf_conntrack_max", &TABLE_MAX.to_string()).expect("sysctl");
    let room = TABLE_MAX - lab.server.conntrack_stat().unwrap().entries;
    let _held: Vec<_> = (0..room)
        .map(|i| lab.connect(FILLER, PORT, FILL_TIMEOUT).unwrap_or_else(|e| panic!("fill {i}: {e}")))
        .collect();

    // The storm runs until the test is done with the screen: two SYNs from A
    // for every one from B.
    let stop = Arc::new(AtomicBool::new(false));
    std::thread::scope(|scope| {
        let storm_stop = stop.clone();
        let lab = &lab;
        scope.spawn(move || {
            let mut round = 0u64;
            while !storm_stop.load(Ordering::Relaxed) {
                let src = if round % 3 == 2 { STORM_B } else { STORM_A };
                assert!(lab.connect(src, PORT, Duration::from_millis(20)).is_err(), "a SYN got through a full table");
                round += 1;
            }
        });
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drive_the_view(&tmux)));
        stop.store(true, Ordering::Relaxed);
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    });
    drop(max);
}

fn drive_the_view(tmux: &Tmux) {
    // The storm sources lead the table, as table_full, and the gauge says full.
    let screen = tmux.wait_for("both storm sources on screen", |s| {
        let rows = top_rows(s);
        rows.len() >= 2 && rows.iter().take(2).all(|r| r.contains("table_full"))
    });
    let rows = top_rows(&screen);
    let leaders: Vec<bool> =
        rows.iter().take(2).map(|r| r.contains(&STORM_A.to_string()) || r.contains(&STORM_B.to_string())).collect();
    assert_eq!(leaders, [true, true], "storm sources are not the top rows:\n{screen}");
    assert!(rows.iter().all(|r| !r.contains(&FILLER.to_string())), "the filler shows as dropped:\n{screen}");
    assert!(rows[0].contains("SYN_SENT") && rows[0].contains(&PORT.to_string()), "{screen}");
    let gauge = screen.lines().find(|l| l.contains("ctrace-live-srv")).unwrap_or_else(|| panic!("no gauge:\n{screen}"));
    assert!(gauge.contains("64/64") && gauge.contains("FULL"), "gauge: {gauge}");

    // Who fills the table: the filler's 64 entries, from the kernel's own
    // table on every tier; where the conntrack hooks run, also its 64
    // insertions.
    let hooked = screen.contains("tier: kprobe") || screen.contains("tier: fentry");
    // (Until the first count of the table, the hook tiers show the hooks' own rows.)
    let census_row = |l: &&str| l.contains(&FILLER.to_string()) && l.contains("ESTABLISHED");
    let screen = tmux.wait_for("the filler in the table census", |s| {
        s.lines().skip_while(|l| !l.starts_with("WHO FILLS")).any(|l| census_row(&l))
    });
    let row = screen.lines().skip_while(|l| !l.starts_with("WHO FILLS")).find(census_row).unwrap().to_string();
    if let Some(keep) = std::env::var_os("CTRACE_KEEP_SCREEN") {
        std::fs::write(keep, &screen).expect("keep the screen");
    }
    let words: Vec<&str> = row.split_whitespace().collect();
    // SOURCE PROTO NETNS ENTRIES INSERTED REMOVED BY-STATE...
    assert_eq!(words[3], TABLE_MAX.to_string(), "the filler's entries in the table: {row}");
    assert!(row.contains(&format!("ESTABLISHED {TABLE_MAX}")), "held connections are ESTABLISHED: {row}");
    let inserted = if hooked { TABLE_MAX.to_string() } else { "-".to_string() };
    assert_eq!(words[4], inserted, "insertions seen by the hooks: {row}");

    // s: sort by the next column.
    tmux.keys(&["s"]);
    tmux.wait_for("sorting by total", |s| s.contains("by total"));

    // /: a filter keeps only storm B.
    tmux.keys(&["/", &STORM_B.to_string(), "Enter"]);
    let screen = tmux.wait_for("the filter applied", |s| s.contains(&format!("filter: {STORM_B}")));
    let rows = top_rows(&screen);
    assert!(!rows.is_empty() && rows.iter().all(|r| r.contains(&STORM_B.to_string())), "filter let through:\n{screen}");

    // ?: help, then any key closes it.
    tmux.keys(&["?"]);
    // (A line only the help has: the destinations panel speaks of source prefixes too.)
    tmux.wait_for("help", |s| s.contains("reset counts and history"));
    tmux.keys(&["x"]);
    tmux.wait_for("help closed", |s| !s.contains("reset counts and history"));

    // q: a clean exit, the terminal back from the alternate screen.
    tmux.keys(&["q"]);
    let screen = tmux.wait_for("ctrace to exit", |s| s.contains("ctrace-exit="));
    assert!(screen.contains("ctrace-exit=0"), "{screen}");
    assert!(!screen.contains("TOP DROPPED"), "the view was left on screen:\n{screen}");
    assert_eq!(
        tmux.run(&["display", "-p", "-t", "live", "#{alternate_on}"]).trim(),
        "0",
        "still on the alternate screen"
    );
}
