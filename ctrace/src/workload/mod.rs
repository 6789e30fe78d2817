//! What lives in a network namespace, and which local workload owns an
//! address: "container web (podman)" instead of 4026532177 and 198.18.8.10.
//!
//! Resolution runs apart from the event path, every [`REFRESH`] (front ends
//! call [`Workloads::refresh`] from their tick): processes are scanned for
//! their namespace and cgroup ([`cgroup`]), runtimes' own state files name
//! containers ([`names`]), the kubelet's pod directories name pods
//! ([`kubelet`]), and each namespace's interface addresses map addresses to
//! it. Lookups are map reads. Bounded: at most [`MAX_NAMESPACES`] namespaces
//! and [`MAX_ADDRESSES`] addresses are kept; a namespace that disappears
//! keeps its last known workload until the bound pushes it out, so a record
//! still names what was dropped there.
//!
//! [`AddressOwner`] is the seam for a cluster-wide lookup (the Kubernetes
//! API) of addresses that are not local: the engine does not change.
pub mod cgroup;
pub mod kubelet;
pub mod names;

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

pub use self::cgroup::Runtime;

/// How often the picture is rebuilt (and at once when a namespace is new).
/// A scan looks at every process: every 2 s it was a tenth of an idle
/// `ctrace live`'s CPU here, and it grows with the process count.
pub const REFRESH: Duration = Duration::from_secs(5);
pub const MAX_NAMESPACES: usize = 4096;
pub const MAX_ADDRESSES: usize = 65_536;

/// What a namespace is, for the people reading the numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The initial namespace (ctrace's own).
    Host,
    /// An `ip netns` name.
    Netns,
    Container,
    Pod,
}

/// A workload: a named namespace, a container, or a Kubernetes pod.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Workload {
    pub kind: Kind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<Runtime>,
    /// The container id (64 hex digits) or the pod UID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Container name, pod name, `ip netns` name; None when it cannot be had.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_namespace: Option<String>,
}

impl Workload {
    pub fn host() -> Self {
        Workload { kind: Kind::Host, runtime: None, id: None, name: Some("host".into()), pod_namespace: None }
    }

    pub fn netns(name: &str) -> Self {
        Workload { kind: Kind::Netns, runtime: None, id: None, name: Some(name.into()), pod_namespace: None }
    }

    /// One short phrase: `pod shop/web-7d9f`, `container web (podman)`,
    /// `container 2c4d9f1e8b7a (docker)`, `netns blue`, `host`.
    pub fn label(&self) -> String {
        let short_id = || self.id.as_deref().map(|id| id.chars().take(12).collect::<String>()).unwrap_or_default();
        let runtime = self.runtime.map(|r| format!(" ({})", r.as_str())).unwrap_or_default();
        match self.kind {
            Kind::Host => "host".into(),
            Kind::Netns => format!("netns {}", self.name.as_deref().unwrap_or("?")),
            Kind::Pod => match (&self.pod_namespace, &self.name) {
                (Some(ns), Some(name)) => format!("pod {ns}/{name}"),
                _ => format!("pod {}", self.id.as_deref().unwrap_or("?")),
            },
            Kind::Container => match &self.name {
                Some(name) => format!("container {name}{runtime}"),
                None => format!("container {}{runtime}", short_id()),
            },
        }
    }

    /// A column's worth: the name alone (`web`, `shop/web-7d9f`, `host`),
    /// or the short id where there is no name.
    pub fn short(&self) -> String {
        match (self.kind, &self.pod_namespace, &self.name) {
            (Kind::Pod, Some(ns), Some(name)) => format!("{ns}/{name}"),
            (_, _, Some(name)) => name.clone(),
            _ => self.id.as_deref().map(|id| id.chars().take(12).collect()).unwrap_or_else(|| "?".into()),
        }
    }

    /// Does `pod=` or `container=` of a filter match it (name or id prefix)?
    pub fn matches(&self, kind: Kind, wanted: &str) -> bool {
        let by_id = self.id.as_deref().is_some_and(|id| wanted.len() >= 4 && id.starts_with(wanted));
        let by_name = match (kind, &self.pod_namespace, &self.name) {
            (Kind::Pod, Some(ns), Some(name)) => wanted == name || wanted == format!("{ns}/{name}"),
            (_, _, Some(name)) => wanted == name,
            _ => false,
        };
        self.kind == kind && (by_id || by_name)
    }
}

/// Who owns an address that is not on this machine: a seam for a cluster
/// lookup, none built in.
pub trait AddressOwner: Send {
    fn owner(&self, addr: IpAddr) -> Option<Workload>;
}

