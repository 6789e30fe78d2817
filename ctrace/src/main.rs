//! The ctrace command line; the library (lib.rs) does the work.
use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use ctrace::record;

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
        sudo ctrace record --duration 30 --output drops.json\n  \
        sudo ctrace record --output - | jq '.sources[:5]'"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Record drops for a while and write them per source, with a per-second
    /// histogram, as JSON (schema ctrace.drops.v1).
    #[command(after_help = "Reasons:\n  \
        table_full       conntrack dropped a new flow while its namespace's table was at nf_conntrack_max\n  \
        conntrack_other  conntrack dropped it for another reason (allocation failure, tracker verdict)\n  \
        ruleset          a rule (nftables/iptables) dropped it\n\n\
        The file also holds the kernel's own counters per namespace (drop, insert_failed, \
        early_drop, invalid) over the same window, to check the attribution against.")]
    Record {
        /// Seconds to record; without it, records until Ctrl-C or SIGTERM.
        /// Ctrl-C always ends early and still writes a complete file.
        #[arg(long, short = 'd', value_name = "SECS", value_parser = parse_duration)]
        duration: Option<Duration>,
        /// Where to write the JSON file; `-` for stdout. Written atomically.
        #[arg(long, short = 'o', value_name = "PATH", default_value = "-")]
        output: PathBuf,
    },
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number of seconds"))?;
    if !(secs > 0.0 && secs.is_finite() && secs <= 7.0 * 86_400.0) {
        return Err("the duration must be more than 0 and at most a week (604800 s)".into());
    }
    Ok(Duration::from_secs_f64(secs))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("ctrace: error: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Record { duration, output } => {
                record::run(record::Options { duration, output }).await
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
        let err = Cli::try_parse_from(["ctrace", "record", "--bogus"])
            .err()
            .unwrap();
        assert_eq!(err.kind(), clap::error::ErrorKind::UnknownArgument);
        let err = Cli::try_parse_from(["ctrace", "record", "--duration", "x"])
            .err()
            .unwrap();
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
        let err = Cli::try_parse_from(["ctrace"]).err().unwrap();
        assert_eq!(
            err.kind(),
            clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        );
    }
}
