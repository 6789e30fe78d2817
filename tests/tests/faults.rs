//! ctrace when things go wrong around it: bad record files, a full file
//! system, a SIGKILL in the middle of a storm. Each must end in one clear
//! sentence or in nothing left behind, never in a panic or a half file.
use std::{
    net::Ipv4Addr,
    path::Path,
    process::{Command, Output, Stdio},
};

use ctrace_tests::{
    ctrace_bin, require_root, run, wait_for, wait_for_explained, Daemon, Lab, Sysctl, TempDir, FILL_TIMEOUT,
};

fn ctrace(args: &[&str]) -> Output {
    Command::new(ctrace_bin()).args(args).output().expect("run ctrace")
}

/// An error exit ending in one error sentence (after any progress lines),
/// and no panic. Returns the sentence.
fn assert_one_sentence(out: &Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{what}: {stderr}");
    assert!(!stderr.contains("panicked"), "{what} panicked: {stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("ctrace: error:")).collect();
    assert_eq!(errors.len(), 1, "{what}: one error sentence, not\n{stderr}");
    assert_eq!(stderr.trim_end().lines().last(), Some(errors[0]), "{what}: the error comes last:\n{stderr}");
    errors[0].to_string()
}

#[test]
fn report_rejects_bad_files_in_one_sentence() {
    let dir = TempDir::new("badfiles");
    let good = include_str!("../../ctrace/tests/golden/record.json");
    let cases: Vec<(&str, String)> = vec![
        ("truncated", good[..good.len() / 2].to_string()),
        ("wrong schema", good.replace("ctrace.drops.v2", "someone.else.v7")),
        ("not a record", r#"{"schema": "ctrace.drops.v1", "sources": 5}"#.to_string()),
        ("deeply nested", "[".repeat(100_000)),
        ("empty", String::new()),
        ("binary", String::from_utf8_lossy(&[0xff, 0xfe, 0, 1, 2, 3]).into_owned()),
        // 4 MB of sources whose fields are all of the wrong type.
        (
            "wrong types",
            format!(r#"{{"schema": "ctrace.drops.v1", "sources": [{}]}}"#, vec!["{\"src\": 1}"; 400_000].join(",")),
        ),
    ];
    // Larger than any record: refused before it is read (sparse, so cheap).
    let huge = dir.0.join("huge.json");
    std::fs::File::create(&huge).unwrap().set_len(300 << 20).unwrap();
    let said = assert_one_sentence(&ctrace(&["report", huge.to_str().unwrap()]), "huge");
    assert!(said.contains("larger than any record"), "{said}");
    for (what, text) in cases {
        let path = dir.0.join(format!("{}.json", what.replace(' ', "-")));
        std::fs::write(&path, text).unwrap();
        let out = ctrace(&["report", path.to_str().unwrap()]);
        let said = assert_one_sentence(&out, what);
        assert!(said.contains(&path.display().to_string()), "{what}: names the file: {said}");
        assert!(out.stdout.is_empty(), "{what}: nothing on stdout");
    }
}

/// A tiny tmpfs, unmounted on drop.
struct TinyFs(TempDir);

impl TinyFs {
    fn mount() -> Self {
        let dir = TempDir::new("tinyfs");
        run("mount", &["-t", "tmpfs", "-o", "size=64k", "ctrace-test", dir.0.to_str().unwrap()]).expect("mount tmpfs");
        TinyFs(dir)
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        if let Err(err) = run("umount", &[self.0 .0.to_str().unwrap()]) {
            eprintln!("cleanup: {err:#}");
        }
    }
}

/// Files in `dir` other than `keep`.
fn leftovers(dir: &Path, keep: &[&str]) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !keep.contains(&n.as_str()))
        .collect()
}

#[test]
fn a_full_file_system_gets_one_sentence_and_no_partial_file() {
    require_root();
    let fs = TinyFs::mount();
    // Fill it: the record cannot fit.
    let filler = fs.0 .0.join("filler");
    let _ = std::fs::write(&filler, vec![0u8; 1 << 20]);
    let out_path = fs.0 .0.join("r.json");
    let out = ctrace(&["record", "--duration", "1", "--output", out_path.to_str().unwrap()]);
    let said = assert_one_sentence(&out, "record onto a full file system");
    assert!(said.contains("No space left"), "{said}");
    assert!(!out_path.exists(), "a partial record was left");
    assert_eq!(leftovers(&fs.0 .0, &["filler"]), Vec::<String>::new(), "temporary files left");
}

/// ctrace's kernel programs loaded now (by name, as bpftool lists them).
fn ctrace_programs() -> usize {
    let out = run("bpftool", &["-j", "prog", "show"]).expect("bpftool");
    let progs: serde_json::Value = serde_json::from_str(&out).expect("bpftool json");
    let ours = |name: &str| name == "kfree_skb" || name.starts_with("ct_");
    progs.as_array().map_or(0, |p| p.iter().filter(|p| ours(p["name"].as_str().unwrap_or(""))).count())
}

/// Each long-running command killed with SIGKILL while a storm is being
/// dropped: the kernel unloads its programs (they live only as long as
/// its file descriptors), no temporary file is left, and an earlier output
/// file is untouched.
#[test]
fn sigkill_mid_storm_leaves_no_program_and_no_file() {
    require_root();
    const FILLER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
    const STORM: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
    let lab = Lab::new("kill", &[FILLER, STORM]).expect("lab");
    lab.track_connections("ctrace_kill").unwrap();
    let _listener = lab.listen(8080).unwrap();
    let max = Sysctl::set("net.netfilter.nf_conntrack_max", "64").unwrap();
    let room = 64 - lab.server.conntrack_stat().unwrap().entries;
    let _held: Vec<_> = (0..room).map(|_| lab.connect(FILLER, 8080, FILL_TIMEOUT).expect("fill")).collect();
    let baseline = ctrace_programs();
    let dir = TempDir::new("kill");
    let earlier = dir.0.join("r.json");

    for command in ["record", "live", "serve"] {
        std::fs::write(&earlier, "an earlier record\n").unwrap();
        let args: Vec<String> = match command {
            "record" => vec!["record".into(), "--output".into(), earlier.display().to_string()],
            "live" => vec!["live".into(), "--plain".into()],
            _ => vec!["serve".into(), "--listen".into(), format!("127.0.0.1:{}", ctrace_tests::free_port())],
        };
        let mut daemon =
            Daemon::spawn("ctrace", Command::new(ctrace_bin()).args(&args).stdout(Stdio::null()).stderr(Stdio::null()))
                .unwrap();
        wait_for("ctrace to attach its programs", || {
            daemon.check_running().unwrap();
            (ctrace_programs() > baseline).then_some(())
        });
        lab.syn_burst(STORM, 8080, 200);
        // SAFETY: signalling our own child.
        unsafe { libc::kill(daemon.child.id() as i32, libc::SIGKILL) };
        let _ = daemon.child.wait();
        wait_for("the kernel to unload the killed ctrace's programs", || (ctrace_programs() == baseline).then_some(()));
        assert_eq!(std::fs::read_to_string(&earlier).unwrap(), "an earlier record\n", "{command}: output touched");
        assert_eq!(leftovers(&dir.0, &["r.json"]), Vec::<String>::new(), "{command}: temporary files left");
    }
    drop(max);
}

/// Namespaces made in one `ip -batch` and deleted on drop (also when the
/// test fails).
struct ManyNamespaces(Vec<String>);

impl ManyNamespaces {
    fn create(tag: &str, count: usize) -> Self {
        let names: Vec<String> = (0..count).map(|i| format!("ctrace-{tag}-{}-{i}", std::process::id())).collect();
        let many = ManyNamespaces(names);
        ip_batch(many.0.iter().map(|n| format!("netns add {n}\n")).collect());
        many
    }
}

impl Drop for ManyNamespaces {
    fn drop(&mut self) {
        ip_batch(self.0.iter().map(|n| format!("netns delete {n}\n")).collect());
    }
}

fn ip_batch(commands: String) {
    use std::io::Write as _;
    let mut ip = Command::new("ip").args(["-force", "-batch", "-"]).stdin(Stdio::piped()).spawn().expect("ip");
    ip.stdin.take().expect("piped").write_all(commands.as_bytes()).expect("ip -batch input");
    assert!(ip.wait().expect("ip -batch").success(), "ip -batch failed");
}

/// A process's open conntrack stat files (each pins its namespace).
fn open_stat_files(pid: u32) -> usize {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return 0 };
    fds.flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter(|target| target.ends_with("net/stat/nf_conntrack"))
        .count()
}