/// The namespaces and addresses of this machine, and who is behind them.
#[derive(Default)]
pub struct Workloads {
    by_netns: HashMap<u32, Workload>,
    by_address: HashMap<IpAddr, u32>,
    /// Namespaces that are gone, oldest first: named still, until the bound.
    gone: Vec<u32>,
    remote: Option<Box<dyn AddressOwner>>,
    /// Said once: what could not be read, and what is missing because of it.
    pub warnings: Vec<String>,
    warned: std::collections::HashSet<&'static str>,
    scanner: Option<Scanner>,
}

/// What one scan found: pure data, so the merging can be tested.
#[derive(Debug, Default)]
pub struct Scan {
    pub namespaces: HashMap<u32, Workload>,
    pub addresses: Vec<(IpAddr, u32)>,
    /// What could not be read, by kind (said once each).
    pub warnings: Vec<(&'static str, String)>,
}

/// The thread that scans: every [`REFRESH`], or at once when asked. A scan
/// reads every process's cgroup and enters every namespace: the engine's
/// thread (which also answers scrapes) must never wait for one.
struct Scanner {
    scans: std::sync::mpsc::Receiver<Scan>,
    wake: std::sync::mpsc::SyncSender<()>,
}

impl Scanner {
    fn start() -> Self {
        let (scans_tx, scans) = std::sync::mpsc::sync_channel(1);
        let (wake, woken) = std::sync::mpsc::sync_channel::<()>(1);
        std::thread::Builder::new()
            .name("ctrace-workloads".into())
            .spawn(move || loop {
                if scans_tx.send(scan()).is_err() {
                    return; // the front end is gone
                }
                match woken.recv_timeout(REFRESH) {
                    Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                }
            })
            .expect("spawn the workload scanner");
        Scanner { scans, wake }
    }
}

impl Workloads {
    pub fn new() -> Self {
        Self::default()
    }

    /// A lookup for addresses no local namespace has.
    pub fn with_remote(mut self, owner: Box<dyn AddressOwner>) -> Self {
        self.remote = Some(owner);
        self
    }

    pub fn of_netns(&self, netns: u32) -> Option<&Workload> {
        self.by_netns.get(&netns)
    }

    /// The local workload that has `addr` on an interface, else the remote
    /// lookup's answer.
    pub fn of_address(&self, addr: IpAddr) -> Option<Workload> {
        match self.by_address.get(&addr) {
            Some(netns) => self.by_netns.get(netns).cloned(),
            None => self.remote.as_ref().and_then(|r| r.owner(addr)),
        }
    }

    /// Rebuilds the picture when [`REFRESH`] has passed or a namespace it
    /// does not know yet shows up in `seen`.
    ///
    /// Never waits: the scans run on their own thread (started by the first
    /// call); this takes the latest finished one in and asks for another at
    /// once when a namespace is new.
    pub fn refresh(&mut self, seen: impl IntoIterator<Item = u32>) {
        let scanner = self.scanner.get_or_insert_with(Scanner::start);
        let mut latest = None;
        while let Ok(scan) = scanner.scans.try_recv() {
            latest = Some(scan);
        }
        let unknown = seen.into_iter().any(|ns| !self.by_netns.contains_key(&ns));
        if unknown {
            let _ = scanner.wake.try_send(());
        }
        if let Some(scan) = latest {
            self.merge(scan);
        }
    }

    /// Scans here and now (the end of a recording: the last word).
    pub fn refresh_now(&mut self) {
        self.merge(scan());
    }

    /// The warnings not yet handed out (each is made once).
    pub fn take_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
    }

    fn warn(&mut self, what: &'static str, why: String) {
        if self.warned.insert(what) {
            self.warnings.push(why);
        }
    }

    /// Takes a scan in: new and changed namespaces replace what was known,
    /// vanished ones are kept as gone, the oldest forgotten past the bound.
    pub fn merge(&mut self, scan: Scan) {
        for (what, why) in &scan.warnings {
            self.warn(what, why.clone());
        }
        for netns in self.by_netns.keys() {
            if !scan.namespaces.contains_key(netns) && !self.gone.contains(netns) {
                self.gone.push(*netns);
            }
        }
        self.gone.retain(|ns| !scan.namespaces.contains_key(ns));
        self.by_netns.extend(scan.namespaces);
        while self.by_netns.len() > MAX_NAMESPACES && !self.gone.is_empty() {
            let oldest = self.gone.remove(0);
            self.by_netns.remove(&oldest);
        }
        self.by_address.clear();
        for (addr, netns) in scan.addresses.into_iter().take(MAX_ADDRESSES) {
            // The first namespace found with it (a shared address is
            // ambiguous; loopback is left out by the scan).
            self.by_address.entry(addr).or_insert(netns);
        }
    }
}

