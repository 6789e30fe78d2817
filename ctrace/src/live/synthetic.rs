//! Synthetic load for benchmarks: records built as the kernel builds them,
//! fed through the engine's pipeline (decode -> classify -> aggregate) as
//! ring-buffer records are, timed, with the process's peak memory reported.
use std::time::Instant;

use ctrace_common::{family, kind, PacketDrop};

use crate::{
    classify::{Classifier, Symbols},
    decode::encode,
    engine::Pipeline,
    live::{plain, query::Query, state::LiveState, state::TickInput, Header},
    netns::Namespaces,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workload {
    pub events: u64,
    /// Distinct source addresses, cycled (`events` of them: a spoofed flood).
    pub sources: u64,
}

/// The `i`th source address: scattered over the whole IPv4 space, as a
/// random-source flood's are (consecutive addresses would share their /24
/// and /16 prefixes and flatter the prefix counters), and distinct for
/// every `i` below 2^32 (an odd multiplier is a bijection on u32).
fn source(i: u64) -> u32 {
    (i as u32).wrapping_mul(0x9e37_79b1)
}

/// A SYN from the `i`th source, as the kfree_skb program would record it.
fn record(i: u64, ts_ns: u64) -> [u8; PacketDrop::SIZE] {
    let mut raw = PacketDrop {
        kind: kind::NETFILTER_DROP,
        family: family::INET,
        proto: 6,
        netns: 4026531840,
        ts_ns,
        location: 0,
        cpu: (i % 2) as u32,
        sport: 40000 + (i % 20000) as u16,
        dport: 443,
        tcp_flags: 0x02,
        ..Default::default()
    };
    raw.src[..4].copy_from_slice(&source(i).to_be_bytes());
    raw.dst[..4].copy_from_slice(&[198, 18, 1, 1]);
    encode(&raw)
}

pub fn run(workload: Workload, capacity: usize, query: &Query) -> anyhow::Result<()> {
    anyhow::ensure!(workload.sources > 0, "--synthetic-sources must be positive");
    // Symbols and namespaces as on a machine where nothing resolves: the
    // lookups still happen per event, as in a real run.
    let mut pipeline = Pipeline::new(Classifier::new(Symbols::unresolved(), Namespaces::new()), Vec::new());
    let mut state = LiveState::new(0, capacity);
    // Records are made in batches, as they sit in the ring buffer, so the
    // timing covers decoding and aggregation, not record making.
    const BATCH: u64 = 1 << 16;
    let mut buffer = Vec::with_capacity((BATCH as usize) * PacketDrop::SIZE);
    let mut busy = std::time::Duration::ZERO;
    let mut done = 0u64;
    while done < workload.events {
        let n = BATCH.min(workload.events - done);
        buffer.clear();
        for i in done..done + n {
            buffer.extend_from_slice(&record(i % workload.sources, i));
        }
        let start = Instant::now();
        for bytes in buffer.chunks_exact(PacketDrop::SIZE) {
            pipeline.feed(bytes, &mut state);
        }
        busy += start.elapsed();
        done += n;
    }
    state.tick(TickInput { now_ns: workload.events, ..Default::default() });
    let snap = state.snapshot(query, workload.events);
    let header = Header {
        host: "synthetic".into(),
        kernel: "-".into(),
        tier: "synthetic records".into(),
        hooks: vec![],
        fills_note: "-".into(),
    };
    println!("{}", plain::render(&header, &snap, query));
    let rate = workload.events as f64 / busy.as_secs_f64();
    eprintln!(
        "synthetic: {} events from {} sources in {:.3} s of decode+aggregate: {:.2} M events/s; tracked {} keys, \
         {} evictions; peak RSS {} KiB",
        workload.events,
        workload.sources,
        busy.as_secs_f64(),
        rate / 1e6,
        snap.tracked,
        snap.evictions,
        peak_rss_kib().unwrap_or(0)
    );
    Ok(())
}

/// VmHWM: the most resident memory this process has had.
pub fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    #[test]
    fn sources_are_distinct_and_scattered_over_prefixes() {
        let sources: Vec<u32> = (0..65_536).map(super::source).collect();
        assert_eq!(sources.iter().collect::<HashSet<_>>().len(), sources.len());
        // A random-source flood's 64 Ki sources land in most /16s, not one.
        let prefixes: HashSet<u32> = sources.iter().map(|a| a >> 16).collect();
        assert!(prefixes.len() > 30_000, "{}", prefixes.len());
    }
}
