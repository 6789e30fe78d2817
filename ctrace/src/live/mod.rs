//! `ctrace live`: the incident view.
//!
//! One thread runs everything: ring-buffer records are decoded, classified
//! and counted as they arrive; once per interval the kernel's counters are
//! sampled and a snapshot is drawn (terminal), printed (plain text) or
//! written as a JSON line. Keys come from a small reader thread.
pub mod plain;
pub mod query;
pub mod resolve;
pub mod snapshot;
pub mod state;
pub mod synthetic;
pub mod view;

use std::{
    io::{IsTerminal, Write},
    time::Duration,
};

use anyhow::Context as _;
use crossterm::event::{Event, KeyEventKind};
use serde::Serialize;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::{
    engine::{monotonic_ns, Engine},
    export::json::rfc3339_utc,
    hooks::Attached,
    live::{
        query::{Filter, Query},
        resolve::Resolver,
        state::{LiveState, Snapshot},
        view::{Action, ViewState},
    },
};

/// How often the tables are counted (reading a big table costs about a
/// second per million entries, on its own thread).
const CENSUS_EVERY: Duration = Duration::from_secs(5);

/// What the header says about the kernel and the hooks.
#[derive(Clone, Debug, Serialize)]
pub struct Header {
    pub host: String,
    pub kernel: String,
    pub tier: String,
    /// One line per hook family: what is attached, what is missing and why.
    pub hooks: Vec<String>,
    /// What the "who fills the table" panel can say on this tier.
    pub fills_note: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Jsonl,
}

pub struct Options {
    pub interval: Duration,
    /// Plain output even on a terminal.
    pub plain: bool,
    pub format: Format,
    pub resolve: bool,
    pub top: usize,
    pub filter: Option<String>,
    pub capacity: usize,
    pub hooks: crate::hooks::HookChoice,
    /// Feed this many synthetic records instead of attaching (benchmarks).
    pub synthetic: Option<synthetic::Workload>,
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path).map(|s| s.trim().to_string()).unwrap_or_default()
}

