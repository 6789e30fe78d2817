//! New connections per second through a namespace with conntrack, with and
//! without ctrace attached: what the hooks cost the path every new flow
//! takes. Measured inside guest kernels (the hook tiers need them), on
//! emulated CPUs: only ratios mean anything. The kprobe guest's clock counts
//! instructions ([`vm::Clock::Instructions`]): its rates are costs in
//! instructions and repeat to about a percent, where the wall clock spread
//! 5-60 %. The built-in guest runs on the host's clock: under the
//! instruction clock its rates spread 15-26 % all the same, and now and then
//! it ended without the command's exit code.
//!
//! `cargo xtask bench --guests` boots the 6.12 guest (kprobe tier) and the
//! built-in 6.12 guest (fentry tier) and runs `xtask conn-rate` in each.
use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use ctrace_tests::{Lab, Recording, Sysctl, TempDir, SERVER};
use socket2::{Domain, Socket, Type};

use crate::{bench, figures::Figures, vm};

const PORT: u16 = 8090;
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// What `conn-rate` prints before its JSON line.
const MARK: &str = "xtask-conn-rate ";

/// In the guest: connections per second with nothing attached, with
/// `ctrace record --tier TIER`, and with `--invalid` too, three rounds of
/// the three, interleaved (emulated CPUs drift); medians, and the spread
/// of the "off" runs (the noise floor).
pub fn conn_rate(secs: u64, tier: &str) -> anyhow::Result<()> {
    const ROUNDS: usize = 3;
    let lab = Lab::new("conn", &[CLIENT])?;
    lab.track_connections("ctrace_conn")?;
    // Each connection ends with a reset; its closed entry then leaves after
    // a second (the namespace's own timeout), so the table stays the same
    // size from round to round.
    lab.server.enter(|| std::fs::write("/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_close", "1"))?;
    let _max = Sysctl::set("net.netfilter.nf_conntrack_max", "1048576")?;
    let listener = lab.listen(PORT)?;
    std::thread::spawn(move || {
        while let Ok((socket, _)) = listener.accept() {
            drop(socket);
        }
    });
    let stalls = std::cell::Cell::new(0);
    let run = |secs: u64| -> anyhow::Result<Connects> {
        let connects = lab.client.enter(|| connect_loop(Duration::from_secs(secs)))?;
        stalls.set(stalls.get() + connects.stalls);
        Ok(connects)
    };
    run(1)?; // warm-up
    let dir = TempDir::new("conn");
    // The programs' own run time per connection (bpf_stats): steadier under
    // emulation than the rates, whose spread the "off" runs show.
    let _stats = Sysctl::set("kernel.bpf_stats_enabled", "1")?;
    // Per program: run time and runs, summed over the rounds, and the connections made.
    type Programs = std::collections::BTreeMap<String, (u64, u64)>;
    let attached = |extra: &[&str], programs: &mut Programs, connections: &mut f64| -> anyhow::Result<(f64, f64)> {
        let mut args = vec!["--tier", tier];
        args.extend(extra);
        let before: Vec<u64> = bench::bpf_programs()?.iter().map(|p| p.0).collect();
        let recording = Recording::start(&dir.0.join("r.json"), &args)?;
        let at_start = bench::bpf_programs()?;
        let Connects { rate, made, .. } = run(secs)?;
        let made = made as f64;
        let at_end = bench::bpf_programs()?;
        let record = recording.stop()?;
        anyhow::ensure!(record["tier"] == tier, "ctrace ran on {} instead of {tier}", record["tier"]);
        let mut run_ns = 0;
        for (id, ns, cnt, name) in at_end.iter().filter(|p| !before.contains(&p.0)) {
            let (ns0, cnt0) = at_start.iter().find(|q| q.0 == *id).map_or((0, 0), |q| (q.1, q.2));
            run_ns += ns - ns0;
            let entry = programs.entry(name.clone()).or_default();
            (entry.0, entry.1) = (entry.0 + ns - ns0, entry.1 + cnt - cnt0);
        }
        *connections += made;
        Ok((rate, run_ns as f64 / made.max(1.0)))
    };
    let per_connection = |programs: &Programs, connections: f64| -> serde_json::Value {
        let each = programs.iter().filter(|(_, (_, runs))| *runs > 0).map(|(name, (ns, runs))| {
            let per = |v: u64| v as f64 / connections.max(1.0);
            (name.clone(), serde_json::json!({ "ns": per(*ns), "runs": per(*runs) }))
        });
        serde_json::Value::Object(each.collect())
    };
    let (mut hooked_programs, mut invalid_programs) = (Programs::new(), Programs::new());
    let (mut hooked_made, mut invalid_made) = (0.0, 0.0);
    let (mut off, mut hooked, mut invalid) = (Vec::new(), Vec::new(), Vec::new());
    let (mut hooked_ns, mut invalid_ns) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        off.push(run(secs)?.rate);
        let (rate, ns) = attached(&[], &mut hooked_programs, &mut hooked_made)?;
        hooked.push(rate);
        hooked_ns.push(ns);
        let (rate, ns) = attached(&["--invalid"], &mut invalid_programs, &mut invalid_made)?;
        invalid.push(rate);
        invalid_ns.push(ns);
    }
    let result = serde_json::json!({
        "tier": tier,
        "runs": { "off": off, "hooked": hooked, "invalid": invalid },
        "off": median(&mut off.clone()),
        "hooked": median(&mut hooked),
        "invalid": median(&mut invalid),
        "hooked_ns_per_conn": median(&mut hooked_ns),
        "invalid_ns_per_conn": median(&mut invalid_ns),
        "hooked_programs": per_connection(&hooked_programs, hooked_made),
        "invalid_programs": per_connection(&invalid_programs, invalid_made),
        "stalls": stalls.get(),
        "off_spread": (off.iter().cloned().fold(f64::MIN, f64::max) / off.iter().cloned().fold(f64::MAX, f64::min)) - 1.0,
    });
    println!("{MARK}{result}");
    Ok(())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// A connect that took longer waited for a retransmission (a lost SYN is