/// What a process has open and what namespaces there are: for a hang's message.
fn open_files_seen(pid: u32) -> String {
    let mut targets: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .map(|target| target.display().to_string())
        .collect();
    targets.sort();
    targets.dedup_by(|a, b| a.starts_with("/proc/") && b.starts_with("/proc/") && a.ends_with("nf_conntrack"));
    format!(
        "{} stat files open, {} namespaces on the system, /proc/net/stat/nf_conntrack {}; open files (stat files once): {targets:?}",
        open_stat_files(pid),
        system_namespaces(),
        if Path::new("/proc/net/stat/nf_conntrack").exists() { "exists" } else { "missing" }
    )
}

/// Network namespaces on the system, found as ctrace finds them (named
/// ones, and those of processes).
fn system_namespaces() -> usize {
    use std::os::unix::fs::MetadataExt as _;
    let named = std::fs::read_dir("/run/netns").into_iter().flatten().flatten().map(|e| e.path());
    let of_processes = std::fs::read_dir("/proc").into_iter().flatten().flatten().map(|e| e.path().join("ns/net"));
    named
        .chain(of_processes)
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.ino())
        .collect::<std::collections::HashSet<_>>()
        .len()
}

/// 500 namespaces come and go while `ctrace record` runs: it reads each
/// one's counters while it exists, and lets go of it when it is gone (an
/// open stat file pins a deleted namespace in the kernel), so after every
/// round its open stat files come back to one per namespace there is, and
/// it goes on recording.
#[test]
fn namespaces_that_come_and_go_leave_no_open_files() {
    require_root();
    const ROUNDS: usize = 5;
    const PER_ROUND: usize = 100;
    // Namespaces have conntrack counters only once nf_conntrack is loaded
    // (a module on most kernels, loaded by the first rule that needs it).
    ctrace_tests::ensure_conntrack_loaded();
    let dir = TempDir::new("netnsfd");
    let path = dir.0.join("r.json");
    let mut recording = ctrace_tests::Recording::start(&path, &[]).expect("ctrace record");
    let pid = recording.pid().expect("ctrace pid");
    let mut seen = (0, 0);
    for round in 0..ROUNDS {
        let batch = ManyNamespaces::create(&format!("fd{round}"), PER_ROUND);
        // ctrace samples every namespace's counters once a second: wait
        // until it has the new ones open, so their going is tested.
        wait_for_explained(
            "ctrace to read the new namespaces' counters",
            || {
                recording.assert_running();
                (open_stat_files(pid) > PER_ROUND).then_some(())
            },
            || open_files_seen(pid),
        );
        drop(batch);
        seen = wait_for_explained(
            "ctrace to close the stat files of deleted namespaces",
            || {
                recording.assert_running();
                let (open, namespaces) = (open_stat_files(pid), system_namespaces());
                (open <= namespaces).then_some((open, namespaces))
            },
            || open_files_seen(pid),
        );
    }
    eprintln!(
        "ctrace record: {} stat files open for {} namespaces after {} came and went",
        seen.0,
        seen.1,
        ROUNDS * PER_ROUND
    );
    let record = recording.stop().expect("record after the namespaces");
    assert_eq!(record["schema"], "ctrace.drops.v2");
}
