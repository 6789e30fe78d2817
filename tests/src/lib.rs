//! Fixtures for ctrace's privileged end-to-end tests: network namespaces
//! joined by veth, rules, sysctls and a running `ctrace`, each undone by its
//! guard's Drop, so the machine is left as it was even when a test fails.
//!
//! Test traffic stays inside namespaces the tests create, on 198.18.0.0/15.
use std::{
    fs::File,
    io::{BufRead, BufReader},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use socket2::{Domain, Protocol, Socket, Type};

pub mod doctor;
pub mod nfqueue;

/// How long a wait may last before the test calls it a hang. Waits end on
/// readiness (a line printed, a counter moved, a screen drawn), never on a
/// guessed time: under CI's emulated CPUs everything takes 10-50 times
/// longer, so this limit only catches what would never finish.
pub const HANG: Duration = Duration::from_secs(600);

/// How long a connection that must get in (a table with room) may take:
/// only a failure waits this long.
pub const FILL_TIMEOUT: Duration = Duration::from_secs(30);

/// Polls `ready` until it gives a value; fails, saying what was awaited,
/// only after [`HANG`].
pub fn wait_for<T>(what: &str, ready: impl FnMut() -> Option<T>) -> T {
    wait_for_explained(what, ready, String::new)
}

/// [`wait_for`], and on a hang also says what `seen` finds then, so that a
/// hang in CI can be understood from its log.
pub fn wait_for_explained<T>(what: &str, mut ready: impl FnMut() -> Option<T>, seen: impl FnOnce() -> String) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = ready() {
            return value;
        }
        if started.elapsed() >= HANG {
            panic!("waited {HANG:?} for {what}: a hang; {}", seen());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Loads nf_conntrack where it is a module not loaded yet (a fresh guest):
/// without it no namespace has conntrack counters or nf_conntrack_max.
pub fn ensure_conntrack_loaded() {
    if !Path::new("/proc/sys/net/netfilter/nf_conntrack_max").exists() {
        run("modprobe", &["nf_conntrack"]).expect("nf_conntrack is not loaded and modprobe failed");
    }
}

/// Privileged tests cannot be faked: without root they fail, saying why.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test loads eBPF programs and creates network namespaces: it must run as root \
         (run `cargo xtask test` as root)"
    );
    for tool in ["ip", "nft", "iptables"] {
        let found = Command::new(tool).arg("--version").output().is_ok();
        assert!(found, "`{tool}` is not installed: run `cargo xtask setup`");
    }
}

/// Runs a command, failing with its stderr when it fails.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program).args(args).output().with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!("{program} {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command inside a named namespace.
pub fn run_in(ns: &str, program: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut all = vec!["netns", "exec", ns, program];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// The path of the ctrace binary under test: `CTRACE_BIN`, or the workspace's
/// debug build.
pub fn ctrace_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("CTRACE_BIN") {
        return PathBuf::from(bin);
    }
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/ctrace");
    assert!(bin.exists(), "{} is missing: build it first (`cargo build`, or `cargo xtask test`)", bin.display());
    bin
}