fn header(attached: &Attached) -> Header {
    // One line each for what is on and what is off; `ctrace probes` has the reasons.
    let conntrack = attached.hooks.iter().filter(|h| h.hook != crate::hooks::conntrack::HookFamily::Drops);
    let (on, off): (Vec<_>, Vec<_>) = conntrack.partition(|h| h.tier.is_some());
    let mut hooks = vec![format!("drops: {}", attached.drop_test.describe())];
    if !on.is_empty() {
        let names: Vec<String> = on.iter().map(|h| format!("{} ({})", h.hook, h.detail)).collect();
        hooks.push(format!("conntrack hooks on: {}", names.join("; ")));
    }
    if !off.is_empty() {
        let names: Vec<&str> = off.iter().map(|h| h.hook.name()).collect();
        hooks.push(format!("conntrack hooks off: {} (`ctrace probes` says why)", names.join(", ")));
    }
    Header {
        host: read_trimmed("/proc/sys/kernel/hostname"),
        kernel: read_trimmed("/proc/sys/kernel/osrelease"),
        tier: format!("tier: {}", attached.tier),
        hooks,
        fills_note: "no table has entries yet (tables are counted every 5 s)".into(),
    }
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    let filter =
        Filter::parse(options.filter.as_deref().unwrap_or("")).map_err(|e| anyhow::anyhow!("--filter: {e}"))?;
    let query = Query { filter, limit: options.top, ..Query::default() };
    if let Some(workload) = options.synthetic {
        return synthetic::run(workload, options.capacity, &query);
    }
    let tui = !options.plain && options.format == Format::Text && std::io::stdout().is_terminal();

    if tui {
        // Attaching takes a moment (seconds on a slow or emulated CPU): say so.
        eprintln!("ctrace: attaching (reading the kernel's BTF and symbols, loading programs)...");
    }
    let mut engine = Engine::start(options.hooks)?;
    let header = header(&engine.attached);
    let mut state = LiveState::new(monotonic_ns(), options.capacity);
    let mut resolver = options.resolve.then(Resolver::start);
    // The first tick sets the counters' baselines.
    state.tick(engine.sample());
    state.refresh_workloads();
    // Said once, before the screen is taken: what cannot be named, and why.
    for warning in state.workloads.take_warnings() {
        eprintln!("ctrace: {warning}");
    }

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut ticker = tokio::time::interval(options.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;

    let mut terminal = if tui { Some(Screen::enter()?) } else { None };
    let (keys_tx, mut keys) = mpsc::unbounded_channel();
    if tui {
        spawn_key_reader(keys_tx);
    } else {
        drop(keys_tx);
    }
    let mut view = ViewState::new(query);
    if let Some(screen) = terminal.as_mut() {
        // The first frame at once, not a tick later: attached, nothing yet.
        screen.draw(&header, &snapshot(&state, &view, resolver.as_mut()), &view)?;
    }
    if !tui {
        let tier = engine.attached.tier;
        eprintln!("ctrace: {tier} attached; a snapshot every {:?} (Ctrl-C to stop)", options.interval);
    }

    let mut keys_open = tui;
    // The table census: read on worker threads, a few seconds apart.
    let mut census_every = tokio::time::interval(CENSUS_EVERY);
    let mut censuses: Vec<(u32, std::sync::mpsc::Receiver<Option<crate::census::Census>>)> = Vec::new();
    loop {
        tokio::select! {
            _ = census_every.tick(), if censuses.is_empty() => {
                for netns in state.namespaces_with_entries() {
                    if let Some(path) = engine.namespaces().path(netns) {
                        censuses.push((netns, crate::census::spawn(netns, path)));
                    }
                }
            }
            woke = engine.wait() => {
                woke?;
                engine.drain(&mut state);
            }
            _ = ticker.tick() => {
                censuses.retain(|(netns, rx)| match rx.try_recv() {
                    Ok(Some(census)) => { state.set_census(*netns, census); false }
                    Ok(None) | Err(std::sync::mpsc::TryRecvError::Disconnected) => false,
                    Err(std::sync::mpsc::TryRecvError::Empty) => true,
                });
                engine.drain(&mut state);
                state.tick(engine.sample());
                state.refresh_workloads();
                let snap = snapshot(&state, &view, resolver.as_mut());
                match terminal.as_mut() {
                    Some(screen) => screen.draw(&header, view.paused.as_ref().unwrap_or(&snap), &view)?,
                    None => print_plain(options.format, &header, &snap, &view.query)?,
                }
            }
            key = keys.recv(), if keys_open => {
                let Some(key) = key else { keys_open = false; continue };
                match view.on_key(key) {
                    Action::Quit => break,
                    Action::Reset => state.reset(monotonic_ns()),
                    Action::TogglePause => {
                        view.paused = match view.paused {
                            Some(_) => None,
                            None => Some(snapshot(&state, &view, resolver.as_mut())),
                        };
                    }
                    Action::Redraw | Action::Nothing => {}
                }
                if let Some(screen) = terminal.as_mut() {
                    // A paused view still follows filter and sort changes on its frozen data.
                    let snap = snapshot(&state, &view, resolver.as_mut());
                    screen.draw(&header, view.paused.as_ref().unwrap_or(&snap), &view)?;
                }
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    drop(terminal);
    Ok(())
}

fn snapshot(state: &LiveState, view: &ViewState, resolver: Option<&mut Resolver>) -> Snapshot {
    let mut snap = state.snapshot(&view.query, monotonic_ns());
    if let Some(resolver) = resolver {
        for row in &mut snap.top {
            row.src_name = resolver.name(row.src);
        }
    }
    snap
}

fn print_plain(format: Format, header: &Header, snap: &Snapshot, query: &Query) -> anyhow::Result<()> {
    let text = match format {
        Format::Text => format!("{}\n", plain::render(header, snap, query)),
        Format::Jsonl => {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            plain::render_jsonl(header, snap, rfc3339_utc(now.as_secs()))
        }
    };
    let mut out = std::io::stdout().lock();
    // A closed pipe (`| head`) ends the view quietly.
    if out.write_all(text.as_bytes()).and_then(|_| out.flush()).is_err() {
        std::process::exit(0);
    }
    Ok(())
}

fn spawn_key_reader(tx: mpsc::UnboundedSender<crossterm::event::KeyEvent>) {
    std::thread::Builder::new()
        .name("ctrace-keys".into())
        .spawn(move || loop {
            // Poll in short steps so the thread notices when the view is gone.
            match crossterm::event::poll(Duration::from_millis(50)) {
                Ok(true) => {
                    if let Ok(Event::Key(key)) = crossterm::event::read() {
                        if key.kind != KeyEventKind::Release && tx.send(key).is_err() {
                            return;
                        }
                    }
                }
                Ok(false) => {
                    if tx.is_closed() {
                        return;
                    }
                }
                Err(_) => return,
            }
        })
        .expect("spawn key reader");
}

/// The terminal in raw mode on the alternate screen (ratatui's own set-up),
/// restored when dropped, and by ratatui's panic hook if ctrace panics.
struct Screen {
    terminal: ratatui::DefaultTerminal,
}

impl Screen {
    fn enter() -> anyhow::Result<Self> {
        Ok(Screen { terminal: ratatui::try_init().context("setting up the terminal")? })
    }

    fn draw(&mut self, header: &Header, snap: &Snapshot, view: &ViewState) -> anyhow::Result<()> {
        self.terminal.draw(|frame| view::draw(frame, header, snap, view))?;
        Ok(())
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        ratatui::restore();
    }
}
