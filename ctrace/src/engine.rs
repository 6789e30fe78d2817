//! The engine under `record`, `live` and `serve`: attach, drain the ring
//! buffer, decode and classify each record, hand it to a [`Sink`].
//!
//! Front ends own only what differs: what they count (their sink), when
//! they sample and what they show. The benchmark's synthetic feed goes
//! through the same [`Pipeline`], so it measures the path real records take.
use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

use tokio::io::{unix::AsyncFd, Interest};

use crate::{
    aggregate::SourceKey,
    classify::Classifier,
    decode::{decode, Births, Record},
    hooks::{kernel_btf, Attached, Events, HookChoice, Tier},
    live::state::{NetnsSample, TickInput},
    model::{ConnState, CtEvent, DropEvent},
    netns::{self, Namespaces},
};

/// The kernel wakes the reader only in batches (see ctrace-ebpf's maps.rs);
/// whatever is below the wake-up threshold is collected this often, and
/// before every snapshot, scrape and end, while records come (an idle
/// reader sleeps: [`Engine::drain`]). Each drain wakes the process (a
/// third of `live`'s CPU in a storm on this VM), so the hook tiers, where
/// the kernel marks each drop's reason, drain every 200 ms; the tracepoint
/// tier tells a full table by sampling it when it reads a drop, so its
/// records must not wait long.
fn drain_every(tier: Tier) -> Duration {
    match tier {
        Tier::Tracepoint => Duration::from_millis(50),
        Tier::Kprobe | Tier::Fentry => Duration::from_millis(200),
    }
}

/// What a front end counts. Called once per record, on the engine's thread.
pub trait Sink {
    /// A packet the kernel dropped, with the key it is counted by.
    fn on_drop(&mut self, key: &SourceKey, event: &DropEvent);
    /// A conntrack event (hook tiers); `state` is its TCP state, named from BTF.
    fn on_conntrack(&mut self, event: &CtEvent, state: ConnState);
    /// A record that did not decode (a layout ctrace does not know).
    fn on_undecodable(&mut self);
}

/// Passes on one namespace's events only (`serve --netns`): an instance
/// that answers for one namespace, as a node's stand-in or a gateway's.
pub struct OnlyNetns<'a, S> {
    pub netns: u32,
    pub inner: &'a mut S,
}

impl<S: Sink> Sink for OnlyNetns<'_, S> {
    #[inline]
    fn on_drop(&mut self, key: &SourceKey, event: &DropEvent) {
        if key.netns == self.netns {
            self.inner.on_drop(key, event);
        }
    }

    fn on_conntrack(&mut self, event: &CtEvent, state: ConnState) {
        if event.netns == self.netns {
            self.inner.on_conntrack(event, state);
        }
    }

    fn on_undecodable(&mut self) {
        self.inner.on_undecodable();
    }
}

/// Decoding and classification: raw records in, keyed events out.
pub struct Pipeline {
    pub classifier: Classifier,
    /// Raw TCP state values to states (from BTF).
    tcp_states: Vec<(u8, ConnState)>,
    births: Births,
}

impl Pipeline {
    pub fn new(classifier: Classifier, tcp_states: Vec<(u8, ConnState)>) -> Self {
        Pipeline { classifier, tcp_states, births: Births::default() }
    }

    /// One ring-buffer record. The per-event path: keep it lean.
    #[inline]
    pub fn feed(&mut self, bytes: &[u8], sink: &mut impl Sink) {
        match decode(bytes) {
            Ok(Record::Drop(event)) => {
                let key = self.classifier.key(&event);
                sink.on_drop(&key, &event);
            }
            Ok(Record::Conntrack(mut event)) => {
                self.births.pair(&mut event);
                let state = crate::decode::event_state(&self.tcp_states, &event);
                sink.on_conntrack(&event, state);
            }
            Err(_) => sink.on_undecodable(),
        }
    }
}

