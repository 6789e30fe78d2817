//! A table-full incident on demand, for demos and documentation: fills a
//! namespace's conntrack table and storms it from several sources while
//! `ctrace record` runs, then writes the record.
//!
//! cargo run -p ctrace-tests --example storm -- SECONDS OUTPUT.json
//!
//! Root only. Everything is undone on exit (namespaces, nf_conntrack_max).
use std::{net::Ipv4Addr, time::Duration};

use ctrace_tests::{require_root, Lab, Recording, Sysctl};

fn main() -> anyhow::Result<()> {
    require_root();
    let args: Vec<String> = std::env::args().collect();
    let (Some(seconds), Some(output)) = (args.get(1).and_then(|s| s.parse::<u64>().ok()), args.get(2)) else {
        anyhow::bail!("usage: storm SECONDS OUTPUT.json");
    };
    let filler = Ipv4Addr::new(198, 18, 0, 2);
    let storm: Vec<Ipv4Addr> = (10..16).map(|i| Ipv4Addr::new(198, 18, 0, i)).collect();
    let mut addrs = vec![filler];
    addrs.extend(&storm);
    let lab = Lab::new("storm", &addrs)?;
    lab.track_connections("ctrace_storm")?;
    let _listener = lab.listen(8080)?;
    let recording = Recording::start(std::path::Path::new(output), &["--duration", &seconds.to_string()])?;
    let max = Sysctl::set("net.netfilter.nf_conntrack_max", "128")?;
    let _held: Vec<_> =
        (0..128).map(|_| lab.connect(filler, 8080, Duration::from_secs(2))).collect::<Result<_, _>>()?;
    // Each source storms at its own pace, rising and falling over the window.
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(seconds.saturating_sub(2)) {
        let t = start.elapsed().as_secs_f64();
        for (i, src) in storm.iter().enumerate() {
            let phase = (t / seconds as f64 * std::f64::consts::PI * (1.0 + i as f64 / 3.0)).sin().abs();
            lab.syn_burst(*src, 8080, (phase * 40.0 / (i + 1) as f64) as u64 + 1);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(max);
    let record = recording.wait()?;
    eprintln!("storm: {} table_full drops recorded in {output}", record["totals"]["table_full"]);
    Ok(())
}