/// A named network namespace (`ip netns add`), deleted on drop with
/// everything in it (veth ends, rules, sockets' routes).
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: &str) -> anyhow::Result<Self> {
        let _ = run("ip", &["netns", "delete", name]); // a crashed earlier run's
        run("ip", &["netns", "add", name])?;
        let ns = Netns { name: name.to_string() };
        ns.exec("ip", &["link", "set", "lo", "up"])?;
        // No IPv6: neighbour discovery would add traffic the test does not count.
        ns.exec("sysctl", &["-qw", "net.ipv6.conf.all.disable_ipv6=1"])?;
        ns.exec("sysctl", &["-qw", "net.ipv6.conf.default.disable_ipv6=1"])?;
        Ok(ns)
    }

    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        run_in(&self.name, program, args)
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// The namespace's inode number, as ctrace reports it.
    pub fn inode(&self) -> u32 {
        std::fs::metadata(self.path()).expect("netns file").ino() as u32
    }

    /// Runs `f` on a thread inside this namespace. Sockets made there stay
    /// in it after the thread ends.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let ns = File::open(self.path()).expect("open netns");
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: a valid namespace fd; only this thread moves.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("thread in namespace panicked")
        })
    }

    /// Reads `/proc/net/NAME` of this namespace. (Through thread-self: a
    /// plain /proc/net names the main thread's namespace, not this one's.)
    pub fn proc_net(&self, name: &str) -> anyhow::Result<String> {
        let path = Path::new("/proc/thread-self/net").join(name);
        self.enter(|| std::fs::read_to_string(&path)).with_context(|| format!("read {name} in {}", self.name))
    }

    /// The namespace's conntrack counters (`/proc/net/stat/nf_conntrack`,
    /// summed over CPUs) and its entry count from another interface than
    /// the one ctrace reads: the `nf_conntrack_count` sysctl.
    pub fn conntrack_stat(&self) -> anyhow::Result<ConntrackStat> {
        let (stat, count) = self.enter(|| {
            let stat = std::fs::read_to_string("/proc/thread-self/net/stat/nf_conntrack");
            (stat, std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count"))
        });
        let stat = stat.with_context(|| format!("read stat/nf_conntrack in {}", self.name))?;
        let count = count.with_context(|| format!("read nf_conntrack_count in {}", self.name))?;
        let entries = count.trim().parse().with_context(|| format!("nf_conntrack_count {count:?}"))?;
        Ok(ConntrackStat { entries, ..ConntrackStat::from_counters(&stat)? })
    }

    /// Lists the namespace's table, which removes the entries that have
    /// timed out (the kernel reaps them as it lists), and returns the
    /// counters after that.
    pub fn reap_expired(&self) -> anyhow::Result<ConntrackStat> {
        self.proc_net("nf_conntrack")?;
        self.conntrack_stat()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(err) = run("ip", &["netns", "delete", &self.name]) {
            eprintln!("cleanup: {err:#}");
        }
    }
}

/// Kernel ground truth from a namespace's conntrack stat file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConntrackStat {
    pub entries: u64,
    pub drop: u64,
    pub insert_failed: u64,
    pub early_drop: u64,
    pub invalid: u64,
    /// Clashes the kernel resolved without a drop.
    pub clash_resolve: u64,
}

impl ConntrackStat {
    /// The counters of a stat file; `entries` is left 0 (see
    /// [`Netns::conntrack_stat`]). Written apart from ctrace's own parser
    /// (`netns.rs`), by column name into a map, so that the ground truth
    /// does not share its mistakes.
    pub fn from_counters(text: &str) -> anyhow::Result<Self> {
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        let names: Vec<&str> = lines.next().context("empty stat file")?.split_whitespace().collect();
        let mut totals: std::collections::HashMap<&str, u64> = names.iter().map(|&n| (n, 0)).collect();
        for (cpu, line) in lines.enumerate() {
            let values: Vec<&str> = line.split_whitespace().collect();
            anyhow::ensure!(
                values.len() == names.len(),
                "row {cpu}: {} values under {} names",
                values.len(),
                names.len()
            );
            for (name, value) in names.iter().zip(values) {
                let value = u64::from_str_radix(value, 16).with_context(|| format!("{name} = {value:?}"))?;
                *totals.get_mut(name).expect("every name has a total") += value;
            }
        }
        let total = |name: &str| totals.get(name).copied().unwrap_or(0);
        Ok(ConntrackStat {
            entries: 0,
            drop: total("drop"),
            insert_failed: total("insert_failed"),
            early_drop: total("early_drop"),
            invalid: total("invalid"),
            clash_resolve: total("clashres"),
        })
    }
}

#[cfg(test)]
mod stat_tests {
    use super::ConntrackStat;