/// The attached programs and their ring buffer.
pub struct Engine {
    pub attached: Attached,
    pub pipeline: Pipeline,
    events: AsyncFd<Events>,
    drain: DrainTimer,
    /// The drain period while records come.
    period: Duration,
    /// Drains in a row that found the ring empty.
    quiet_drains: u32,
    /// Waiting for a record to wake us (see [`Engine::drain`]).
    asleep: bool,
}

/// Empty drains in a row after which the reader sleeps until a record
/// wakes it: 250 ms of nothing on the tracepoint tier, 1 s on the hooks.
const QUIET_DRAINS: u32 = 5;
/// The drain period while asleep: a net under the programs' wake-up, in
/// case one is missed (the flag could not be set, say).
const ASLEEP_PERIOD: Duration = Duration::from_secs(1);

impl Engine {
    /// Reads the kernel's BTF and symbols, loads and attaches the programs.
    pub fn start(hooks: HookChoice) -> anyhow::Result<Engine> {
        let (attached, events) = Attached::attach(kernel_btf()?, hooks)?;
        // Start-up parsed kallsyms and BTF twice over (tens of MiB), all
        // freed by now: give those pages back rather than hold them for
        // the whole run.
        // SAFETY: malloc_trim only releases free heap memory.
        unsafe { libc::malloc_trim(0) };
        let classifier = Classifier::new(attached.symbols.clone(), Namespaces::new())
            .with_table_full_hooks(attached.table_full_hooked)
            .with_refusals(attached.insert_hooked, attached.engines_free_own_drops);
        let pipeline = Pipeline::new(classifier, attached.tcp_states.clone());
        let period = drain_every(attached.tier);
        let drain = DrainTimer::new(period)?;
        let events = crate::hooks::poll_events(events)?;
        Ok(Engine { attached, pipeline, events, drain, period, quiet_drains: 0, asleep: false })
    }

    /// Waits until records may be waiting: the kernel woke us, or a drain
    /// period passed (records below the wake-up threshold). Cancel-safe, for
    /// `select!`; follow it with [`Engine::drain`].
    pub async fn wait(&mut self) -> std::io::Result<()> {
        tokio::select! {
            ready = self.events.readable_mut() => {
                // Cleared before draining: a wake-up during the drain sets it again.
                ready?.clear_ready();
            }
            ticked = self.drain.tick() => ticked?,
        }
        Ok(())
    }

    /// Hands every record waiting in the ring buffer to `sink`.
    ///
    /// After [`QUIET_DRAINS`] empty drains in a row the reader goes to
    /// sleep: it sets the programs' "asleep" flag, drains once more (a
    /// record that came before the flag was set woke nobody), and if that
    /// found nothing slows its timer to [`ASLEEP_PERIOD`]. The next record
    /// clears the flag and wakes it, and the timer goes back to the drain
    /// period. An idle reader so wakes about once a second, not twenty
    /// times, and the first record after a quiet spell is read at once.
    pub fn drain(&mut self, sink: &mut impl Sink) {
        if self.read_ring(sink) > 0 {
            self.quiet_drains = 0;
            if self.asleep {
                self.asleep = false;
                if let Err(e) = self.drain.set(self.period) {
                    eprintln!("ctrace: cannot reset the drain timer: {e}");
                }
            }
            return;
        }
        self.quiet_drains = self.quiet_drains.saturating_add(1);
        if self.asleep || self.quiet_drains < QUIET_DRAINS || self.attached.set_reader_asleep().is_err() {
            return;
        }
        // Records that raced the flag stay on the timer; the flag then
        // costs one wake-up too many.
        if self.read_ring(sink) == 0 && self.drain.set(ASLEEP_PERIOD).is_ok() {
            self.asleep = true;
        }
    }

    /// Feeds every waiting record to `sink`; says how many there were.
    fn read_ring(&mut self, sink: &mut impl Sink) -> usize {
        let ring = self.events.get_mut();
        let mut read = 0;
        while let Some(item) = ring.next() {
            self.pipeline.feed(&item, sink);
            read += 1;
        }
        read
    }