/// Looks at the machine: every namespace reachable through `/run/netns` or
/// a process, what it is, and its interfaces' addresses.
fn scan() -> Scan {
    let mut out = Scan::default();
    let mut warnings = Vec::new();
    let mut warn = |what: &'static str, why: String| warnings.push((what, why));
    let own = std::fs::metadata("/proc/self/ns/net").map(|m| std::os::unix::fs::MetadataExt::ino(&m) as u32).ok();
    let pods = kubelet::pods(Path::new(kubelet::POD_LOGS));
    let names = names::Names::load();
    // Named namespaces: their names, and a path to enter them by.
    let mut paths: BTreeMap<u32, PathBuf> = BTreeMap::new();
    for dir in ["/run/netns", "/var/run/netns"] {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        for entry in entries.flatten() {
            if let Some(inum) = inode(&entry.path()) {
                let name = entry.file_name().to_string_lossy().into_owned();
                out.namespaces.entry(inum).or_insert_with(|| Workload::netns(&name));
                paths.entry(inum).or_insert(entry.path());
            }
        }
    }
    // Processes: a container's cgroup names the container (and its pod).
    let mut unreadable = 0;
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let pid = entry.file_name();
            if !pid.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let ns_path = entry.path().join("ns/net");
            let inum = match std::fs::metadata(&ns_path) {
                Ok(meta) => std::os::unix::fs::MetadataExt::ino(&meta) as u32,
                // Not allowed (another user's process without CAP_SYS_PTRACE);
                // a process that has just exited is not a failure.
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    unreadable += 1;
                    continue;
                }
                Err(_) => continue,
            };
            paths.entry(inum).or_insert(ns_path);
            if Some(inum) == own {
                out.namespaces.entry(inum).or_insert_with(Workload::host);
                continue;
            }
            if matches!(out.namespaces.get(&inum), Some(w) if w.kind != Kind::Netns) {
                continue; // known from another of its processes
            }
            let Ok(text) = std::fs::read_to_string(entry.path().join("cgroup")) else { continue };
            if let Some(container) = cgroup::container_of(&text) {
                let workload = match container.pod_uid.as_deref() {
                    Some(uid) => {
                        let pod = pods.get(uid);
                        Workload {
                            kind: Kind::Pod,
                            runtime: Some(container.runtime),
                            id: Some(uid.to_string()),
                            name: pod.map(|p| p.name.clone()),
                            pod_namespace: pod.map(|p| p.namespace.clone()),
                        }
                    }
                    None => Workload {
                        kind: Kind::Container,
                        runtime: Some(container.runtime),
                        name: names.name(container.runtime, &container.id),
                        id: Some(container.id),
                        pod_namespace: None,
                    },
                };
                // A container in a named namespace is the container.
                out.namespaces.insert(inum, workload);
            }
        }
    }
    if unreadable > 0 {
        warn(
            "proc",
            format!(
                "{unreadable} processes' namespaces could not be read (permission denied: it takes root with \
                 CAP_SYS_PTRACE, and no security module in the way): their workloads are unnamed"
            ),
        );
    }
    if let Some(why) = names.unreadable() {
        warn("names", why);
    }
    // Interface addresses, read inside each namespace by one thread that
    // moves from namespace to namespace (and then ends).
    let paths: Vec<(u32, PathBuf)> = paths.into_iter().collect();
    let read = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let mut found = Vec::new();
                for (inum, path) in &paths {
                    let Ok(ns) = std::fs::File::open(path) else { continue };
                    // SAFETY: setns on a valid namespace fd, on this thread only.
                    if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) } != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    found.extend(local_addresses().into_iter().map(|a| (a, *inum)));
                }
                Ok(found)
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("address thread panicked")))
    });
    match read {
        Ok(addresses) => out.addresses = addresses,
        Err(err) => {
            warn("addresses", format!("cannot enter namespaces to read their addresses ({err}): sources are not named"))
        }
    }
    out.warnings = warnings;
    out
}

fn inode(path: &Path) -> Option<u32> {
    std::fs::metadata(path).ok().map(|m| std::os::unix::fs::MetadataExt::ino(&m) as u32)
}

