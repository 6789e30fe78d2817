//! Which container is dropped, and which fills the table: real Podman
//! containers on a Podman network inside 198.18.0.0/15, a table filled and
//! stormed between them, and ctrace naming every party by its container
//! name; and a Kubernetes pod's layout (kubelet directory, pod cgroup) built
//! around a real namespace.
use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use ctrace_tests::{
    ctrace_bin, nft_counter, require_podman, require_root, skipped_in_guest, wait_for, Netns, Recording, Sysctl,
    TempDir, FILL_TIMEOUT,
};
use serde_json::Value;
use socket2::{Domain, Socket, Type};

const PORT: u16 = 8080;
const TABLE_MAX: u64 = 64;
const SUBNET: &str = "198.18.9.0/24";
const SERVER: Ipv4Addr = Ipv4Addr::new(198, 18, 9, 10);
const CLIENT_A: Ipv4Addr = Ipv4Addr::new(198, 18, 9, 11);
const CLIENT_B: Ipv4Addr = Ipv4Addr::new(198, 18, 9, 12);

/// How podman runs here (docs/containers: runc, explicit rlimits).
const PODMAN_RUN: &[&str] =
    &["run", "-d", "--runtime", "runc", "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096"];

fn podman(args: &[&str]) -> String {
    let out = Command::new("podman").args(args).stderr(Stdio::piped()).output().expect("podman");
    assert!(out.status.success(), "podman {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A busybox image, a network and containers made for the test; all removed
/// on drop, with the firewall tables netavark made in the host's namespace
/// (they would keep conntrack tracking the host's own traffic, loopback
/// included, long after the test).
struct Podman {
    image: String,
    network: String,
    containers: Vec<String>,
    host_tables_before: Vec<String>,
}

/// The host namespace's nftables tables, as `FAMILY NAME`.
fn host_tables() -> Vec<String> {
    let out = Command::new("nft").args(["list", "tables"]).output().expect("nft");
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.strip_prefix("table ").map(str::to_string)).collect()
}

impl Podman {
    /// The image: a static busybox imported from a tar (no registry here).
    fn new(dir: &Path) -> Self {
        let tag = std::process::id();
        let root = dir.join("rootfs/bin");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::copy("/bin/busybox", root.join("busybox")).expect("busybox-static (cargo xtask setup)");
        std::os::unix::fs::symlink("busybox", root.join("sleep")).unwrap();
        let tar = dir.join("rootfs.tar");
        let ok = Command::new("tar").arg("-C").arg(dir.join("rootfs")).arg("-cf").arg(&tar).arg(".").status();
        assert!(ok.is_ok_and(|s| s.success()), "tar");
        let image = format!("localhost/ctrace-busybox:{tag}");
        let network = format!("ctrace-wl-{tag}");
        let images = Podman { image, network, containers: Vec::new(), host_tables_before: host_tables() };
        podman(&["import", "-q", tar.to_str().unwrap(), &images.image]);
        // Never podman's default 10.88.0.0/16: test traffic stays in 198.18.0.0/15.
        podman(&["network", "create", "--subnet", SUBNET, "--disable-dns", &images.network]);
        images
    }

    /// A container that only holds its namespace (the test enters it).
    fn start(&mut self, name: &str, ip: Ipv4Addr) -> (String, u32) {
        self.containers.push(name.to_string());
        let mut args = PODMAN_RUN.to_vec();
        let ip = ip.to_string();
        args.extend(["--name", name, "--network", &self.network, "--ip", &ip, &self.image, "/bin/sleep", "3600"]);
        let id = podman(&args);
        let pid = podman(&["inspect", "-f", "{{.State.Pid}}", name]).parse().expect("pid");
        (id, pid)
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        for name in &self.containers {
            let _ = Command::new("podman").args(["rm", "-f", "-t", "0", name]).output();
        }
        let _ = Command::new("podman").args(["network", "rm", "-f", &self.network]).output();
        let _ = Command::new("podman").args(["rmi", "-f", &self.image]).output();
        for table in host_tables().into_iter().filter(|t| !self.host_tables_before.contains(t)) {
            let args: Vec<&str> = ["delete", "table"].into_iter().chain(table.split_whitespace()).collect();
            if let Err(e) = Command::new("nft").args(&args).output() {
                eprintln!("cleanup: nft delete table {table}: {e}");
            }
        }
    }
}

/// A TCP connection from inside `ns` to `dst`, or an error after `timeout`.
fn connect_from(ns: &Netns, dst: Ipv4Addr, timeout: Duration) -> std::io::Result<Socket> {
    ns.enter(|| {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        socket.connect_timeout(&SocketAddr::V4(SocketAddrV4::new(dst, PORT)).into(), timeout)?;
        Ok(socket)
    })
}

fn listen_in(ns: &Netns) -> Socket {
    ns.enter(|| {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        socket.bind(&SocketAddr::V4(SocketAddrV4::new(SERVER, PORT)).into())?;
        socket.listen(1024)?;
        Ok::<_, std::io::Error>(socket)
    })
    .expect("listener")
}

/// Rows of one source in one namespace: their drops and the source's workload.
fn source_rows(record: &Value, netns: u32, src: Ipv4Addr) -> (u64, Vec<Value>) {
    let rows: Vec<&Value> = record["sources"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["netns"] == netns && s["src"] == src.to_string())
        .collect();
    (rows.iter().map(|s| s["drops"].as_u64().unwrap()).sum(), rows.iter().map(|s| s["src_workload"].clone()).collect())
}

fn workload_of(record: &Value, netns: u32) -> Value {
    let found = record["workloads"].as_array().unwrap().iter().find(|w| w["netns"] == netns);
    found.map(|w| w["workload"].clone()).unwrap_or(Value::Null)
}

#[test]
fn podman_containers_are_named_in_the_record_and_in_live() {
    require_root();
    if skipped_in_guest("podman runs on the host; naming does not depend on the hook tier") {
        return;
    }
    require_podman();
    let dir = TempDir::new("workloads");
    let mut podman = Podman::new(&dir.0);
    let tag = std::process::id();
    let names = [format!("ctrace-srv-{tag}"), format!("ctrace-cli-a-{tag}"), format!("ctrace-cli-b-{tag}")];
    let (srv_id, srv_pid) = podman.start(&names[0], SERVER);
    let (_, a_pid) = podman.start(&names[1], CLIENT_A);
    let (_, b_pid) = podman.start(&names[2], CLIENT_B);
    // Bridged packets would also pass the host's iptables (br_netfilter),
    // whose conntrack table the test does not fill: keep them off it.
    let _bridged = Sysctl::set("net.bridge.bridge-nf-call-iptables", "0").ok();
    let srv = Netns::attach(&format!("ctrace-wl-srv-{tag}"), srv_pid).unwrap();
    let cli_a = Netns::attach(&format!("ctrace-wl-a-{tag}"), a_pid).unwrap();
    let cli_b = Netns::attach(&format!("ctrace-wl-b-{tag}"), b_pid).unwrap();
    let rules = format!(
        "table inet ctrace_wl {{
            counter syn_a {{}}
            counter syn_b {{}}
            chain raw {{ type filter hook prerouting priority raw;
                ip saddr {CLIENT_A} tcp flags & (syn | ack) == syn counter name syn_a
                ip saddr {CLIENT_B} tcp flags & (syn | ack) == syn counter name syn_b;
            }}
            chain track {{ type filter hook input priority filter; ct state new counter; }}
        }}"
    );
    std::fs::write(dir.0.join("rules.nft"), rules).unwrap();
    srv.exec("nft", &["-f", dir.0.join("rules.nft").to_str().unwrap()]).expect("rules in the server container");
    let _listener = listen_in(&srv);

    let out = TempDir::new("workloads-out");
    let recording = Recording::start(&out.0.join("record.json"), &[]).expect("ctrace record");
    let mut live = Command::new(ctrace_bin())
        .args(["live", "--plain", "--interval", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("ctrace live");
    let live_out = live.stdout.take().unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(live_out).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });

    // Client a fills the server's table; then both storm it.
    let max = Sysctl::set("net.netfilter.nf_conntrack_max", &TABLE_MAX.to_string()).unwrap();
    let before = srv.conntrack_stat().unwrap();
    let held: Vec<_> = (0..TABLE_MAX - before.entries)
        .map(|i| connect_from(&cli_a, SERVER, FILL_TIMEOUT).unwrap_or_else(|e| panic!("fill {i}: {e}")))
        .collect();
    for i in 0..30 {
        let client = if i % 3 == 2 { &cli_b } else { &cli_a };
        assert!(connect_from(client, SERVER, Duration::from_millis(50)).is_err(), "a SYN got through a full table");
    }
    wait_for("the kernel to drop every storm SYN", || {
        (srv.conntrack_stat().unwrap().drop - before.drop >= 30).then_some(())
    });
    // live names both sides: client -> server, by container name.
    let shown = wait_for("live to show the storm with container names", || {
        let line = lines.recv_timeout(Duration::from_secs(1)).ok()?;
        (line.contains(&CLIENT_A.to_string()) && line.contains(&format!("{} -> {}", names[1], names[0])))
            .then_some(line)
    });
    eprintln!("live: {shown}");
    let record = recording.stop().expect("record");
    drop(max);
    drop(held);
    let _ = live.kill();
    let _ = live.wait();

    let netns = srv.inode();
    let truth_a = nft_counter(&srv, "inet", "ctrace_wl", "syn_a").unwrap();
    let truth_b = nft_counter(&srv, "inet", "ctrace_wl", "syn_b").unwrap();
    let (dropped_a, workloads_a) = source_rows(&record, netns, CLIENT_A);
    let (dropped_b, workloads_b) = source_rows(&record, netns, CLIENT_B);
    eprintln!("server container {}: {}", names[0], workload_of(&record, netns));
    // Client a's SYNs: the 64 that filled the table got in, the rest were dropped.
    assert_eq!(dropped_a, truth_a - (TABLE_MAX - before.entries), "client a's drops vs the raw-table SYN counter");
    assert_eq!(dropped_b, truth_b, "client b's drops vs the raw-table SYN counter");
    let server = workload_of(&record, netns);
    assert_eq!(server["kind"], "container");
    assert_eq!(server["runtime"], "podman");
    assert_eq!(server["name"], names[0].as_str());
    assert_eq!(server["id"], srv_id.as_str());
    for (workloads, name) in [(workloads_a, &names[1]), (workloads_b, &names[2])] {
        assert!(!workloads.is_empty());
        for w in workloads {
            assert_eq!((w["kind"].as_str(), w["name"].as_str()), (Some("container"), Some(name.as_str())), "{w}");
        }
    }
    assert_eq!(record["schema"], "ctrace.drops.v2");
    if let Some(keep) = std::env::var_os("CTRACE_KEEP_RECORD") {
        std::fs::write(keep, serde_json::to_string_pretty(&record).unwrap()).unwrap();
    }
}