    /// Detaches the programs, then hands over what is still in the ring:
    /// after this no record the counters know of is missing, but lost ones.
    pub fn stop(&mut self, sink: &mut impl Sink) {
        self.attached.detach();
        self.drain(sink);
    }

    pub fn namespaces(&mut self) -> &mut Namespaces {
        &mut self.pipeline.classifier.namespaces
    }

    /// The kernel's counters for one tick.
    pub fn sample(&mut self) -> TickInput {
        let kernel = self.attached.totals().unwrap_or_default();
        let namespaces = self.namespaces();
        let samples = namespaces.snapshot_recent();
        TickInput {
            now_ns: monotonic_ns(),
            kernel,
            namespaces: samples
                .into_iter()
                .map(|(netns, stats)| NetnsSample { netns, name: namespaces.name(netns).map(str::to_string), stats })
                .collect(),
            max: netns::conntrack_max(),
            buckets: std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_buckets")
                .ok()
                .and_then(|s| s.trim().parse().ok()),
        }
    }
}

/// The drain's period, as a kernel timer (timerfd) polled with the ring.
/// A tokio interval of 50 ms woke the process half as often again: tokio's
/// timer wheel keeps a deadline in the next 64 ms block one level up, and
/// wakes at the block's start to move it down, so most drain periods cost
/// two wake-ups (an idle `live`: 36 a second, 15 of them those).
struct DrainTimer(AsyncFd<OwnedFd>);

impl DrainTimer {
    fn new(every: Duration) -> anyhow::Result<Self> {
        // SAFETY: plain syscalls; the fd is owned from here on.
        let fd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
        anyhow::ensure!(fd >= 0, "timerfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: the AsyncFd owns the descriptor: it stays open and the
        // same until dropped.
        let timer = DrainTimer(unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }?);
        timer.set(every)?;
        Ok(timer)
    }