    /// Two CPUs' rows in the layout of 5.x kernels (`delete_list` where
    /// 6.x prints `chainlength`): the columns are found by name.
    const STAT: &str = "\
entries  clashres found new invalid ignore delete delete_list insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart
00000010  00000001 00000000 00000000 0000000a 00000000 00000000 00000007 00000000 00000002 00000003 00000004 00000000  00000000 00000000 00000000 00000000
00000010  00000002 00000000 00000000 00000010 00000000 00000000 00000000 00000000 00000000 00000100 00000001 00000000  00000000 00000000 00000000 00000000
";

    #[test]
    fn counters_are_summed_over_cpus_by_name() {
        let stat = ConntrackStat::from_counters(STAT).unwrap();
        let expected =
            ConntrackStat { entries: 0, drop: 0x103, insert_failed: 2, early_drop: 5, invalid: 0x1a, clash_resolve: 3 };
        assert_eq!(stat, expected);
    }

    #[test]
    fn a_short_row_is_an_error() {
        let text = STAT.replace("00000001 00000000 00000000 0000000a", "00000001 00000000 0000000a");
        assert!(ConntrackStat::from_counters(&text).is_err());
        assert!(ConntrackStat::from_counters("").is_err());
    }
}

/// A sysctl set for the duration of a test and restored on drop.
pub struct Sysctl {
    path: PathBuf,
    old: String,
}

impl Sysctl {
    pub fn set(name: &str, value: &str) -> anyhow::Result<Self> {
        let path = Path::new("/proc/sys").join(name.replace('.', "/"));
        let old = std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        std::fs::write(&path, value).with_context(|| format!("write {}", path.display()))?;
        Ok(Sysctl { path, old: old.trim().to_string() })
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        if let Err(err) = std::fs::write(&self.path, &self.old) {
            eprintln!("cleanup: cannot restore {}: {err}", self.path.display());
        }
    }
}

/// Two namespaces on one veth link: a server at `SERVER` and a client with
/// several source addresses. Conntrack runs only in the server.
pub struct Lab {
    pub server: Netns,
    pub client: Netns,
}

pub const SERVER: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);

impl Lab {
    pub fn new(tag: &str, client_addrs: &[Ipv4Addr]) -> anyhow::Result<Self> {
        let pid = std::process::id();
        let server = Netns::create(&format!("ctrace-{tag}-srv-{pid}"))?;
        let client = Netns::create(&format!("ctrace-{tag}-cli-{pid}"))?;
        client.exec("ip", &["link", "add", "veth-c", "type", "veth", "peer", "name", "veth-s"])?;
        client.exec("ip", &["link", "set", "veth-s", "netns", &server.name])?;
        for addr in client_addrs {
            client.exec("ip", &["addr", "add", &format!("{addr}/16"), "dev", "veth-c"])?;
        }
        server.exec("ip", &["addr", "add", &format!("{SERVER}/16"), "dev", "veth-s"])?;
        client.exec("ip", &["link", "set", "veth-c", "up"])?;
        server.exec("ip", &["link", "set", "veth-s", "up"])?;
        Ok(Lab { server, client })
    }

    /// Opens a TCP connection from `src` to the server, or gives up after
    /// `timeout` (a dropped SYN: closing the socket stops retransmissions).
    pub fn connect(&self, src: Ipv4Addr, port: u16, timeout: Duration) -> std::io::Result<Socket> {
        self.client.enter(|| {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            socket.bind(&SocketAddr::V4(SocketAddrV4::new(src, 0)).into())?;
            socket.connect_timeout(&SocketAddr::V4(SocketAddrV4::new(SERVER, port)).into(), timeout)?;
            Ok(socket)
        })
    }

    /// Sends `count` SYNs from `src` as fast as sockets can be made: each a
    /// non-blocking connect whose socket is closed at once (one SYN, no
    /// retransmission). Returns how many SYNs left.
    pub fn syn_burst(&self, src: Ipv4Addr, port: u16, count: u64) -> u64 {
        self.client.enter(|| {
            let dst: socket2::SockAddr = SocketAddr::V4(SocketAddrV4::new(SERVER, port)).into();
            let bind: socket2::SockAddr = SocketAddr::V4(SocketAddrV4::new(src, 0)).into();
            let mut sent = 0;
            for _ in 0..count {
                let Ok(socket) = Socket::new(Domain::IPV4, Type::STREAM, None) else { continue };
                if socket.bind(&bind).is_err() || socket.set_nonblocking(true).is_err() {
                    continue;
                }
                match socket.connect(&dst) {
                    Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => sent += 1,
                    _ => {}
                }
            }
            sent
        })
    }