const FILLER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const STORM: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);

/// What the kubelet and containerd leave for a pod, built by hand around a
/// real namespace (no Kubernetes node runs here): the pod's log directory,
/// and a process of the namespace in a pod container's cgroup, systemd
/// driver shape. Removed on drop.
struct PodLayout {
    process: std::process::Child,
    cgroups: Vec<std::path::PathBuf>,
    logs: Vec<std::path::PathBuf>,
}

impl PodLayout {
    fn build(namespace: &Netns, pod_namespace: &str, pod: &str, uid: &str, container_id: &str) -> Self {
        let mut layout = PodLayout {
            process: Command::new("ip")
                .args(["netns", "exec", &namespace.name, "sleep", "600"])
                .spawn()
                .expect("sleep"),
            cgroups: Vec::new(),
            logs: Vec::new(),
        };
        let pods = Path::new("/var/log/pods");
        if !pods.exists() {
            layout.logs.push(pods.to_path_buf());
        }
        let log_dir = pods.join(format!("{pod_namespace}_{pod}_{uid}"));
        layout.logs.push(log_dir.clone());
        std::fs::create_dir_all(log_dir.join("app")).unwrap();
        // kubelet's systemd driver, containerd's CRI plugin (docs: workload/cgroup.rs).
        let hierarchy = Path::new("/sys/fs/cgroup/systemd");
        assert!(hierarchy.exists(), "no name=systemd cgroup hierarchy at {}", hierarchy.display());
        let mut dir = hierarchy.to_path_buf();
        for part in [
            "kubepods.slice".to_string(),
            "kubepods-burstable.slice".to_string(),
            format!("kubepods-burstable-pod{}.slice", uid.replace('-', "_")),
            format!("cri-containerd-{container_id}.scope"),
        ] {
            dir = dir.join(part);
            if !dir.exists() {
                std::fs::create_dir(&dir).expect("cgroup");
                layout.cgroups.push(dir.clone());
            }
        }
        std::fs::write(dir.join("cgroup.procs"), layout.process.id().to_string()).expect("move into the pod's cgroup");
        layout
    }
}

