//! The ctrace command line; the library (lib.rs) does the work.
use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{CommandFactory, Parser, Subcommand};
use ctrace::{
    export::{self, json::RecordFile, Format, Output},
    hooks::{self, HookChoice, TierChoice},
    live, record, serve,
};

#[derive(Parser)]
#[command(
    name = "ctrace",
    version,
    about = "Shows who is being dropped by Linux connection tracking, and why",
    long_about = "Shows who is being dropped by Linux connection tracking, and why.\n\n\
        When the conntrack table is full the kernel drops the first packet of every new \
        flow before any socket sees it: clients time out while `ss` looks normal. ctrace \
        hooks the kernel's drop path with eBPF and attributes every drop to its source \
        address, port, protocol, TCP state, reason and network namespace.\n\n\
        Needs root (or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN) and a kernel with BTF (5.17+).",
    after_help = "Examples:\n  \
        sudo ctrace live\n  \
        sudo ctrace record --duration 30 --output drops.json\n  \
        ctrace report drops.json --format svg --output drops.svg\n  \
        sudo ctrace serve --listen 127.0.0.1:9640\n  \
        sudo ctrace doctor"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The incident view: is conntrack dropping, why, who is hit, how full
    /// are the tables. A terminal UI on a terminal; plain text snapshots
    /// otherwise (or with --plain), JSON lines with --format jsonl.
    #[command(
        after_help = "Keys (terminal UI): q quit · s/S sort · / filter · c clear filter · p pause · r reset · ? help\n\n\
        Filter words (all must match): 198.18.0.0/16 (source prefix), :8080 (port), table_full | conntrack_other | \
        ruleset, ns=NAME|INODE, container=NAME|ID, pod=NAME|NAMESPACE/NAME|UID (the source's or the namespace's).\n\n\
        WORKLOAD column: the container, pod or `ip netns` that owns the source address -> the one the dropping \
        namespace belongs to (docs/workloads.md).\n\n\
        Examples:\n  sudo ctrace live\n  sudo ctrace live --filter ':443 table_full'\n  \
        sudo ctrace live --filter 'container=web'\n  \
        ssh host sudo ctrace live --plain | tee incident.txt\n  sudo ctrace live --format jsonl > snapshots.jsonl"
    )]
    Live {
        /// Seconds between refreshes.
        #[arg(long, short = 'i', value_name = "SECS", default_value = "1", value_parser = parse_duration)]
        interval: Duration,
        /// Plain text snapshots even on a terminal (the default when stdout is not one).
        #[arg(long)]
        plain: bool,
        /// Output when not drawing the terminal UI.
        #[arg(long, value_enum, default_value = "text")]
        format: live::Format,
        /// Show reverse-DNS names of sources (looked up in the background).
        #[arg(long)]
        resolve: bool,
        /// Rows in the top table.
        #[arg(long, value_name = "N", default_value = "20", value_parser = clap::value_parser!(u16).range(1..))]
        top: u16,
        /// Show only matching rows (see below); `/` changes it in the UI.
        #[arg(long, value_name = "WORDS")]
        filter: Option<String>,
        /// Sources tracked at once. Beyond it (a spoofed flood) the least
        /// dropped are replaced and counts carry a stated error bound;
        /// memory stays bounded.
        #[arg(long, value_name = "N", default_value = "16384", value_parser = clap::value_parser!(u32).range(16..=10_000_000))]
        capacity: u32,
        #[command(flatten)]
        hooks: HookChoice,
        /// Benchmark only: feed this many synthetic records instead of attaching.
        #[arg(long, hide = true, value_name = "N")]
        synthetic_events: Option<u64>,
        /// Benchmark only: distinct sources among the synthetic records.
        #[arg(long, hide = true, value_name = "N", default_value = "1000")]
        synthetic_sources: u64,
    },
    /// Record drops for a while and write them per source, with a per-second
    /// histogram: JSON (schema ctrace.drops.v2) or another --format.
    #[command(after_help = "Reasons:\n  \
        table_full       conntrack dropped a new flow while its namespace's table was at nf_conntrack_max\n  \
        conntrack_other  conntrack dropped it for another reason (allocation failure, tracker verdict)\n  \
        insert_failed    conntrack refused to insert its new entry (clash, chain too long; hook tiers)\n  \
        ruleset          a rule (nftables/iptables) dropped it\n\n\
        On hook tiers it also holds conntrack's own events per source: insert, insert_failed, \
        clash_resolved, early_drop, delete, table_full, and invalid with --invalid.\n\n\
        The file also holds the kernel's own counters per namespace (drop, insert_failed, \
        early_drop, invalid, clashres) over the same window, to check the attribution against.")]
    Record {
        /// Seconds to record; without it, records until Ctrl-C or SIGTERM.
        /// Ctrl-C always ends early and still writes a complete file.
        #[arg(long, short = 'd', value_name = "SECS", value_parser = parse_duration)]
        duration: Option<Duration>,
        /// Where to write; `-` for stdout. Files are written atomically.
        #[arg(long, short = 'o', value_name = "PATH", default_value = "-")]
        output: PathBuf,
        /// json is the full record; the others can also be made from it later
        /// with `ctrace report`.
        #[arg(long, short = 'f', value_enum, default_value = "json")]
        format: Format,
        /// Sources in the plot, the text report and the per-source metrics.
        #[arg(long, value_name = "N", default_value = "10", value_parser = clap::value_parser!(u16).range(1..))]
        top: u16,
        /// Source rows kept (and conntrack event rows). Beyond it (a spoofed
        /// flood) the least dropped sources are replaced, the file says it
        /// is approximate with the error bound, and their drops go to an
        /// `others` row per reason, so totals stay exact; memory and file
        /// size stay bounded.
        #[arg(long, value_name = "N", default_value = "4096", value_parser = clap::value_parser!(u32).range(16..=10_000_000))]
        capacity: u32,
        #[command(flatten)]
        hooks: HookChoice,
    },
    /// Turn a saved record (JSON) into a text report, CSV, OpenMetrics or an
    /// SVG plot. Offline: needs no privileges.
    #[command(
        after_help = "Examples:\n  ctrace report drops.json\n  ctrace report drops.json --format svg --output drops.svg\n  \
        ctrace report drops.json --format csv --output drops.csv"
    )]
    Report {
        /// A file written by `ctrace record` (schema ctrace.drops.v1 or v2).
        file: PathBuf,
        #[arg(long, short = 'f', value_enum, default_value = "text")]
        format: Format,
        /// Sources in the plot, the text report and the per-source metrics.
        #[arg(long, value_name = "N", default_value = "10", value_parser = clap::value_parser!(u16).range(1..))]
        top: u16,
        /// Where to write; `-` for stdout.
        #[arg(long, short = 'o', value_name = "PATH", default_value = "-")]
        output: PathBuf,
    },
    /// Serve OpenMetrics at /metrics for Prometheus: exact drop counters per
    /// reason and namespace, the kernel's conntrack counters, table entries,
    /// lost events, and per-source counters for the top sources only.
    #[command(after_help = "Every metric is described in docs/metrics.md; running it on many nodes (rules, \
        dashboard, image, DaemonSet) in docs/fleet.md.\n\nExamples:\n  sudo ctrace serve\n  \
        sudo ctrace serve --listen 0.0.0.0:9640 --web-config /etc/ctrace/web.yml\n  \
        sudo ctrace serve --netns gateway --listen 127.0.0.1:9641\n\nExample scrape config:\n  \
        - job_name: ctrace\n    static_configs: [{targets: ['127.0.0.1:9640']}]")]
    Serve {
        /// Address to listen on. Loopback by default; anything else is
        /// reachable from the network.
        #[arg(long, short = 'l', value_name = "ADDR:PORT", default_value = "127.0.0.1:9640")]
        listen: std::net::SocketAddr,
        /// Sources with their own series (bounds label cardinality under a
        /// spoofed flood).
        #[arg(long, value_name = "N", default_value = "20", value_parser = clap::value_parser!(u16).range(1..))]
        top: u16,
        /// Sources tracked at once (see `ctrace live --help`).
        #[arg(long, value_name = "N", default_value = "16384", value_parser = clap::value_parser!(u32).range(16..=10_000_000))]
        capacity: u32,
        /// Only this network namespace: its `ip netns` name, `host`, `pid N`,
        /// or its inode number. Drops, sources and the namespace's counters
        /// are its own; lost events and conntrack events stay node-wide.
        #[arg(long, value_name = "NAME")]
        netns: Option<String>,
        /// TLS and basic auth, in the web configuration file Prometheus
        /// exporters share (tls_server_config, basic_auth_users with bcrypt
        /// hashes): what a listener on anything but loopback should have
        /// (docs/fleet.md).
        #[arg(long, value_name = "FILE")]
        web_config: Option<PathBuf>,
        #[command(flatten)]
        hooks: HookChoice,
    },
    /// What to change: watches a short window, reads the kernel's counters,
    /// settings and tables, and says what is wrong, with the numbers that
    /// show it and the exact command (and config file) that fixes it.
    /// Changes nothing.
    #[command(after_help = "It looks at every network namespace with conntrack activity (or --netns), and at \
        the machine: occupancy and peak against nf_conntrack_max, the kernel's drop, early_drop, insert_failed, \
        invalid and chaintoolong counters, hash size and memory per entry, what fills each table (TCP states, ports, the \
        timeouts that hold them), local services worth a NOTRACK rule, the DNS insertion race, and the kernel \
        log's \"table full\" lines.\n\n\
        Exit status: 0 healthy, 1 warnings, 2 critical, 3 doctor itself failed (no privileges, bad \
        arguments). JSON schema: docs/doctor.md.\n\n\
        Examples:\n  sudo ctrace doctor\n  sudo ctrace doctor --netns web --window 30\n  \
        sudo ctrace doctor --format json | jq '.findings[] | select(.severity != \"info\")'")]
    Doctor {
        /// Seconds to watch drops and rates (Ctrl-C ends it early).
        #[arg(long, value_name = "SECS", default_value = "5", value_parser = parse_duration)]
        window: Duration,
        /// Only this namespace: its `ip netns` name, `host`, `pid N`, or its inode number.
        #[arg(long, value_name = "NAME")]
        netns: Option<String>,
        #[arg(long, value_enum, default_value = "text")]
        format: DoctorFormat,
        #[command(flatten)]
        hooks: HookChoice,
    },
    /// Reproduce an incident in two network namespaces the command makes
    /// (198.18.0.0/16, nothing leaves them), to see what ctrace shows
    /// before a real one. Removes everything on exit.
    #[command(after_help = "The demo fills its own namespace's table up to the real nf_conntrack_max (one value \
        for the machine; the count is per namespace, so no other namespace is affected). Where that takes \
        much kernel memory it asks for --yes, or --lower-max N, which lowers the maximum for the whole machine \
        until the demo ends and restores it on every exit. After a kill, `ctrace demo --cleanup` removes the \
        namespaces and restores the maximum.\n\n\
        Examples:\n  sudo ctrace demo --scenario table-full --lower-max 4096 &\n  \
        sudo ctrace doctor --netns ctrace-demo-srv\n  \
        sudo ctrace demo --scenario syn-flood --duration 20 --record flood.json --lower-max 4096\n  \
        sudo ctrace demo --scenario dns-race --duration 20   # needs two CPUs\n  \
        sudo ctrace demo --cleanup")]
    Demo {
        #[arg(long, value_enum, default_value = "table-full")]
        scenario: ctrace::demo::Scenario,
        /// Seconds the incident lasts (Ctrl-C ends it early).
        #[arg(long, value_name = "SECS", default_value = "60", value_parser = parse_duration)]
        duration: Duration,
        /// Go on although filling the table takes much kernel memory.
        #[arg(long)]
        yes: bool,
        /// Lower nf_conntrack_max to N for the demo (machine-wide; restored on exit).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(64..))]
        lower_max: Option<u64>,
        /// Also record the demo to FILE (`ctrace record`).
        #[arg(long, value_name = "FILE")]
        record: Option<PathBuf>,
        /// After the traffic, keep the namespaces and their tables until Ctrl-C.
        #[arg(long)]
        keep: bool,
        /// Remove what a killed demo left (namespaces, a lowered maximum), and exit.
        #[arg(long, exclusive = true)]
        cleanup: bool,
    },
    /// Show, for this kernel, each hook, the tier it uses and why: attaches
    /// and detaches again (root), or only checks what it can (otherwise).
    Probes {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Would the hooks work on another kernel? Checks its files the way
    /// ctrace checks the running kernel before loading (prototypes, struct
    /// members, enum values, which functions exist, the plan per tier).
    /// `cargo xtask kernels` extracts the files from kernel packages.
    #[command(after_help = "What files cannot tell: whether the verifier accepts the programs. Example:\n  \
        ctrace kernel-check --btf vmlinux.btf --module-btf nf_conntrack.btf --module-functions nf_conntrack.txt --kprobes")]
    KernelCheck {
        /// vmlinux's .BTF section, raw (as /sys/kernel/btf/vmlinux is).
        #[arg(long, value_name = "FILE")]
        btf: PathBuf,
        /// nf_conntrack.ko's .BTF section (none before 5.11).
        #[arg(long, value_name = "FILE")]
        module_btf: Option<PathBuf>,
        /// nf_conntrack's function names, one per line (`nm --defined-only`
        /// of the module); leave out where conntrack is built in.
        #[arg(long, value_name = "FILE")]
        module_functions: Option<PathBuf>,
        /// The kernel has kprobes (CONFIG_KPROBES=y).
        #[arg(long)]
        kprobes: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    #[command(after_help = "Example:\n  ctrace completions bash > /etc/bash_completion.d/ctrace")]
    Completions { shell: clap_complete::Shell },
    /// Write man pages (ctrace.1 and one per subcommand) into a folder.
    Manpages {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum DoctorFormat {
    Text,
    Json,
}

/// `doctor`'s status when it could not diagnose: apart from its verdicts.
const DOCTOR_FAILED: u8 = 3;

fn parse_duration(text: &str) -> Result<Duration, String> {
    let secs: f64 = text.parse().map_err(|_| format!("`{text}` is not a number of seconds"))?;
    if !(secs > 0.0 && secs.is_finite() && secs <= 7.0 * 86_400.0) {
        return Err("the duration must be more than 0 and at most a week (604800 s)".into());
    }
    Ok(Duration::from_secs_f64(secs))
}

fn report(file: &std::path::Path, format: Format, top: usize, output: &std::path::Path) -> anyhow::Result<()> {
    let output = Output::prepare(output)?;
    let record = RecordFile::load(file)?;
    output.write(&export::render(&record, format, top)?)
}

/// Attaches with every tier allowed, reports, detaches.
fn probes(json: bool) -> anyhow::Result<()> {
    let btf = hooks::kernel_btf()?;
    let (attached, _events) =
        hooks::Attached::attach(btf, HookChoice { tier: TierChoice::Auto, invalid: true, ring_kib: None })?;
    if json {
        let report = serde_json::json!({ "tier": attached.tier, "hooks": attached.hooks });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("tier: {}", attached.tier);
    println!("{:<12} {:<11} DETAIL", "HOOK", "TIER");
    for h in &attached.hooks {
        println!("{:<12} {:<11} {}", h.hook, h.tier.map_or("off", |t| t.name()), h.detail);
    }
    Ok(())
}

fn kernel_check(
    btf: &std::path::Path,
    module_btf: Option<&std::path::Path>,
    module_functions: Option<&std::path::Path>,
    kprobes: bool,
    json: bool,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let read = |path: &std::path::Path| std::fs::read(path).with_context(|| format!("cannot read {}", path.display()));
    let files = hooks::offline::KernelFiles {
        vmlinux_btf: read(btf)?,
        module_btf: module_btf.map(read).transpose()?,
        module_functions: module_functions
            .map(|p| read(p).map(|b| String::from_utf8_lossy(&b).split_whitespace().map(str::to_string).collect()))
            .transpose()?,
        kprobes,
    };
    let verdicts = hooks::offline::check(&files)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&verdicts)?);
        return Ok(());
    }
    println!("{:<12} {:<11} {:<4} DETAIL", "HOOK", "TIER", "OK");
    for v in &verdicts {
        println!("{:<12} {:<11} {:<4} {}", v.hook, v.tier, if v.ok { "yes" } else { "no" }, v.detail);
    }
    Ok(())
}

fn manpages(dir: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context as _;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let top = Cli::command();
    let mut pages = vec![("ctrace".to_string(), top.clone())];
    for sub in top.get_subcommands() {
        pages.push((format!("ctrace-{}", sub.get_name()), sub.clone().name(format!("ctrace-{}", sub.get_name()))));
    }
    for (name, cmd) in pages {
        let path = dir.join(format!("{name}.1"));
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd).render(&mut page)?;
        std::fs::write(&path, page).with_context(|| format!("cannot write {}", path.display()))?;
        println!("{}", path.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // doctor's 1 and 2 are verdicts: its usage errors must not read as one.
        Err(err) if err.use_stderr() && std::env::args().nth(1).as_deref() == Some("doctor") => {
            let _ = err.print();
            return ExitCode::from(DOCTOR_FAILED);
        }
        Err(err) => err.exit(),
    };
    if let Command::Doctor { window, netns, format, hooks } = cli.command {
        let options = ctrace::doctor::Options { window, netns, json: matches!(format, DoctorFormat::Json), hooks };
        return match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(runtime) => match runtime.block_on(ctrace::doctor::run(options)) {
                Ok(code) => ExitCode::from(code),
                Err(err) => {
                    eprintln!("ctrace: error: {err:#}");
                    ExitCode::from(DOCTOR_FAILED)
                }
            },
            Err(err) => {
                eprintln!("ctrace: error: cannot start the runtime: {err}");
                ExitCode::from(DOCTOR_FAILED)
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("ctrace: error: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Record { duration, output, format, top, capacity, hooks } => {
                let capacity = capacity as usize;
                record::run(record::Options { duration, output, format, top: top as usize, capacity, hooks }).await
            }
            Command::Probes { json } => probes(json),
            Command::KernelCheck { btf, module_btf, module_functions, kprobes, json } => {
                kernel_check(&btf, module_btf.as_deref(), module_functions.as_deref(), kprobes, json)
            }
            Command::Doctor { .. } => unreachable!("handled above"),
            Command::Demo { cleanup: true, .. } => ctrace::demo::cleanup(),
            Command::Demo { scenario, duration, yes, lower_max, record, keep, cleanup: false } => {
                ctrace::demo::run(ctrace::demo::Options { scenario, duration, yes, lower_max, record, keep }).await
            }
            Command::Report { file, format, top, output } => report(&file, format, top as usize, &output),
            Command::Serve { listen, top, capacity, netns, web_config, hooks } => {
                let (top, capacity) = (top as usize, capacity as usize);
                serve::run(serve::Options { listen, top, capacity, hooks, netns, web_config }).await
            }
            Command::Completions { shell } => {
                clap_complete::generate(shell, &mut Cli::command(), "ctrace", &mut std::io::stdout());
                Ok(())
            }
            Command::Manpages { dir } => manpages(&dir),
            Command::Live {
                interval,
                plain,
                format,
                resolve,
                top,
                filter,
                capacity,
                hooks,
                synthetic_events,
                synthetic_sources,
            } => {
                live::run(live::Options {
                    interval,
                    plain,
                    format,
                    resolve,
                    top: top as usize,
                    filter,
                    capacity: capacity as usize,
                    hooks,
                    synthetic: synthetic_events
                        .map(|events| live::synthetic::Workload { events, sources: synthetic_sources }),
                })
                .await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ctrace: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("0.5").unwrap(), Duration::from_millis(500));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("-3").is_err());
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("inf").is_err());
    }

    #[test]
    fn bad_arguments_are_usage_errors() {
        let err = Cli::try_parse_from(["ctrace", "record", "--bogus"]).err().unwrap();
        assert_eq!(err.kind(), clap::error::ErrorKind::UnknownArgument);
        let err = Cli::try_parse_from(["ctrace", "record", "--duration", "x"]).err().unwrap();
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
        let err = Cli::try_parse_from(["ctrace"]).err().unwrap();
        assert_eq!(err.kind(), clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand);
    }
}
