//! Project tasks: `cargo xtask setup`, `cargo xtask test`.
mod bench;
mod connections;
mod figures;
mod fleet;
mod flood;
mod kernels;
mod setup;
mod tally;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use tally::Tally;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "ctrace's setup, test and benchmark tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Make this machine ready to build and test ctrace: Debian packages the
    /// tests use, nightly rust-src, and bpf-linker built against the
    /// nightly's own LLVM. Idempotent; quick when all is present.
    Setup,
    /// Run the whole test suite: formatting, clippy, unit tests, and the
    /// privileged end-to-end tests (root required; they fail, not skip,
    /// without it).
    Test {
        /// Skip `setup` (for a machine known to be ready).
        #[arg(long)]
        no_setup: bool,
        /// Skip the guest-kernel runs (`vm-test`); they are part of the suite.
        #[arg(long)]
        no_vm: bool,
        /// Run the privileged end-to-end suites (host, then each guest)
        /// this many times and report each test's passes: stability,
        /// measured. Fails if any test failed once.
        #[arg(long, default_value = "1", value_parser = clap::value_parser!(u32).range(1..))]
        repeat: u32,
    },
    /// Run a command as root inside a guest kernel under qemu (host files
    /// visible read-only, writes discarded); exits with the command's code.
    VmRun {
        #[arg(long, value_enum)]
        kernel: vm::KernelChoice,
        /// Minutes before the guest is killed.
        #[arg(long, default_value = "20")]
        timeout_min: u64,
        /// Run the guest's clock by the instructions it executes (qemu
        /// -icount), as `bench --guests` does in the kprobe guest:
        /// repeatable costs, not speeds.
        #[arg(long)]
        count_instructions: bool,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Inside a guest (run by `bench --guests`): new connections per second
    /// through a namespace, off, with ctrace on TIER, with --invalid.
    #[command(hide = true)]
    ConnRate {
        #[arg(long, default_value = "5")]
        secs: u64,
        #[arg(long)]
        tier: String,
    },
    /// Run the privileged end-to-end tests inside guest kernels.
    VmTest {
        #[arg(long, value_enum, default_value = "all")]
        kernel: VmSelection,
        /// Run the suite this many times in each guest and report each
        /// test's passes.
        #[arg(long, default_value = "1", value_parser = clap::value_parser!(u32).range(1..))]
        repeat: u32,
        /// Run only these suites (test binaries: table_full, conntrack_hooks, ...).
        #[arg(long = "suite")]
        suites: Vec<String>,
    },
    /// Build the release binary and install it with its man pages and shell
    /// completions (bash, zsh, fish) under a prefix.
    Install {
        #[arg(long, default_value = "/usr/local")]
        prefix: PathBuf,
    },
    /// Measure: decode+aggregate throughput, memory under 10 M sources, CPU
    /// during a real namespace storm next to bpftrace, and memory, file size
    /// and lost events of record, live and serve under a random-source flood
    /// (root). Prints the figures; asserts nothing.
    Bench {
        /// Seconds of storm per tool (0 skips the storm).
        #[arg(long, default_value = "5")]
        storm_secs: u64,
        /// Only the storm (for guest kernels, where emulated CPUs make the
        /// synthetic throughput figures meaningless and slow).
        #[arg(long)]
        storm_only: bool,
        /// Seconds of random-source flood with record, live and serve
        /// running (root; 0 skips it); then `--storm-secs` (at least 5) of
        /// it per tool for the CPU comparison with bpftrace.
        #[arg(long, default_value = "60")]
        flood_secs: u64,
        /// Also write every figure under fixed keys to FILE (JSON; null,
        /// with the reason, where this run could not measure one).
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// Also measure new connections per second in the 6.12 guest
        /// (kprobe tier) and the built-in 6.12 guest (fentry tier), with
        /// and without ctrace attached (emulated CPUs: ratios only).
        #[arg(long)]
        guests: bool,
        /// Also measure this ctrace binary (an earlier release build, say
        /// copied aside before a change) in the storm and flood CPU runs,
        /// beside the current one, and with --guests in the guests after
        /// it: before and after in one run.
        #[arg(long, value_name = "BIN")]
        earlier: Option<PathBuf>,
    },
    /// Check every hook against each Debian kernel line (5.10, 6.1, 6.12,
    /// the newest 7.x) from its package, without booting it; print the
    /// compatibility table. Fails when a verdict differs from
    /// docs/kernels.json (--write updates it).
    Kernels {
        #[arg(long)]
        write: bool,
    },
    /// Build the container image (deploy/container/Containerfile) from a
    /// statically linked release binary, with podman.
    Image {
        #[arg(long, default_value = concat!("localhost/ctrace:", env!("CARGO_PKG_VERSION")))]
        tag: String,
    },
    /// Print the README's "Measured" table from a `bench --json` file
    /// (docs/bench.json is the one the README shows).
    BenchTable {
        #[arg(default_value = "docs/bench.json")]
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse().task {
        Task::Setup => setup::setup(),
        Task::Test { no_setup, no_vm, repeat } => test(no_setup, no_vm, repeat),
        Task::Bench { storm_secs, storm_only, flood_secs, json, guests, earlier } => {
            bench::bench(storm_secs, storm_only, flood_secs, json.as_deref(), guests, earlier.as_deref())
        }
        Task::BenchTable { file } => bench_table(&file),
        Task::ConnRate { secs, tier } => connections::conn_rate(secs, &tier),
        Task::Install { prefix } => install(&prefix),
        Task::Image { tag } => fleet::image(&tag),
        Task::Kernels { write } => kernels::kernels(write),
        Task::VmRun { kernel, timeout_min, count_instructions, command } => {
            let clock = if count_instructions { vm::Clock::Instructions } else { vm::Clock::Host };
            vm_run(kernel, timeout_min, clock, &command)
        }
        Task::VmTest { kernel, repeat, suites } => {
            let mut tally = Tally::default();
            let result = vm_test(kernel, repeat, &suites, &mut tally);
            eprint!("\nxtask: end-to-end tests, passes per run:\n{}", tally.report());
            result
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// The debug build of ctrace (under `CARGO_TARGET_DIR` when set, so that a
/// guest run can use its own build while another is made beside it).
pub fn ctrace_debug_bin() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from);
    target.join("debug/ctrace")
}

/// Runs a command in the workspace root, echoing it, and fails if it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: $ {}", describe(cmd));
    let status = cmd.current_dir(root()).status().with_context(|| format!("cannot run {}", describe(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", describe(cmd));
    }
    Ok(())
}

pub fn describe(cmd: &Command) -> String {
    let mut words = vec![cmd.get_program().to_string_lossy().into_owned()];
    words.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    words.join(" ")
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn test(no_setup: bool, no_vm: bool, repeat: u32) -> anyhow::Result<()> {
    if !no_setup {
        setup::setup()?;
    }
    run(cargo().args(["fmt", "--all", "--check"]))?;
    // The host crates (default members), then the kernel programs for their
    // own target with the nightly toolchain.
    run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    run(Command::new("rustup")
        .args(["run", "nightly", "cargo", "clippy", "--package", "ctrace-ebpf"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .args(["--target-dir", "target/ebpf-clippy", "--", "-D", "warnings"])
        .env_remove("RUSTC")
        .env_remove("CARGO"))?;
    // Unit tests: no privileges, no shared kernel state.
    run(cargo().args(["test", "--lib", "--bins"]))?;
    // The Prometheus rules, firing as their tests say; the manifests.
    fleet::check_deploy()?;
    // Every hook against every Debian kernel line, from the packages.
    kernels::kernels(false)?;
    // The fleet suite builds its container image from this binary.
    fleet::static_binary()?;
    let mut tally = Tally::default();
    let result = e2e_rounds(no_vm, repeat, &mut tally);
    eprint!("\nxtask: end-to-end tests, passes per run:\n{}", tally.report());
    result?;
    if no_vm {
        eprintln!("xtask: NOT RUN: guest-kernel tests (--no-vm); CI runs them");
    }
    Ok(())
}

/// The privileged suites `repeat` times: on the host, then in each guest.
fn e2e_rounds(no_vm: bool, repeat: u32, tally: &mut Tally) -> anyhow::Result<()> {
    run(cargo().args(["build", "--bin", "ctrace"]))?;
    let bins = e2e_test_binaries()?;
    let ctrace = ctrace_debug_bin();
    let mut failed_rounds = 0;
    for round in 1..=repeat {
        if repeat > 1 {
            eprintln!("xtask: host end-to-end tests, run {round} of {repeat}");
        }
        for bin in &bins {
            // One test at a time: the end-to-end tests share kernel state
            // (nf_conntrack_max is global). --nocapture: a test that cannot
            // run here says why (SKIPPED, NOT EXERCISED) in the log even
            // when it passes.
            let (ok, stdout) =
                run_echoing(Command::new(bin).args(["--test-threads=1", "--nocapture"]).env("CTRACE_BIN", &ctrace))?;
            let found = tally::outcomes(&stdout);
            if found.is_empty() {
                tally.add_broken_run("host", &suite_name(bin));
            }
            tally.add("host", &suite_name(bin), &found);
            failed_rounds += u32::from(!ok);
        }
    }
    if !no_vm {
        vm_test(VmSelection::All, repeat, &[], tally)?;
    }
    if failed_rounds > 0 {
        bail!("end-to-end tests failed on the host ({failed_rounds} test binary runs)");
    }
    Ok(())
}

/// A test binary's suite name: `conntrack_hooks-0123abcd` -> `conntrack_hooks`.
fn suite_name(bin: &Path) -> String {
    let stem = bin.file_name().unwrap_or_default().to_string_lossy();
    stem.rsplit_once('-').map_or(stem.to_string(), |(name, _)| name.to_string())
}

/// Runs a command in the workspace root with its standard output echoed
/// and kept; returns whether it succeeded, and that output.
fn run_echoing(cmd: &mut Command) -> anyhow::Result<(bool, String)> {
    use std::io::{BufRead, Write};
    eprintln!("xtask: $ {}", describe(cmd));
    let mut child = cmd
        .current_dir(root())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", describe(cmd)))?;
    let mut kept = String::new();
    let stdout = child.stdout.take().expect("piped");
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line?;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
        kept.push_str(&line);
        kept.push('\n');
    }
    Ok((child.wait()?.success(), kept))
}

fn bench_table(file: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", file.display()))?;
    print!("{}", figures::markdown(&json));
    Ok(())
}

fn install(prefix: &Path) -> anyhow::Result<()> {
    run(cargo().args(["build", "--release", "--bin", "ctrace"]))?;
    let built = root().join("target/release/ctrace");
    let bin_dir = prefix.join("bin");
    std::fs::create_dir_all(&bin_dir)?;
    let bin = bin_dir.join("ctrace");
    std::fs::copy(&built, &bin).with_context(|| format!("cannot install {}", bin.display()))?;
    run(Command::new(&bin).arg("manpages").arg(prefix.join("share/man/man1")))?;
    for (shell, path) in [
        ("bash", "share/bash-completion/completions/ctrace"),
        ("zsh", "share/zsh/site-functions/_ctrace"),
        ("fish", "share/fish/vendor_completions.d/ctrace.fish"),
    ] {
        let out = Command::new(&bin).args(["completions", shell]).output()?;
        if !out.status.success() {
            bail!("ctrace completions {shell} failed");
        }
        let path = prefix.join(path);
        std::fs::create_dir_all(path.parent().expect("has a folder"))?;
        std::fs::write(&path, out.stdout).with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("xtask: installed {}", path.display());
    }
    eprintln!("xtask: installed {}", bin.display());
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum VmSelection {
    #[value(name = "5.10")]
    Debian510,
    #[value(name = "6.1")]
    Debian61,
    #[value(name = "6.12")]
    Debian612,
    #[value(name = "6.12-builtin")]
    Builtin612,
    #[value(name = "7.x")]
    Debian7,
    All,
}

/// The end-to-end test executables, built.
fn e2e_test_binaries() -> anyhow::Result<Vec<PathBuf>> {
    let out = cargo()
        .args(["test", "-p", "ctrace-tests", "--no-run", "--message-format=json"])
        .current_dir(root())
        .stderr(std::process::Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("building the end-to-end tests failed");
    }
    let mut bins = Vec::new();
    for message in cargo_metadata::Message::parse_stream(out.stdout.as_slice()) {
        if let cargo_metadata::Message::CompilerArtifact(artifact) = message? {
            let is_test = artifact.target.kind.contains(&cargo_metadata::TargetKind::Test);
            if let (true, Some(exe)) = (is_test, artifact.executable) {
                bins.push(exe.into_std_path_buf());
            }
        }
    }
    Ok(bins)
}

/// Marks where each test binary's output starts in a guest's output.
const SUITE_MARK: &str = "xtask-suite ";

fn vm_test(selection: VmSelection, repeat: u32, only: &[String], tally: &mut Tally) -> anyhow::Result<()> {
    run(cargo().args(["build", "--bin", "ctrace"]))?;
    let bins = e2e_test_binaries()?;
    let known: Vec<String> = bins.iter().map(|b| suite_name(b)).collect();
    if let Some(unknown) = only.iter().find(|s| !known.contains(s)) {
        bail!("no end-to-end suite is called {unknown}; there are {}", known.join(", "));
    }
    let kernels: Vec<vm::KernelChoice> = match selection {
        VmSelection::Debian510 => vec![vm::KernelChoice::Debian510],
        VmSelection::Debian61 => vec![vm::KernelChoice::Debian61],
        VmSelection::Debian612 => vec![vm::KernelChoice::Debian612],
        VmSelection::Builtin612 => vec![vm::KernelChoice::Builtin612],
        VmSelection::Debian7 => vec![vm::KernelChoice::Debian7],
        VmSelection::All => vm::KernelChoice::ALL.to_vec(),
    };
    // One shell line: every test binary runs, the exit code says whether any failed.
    let script_for = |suites: Option<&[&str]>| {
        let mut script = String::from("fail=0; ");
        for bin in bins.iter().filter(|b| suites.is_none_or(|s| s.contains(&suite_name(b).as_str()))) {
            script.push_str(&format!(
                "echo {SUITE_MARK}{}; {} --test-threads=1 --nocapture --color never || fail=1; ",
                suite_name(bin),
                bin.display()
            ));
        }
        script.push_str("exit $fail");
        script
    };
    let mut failed = Vec::new();
    for round in 1..=repeat {
        for &choice in &kernels {
            let smoke = (selection == VmSelection::All).then(|| choice.smoke_suites()).flatten();
            let kernel = match vm::prepare(choice) {
                Ok(kernel) => kernel,
                // Another suite's package (5.10, 7.x) that cannot be fetched
                // is said loudly, not failed on: the registry, not ctrace.
                Err(e) if smoke.is_some() => {
                    eprintln!("xtask: NOT RUN: the {} guest: its kernel could not be fetched: {e:#}", choice.label());
                    tally.add_broken_run(choice.label(), "kernel not fetched");
                    continue;
                }
                Err(e) => return Err(e),
            };
            // CTRACE_GUEST: tests that do not depend on the kernel run on the host only.
            let env = [
                ("CTRACE_BIN".to_string(), ctrace_debug_bin().display().to_string()),
                ("CTRACE_GUEST".to_string(), kernel.label.to_string()),
            ];
            let of = if repeat > 1 { format!(", run {round} of {repeat}") } else { String::new() };
            eprintln!("xtask: end-to-end tests in the {} guest ({}{of})", kernel.label, kernel.release);
            // `all` (CI) runs the newest and oldest kernels' storm suite only
            // (the time budget; their whole suite: `--kernel 5.10`, `--kernel 7.x`).
            let named: Vec<&str> = only.iter().map(String::as_str).collect();
            let suites = if named.is_empty() { smoke } else { Some(&named[..]) };
            if let (Some(suites), true) = (smoke, named.is_empty()) {
                eprintln!("xtask: the {} guest runs the storm suites only ({suites:?}) in `all`", kernel.label);
            }
            let command = ["sh".into(), "-c".into(), script_for(suites)];
            match vm::run_in_guest(&kernel, &command, &env, vm::Clock::Host, std::time::Duration::from_secs(30 * 60)) {
                Ok(guest) => {
                    for part in guest.stdout.split(SUITE_MARK).skip(1) {
                        let (suite, output) = part.split_once('\n').unwrap_or((part, ""));
                        let found = tally::outcomes(output);
                        if found.is_empty() {
                            tally.add_broken_run(kernel.label, suite.trim());
                        }
                        tally.add(kernel.label, suite.trim(), &found);
                    }
                    if guest.code != 0 {
                        failed.push(kernel.label);
                    }
                }
                Err(err) => {
                    eprintln!("xtask: the {} guest failed: {err:#}", kernel.label);
                    tally.add_broken_run(kernel.label, "guest run");
                    failed.push(kernel.label);
                }
            }
        }
    }
    if !failed.is_empty() {
        bail!("end-to-end tests failed in the guest kernels {failed:?}");
    }
    Ok(())
}

fn vm_run(kernel: vm::KernelChoice, timeout_min: u64, clock: vm::Clock, command: &[String]) -> anyhow::Result<()> {
    let kernel = vm::prepare(kernel)?;
    let guest = vm::run_in_guest(&kernel, command, &[], clock, std::time::Duration::from_secs(timeout_min * 60))?;
    std::process::exit(guest.code);
}
