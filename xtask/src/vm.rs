//! Guest kernels under qemu, for the hook tiers this machine cannot run
//! (no kprobes, fentry refused): `cargo xtask vm-run` and `vm-test`.
//!
//! A guest shares the host's `/` read-only over 9p with a tmpfs overlay on
//! top, so it sees the freshly built binaries and its writes vanish. Debian's
//! kernel packages are downloaded with apt and unpacked into a cache folder
//! (`~/.cache/ctrace/vm`, or `CTRACE_VM_CACHE`) that later runs reuse.
use std::{
    fmt::Write as _,
    io::{Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use crate::{describe, root};

/// The guest kernels ctrace is tested on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelChoice {
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
}

impl KernelChoice {
    pub const ALL: [KernelChoice; 3] = [KernelChoice::Debian61, KernelChoice::Debian612, KernelChoice::Builtin612];

    fn label(self) -> &'static str {
        match self {
            KernelChoice::Debian61 => "6.1",
            KernelChoice::Debian612 => "6.12",
            KernelChoice::Builtin612 => "6.12-builtin",
        }
    }

    /// apt-cache search pattern for the package, newest picked.
    fn package_pattern(self) -> &'static str {
        match self {
            KernelChoice::Debian61 => r"^linux-image-6\.1\.0-[0-9]+-amd64$",
            KernelChoice::Debian612 => r"^linux-image-6\.12\.[0-9]+\+deb12-amd64$",
            KernelChoice::Builtin612 => "",
        }
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

fn output(cmd: &mut Command) -> anyhow::Result<String> {
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

fn newest_package(pattern: &str) -> anyhow::Result<String> {
    let search = || output(Command::new("apt-cache").args(["search", "--names-only", pattern]));
    let mut listing = search()?;
    if listing.trim().is_empty() {
        output(Command::new("apt-get").args(["update", "-q"]))?;
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
    let package = newest_package(choice.package_pattern())?;
    let dir = cache.join(&package);
    let root = dir.join("root");
    if !dir.join("ready").exists() {
        eprintln!("xtask: fetching {package} into {}", dir.display());
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        output(Command::new("apt-get").args(["download", "-q", &package]).current_dir(&dir))?;
        let deb = std::fs::read_dir(&dir)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .context("apt-get download left no .deb")?;
        output(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
        std::fs::remove_file(&deb)?;
        let release = release_of(&root)?;
        output(Command::new("depmod").arg("-a").arg("-b").arg(&root).arg(&release))?;
        std::fs::write(dir.join("ready"), "")?;
    }
    let release = release_of(&root)?;
    Ok(Kernel { label: choice.label(), vmlinuz: root.join(format!("boot/vmlinuz-{release}")), release, root })
}

fn release_of(root: &Path) -> anyhow::Result<String> {
    std::fs::read_dir(root.join("lib/modules"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .context("the kernel package has no lib/modules")
}

/// Modules the initramfs loads, in dependency order, for 9p and overlay
/// (none for a kernel without modules).
fn boot_modules(kernel: &Kernel) -> anyhow::Result<Vec<PathBuf>> {
    let mut modules: Vec<PathBuf> = Vec::new();
    if !kernel.root.join("lib/modules").exists() {
        return Ok(modules);
    }
    for name in ["virtio_pci", "9pnet_virtio", "9p", "overlay"] {
        let deps = output(Command::new("modprobe").arg("-d").arg(&kernel.root).args([
            "-S",
            &kernel.release,
            "--show-depends",
            name,
        ]))?;
        for line in deps.lines() {
            if let Some(path) = line.strip_prefix("insmod ").and_then(|l| l.split_whitespace().next()) {
                let path = PathBuf::from(path);
                if !modules.contains(&path) {
                    modules.push(path);
                }
            }
        }
    }
    Ok(modules)
}

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /lower /rw /newroot
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read m; do insmod "/modules/$m" || echo "ctrace-vm: insmod $m failed"; done < /modules/order
fail() { echo "ctrace-vm: $*"; echo "CTRACE-VM-EXIT=125"; exit 1; }
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,ro hostroot /lower || fail "9p mount failed"
mount -t tmpfs -o size=60% tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot || fail "overlay failed"
if [ -d "/lower$(cat /modules_dir)" ]; then
  mkdir -p /newroot/lib/modules
  mount --bind "/lower$(cat /modules_dir)" /newroot/lib/modules || fail "no guest modules"
fi
cp /guest /newroot/ctrace-vm-guest
cp /cmd /newroot/ctrace-vm-cmd
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
mount --move /dev /newroot/dev
exec switch_root /newroot /bin/sh /ctrace-vm-guest
"#;

/// Runs in the guest's new root as PID 1. When it exits the kernel panics
/// and, with panic=-1 and -no-reboot, qemu exits.
/// /tmp is left to the overlay (writable, discarded): the command may run
/// from a folder under the host's /tmp.
const GUEST: &str = r#"export PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TERM=xterm-256color
mount -t tmpfs tmpfs /run
mkdir -p /run/netns /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
hostname ctrace-vm
ip link set lo up
stty -F /dev/ttyS1 raw -echo
stty -F /dev/ttyS2 raw -echo
sh /ctrace-vm-cmd > /dev/ttyS1 2> /dev/ttyS2 < /dev/null
echo "CTRACE-VM-EXIT=$?" > /dev/ttyS0
"#;

fn shell_quote(word: &str) -> String {
    if !word.is_empty() && word.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b)) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Packs the initramfs for one run of `command` (run in `cwd`, with `env`).
fn initramfs(
    kernel: &Kernel,
    command: &[String],
    cwd: &Path,
    env: &[(String, String)],
    dir: &Path,
) -> anyhow::Result<PathBuf> {
    let stage = dir.join("initramfs");
    std::fs::create_dir_all(stage.join("bin"))?;
    std::fs::create_dir_all(stage.join("modules"))?;
    std::fs::copy("/bin/busybox", stage.join("bin/busybox")).context("busybox-static is not installed")?;
    let mut order = String::new();
    for module in boot_modules(kernel)? {
        let name = module.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let plain = name.trim_end_matches(".xz").trim_end_matches(".zst").to_string();
        let bytes = if name.ends_with(".xz") {
            let out = Command::new("xz").arg("-dc").arg(&module).output()?;
            if !out.status.success() {
                bail!("cannot decompress {}", module.display());
            }
            out.stdout
        } else {
            std::fs::read(&module)?
        };
        std::fs::write(stage.join("modules").join(&plain), bytes)?;
        let _ = writeln!(order, "{plain}");
    }
    std::fs::write(stage.join("modules/order"), order)?;
    std::fs::write(stage.join("modules_dir"), kernel.root.join("lib/modules").display().to_string())?;
    let init = stage.join("init");
    std::fs::write(&init, INIT)?;
    std::fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    std::fs::write(stage.join("guest"), GUEST)?;
    let mut script = format!("cd {} || exit 126\n", shell_quote(&cwd.display().to_string()));
    for (k, v) in env {
        let _ = writeln!(script, "export {k}={}", shell_quote(v));
    }
    script.push_str(&command.iter().map(|w| shell_quote(w)).collect::<Vec<_>>().join(" "));
    script.push('\n');
    std::fs::write(stage.join("cmd"), script)?;

    let image = dir.join("initramfs.cpio");
    let files = output(Command::new("/bin/busybox").args(["find", "."]).current_dir(&stage))?;
    let mut cpio = Command::new("/bin/busybox")
        .args(["cpio", "-o", "-H", "newc"])
        .current_dir(&stage)
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(&image)?)
        .stderr(Stdio::null())
        .spawn()?;
    cpio.stdin.take().expect("piped").write_all(files.as_bytes())?;
    if !cpio.wait()?.success() {
        bail!("packing the initramfs failed");
    }
    Ok(image)
}

/// Copies what a file gains to `to` until `done`, then the rest.
fn follow(
    path: PathBuf,
    mut to: impl Write + Send + 'static,
    done: &'static AtomicBool,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut pos = 0u64;
        let mut buf = Vec::new();
        loop {
            let finished = done.load(Ordering::Acquire);
            if let Ok(mut f) = std::fs::File::open(&path) {
                if f.seek(SeekFrom::Start(pos)).is_ok() {
                    buf.clear();
                    if let Ok(n) = f.read_to_end(&mut buf) {
                        pos += n as u64;
                        let _ = to.write_all(&buf);
                        let _ = to.flush();
                    }
                }
            }
            if finished {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
}

/// What a command in a guest left: its exit code and standard output.
pub struct GuestRun {
    pub code: i32,
    pub stdout: String,
}

/// Boots `kernel`, runs `command` as root in the guest (host files visible,
/// writes discarded), streams its output, and returns its exit code and
/// standard output.
pub fn run_in_guest(
    kernel: &Kernel,
    command: &[String],
    env: &[(String, String)],
    timeout: Duration,
) -> anyhow::Result<GuestRun> {
    static DONE: AtomicBool = AtomicBool::new(false);
    DONE.store(false, Ordering::Release);
    let dir = std::env::temp_dir().join(format!("ctrace-vm-{}-{}", kernel.label, std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let result = (|| {
        let image = initramfs(kernel, command, &root(), env, &dir)?;
        let (out, err, console) = (dir.join("stdout"), dir.join("stderr"), dir.join("console"));
        for f in [&out, &err] {
            std::fs::write(f, "")?;
        }
        let accel = if kvm_usable() { "kvm" } else { "tcg" };
        let mut qemu = Command::new("qemu-system-x86_64");
        qemu.args(["-machine", &format!("q35,accel={accel}"), "-cpu", "max", "-smp", "2", "-m", "2G"])
            .args(["-nographic", "-no-reboot", "-nodefaults"])
            .arg("-kernel")
            .arg(&kernel.vmlinuz)
            .arg("-initrd")
            .arg(&image)
            .args(["-append", "console=ttyS0 panic=-1 quiet loglevel=3"])
            .args(["-fsdev", "local,id=root,path=/,readonly=on,security_model=none,multidevs=remap"])
            .args(["-device", "virtio-9p-pci,fsdev=root,mount_tag=hostroot"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-serial")
            .arg(format!("file:{}", out.display()))
            .arg("-serial")
            .arg(format!("file:{}", err.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = qemu.spawn().context("cannot start qemu-system-x86_64 (run `cargo xtask setup`)")?;
        let followers = [follow(out.clone(), std::io::stdout(), &DONE), follow(err.clone(), std::io::stderr(), &DONE)];
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if started.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the {} guest did not finish within {:?}", kernel.label, timeout);
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        DONE.store(true, Ordering::Release);
        for f in followers {
            let _ = f.join();
        }
        let console_text = std::fs::read_to_string(&console).unwrap_or_default();
        let code = console_text.lines().find_map(|l| {
            let (_, code) = l.split_once("CTRACE-VM-EXIT=")?;
            code.trim().parse::<i32>().ok()
        });
        match code {
            Some(code) => {
                eprintln!(
                    "xtask: {} guest ({}) finished in {:.1} s: exit {code}",
                    kernel.label,
                    kernel.release,
                    started.elapsed().as_secs_f64()
                );
                let stdout = String::from_utf8_lossy(&std::fs::read(&out).unwrap_or_default()).into_owned();
                Ok(GuestRun { code, stdout })
            }
            None => {
                let mut qemu_err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut qemu_err);
                }
                let tail: Vec<&str> =
                    console_text.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect();
                bail!(
                    "the {} guest gave no exit code (qemu {status}: {qemu_err}); console ends:\n{}",
                    kernel.label,
                    tail.join("\n")
                )
            }
        }
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// KVM only where the CPU offers virtualisation; /dev/kvm alone is not enough.
fn kvm_usable() -> bool {
    Path::new("/dev/kvm").exists()
        && std::fs::read_to_string("/proc/cpuinfo")
            .is_ok_and(|c| c.split_whitespace().any(|w| w == "vmx" || w == "svm"))
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

    #[test]
    fn quoting_for_the_guest_shell() {
        assert_eq!(shell_quote("target/debug/ctrace"), "target/debug/ctrace");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
