//! The guest kernels: Debian's packages, downloaded and unpacked into the
//! cache, and the small built-in kernel built here.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context as _};

use crate::describe;

/// The guest kernels ctrace is tested on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelChoice {
    /// Debian bullseye's 5.10 (conntrack as a module, no module BTF,
    /// `kfree_skb` without a drop reason).
    #[value(name = "5.10")]
    Debian510,
    /// Debian bookworm's 6.1 (conntrack as a module: kprobe tier).
    #[value(name = "6.1")]
    Debian61,
    /// Debian's 6.12 (conntrack as a module: kprobe tier).
    #[value(name = "6.12")]
    Debian612,
    /// A small 6.12 built here from Debian's linux-source-6.12 with
    /// conntrack built in (fentry tier).
    #[value(name = "6.12-builtin")]
    Builtin612,
    /// Debian sid's newest 7.x (packaged as linux-binary + linux-modules,
    /// modules as .ko.xz under /usr/lib/modules).
    #[value(name = "7.x")]
    Debian7,
}

impl KernelChoice {
    pub const ALL: [KernelChoice; 5] = [
        KernelChoice::Debian510,
        KernelChoice::Debian61,
        KernelChoice::Debian612,
        KernelChoice::Builtin612,
        KernelChoice::Debian7,
    ];

    pub fn label(self) -> &'static str {
        match self {
            KernelChoice::Debian510 => "5.10",
            KernelChoice::Debian61 => "6.1",
            KernelChoice::Debian612 => "6.12",
            KernelChoice::Builtin612 => "6.12-builtin",
            KernelChoice::Debian7 => "7.x",
        }
    }

    /// apt-cache search pattern for the package, newest picked.
    fn package_pattern(self) -> &'static str {
        match self {
            KernelChoice::Debian510 => r"^linux-image-5\.10\.0-[0-9]+-amd64$",
            KernelChoice::Debian61 => r"^linux-image-6\.1\.0-[0-9]+-amd64$",
            KernelChoice::Debian612 => r"^linux-image-6\.12\.[0-9]+\+deb12-amd64$",
            KernelChoice::Builtin612 => "",
            // The image package is a stub from 7.x: the kernel is in
            // linux-binary, its modules in linux-modules.
            KernelChoice::Debian7 => r"^linux-binary-7\.[0-9.]+\+deb[0-9]+-amd64$",
        }
    }

    /// The suites `vm-test --kernel all` runs in this guest, where not all:
    /// a storm recorded on each tier this kernel allows, checked against the
    /// kernel's counters.
    pub fn smoke_suites(self) -> Option<&'static [&'static str]> {
        match self {
            KernelChoice::Debian510 | KernelChoice::Debian7 => Some(&["table_full"]),
            _ => None,
        }
    }

    /// The Debian suite that has it, when it is not the host's (bookworm).
    fn suite(self) -> Option<&'static str> {
        match self {
            KernelChoice::Debian510 => Some("bullseye"),
            KernelChoice::Debian7 => Some("sid"),
            _ => None,
        }
    }

    /// The packages to unpack for `package` (the one the pattern found).
    fn packages(self, package: &str) -> Vec<String> {
        match self {
            // linux-base holds the config and System.map.
            KernelChoice::Debian7 => vec![
                package.to_string(),
                package.replacen("linux-binary-", "linux-modules-", 1),
                package.replacen("linux-binary-", "linux-base-", 1),
            ],
            _ => vec![package.to_string()],
        }
    }
}

/// apt for another Debian suite, with its own sources and lists in the
/// cache, so the host's apt configuration stays as it is.
struct Apt {
    options: Vec<String>,
}

impl Apt {
    fn for_suite(suite: Option<&str>) -> anyhow::Result<Self> {
        let Some(suite) = suite else { return Ok(Apt { options: Vec::new() }) };
        let dir = cache_dir().join(format!("apt-{suite}"));
        std::fs::create_dir_all(dir.join("lists/partial"))?;
        let sources = dir.join("sources.list");
        std::fs::write(&sources, format!("deb http://deb.debian.org/debian {suite} main\n"))?;
        let options = vec![
            format!("-oDir::Etc::sourcelist={}", sources.display()),
            "-oDir::Etc::sourceparts=-".to_string(),
            format!("-oDir::State::Lists={}", dir.join("lists").display()),
            "-oAPT::Get::List-Cleanup=0".to_string(),
        ];
        Ok(Apt { options })
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.args(&self.options);
        cmd
    }
}