    /// Turns conntrack on in the server namespace: a `ct state new` rule
    /// (any conntrack expression registers its hooks there) in table `name`.
    pub fn track_connections(&self, name: &str) -> anyhow::Result<()> {
        self.server.exec("nft", &["add", "table", "inet", name])?;
        self.server.exec("nft", &["add chain inet", name, "track { type filter hook input priority filter; }"])?;
        self.server.exec("nft", &["add rule inet", name, "track ct state new counter"])?;
        Ok(())
    }

    /// Sends one datagram from one socket on `src` to each of `ports` on the
    /// server: a new conntrack entry per port, made as fast as sendto goes.
    /// Returns when the server's kernel has processed every one of them.
    ///
    /// Readiness: the packets cross the veth through the sending CPU's
    /// backlog, in order, but under load the kernel may leave that backlog
    /// to ksoftirqd after sendto returned. So the sender stays on one CPU
    /// and ends with a datagram on a flow conntrack already knows (no new
    /// entry, so it cannot fail to insert); once the server has received
    /// it, everything sent before it has been through conntrack. The caller
    /// keeps that flow's entry for the whole spray (a UDP timeout longer
    /// than the spray takes), or the last datagram may be refused too.
    pub fn udp_spray(&self, src: Ipv4Addr, ports: std::ops::RangeInclusive<u16>) -> std::io::Result<u64> {
        const MARKER_PORT: u16 = 65_000;
        assert!(!ports.contains(&MARKER_PORT));
        let marker_sink = self.udp_sink(MARKER_PORT).map_err(std::io::Error::other)?;
        marker_sink.set_read_timeout(Some(HANG))?;
        let marker_dst: socket2::SockAddr = SocketAddr::V4(SocketAddrV4::new(SERVER, MARKER_PORT)).into();
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 16];
        self.client.enter(|| {
            pin_to_first_cpu()?;
            let marker = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
            marker.bind(&SocketAddr::V4(SocketAddrV4::new(src, 0)).into())?;
            marker.send_to(b"marker", &marker_dst)?;
            marker_sink.recv(&mut buf)?; // the marker's flow is in the table
            let socket = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
            socket.bind(&SocketAddr::V4(SocketAddrV4::new(src, 0)).into())?;
            let mut sent = 0;
            for port in ports {
                if socket.send_to(b"ctrace", &SocketAddr::V4(SocketAddrV4::new(SERVER, port)).into()).is_ok() {
                    sent += 1;
                }
            }
            marker.send_to(b"marker", &marker_dst)?;
            marker_sink.recv(&mut buf)?;
            Ok(sent)
        })
    }

    /// Sends one UDP datagram from `src` (a fresh source port) to the server.
    pub fn udp_send(&self, src: Ipv4Addr, port: u16) -> std::io::Result<()> {
        self.udp_send_from(src, 0, port)
    }

    /// Sends one UDP datagram from `src`:`sport` (0: any) to the server.
    pub fn udp_send_from(&self, src: Ipv4Addr, sport: u16, port: u16) -> std::io::Result<()> {
        self.client.enter(|| {
            let socket = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
            socket.bind(&SocketAddr::V4(SocketAddrV4::new(src, sport)).into())?;
            socket.send_to(b"ctrace", &SocketAddr::V4(SocketAddrV4::new(SERVER, port)).into())?;
            Ok(())
        })
    }

    /// Sends `count` bare TCP segments with header `flags` from `src` to the
    /// server's `port` through a raw socket (no connection behind them),
    /// from source ports 1024, 1025, ... (wrapping): each a new flow to
    /// conntrack. As fast as sendto goes, so it can flood. Returns how many
    /// left.
    pub fn tcp_raw(&self, src: Ipv4Addr, port: u16, flags: u8, count: u32) -> std::io::Result<u32> {
        self.client.enter(|| {
            let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::TCP))?;
            socket.bind(&SocketAddr::V4(SocketAddrV4::new(src, 0)).into())?;
            let dst: socket2::SockAddr = SocketAddr::V4(SocketAddrV4::new(SERVER, 0)).into();
            let mut sent = 0;
            for i in 0..count {
                let sport = 1024 + (i % 64_000) as u16;
                let segment = tcp_segment(src, SERVER, sport, port, flags);
                if socket.send_to(&segment, &dst).is_ok() {
                    sent += 1;
                }
            }
            Ok(sent)
        })
    }

    /// Sends `count` TCP SYNs to the server's `port`, each from a
    /// pseudo-random source address (a spoofed flood: the addresses exist
    /// only in these packets' headers, on this veth; see [`Spoofed`] for
    /// where replies go). `seed` picks the sequence: pass the previous
    /// call's return to go on with it. Through a raw IP socket as fast as
    /// sendto goes. Returns how many left and the next seed.
    pub fn syn_flood_random_sources(
        &self,
        port: u16,
        count: u32,
        sources: Spoofed,
        seed: u32,
    ) -> std::io::Result<(u32, u32)> {
        self.client.enter(|| {
            // IPPROTO_RAW: the packet carries its own IP header.
            let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW)))?;
            let dst: socket2::SockAddr = SocketAddr::V4(SocketAddrV4::new(SERVER, 0)).into();
            let (sources, next) = sources.addresses(count, seed);
            let mut sent = 0;
            for (i, src) in (0..count).zip(sources) {
                let mut packet = [0u8; 40];
                packet[0] = 0x45; // IPv4, 5-word header
                packet[2..4].copy_from_slice(&40u16.to_be_bytes());
                packet[4..6].copy_from_slice(&(i as u16).to_be_bytes());
                packet[8] = 64; // TTL
                packet[9] = 6; // TCP; the kernel fills in the checksum
                packet[12..16].copy_from_slice(&src.octets());
                packet[16..20].copy_from_slice(&SERVER.octets());
                packet[20..].copy_from_slice(&tcp_segment(src, SERVER, 1024 + (i % 60_000) as u16, port, 0x02));
                if socket.send_to(&packet, &dst).is_ok() {
                    sent += 1;
                }
            }
            Ok((sent, next))
        })
    }

    /// Routes everything the server sends back over its veth (for floods
    /// from addresses outside the lab's /16).
    pub fn route_all_back(&self) -> anyhow::Result<()> {
        self.server.exec("ip", &["route", "add", "default", "dev", "veth-s"]).map(drop)
    }

    /// A UDP socket bound in the server namespace: datagrams arrive and get
    /// no answer, so their conntrack entries stay unreplied.
    pub fn udp_sink(&self, port: u16) -> anyhow::Result<Socket> {
        self.server.enter(|| {
            let socket = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
            socket.bind(&SocketAddr::V4(SocketAddrV4::new(SERVER, port)).into())?;
            Ok(socket)
        })
    }

    /// A listening socket in the server namespace. The kernel completes
    /// handshakes into its backlog without accept().
    pub fn listen(&self, port: u16) -> anyhow::Result<Socket> {
        self.server.enter(|| {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            socket.bind(&SocketAddr::V4(SocketAddrV4::new(SERVER, port)).into())?;
            socket.listen(1024)?;
            Ok(socket)
        })
    }
}

