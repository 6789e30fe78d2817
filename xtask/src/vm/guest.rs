//! Booting a kernel under qemu with the host's `/` shared read-only, and
//! running one command in it.
use std::{
    fmt::Write as _,
    io::{Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use crate::root;

use super::kernels::{output, Kernel};
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
echo "CTRACE-VM-START" > /dev/ttyS0
sh /ctrace-vm-cmd > /dev/ttyS1 2> /dev/ttyS2 < /dev/null
code=$?
echo "CTRACE-VM-EXIT=$code" > /dev/ttyS0
# Also through the kernel log, which the panic that follows init's exit
# flushes to the console: under qemu -icount the line above was lost now
# and then (the tty's last bytes not yet sent when the guest ended).
echo "<2>CTRACE-VM-EXIT=$code" > /dev/kmsg
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

/// How the guest's clock runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clock {
    /// The host's: KVM where this machine allows it, else emulated CPUs.
    Host,
    /// Counted in the instructions the guest executes, 2 ns each (qemu
    /// `-icount shift=1`), idle time skipped (`sleep=off`); emulated, one
    /// host thread for both CPUs. The same work then takes the same guest
    /// time whatever else the host is doing: costs compare to about a
    /// percent, where the emulated CPUs' wall clock spread 5-60 % between
    /// identical runs. Guest seconds are instruction counts: ratios only.
    Instructions,
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
    clock: Clock,
    timeout: Duration,
) -> anyhow::Result<GuestRun> {
    // An emulated kernel now and then dies while booting (seen once: an
    // int3 oops in sched_clock_cpu under TCG, two seconds in), before the
    // command has started: that guest is booted again, and says so.
    const BOOTS: u32 = 3;
    for boot in 1..=BOOTS {
        match boot_and_run(kernel, command, env, clock, timeout)? {
            Some(run) => return Ok(run),
            None if boot < BOOTS => {
                eprintln!(
                    "xtask: the {} guest's kernel died before the command started; booting it again",
                    kernel.label
                )
            }
            None => {}
        }
    }
    bail!("the {} guest's kernel died before the command started, {BOOTS} times", kernel.label)
}

/// One boot: None when the kernel died before the command started.
fn boot_and_run(
    kernel: &Kernel,
    command: &[String],
    env: &[(String, String)],
    clock: Clock,
    timeout: Duration,
) -> anyhow::Result<Option<GuestRun>> {
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
        let mut qemu = Command::new("qemu-system-x86_64");
        let accel = match clock {
            Clock::Host if kvm_usable() => "kvm",
            Clock::Host => "tcg",
            Clock::Instructions => {
                qemu.args(["-icount", "shift=1,sleep=off"]);
                "tcg"
            }
        };
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
                Ok(Some(GuestRun { code, stdout }))
            }
            None if !console_text.contains("CTRACE-VM-START") => {
                eprintln!(
                    "xtask: the {} guest died while booting ({status}); console:\n{}",
                    kernel.label,
                    console_excerpt(&console_text, 12)
                );
                Ok(None)
            }
            None => {
                let mut qemu_err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut qemu_err);
                }
                // The whole console outlives the guest's folder, for the oops.
                let kept = crate::root().join(format!("target/guest-{}-console.log", kernel.label));
                let kept = match std::fs::copy(&console, &kept) {
                    Ok(_) => format!("whole console in {}", kept.display()),
                    Err(e) => format!("console not kept: {e}"),
                };
                bail!(
                    "the {} guest gave no exit code (qemu {status}: {qemu_err}; {kept}); console:\n{}",
                    kernel.label,
                    console_excerpt(&console_text, 30)
                )
            }
        }
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// The lines that open a kernel's report of its own failure.
const OOPS_OPENERS: [&str; 6] =
    ["------------[ cut here ]", "BUG:", "Oops:", "general protection fault", "kernel BUG at", "WARNING:"];

/// What of a dead guest's console goes into the error: from the first
/// oops or BUG line on (its reason and RIP come before the call trace, which
/// alone says little), at most 80 lines, then always the last `n` lines.
fn console_excerpt(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines.len().saturating_sub(n);
    let from = lines.iter().position(|l| OOPS_OPENERS.iter().any(|o| l.contains(o))).unwrap_or(tail);
    let to = lines.len().min(from + 80);
    let rest = tail.max(to);
    let mut excerpt = lines[from..to].join("\n");
    if rest > to {
        excerpt.push_str(&format!("\n[{} lines left out]", rest - to));
    }
    if rest < lines.len() {
        excerpt.push('\n');
        excerpt.push_str(&lines[rest..].join("\n"));
    }
    excerpt
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
    fn quoting_for_the_guest_shell() {
        assert_eq!(shell_quote("target/debug/ctrace"), "target/debug/ctrace");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn a_crashed_guest_is_shown_from_its_oops() {
        let boot: String = (0..50).map(|i| format!("boot line {i}\n")).collect();
        let oops = "BUG: unable to handle page fault\nRIP: 0010:nf_ct_delete+0x5\nKernel panic - not syncing\n";
        let excerpt = console_excerpt(&(boot.clone() + oops), 2);
        assert!(excerpt.starts_with("BUG: unable"), "{excerpt}");
        assert!(excerpt.ends_with("Kernel panic - not syncing"), "{excerpt}");
        // No oops: the tail.
        assert_eq!(console_excerpt(&boot, 2), "boot line 48\nboot line 49");
        // A long trace is cut, and says so.
        let long: String = (0..100).map(|i| format!("trace {i}\n")).collect();
        let excerpt = console_excerpt(&format!("Oops: 0003\n{long}"), 2);
        assert_eq!(excerpt.lines().count(), 83);
        assert!(excerpt.starts_with("Oops: 0003\ntrace 0\n"), "{excerpt}");
        assert!(excerpt.ends_with("trace 78\n[19 lines left out]\ntrace 98\ntrace 99"), "{excerpt}");
    }
}
