//! Project tasks: `cargo xtask setup`, `cargo xtask test`.
mod bench;
mod setup;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

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
    },
    /// Run a command as root inside a guest kernel under qemu (host files
    /// visible read-only, writes discarded); exits with the command's code.
    VmRun {
        #[arg(long, value_enum)]
        kernel: vm::KernelChoice,
        /// Minutes before the guest is killed.
        #[arg(long, default_value = "20")]
        timeout_min: u64,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Build the release binary and install it with its man pages and shell
    /// completions (bash, zsh, fish) under a prefix.
    Install {
        #[arg(long, default_value = "/usr/local")]
        prefix: PathBuf,
    },
    /// Measure: decode+aggregate throughput, memory under 10 M sources, and
    /// CPU during a real namespace storm next to bpftrace (root). Prints the
    /// figures; asserts nothing.
    Bench {
        /// Seconds of storm per tool.
        #[arg(long, default_value = "5")]
        storm_secs: u64,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse().task {
        Task::Setup => setup::setup(),
        Task::Test { no_setup } => test(no_setup),
        Task::Bench { storm_secs } => bench::bench(storm_secs),
        Task::Install { prefix } => install(&prefix),
        Task::VmRun { kernel, timeout_min, command } => vm_run(kernel, timeout_min, &command),
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

fn test(no_setup: bool) -> anyhow::Result<()> {
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
    run(cargo().args(["build", "--bin", "ctrace"]))?;
    let bin = root().join("target/debug/ctrace");
    // One test at a time: the end-to-end tests share kernel state
    // (nf_conntrack_max is global).
    run(cargo().args(["test", "--", "--test-threads=1"]).env("CTRACE_BIN", bin))
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

fn vm_run(kernel: vm::KernelChoice, timeout_min: u64, command: &[String]) -> anyhow::Result<()> {
    let kernel = vm::prepare(kernel)?;
    let code = vm::run_in_guest(&kernel, command, &[], std::time::Duration::from_secs(timeout_min * 60))?;
    std::process::exit(code);
}
