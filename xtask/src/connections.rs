//! New connections per second through a namespace with conntrack, with and
//! without ctrace attached: what the hooks cost the path every new flow
//! takes. Measured inside guest kernels (the hook tiers need them), so the
//! CPUs are emulated: only the ratios mean anything.
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

use crate::{figures::Figures, vm};

const PORT: u16 = 8090;
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// What `conn-rate` prints before its JSON line.
const MARK: &str = "xtask-conn-rate ";

/// In the guest: connections per second with nothing attached, with
/// `ctrace record --tier TIER`, with `--invalid` too, and with nothing
/// again (the drift between the two "off" runs is the noise floor).
pub fn conn_rate(secs: u64, tier: &str) -> anyhow::Result<()> {
    let lab = Lab::new("conn", &[CLIENT])?;
    lab.track_connections("ctrace_conn")?;
    // Each connection leaves a closing entry for a while: room for all.
    let _max = Sysctl::set("net.netfilter.nf_conntrack_max", "1048576")?;
    let listener = lab.listen(PORT)?;
    std::thread::spawn(move || {
        while let Ok((socket, _)) = listener.accept() {
            drop(socket);
        }
    });
    let run = |secs: u64| -> anyhow::Result<f64> { lab.client.enter(|| connect_loop(Duration::from_secs(secs))) };
    run(1)?; // warm-up
    let off = run(secs)?;
    let dir = TempDir::new("conn");
    let attached = |extra: &[&str]| -> anyhow::Result<f64> {
        let mut args = vec!["--tier", tier];
        args.extend(extra);
        let recording = Recording::start(&dir.0.join("r.json"), &args)?;
        let rate = run(secs)?;
        let record = recording.stop()?;
        anyhow::ensure!(record["tier"] == tier, "ctrace ran on {} instead of {tier}", record["tier"]);
        Ok(rate)
    };
    let hooked = attached(&[])?;
    let invalid = attached(&["--invalid"])?;
    let off_again = run(secs)?;
    let result =
        serde_json::json!({ "tier": tier, "off": off, "hooked": hooked, "invalid": invalid, "off_again": off_again });
    println!("{MARK}{result}");
    Ok(())
}

/// Connects from `CLIENT` to the server and closes with a reset (no
/// TIME_WAIT, so ports never run out), for `length`; connections/s.
fn connect_loop(length: Duration) -> anyhow::Result<f64> {
    let server: socket2::SockAddr = SocketAddr::V4(SocketAddrV4::new(SERVER, PORT)).into();
    let local: socket2::SockAddr = SocketAddr::V4(SocketAddrV4::new(CLIENT, 0)).into();
    let started = Instant::now();
    let mut made = 0u64;
    while started.elapsed() < length {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        socket.bind(&local)?;
        socket.set_linger(Some(Duration::ZERO))?;
        socket.connect(&server).context("connect")?;
        made += 1;
    }
    Ok(made as f64 / started.elapsed().as_secs_f64())
}

/// On the host: `conn-rate` in the kprobe and fentry guests, into `figures`.
pub fn in_guests(ctrace: &Path, secs: u64, figures: &mut Figures) -> anyhow::Result<Vec<String>> {
    let xtask = std::env::current_exe()?;
    let mut lines = Vec::new();
    for (choice, tier) in [(vm::KernelChoice::Debian612, "kprobe"), (vm::KernelChoice::Builtin612, "fentry")] {
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
        let guest = vm::run_in_guest(&kernel, &command, &env, Duration::from_secs(20 * 60))?;
        let line = guest.stdout.lines().find_map(|l| l.strip_prefix(MARK)).with_context(|| {
            format!("conn-rate printed no result in the {} guest (exit {})", kernel.label, guest.code)
        })?;
        let r: serde_json::Value = serde_json::from_str(line)?;
        let rate = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        let (off, hooked, invalid, again) = (rate("off"), rate("hooked"), rate("invalid"), rate("off_again"));
        let cost = |with: f64| 100.0 * (1.0 - with / off);
        lines.push(format!(
            "new connections/s in the {} guest ({}): off {off:.0}, {tier} {hooked:.0} ({:.1} % fewer), {tier} with \
             --invalid {invalid:.0} ({:.1} % fewer), off again {again:.0} (drift {:.1} %)",
            kernel.label,
            kernel.release,
            cost(hooked),
            cost(invalid),
            -cost(again)
        ));
        if tier == "kprobe" {
            figures.set("connections.off.per_s", off);
            figures.set("connections.kprobe.per_s", hooked);
            figures.set("connections.kprobe_invalid.per_s", invalid);
        } else {
            figures.set("connections.off_builtin.per_s", off);
            figures.set("connections.fentry.per_s", hooked);
            figures.set("connections.fentry_invalid.per_s", invalid);
        }
    }
    Ok(lines)
}