/// sent again after a second), not for the CPU: seen in the built-in
/// guest, where under the instruction clock (idle time skipped) a second's
/// wait halved a run's rate.
const STALL: Duration = Duration::from_millis(200);

/// One connect loop's count.
struct Connects {
    /// Connections per second of the time not spent in stalled connects.
    rate: f64,
    /// Connections made, the stalled ones too (the hooks ran for them).
    made: u64,
    stalls: u64,
}

/// Connects from `CLIENT` to the server and closes with a reset (no
/// TIME_WAIT, so ports never run out), for `length`.
fn connect_loop(length: Duration) -> anyhow::Result<Connects> {
    let server: socket2::SockAddr = SocketAddr::V4(SocketAddrV4::new(SERVER, PORT)).into();
    let local: socket2::SockAddr = SocketAddr::V4(SocketAddrV4::new(CLIENT, 0)).into();
    let started = Instant::now();
    let (mut made, mut stalls, mut stalled) = (0u64, 0u64, Duration::ZERO);
    while started.elapsed() < length {
        let connecting = Instant::now();
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        socket.bind(&local)?;
        socket.set_linger(Some(Duration::ZERO))?;
        socket.connect(&server).context("connect")?;
        let took = connecting.elapsed();
        if took > STALL {
            (stalls, stalled) = (stalls + 1, stalled + took);
        } else {
            made += 1;
        }
    }
    let rate = made as f64 / (started.elapsed() - stalled).as_secs_f64();
    Ok(Connects { rate, made: made + stalls, stalls })
}