/// Where a spoofed flood's source addresses come from.
#[derive(Clone, Copy, Debug)]
pub enum Spoofed {
    /// 198.18.2.0-198.18.255.255 (65,024 addresses, inside the lab's /16).
    LabRange,
    /// Any unicast address from 1.0.0.0 to 223.255.255.255 but 127/8, as
    /// `hping3 --rand-source` sends: the server must route back over the
    /// veth ([`Lab::route_all_back`]).
    Anywhere,
}

impl Spoofed {
    /// The `count` source addresses [`Lab::syn_flood_random_sources`] sends
    /// from for `seed`, in order, and the seed that goes on: ground truth
    /// for distinct-source estimates.
    pub fn addresses(self, count: u32, seed: u32) -> (Vec<Ipv4Addr>, u32) {
        let mut state = seed;
        let addresses = (0..count)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                self.address(state)
            })
            .collect();
        (addresses, state)
    }

    fn address(self, random: u32) -> Ipv4Addr {
        match self {
            Spoofed::LabRange => {
                let host = 2 * 256 + (random >> 8) % (254 * 256);
                Ipv4Addr::new(198, 18, (host >> 8) as u8, host as u8)
            }
            Spoofed::Anywhere => {
                let first = 1 + (random >> 24) % 223;
                Ipv4Addr::from(if first == 127 {
                    128 << 24 | (random & 0xff_ffff)
                } else {
                    first << 24 | (random & 0xff_ffff)
                })
            }
        }
    }
}

