//! Network namespaces made for a test, their conntrack ground truth, and
//! sysctls and nft counters: each undone by its guard's Drop.
use std::{
    fs::File,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use anyhow::Context as _;

use crate::{run, run_in};

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

    /// A name for the namespace process `pid` is in (`ip netns attach`), so
    /// a test can enter a container's namespace; on drop only the name goes.
    pub fn attach(name: &str, pid: u32) -> anyhow::Result<Self> {
        let _ = run("ip", &["netns", "delete", name]);
        run("ip", &["netns", "attach", name, &pid.to_string()])?;
        Ok(Netns { name: name.to_string() })
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

/// Packets counted by a named nftables counter.
pub fn nft_counter(ns: &Netns, family: &str, table: &str, name: &str) -> anyhow::Result<u64> {
    let json = ns.exec("nft", &["-j", "list", "counter", family, table, name])?;
    let value: serde_json::Value = serde_json::from_str(&json)?;
    value["nftables"]
        .as_array()
        .and_then(|items| items.iter().find_map(|i| i["counter"]["packets"].as_u64()))
        .with_context(|| format!("no packets in counter {name}: {json}"))
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