/// On the host: `conn-rate` in the kprobe and fentry guests, into `figures`.
pub fn in_guests(ctrace: &Path, secs: u64, figures: &mut Figures) -> anyhow::Result<Vec<String>> {
    let xtask = std::env::current_exe()?;
    let mut lines = Vec::new();
    for (choice, tier, clock) in [
        (vm::KernelChoice::Debian612, "kprobe", vm::Clock::Instructions),
        (vm::KernelChoice::Builtin612, "fentry", vm::Clock::Host),
    ] {
        let kernel = vm::prepare(choice)?;
        let command = [
            xtask.display().to_string(),
            "conn-rate".into(),
            "--secs".into(),
            secs.to_string(),
            "--tier".into(),
            tier.into(),
        ];
        let env = [("CTRACE_BIN".to_string(), ctrace.display().to_string())];
        let result = vm::run_in_guest(&kernel, &command, &env, clock, Duration::from_secs(20 * 60)).and_then(|guest| {
            let line = guest.stdout.lines().find_map(|l| l.strip_prefix(MARK)).with_context(|| {
                format!("conn-rate printed no result in the {} guest (exit {})", kernel.label, guest.code)
            })?;
            Ok(serde_json::from_str::<serde_json::Value>(line)?)
        });
        // A guest that dies (an emulated kernel can) costs its own figures,
        // not the rest of the run's; the report and the JSON say why.
        let r = match result {
            Ok(r) => r,
            Err(e) => {
                let why = format!("the {} guest failed: {}", kernel.label, e.to_string().lines().next().unwrap_or(""));
                eprintln!("xtask: {e:#}");
                lines.push(format!("new connections/s, {tier} tier: not measured: {why}"));
                for key in tier_keys(tier) {
                    figures.skip(key, why.clone());
                }
                continue;
            }
        };
        let rate = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        let (off, hooked, invalid, spread) = (rate("off"), rate("hooked"), rate("invalid"), rate("off_spread"));
        let cost = |with: f64| 100.0 * (1.0 - with / off);
        // The programs' time as a share of a connection's time with nothing attached.
        let share = |ns: f64| 100.0 * ns * off / 1e9;
        let (hooked_ns, invalid_ns) = (rate("hooked_ns_per_conn"), rate("invalid_ns_per_conn"));
        lines.push(format!(
            "new connections per guest second ({}) in the {} guest ({}), medians of 3 \
             interleaved {secs} s runs: off {off:.0}, {tier} {hooked:.0} ({:.1} % fewer), {tier} with --invalid \
             {invalid:.0} ({:.1} % fewer); the off runs spread {:.1} % (the noise floor); {} stalled connects left \
             out. Programs per connection: {hooked_ns:.0} ns ({:.1} % of a connection's time off), with --invalid \
             {invalid_ns:.0} ns ({:.1} %)",
            if clock == vm::Clock::Instructions { "its clock counts instructions" } else { "wall clock" },
            kernel.label,
            kernel.release,
            cost(hooked),
            cost(invalid),
            100.0 * spread,
            r["stalls"].as_u64().unwrap_or(0),
            share(hooked_ns),
            share(invalid_ns)
        ));
        for (with, key) in [("", "hooked_programs"), (" with --invalid", "invalid_programs")] {
            let programs: Vec<String> = r[key]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(name, p)| {
                    let (ns, runs) = (p["ns"].as_f64().unwrap_or(0.0), p["runs"].as_f64().unwrap_or(0.0));
                    format!("{name} {runs:.1} runs, {ns:.0} ns")
                })
                .collect();
            lines.push(format!("  per connection, {tier}{with}: {}", programs.join("; ")));
        }
        for (key, value) in tier_keys(tier).into_iter().zip([off, hooked, invalid, hooked_ns]) {
            figures.set(key, value);
        }
    }
    Ok(lines)
}

/// A tier's figures: connections/s off, hooked, hooked with --invalid, and
/// the programs' ns per connection.
fn tier_keys(tier: &str) -> [&'static str; 4] {
    if tier == "kprobe" {
        [
            "connections.off.per_s",
            "connections.kprobe.per_s",
            "connections.kprobe_invalid.per_s",
            "connections.kprobe.program_ns_per_conn",
        ]
    } else {
        [
            "connections.off_builtin.per_s",
            "connections.fentry.per_s",
            "connections.fentry_invalid.per_s",
            "connections.fentry.program_ns_per_conn",
        ]
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn each_tier_fills_its_own_bench_keys() {
        let (kprobe, fentry) = (super::tier_keys("kprobe"), super::tier_keys("fentry"));
        for key in kprobe.iter().chain(&fentry) {
            assert!(crate::figures::KEYS.contains(key), "{key}");
        }
        assert!(kprobe.iter().all(|k| !fentry.contains(k)));
    }
}