    /// Fires every `every` from now on.
    fn set(&self, every: Duration) -> std::io::Result<()> {
        let period = libc::timespec { tv_sec: every.as_secs() as _, tv_nsec: every.subsec_nanos() as _ };
        let spec = libc::itimerspec { it_interval: period, it_value: period };
        // SAFETY: a valid timerfd and itimerspec; the old value is not asked for.
        if unsafe { libc::timerfd_settime(self.0.as_raw_fd(), 0, &spec, std::ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits for the next period; periods missed meanwhile are skipped.
    /// Cancel-safe.
    async fn tick(&mut self) -> std::io::Result<()> {
        loop {
            let mut ready = self.0.readable_mut().await?;
            let read = ready.try_io(|fd| {
                let mut expirations = 0u64;
                // SAFETY: reads 8 bytes into a u64, as a timerfd gives.
                let n = unsafe { libc::read(fd.as_raw_fd(), (&raw mut expirations).cast(), 8) };
                if n == 8 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
            match read {
                Ok(result) => return result,
                // Not due after all (readiness was stale): wait again.
                Err(_would_block) => continue,
            }
        }
    }
}

/// CLOCK_MONOTONIC, the clock of the records' timestamps.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer; CLOCK_MONOTONIC is what bpf_ktime_get_ns reads.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use ctrace_common::{family, kind, ConntrackEvent, PacketDrop};

    use super::*;
    use crate::{
        export::metrics::encode_input, live::query::Query, live::state::LiveState, record::Recorder, testing::Rng,
    };

    /// A record as the ring buffer could hold it, or worse: random bytes,
    /// records of the right kind and size with every field random (any
    /// family, protocol, address, event, timestamp), and truncated ones.
    fn arbitrary_record(rng: &mut Rng) -> Vec<u8> {
        let (tag, size, shaped) = match rng.below(3) {
            0 => (kind::NETFILTER_DROP, PacketDrop::SIZE, true),
            1 => (kind::CONNTRACK, ConntrackEvent::SIZE, true),
            _ => (rng.next_u64() as u8, rng.below(2 * ConntrackEvent::SIZE), false),
        };
        let len = if rng.below(10) == 0 { rng.below(size + 1) } else { size };
        let mut bytes = rng.bytes(len);
        if let Some(first) = bytes.first_mut() {
            *first = tag;
        }
        // Mostly the families and events the kernel writes, so that records
        // get past decoding into classification and aggregation.
        if shaped && bytes.len() == size && rng.below(4) != 0 {
            bytes[1] = [family::INET, family::INET6][rng.below(2)];
            if tag == kind::CONNTRACK {
                // Conntrack records: the event first, then the family.
                bytes[2] = bytes[1];
                bytes[1] = rng.below(9) as u8;
            }
        }
        bytes
    }

    /// No record can stop the engine: whatever the ring buffer holds is
    /// decoded, refused or counted, never panicked on, and every front end's
    /// sink and summary still works. A fixed budget of cases, the same
    /// cases on every run.
    #[test]
    fn arbitrary_records_never_panic_the_pipeline_or_the_sinks() {
        let mut rng = Rng::seeded(0x5eed_c7ace);
        let mut pipeline =
            Pipeline::new(Classifier::new(crate::classify::Symbols::unresolved(), Namespaces::new()), Vec::new());
        let mut live = LiveState::new(0, 64);
        let mut recorder = Recorder::new(0, 64);
        let mut undecodable = 0;
        for _ in 0..50_000 {
            let record = arbitrary_record(&mut rng);
            pipeline.feed(&record, &mut live);
            pipeline.feed(&record, &mut recorder);
            undecodable += u64::from(crate::decode::decode(&record).is_err());
        }
        assert!(undecodable > 0 && undecodable < 50_000, "both paths were taken: {undecodable} undecodable");
        assert_eq!(live.undecodable, undecodable);
        assert_eq!(recorder.undecodable, undecodable);
        let snapshot = live.snapshot(&Query::default(), u64::MAX);
        assert!(snapshot.flood.drops > 0);
        let _ = encode_input(&live.metrics(20));
        let _ = recorder.table.finish(u64::MAX);
        let _ = (recorder.conntrack_rows(), recorder.lifetime_rows(), recorder.flood.summary(10));
    }

    /// Namespaces of what reached it.
    #[derive(Default)]
    struct Seen {
        drops: Vec<u32>,
        conntrack: Vec<u32>,
        undecodable: u64,
    }

    impl Sink for Seen {
        fn on_drop(&mut self, key: &SourceKey, _: &DropEvent) {
            self.drops.push(key.netns);
        }
        fn on_conntrack(&mut self, event: &CtEvent, _: ConnState) {
            self.conntrack.push(event.netns);
        }
        fn on_undecodable(&mut self) {
            self.undecodable += 1;
        }
    }

    #[test]
    fn only_netns_passes_on_that_namespaces_events_and_nothing_else() {
        let mut rng = Rng::seeded(0x0e7_5c0);
        let mut pipeline =
            Pipeline::new(Classifier::new(crate::classify::Symbols::unresolved(), Namespaces::new()), Vec::new());
        let records: Vec<_> = (0..20_000).map(|_| arbitrary_record(&mut rng)).collect();
        let mut all = Seen::default();
        records.iter().for_each(|r| pipeline.feed(r, &mut all));
        for netns in [all.drops[0], all.conntrack[0], 0] {
            let mut one = Seen::default();
            records.iter().for_each(|r| pipeline.feed(r, &mut OnlyNetns { netns, inner: &mut one }));
            let theirs = |seen: &[u32]| seen.iter().filter(|n| **n == netns).count();
            assert_eq!(one.drops.len(), theirs(&all.drops));
            assert_eq!(one.conntrack.len(), theirs(&all.conntrack));
            assert!(one.drops.iter().chain(&one.conntrack).all(|n| *n == netns));
            assert_eq!(one.undecodable, all.undecodable, "undecodable records are counted whatever the scope");
        }
        assert!(all.drops.len() > 1000 && all.conntrack.len() > 1000);
    }
}