/// The calling thread's namespace's interface addresses, loopback left out.
fn local_addresses() -> Vec<IpAddr> {
    let mut found = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` (freed below); every entry's address,
    // when not null, points at a sockaddr of the family it says.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            return found;
        }
        let mut entry = list;
        while !entry.is_null() {
            let addr = (*entry).ifa_addr;
            if !addr.is_null() {
                match i32::from((*addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(addr as *const libc::sockaddr_in);
                        found.push(IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes()));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(addr as *const libc::sockaddr_in6);
                        found.push(IpAddr::from(sin6.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            entry = (*entry).ifa_next;
        }
        libc::freeifaddrs(list);
    }
    found.retain(|a| !a.is_loopback());
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(name: &str) -> Workload {
        Workload {
            kind: Kind::Container,
            runtime: Some(Runtime::Podman),
            id: Some(format!("{name}00000000")),
            name: Some(name.into()),
            pod_namespace: None,
        }
    }

    #[test]
    fn labels_say_what_it_is() {
        assert_eq!(Workload::host().label(), "host");
        assert_eq!(Workload::netns("blue").label(), "netns blue");
        assert_eq!(container("web").label(), "container web (podman)");
        let unnamed = Workload { name: None, id: Some("2c4d9f1e8b7a6c5d".into()), ..container("x") };
        assert_eq!(unnamed.label(), "container 2c4d9f1e8b7a (podman)");
        let pod = Workload {
            kind: Kind::Pod,
            runtime: Some(Runtime::Containerd),
            id: Some("1f2e3d4c-5b6a-4798-8a6b-5c4d3e2f1a0b".into()),
            name: Some("web-7d9f".into()),
            pod_namespace: Some("shop".into()),
        };
        assert_eq!(pod.label(), "pod shop/web-7d9f");
        assert_eq!(
            (pod.short(), unnamed.short(), container("web").short()),
            ("shop/web-7d9f".into(), "2c4d9f1e8b7a".into(), "web".into())
        );
        assert!(pod.matches(Kind::Pod, "web-7d9f") && pod.matches(Kind::Pod, "shop/web-7d9f"));
        assert!(pod.matches(Kind::Pod, "1f2e3d4c") && !pod.matches(Kind::Container, "web-7d9f"));
        assert!(container("web").matches(Kind::Container, "web") && !container("web").matches(Kind::Container, "we"));
    }

    #[test]
    fn a_namespace_that_goes_keeps_its_name_until_the_bound() {
        let mut w = Workloads::new();
        let addr: IpAddr = "198.18.8.10".parse().unwrap();
        w.merge(Scan {
            namespaces: HashMap::from([(1, Workload::host()), (7, container("web"))]),
            addresses: vec![(addr, 7)],
            ..Default::default()
        });
        assert_eq!(w.of_address(addr).map(|w| w.label()), Some("container web (podman)".into()));
        // The container stops: its namespace is gone from the scan.
        w.merge(Scan { namespaces: HashMap::from([(1, Workload::host())]), ..Default::default() });
        assert_eq!(w.of_netns(7).map(Workload::label), Some("container web (podman)".into()), "kept once gone");
        assert_eq!(w.of_address(addr), None, "an address is only what interfaces have now");
        // Many namespaces later, the gone one is the first to be forgotten.
        let many: HashMap<u32, Workload> = (100..100 + MAX_NAMESPACES as u32).map(|i| (i, container("n"))).collect();
        w.merge(Scan { namespaces: many, ..Default::default() });
        assert!(w.of_netns(7).is_none() && w.by_netns.len() <= MAX_NAMESPACES + 1);
        assert!(w.of_netns(100).is_some(), "live namespaces are never pushed out");
    }

    struct Cluster;
    impl AddressOwner for Cluster {
        fn owner(&self, addr: IpAddr) -> Option<Workload> {
            (addr == IpAddr::from([10, 42, 3, 17])).then(|| container("remote"))
        }
    }

    #[test]
    fn addresses_not_local_go_to_the_remote_lookup() {
        let mut w = Workloads::new().with_remote(Box::new(Cluster));
        w.merge(Scan {
            namespaces: HashMap::from([(7, container("web"))]),
            addresses: vec![("198.18.8.10".parse().unwrap(), 7)],
            ..Default::default()
        });
        assert_eq!(w.of_address("198.18.8.10".parse().unwrap()).unwrap().name.as_deref(), Some("web"));
        assert_eq!(w.of_address("10.42.3.17".parse().unwrap()).unwrap().name.as_deref(), Some("remote"));
        assert_eq!(w.of_address("192.0.2.1".parse().unwrap()), None);
    }
}