/// Options for the built-in kernel, on top of tinyconfig (see
/// shared notes, vm-testing.md): 64-bit SMP with ACPI, a console, 9p and
/// overlay for the shared root, netfilter with conntrack and nf_tables
/// built in, BPF with BTF, kprobes and ftrace.
const BUILTIN_OPTIONS: &[&str] = &[
    "64BIT",
    "SMP",
    "ACPI",
    "PRINTK",
    "TTY",
    "SERIAL_8250",
    "SERIAL_8250_CONSOLE",
    "BLK_DEV_INITRD",
    "PROC_FS",
    "SYSFS",
    "DEVTMPFS",
    "DEVTMPFS_MOUNT",
    "TMPFS",
    "BINFMT_ELF",
    "BINFMT_SCRIPT",
    "MULTIUSER",
    "FUTEX",
    "EPOLL",
    "SIGNALFD",
    "TIMERFD",
    "EVENTFD",
    "SHMEM",
    "FILE_LOCKING",
    "POSIX_TIMERS",
    "SYSCTL",
    "PROC_SYSCTL",
    "UNIX98_PTYS",
    "NET",
    "INET",
    "IPV6",
    "UNIX",
    "PACKET",
    "NETDEVICES",
    "NET_CORE",
    "VETH",
    "NAMESPACES",
    "NET_NS",
    "PID_NS",
    "UTS_NS",
    "IPC_NS",
    "NETFILTER",
    "NETFILTER_ADVANCED",
    "NF_CONNTRACK",
    "NF_CONNTRACK_MARK",
    "NF_CONNTRACK_ZONES",
    "NF_CONNTRACK_EVENTS",
    "NF_CONNTRACK_TIMEOUT",
    "NF_CONNTRACK_TIMESTAMP",
    "NF_CONNTRACK_LABELS",
    "NF_CONNTRACK_PROCFS",
    "NF_CT_NETLINK",
    "NF_TABLES",
    "NF_TABLES_INET",
    "NF_TABLES_IPV4",
    "NF_TABLES_IPV6",
    "NFT_CT",
    "NETFILTER_NETLINK_QUEUE",
    "NFT_QUEUE",
    "NFT_COMPAT",
    "NETFILTER_XTABLES",
    "NETFILTER_XT_MATCH_CONNTRACK",
    "NETFILTER_XT_TARGET_CT",
    "NETFILTER_XT_TARGET_NOTRACK",
    "IP_NF_IPTABLES",
    "IP_NF_FILTER",
    "IP_NF_RAW",
    "IP6_NF_IPTABLES",
    "IP6_NF_FILTER",
    "IP6_NF_RAW",
    "NF_NAT",
    "IP_NF_NAT",
    "BPF",
    "BPF_SYSCALL",
    "BPF_JIT",
    "BPF_EVENTS",
    "DEBUG_INFO",
    "DEBUG_INFO_DWARF_TOOLCHAIN_DEFAULT",
    "DEBUG_INFO_BTF",
    "FTRACE",
    "FUNCTION_TRACER",
    "DYNAMIC_FTRACE",
    "DYNAMIC_FTRACE_WITH_DIRECT_CALLS",
    "KPROBES",
    "KPROBE_EVENTS",
    "PERF_EVENTS",
    "TRACEPOINTS",
    "KALLSYMS",
    "KALLSYMS_ALL",
    "PCI",
    "VIRTIO_MENU",
    "VIRTIO",
    "VIRTIO_PCI",
    "NET_9P",
    "NET_9P_VIRTIO",
    "9P_FS",
    "OVERLAY_FS",
    "CGROUPS",
    "CGROUP_BPF",
    "SYSVIPC",
];

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x100_0000_01b3))
}