impl Drop for PodLayout {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
        for dir in self.cgroups.iter().rev() {
            // A cgroup goes once its process has exited: retry briefly.
            for _ in 0..100 {
                if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        for dir in self.logs.iter().rev() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

#[test]
fn a_kubernetes_pod_is_named_from_the_kubelets_layout() {
    require_root();
    if skipped_in_guest("naming does not depend on the hook tier") {
        return;
    }
    let lab = ctrace_tests::Lab::new("pod", &[FILLER, STORM]).expect("lab");
    lab.track_connections("ctrace_pod").expect("rules");
    let _listener = lab.listen(PORT).expect("listener");
    let uid = format!("5e0c2a51-7f3b-4c1d-9a2e-{:012x}", std::process::id());
    let container_id = format!("{:064x}", u128::from(std::process::id()) << 64 | 0xc7ace);
    let _pod = PodLayout::build(&lab.server, "shop", "web-7d9f8c-x2k4p", &uid, &container_id);

    let out = TempDir::new("pod-out");
    let recording = Recording::start(&out.0.join("record.json"), &[]).expect("ctrace record");
    let max = Sysctl::set("net.netfilter.nf_conntrack_max", &TABLE_MAX.to_string()).unwrap();
    let before = lab.server.conntrack_stat().unwrap();
    let held: Vec<_> =
        (0..TABLE_MAX - before.entries).map(|_| lab.connect(FILLER, PORT, FILL_TIMEOUT).expect("fill")).collect();
    for _ in 0..10 {
        assert!(lab.connect(STORM, PORT, Duration::from_millis(50)).is_err(), "a SYN got through a full table");
    }
    wait_for("the kernel to drop every storm SYN", || {
        (lab.server.conntrack_stat().unwrap().drop - before.drop >= 10).then_some(())
    });
    let record = recording.stop().expect("record");
    drop(max);
    drop(held);

    let pod = workload_of(&record, lab.server.inode());
    eprintln!("the server namespace: {pod}");
    assert_eq!(pod["kind"], "pod");
    assert_eq!(pod["runtime"], "containerd");
    assert_eq!(pod["id"], uid.as_str());
    assert_eq!(pod["name"], "web-7d9f8c-x2k4p");
    assert_eq!(pod["pod_namespace"], "shop");
    let (drops, sources) = source_rows(&record, lab.server.inode(), STORM);
    assert_eq!(drops, 10);
    // The storm's source address is on the client namespace's veth: a named netns.
    for w in sources {
        assert_eq!((w["kind"].as_str(), w["name"].as_str()), (Some("netns"), Some(lab.client.name.as_str())), "{w}");
    }
}