/// Keeps the calling thread on the first CPU it may use.
fn pin_to_first_cpu() -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; the calls get valid pointers and sizes.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let first = (0..libc::CPU_SETSIZE as usize).find(|&c| libc::CPU_ISSET(c, &set)).unwrap_or(0);
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(first, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A 20-byte TCP header with a correct checksum (over the IPv4 pseudo-header).
pub fn tcp_segment(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> [u8; 20] {
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes()); // sequence
    tcp[12] = 5 << 4; // data offset: 5 words
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes()); // window
    let mut pseudo = Vec::with_capacity(32);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 6, 0, 20]); // zero, protocol TCP, length
    pseudo.extend_from_slice(&tcp);
    let mut sum: u32 = pseudo.chunks(2).map(|w| u16::from_be_bytes([w[0], w[1]]) as u32).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    tcp[16..18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    tcp
}

/// A child process killed (SIGINT, then SIGKILL) on drop.
pub struct Daemon {
    pub child: Child,
    pub name: &'static str,
}

impl Daemon {
    pub fn spawn(name: &'static str, cmd: &mut Command) -> anyhow::Result<Self> {
        let child = cmd.spawn().with_context(|| format!("cannot start {name}"))?;
        Ok(Daemon { child, name })
    }

    /// Fails if the process has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited early: {status}", self.name);
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ctrace serve` on a free loopback port, once it says it is serving
/// (its later lines are echoed). Returns the daemon and its port.
pub fn serve() -> anyhow::Result<(Daemon, u16)> {
    let port = free_port();
    let mut ctrace = Daemon::spawn(
        "ctrace serve",
        Command::new(ctrace_bin())
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    )?;
    let mut lines = BufReader::new(ctrace.child.stderr.take().expect("piped")).lines();
    let first = lines.next().context("ctrace serve said nothing")??;
    if !first.contains("serving") {
        bail!("ctrace serve: {first}");
    }
    std::thread::spawn(move || lines.for_each(|l| eprintln!("[ctrace] {}", l.unwrap_or_default())));
    Ok((ctrace, port))
}

/// A free TCP port on loopback (bound and released: a small race is possible).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port()
}

/// A plain HTTP/1.0 GET on loopback; returns status code and body.
pub fn http_get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").context("no HTTP head")?;
    let status = head.split_whitespace().nth(1).context("no status")?.parse()?;
    Ok((status, body.to_string()))
}

/// Percent-encodes a query-string value.
pub fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A running `ctrace record`, stopped with SIGINT (as Ctrl-C would) or
/// killed on drop.
pub struct Recording {
    child: Option<Child>,
    pub output: PathBuf,
    stderr_lines: mpsc::Receiver<String>,
}

impl Recording {
    /// Starts `ctrace record` writing to `output` and waits until it has
    /// attached (its "attached" line on stderr).
    pub fn start(output: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        let mut child = Command::new(ctrace_bin())
            .args(["record", "--output"])
            .arg(output)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn ctrace")?;
        let stderr = child.stderr.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[ctrace] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut recording = Recording { child: Some(child), output: output.to_path_buf(), stderr_lines: rx };
        let started = Instant::now();
        loop {
            match recording.stderr_lines.recv_timeout(HANG.saturating_sub(started.elapsed())) {
                Ok(line) if line.contains("attached") => {
                    eprintln!("ctrace record attached after {:.1} s", started.elapsed().as_secs_f64());
                    return Ok(recording);
                }
                Ok(_) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = recording.child.as_mut().map(|c| c.wait()).transpose()?;
                    bail!("ctrace exited before it attached ({status:?})");
                }
                Err(mpsc::RecvTimeoutError::Timeout) => bail!("ctrace did not attach within {HANG:?}: a hang"),
            }
        }
    }

    /// The process's peak resident memory so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        peak_rss_kib(self.child.as_ref()?.id())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Fails the test at once, with the exit status, if ctrace is no longer
    /// running (a wait on it would otherwise only end as a hang).
    pub fn assert_running(&mut self) {
        let child = self.child.as_mut().expect("running");
        if let Ok(Some(status)) = child.try_wait() {
            let said: Vec<String> = self.stderr_lines.try_iter().collect();
            panic!("ctrace record exited while it should be recording: {status}; it said {said:?}");
        }
    }

    /// Sends SIGINT and waits for a clean exit; returns the record file.
    pub fn stop(self) -> anyhow::Result<serde_json::Value> {
        let child = self.child.as_ref().expect("running");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        self.wait()
    }

    /// Waits for ctrace to finish by itself (`--duration`); returns the record.
    pub fn wait(mut self) -> anyhow::Result<serde_json::Value> {
        let mut child = self.child.take().expect("running");
        let status = child.wait()?;
        if !status.success() {
            bail!("ctrace exited with {status}");
        }
        let text = std::fs::read_to_string(&self.output).with_context(|| format!("read {}", self.output.display()))?;
        Ok(serde_json::from_str(&text)?)
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Spawns `command` with its stderr read line by line on a thread: each
/// line echoed (prefixed with `[tag]`) and sent on the returned channel.
pub fn spawn_reading_stderr(command: &mut Command, tag: &'static str) -> (Child, mpsc::Receiver<String>) {
    let mut child = command.stderr(Stdio::piped()).spawn().unwrap_or_else(|e| panic!("spawn {tag}: {e}"));
    let stderr = child.stderr.take().expect("piped");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        // Drains to the end even when nobody listens any more, so the child
        // never meets a full or closed pipe.
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[{tag}] {line}");
            let _ = tx.send(line);
        }
    });
    (child, lines)
}

/// A process's peak resident memory so far (VmHWM), in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmHWM:")?.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Packets counted by a named nftables counter.
pub fn nft_counter(ns: &Netns, family: &str, table: &str, name: &str) -> anyhow::Result<u64> {
    let json = ns.exec("nft", &["-j", "list", "counter", family, table, name])?;
    let value: serde_json::Value = serde_json::from_str(&json)?;
    value["nftables"]
        .as_array()
        .and_then(|items| items.iter().find_map(|i| i["counter"]["packets"].as_u64()))
        .with_context(|| format!("no packets in counter {name}: {json}"))
}

/// A temporary folder removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ctrace-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_checksum_verifies() {
        let (src, dst) = (Ipv4Addr::new(198, 18, 0, 12), SERVER);
        let tcp = tcp_segment(src, dst, 40_000, 8082, 0x03);
        // Summing the pseudo-header and the segment, checksum included, gives all ones.
        let mut bytes = src.octets().to_vec();
        bytes.extend_from_slice(&dst.octets());
        bytes.extend_from_slice(&[0, 6, 0, 20]);
        bytes.extend_from_slice(&tcp);
        let mut sum: u32 = bytes.chunks(2).map(|w| u16::from_be_bytes([w[0], w[1]]) as u32).sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        assert_eq!(sum, 0xffff);
        assert_eq!(tcp[13], 0x03);
    }
}