/// Builds (once per source version and option list) the built-in kernel.
fn prepare_builtin() -> anyhow::Result<Kernel> {
    let version = output(Command::new("dpkg-query").args(["-W", "-f=${Version}", "linux-source-6.12"]))
        .context("linux-source-6.12 is not installed: run `cargo xtask setup`")?;
    let key = fnv1a(format!("{version}\n{}", BUILTIN_OPTIONS.join(",")).as_bytes());
    let dir = cache_dir().join(format!("builtin-6.12-{key:016x}"));
    let src = dir.join("src");
    if !dir.join("ready").exists() {
        // Builds for other sources or options are stale: 2-3 GB each.
        for entry in std::fs::read_dir(cache_dir()).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with("builtin-6.12-") {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        std::fs::create_dir_all(&src)?;
        let started = Instant::now();
        eprintln!("xtask: building the 6.12-builtin kernel from linux-source {version} in {}", dir.display());
        output(
            Command::new("tar")
                .args(["-xJf", "/usr/src/linux-source-6.12.tar.xz", "--strip-components=1", "-C"])
                .arg(&src),
        )?;
        let make = |args: &[&str]| -> anyhow::Result<()> {
            let status = Command::new("make").args(args).current_dir(&src).stdout(Stdio::null()).status()?;
            if !status.success() {
                bail!("make {} failed", args.join(" "));
            }
            Ok(())
        };
        make(&["tinyconfig"])?;
        let mut config = Command::new("scripts/config");
        config.current_dir(&src);
        for option in BUILTIN_OPTIONS {
            config.args(["-e", option]);
        }
        output(&mut config)?;
        make(&["olddefconfig"])?;
        let cfg = std::fs::read_to_string(src.join(".config"))?;
        let missing: Vec<&str> =
            BUILTIN_OPTIONS.iter().copied().filter(|o| !cfg.contains(&format!("CONFIG_{o}=y\n"))).collect();
        if !missing.is_empty() {
            bail!("the built-in kernel's config lacks {missing:?} (a dependency is missing)");
        }
        let jobs = std::thread::available_parallelism().map_or(2, |n| n.get()).to_string();
        make(&["-j", &jobs, "bzImage"])?;
        std::fs::write(dir.join("ready"), "")?;
        eprintln!("xtask: built the 6.12-builtin kernel in {:.0} s", started.elapsed().as_secs_f64());
    }
    let release = output(Command::new("make").args(["-s", "kernelrelease"]).current_dir(&src))?.trim().to_string();
    Ok(Kernel { label: "6.12-builtin", release, vmlinuz: src.join("arch/x86/boot/bzImage"), root: dir })
}

/// An unpacked kernel: its image and a root holding `lib/modules/<release>`.
pub struct Kernel {
    pub label: &'static str,
    pub release: String,
    pub vmlinuz: PathBuf,
    pub root: PathBuf,
}

pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CTRACE_VM_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    Path::new(&home).join(".cache/ctrace/vm")
}

pub(super) fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("cannot run {}", describe(cmd)))?;
    if !out.status.success() {
        bail!("`{}` failed: {}", describe(cmd), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Sorts Debian package names by their numbers, so -56 comes after -9.
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).filter_map(|s| s.parse().ok()).collect()
}

fn newest_package(apt: &Apt, pattern: &str) -> anyhow::Result<String> {
    let search = || output(apt.command("apt-cache").args(["search", "--names-only", pattern]));
    let mut listing = search()?;
    if listing.trim().is_empty() {
        output(apt.command("apt-get").args(["update", "-q"]))?;
        listing = search()?;
    }
    listing
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .max_by_key(|name| version_key(name))
        .map(str::to_string)
        .with_context(|| format!("no Debian package matches {pattern}"))
}

/// Downloads and unpacks a kernel package (or builds the built-in kernel)
/// once; later calls reuse it.
pub fn prepare(choice: KernelChoice) -> anyhow::Result<Kernel> {
    if choice == KernelChoice::Builtin612 {
        return prepare_builtin();
    }
    let cache = cache_dir();
    std::fs::create_dir_all(&cache)?;
    let apt = Apt::for_suite(choice.suite())?;
    let package = newest_package(&apt, choice.package_pattern())?;
    let dir = cache.join(&package);
    let root = dir.join("root");
    if !dir.join("ready").exists() {
        eprintln!("xtask: fetching {package} into {}", dir.display());
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        for package in choice.packages(&package) {
            output(apt.command("apt-get").args(["download", "-q", &package]).current_dir(&dir))?;
        }
        let debs: Vec<PathBuf> = std::fs::read_dir(&dir)?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "deb"))
            .collect();
        if debs.is_empty() {
            bail!("apt-get download left no .deb");
        }
        for deb in debs {
            output(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
            std::fs::remove_file(&deb)?;
        }
        // From 7.x the modules (and the image) are under /usr/lib/modules:
        // one place for the tools that look in lib/modules.
        if !root.join("lib/modules").exists() && root.join("usr/lib/modules").exists() {
            std::os::unix::fs::symlink("usr/lib", root.join("lib"))?;
        }
        let release = release_of(&root)?;
        output(Command::new("depmod").arg("-a").arg("-b").arg(&root).arg(&release))?;
        std::fs::write(dir.join("ready"), "")?;
    }
    let release = release_of(&root)?;
    let vmlinuz = [root.join(format!("boot/vmlinuz-{release}")), root.join(format!("lib/modules/{release}/vmlinuz"))]
        .into_iter()
        .find(|p| p.exists())
        .with_context(|| format!("no vmlinuz for {release} in {}", root.display()))?;
    Ok(Kernel { label: choice.label(), vmlinuz, release, root })
}

fn release_of(root: &Path) -> anyhow::Result<String> {
    std::fs::read_dir(root.join("lib/modules"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .context("the kernel package has no lib/modules")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_kernel_package_wins() {
        let mut names = ["linux-image-6.1.0-9-amd64", "linux-image-6.1.0-56-amd64", "linux-image-6.1.0-55-amd64"];
        names.sort_by_key(|n| version_key(n));
        assert_eq!(names.last(), Some(&"linux-image-6.1.0-56-amd64"));
    }
}
