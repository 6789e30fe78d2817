//! The terminal view: keys, and drawing a snapshot with ratatui.
use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::{
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style, Stylize},
    text::{Line, Span},
    widgets::{Block, Borders, Cell, Clear, Paragraph, Row, Table, Wrap},
    Frame,
};

use crate::{
    aggregate::{occupancy::TimeToFull, window::sparkline},
    live::{
        plain::{self, bar, netns_label, short, time_to_full},
        query::{Filter, Query},
        state::Snapshot,
        Header,
    },
};

/// What the user has asked of the view.
#[derive(Default)]
pub struct ViewState {
    pub query: Query,
    /// The snapshot frozen by `p`; collection goes on underneath.
    pub paused: Option<Snapshot>,
    pub help: bool,
    /// The filter being typed after `/`.
    pub input: Option<String>,
    /// A one-line message (a filter that did not parse).
    pub message: Option<String>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    Quit,
    Reset,
    /// Pause was toggled: the caller freezes or thaws the snapshot.
    TogglePause,
    Redraw,
    Nothing,
}

impl ViewState {
    pub fn new(query: Query) -> Self {
        ViewState { query, ..Default::default() }
    }

    pub fn on_key(&mut self, key: KeyEvent) -> Action {
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
            return Action::Quit;
        }
        if let Some(text) = self.input.as_mut() {
            match key.code {
                KeyCode::Enter => {
                    let text = self.input.take().unwrap_or_default();
                    match Filter::parse(&text) {
                        Ok(filter) => {
                            self.query.filter = filter;
                            self.message = None;
                        }
                        Err(err) => self.message = Some(err),
                    }
                }
                KeyCode::Esc => self.input = None,
                KeyCode::Backspace => {
                    text.pop();
                }
                KeyCode::Char(c) => text.push(c),
                _ => return Action::Nothing,
            }
            return Action::Redraw;
        }
        if self.help {
            self.help = false;
            return if key.code == KeyCode::Char('q') { Action::Quit } else { Action::Redraw };
        }
        match key.code {
            KeyCode::Char('q') | KeyCode::Esc => Action::Quit,
            KeyCode::Char('?') | KeyCode::Char('h') => {
                self.help = true;
                Action::Redraw
            }
            KeyCode::Char('s') => {
                self.query.sort = self.query.sort.next();
                self.query.descending = self.query.sort.natural_descending();
                Action::Redraw
            }
            KeyCode::Char('S') => {
                self.query.descending = !self.query.descending;
                Action::Redraw
            }
            KeyCode::Char('/') | KeyCode::Char('f') => {
                self.input = Some(self.query.filter.text().to_string());
                Action::Redraw
            }
            KeyCode::Char('c') => {
                self.query.filter = Filter::default();
                self.message = None;
                Action::Redraw
            }
            KeyCode::Char('p') | KeyCode::Char(' ') => Action::TogglePause,
            KeyCode::Char('r') => Action::Reset,
            _ => Action::Nothing,
        }
    }
}

const HELP: &str = "\
keys
  s        sort by the next column (drops/s, total, last seen, source, port, reason, netns)
  S        reverse the order
  /  f     filter: words in any order, all must match
             198.18.0.0/16   source prefix (or one address)
             :8080           destination port
             table_full      reason (conntrack_other, insert_failed, ruleset)
             ns=NAME         namespace name or inode
           Enter applies, Esc cancels
  c        clear the filter
  p  space pause / resume the display (collection goes on)
  r        reset counts and history
  ?  h     this help (any key closes it)
  q  Esc   quit (Ctrl-C too)

reasons
  table_full       conntrack dropped a new flow; its namespace's table was at nf_conntrack_max
  conntrack_other  conntrack dropped it for another reason
  insert_failed    conntrack refused to insert its new entry (a clash, a chain too long; hook tiers)
  ruleset          a rule dropped it";

fn title(text: &str) -> Span<'_> {
    Span::styled(text, Style::new().add_modifier(Modifier::BOLD))
}

pub fn draw(frame: &mut Frame, header: &Header, snap: &Snapshot, view: &ViewState) {
    let area = frame.area();
    let ns_lines = snap.namespaces.len().clamp(1, 4) as u16;
    let fill_lines = plain::fills_lines(header, snap, 5);
    let flood_lines = plain::flood_lines(snap, 3);
    let [top, tables, rates, flood, dropped, fills, footer] = Layout::vertical([
        Constraint::Length(1 + header.hooks.len() as u16),
        Constraint::Length(2 + ns_lines),
        Constraint::Length(2 + snap.series.len() as u16),
        Constraint::Length(2 + flood_lines.len() as u16),
        Constraint::Min(5),
        Constraint::Length(1 + fill_lines.len() as u16),
        Constraint::Length(1),
    ])
    .areas(area);

    let mut lines = vec![Line::from(vec![
        title("ctrace live"),
        Span::raw(format!(" · {} · kernel {} · up {:.0}s · ", header.host, header.kernel, snap.uptime_s)),
        Span::styled(header.tier.clone(), Style::new().fg(Color::Cyan)),
        if view.paused.is_some() {
            Span::styled("  PAUSED", Style::new().fg(Color::Black).bg(Color::Yellow))
        } else {
            Span::raw("")
        },
    ])];
    lines.extend(
        header.hooks.iter().map(|h| Line::from(Span::styled(format!("  {h}"), Style::new().fg(Color::DarkGray)))),
    );
    frame.render_widget(Paragraph::new(lines), top);

    draw_tables(frame, tables, snap);
    draw_rates(frame, rates, snap);
    frame.render_widget(
        Paragraph::new(
            std::iter::once(Line::from(title("DESTINATIONS AND SOURCE PREFIXES")))
                .chain(flood_lines.into_iter().map(|l| {
                    let style = if l.starts_with("!!") {
                        Style::new().fg(Color::White).bg(Color::Red).add_modifier(Modifier::BOLD)
                    } else {
                        Style::new()
                    };
                    Line::from(Span::styled(format!("  {l}"), style))
                }))
                .collect::<Vec<_>>(),
        ),
        flood,
    );
    draw_top(frame, dropped, snap, &view.query);
    frame.render_widget(
        Paragraph::new(
            std::iter::once(Line::from(title("WHO FILLS THE TABLE")))
                .chain(fill_lines.into_iter().map(|l| Line::from(format!("  {l}"))))
                .collect::<Vec<_>>(),
        ),
        fills,
    );
    draw_footer(frame, footer, view);
    if view.help {
        let popup = centered(area, 92, 24);
        frame.render_widget(Clear, popup);
        frame.render_widget(
            Paragraph::new(HELP)
                .wrap(Wrap { trim: false })
                .block(Block::default().borders(Borders::ALL).title(" help ")),
            popup,
        );
    }
}

fn draw_tables(frame: &mut Frame, area: Rect, snap: &Snapshot) {
    let max = snap.max.map_or("?".into(), |m| m.to_string());
    let buckets = snap.buckets.map_or("?".into(), |b| b.to_string());
    let mut head = vec![title("TABLES"), Span::raw(format!("  nf_conntrack_max {max}  buckets {buckets}"))];
    if snap.buckets_too_few {
        head.push(Span::styled("  buckets < max/4: long hash chains when full", Style::new().fg(Color::Yellow)));
    }
    let mut lines = vec![Line::from(head)];
    if snap.namespaces.is_empty() {
        lines.push(Line::from("  no namespace has conntrack entries"));
    }
    for ns in snap.namespaces.iter().take(4) {
        let colour = match ns.time_to_full {
            TimeToFull::Full => Color::Red,
            _ if ns.percent >= 80.0 => Color::Yellow,
            _ => Color::Green,
        };
        lines.push(Line::from(vec![
            Span::raw(format!("  {:<34} ", netns_label(ns.name.as_deref(), ns.netns))),
            Span::styled(bar(ns.percent, 24), Style::new().fg(colour)),
            Span::raw(format!(" {}/{} {:>5.1}%  {:+.1}/s  ", ns.entries, ns.max, ns.percent, ns.rate_per_s)),
            Span::styled(time_to_full(ns.time_to_full), Style::new().fg(colour).add_modifier(Modifier::BOLD)),
        ]));
    }
    if snap.namespaces.len() > 4 {
        lines.push(Line::from(format!("  and {} more namespaces", snap.namespaces.len() - 4)));
    }
    frame.render_widget(Paragraph::new(lines), area);
}

fn draw_rates(frame: &mut Frame, area: Rect, snap: &Snapshot) {
    let mut lines = vec![Line::from(vec![title("RATES"), Span::raw("  per second, last minute")])];
    for s in &snap.series {
        let hot = s.per_s > 0.0;
        let lost = s.name == "lost" && s.total > 0;
        let style = if lost {
            Style::new().fg(Color::White).bg(Color::Red).add_modifier(Modifier::BOLD)
        } else if hot {
            Style::new().fg(Color::Yellow)
        } else {
            Style::new()
        };
        lines.push(Line::from(vec![
            Span::styled(format!("  {:<18} {:>8}/s  total {:<10} ", s.name, short(s.per_s), s.total), style),
            Span::styled(sparkline(s.history.iter().copied()), Style::new().fg(Color::Cyan)),
        ]));
    }
    frame.render_widget(Paragraph::new(lines), area);
}

fn draw_top(frame: &mut Frame, area: Rect, snap: &Snapshot, query: &Query) {
    let filter = if query.filter.is_empty() { "none".to_string() } else { query.filter.text().to_string() };
    let order = if query.descending { "↓" } else { "↑" };
    let mut head = vec![
        title("TOP DROPPED"),
        Span::raw(format!(
            "  by {} {order} · filter: {filter} · {} of {} rows",
            query.sort.label(),
            snap.top.len(),
            snap.matching_rows
        )),
    ];
    if snap.evictions > 0 || snap.declined > 0 {
        head.push(Span::styled(
            format!(
                "  approximate: > {} sources, counts ±{}, {} one-off drops in no row",
                snap.capacity, snap.error_bound, snap.declined
            ),
            Style::new().fg(Color::Yellow),
        ));
    }
    let header = Row::new([
        "SOURCE", "DPORT", "PROTO", "STATE", "REASON", "NETNS", "DROPS/S", "TOTAL", "SHARE", "LAST", "WORKLOAD",
    ])
    .style(Style::new().add_modifier(Modifier::REVERSED));
    let mut rows: Vec<Row> = snap
        .top
        .iter()
        .map(|r| {
            let src = r.src_name.as_ref().map_or(r.src.to_string(), |n| format!("{n} ({})", r.src));
            let reason_style = match r.reason {
                crate::model::Reason::TableFull => Style::new().fg(Color::Red),
                crate::model::Reason::ConntrackOther | crate::model::Reason::InsertFailed => {
                    Style::new().fg(Color::Magenta)
                }
                crate::model::Reason::Ruleset => Style::new().fg(Color::Blue),
            };
            Row::new(vec![
                Cell::from(src),
                Cell::from(r.dport.to_string()),
                Cell::from(r.proto.to_string()),
                Cell::from(r.state.to_string()),
                Cell::from(r.reason.as_str()).style(reason_style),
                Cell::from(r.netns_name.clone().unwrap_or_else(|| r.netns.to_string())),
                Cell::from(short(r.per_s)),
                Cell::from(r.total.to_string()),
                Cell::from(format!("{:.1}%", r.share * 100.0)),
                Cell::from(format!("{:.0}s", r.last_seen_s)),
                Cell::from(r.workload_column()),
            ])
        })
        .collect();
    if snap.others > 0 {
        rows.push(Row::new(vec![
            Cell::from("others").italic(),
            Cell::from(""),
            Cell::from(""),
            Cell::from(""),
            Cell::from(""),
            Cell::from(""),
            Cell::from(""),
            Cell::from(snap.others.to_string()),
        ]));
    }
    if rows.is_empty() {
        rows.push(Row::new(vec![Cell::from("no drops yet").italic()]));
    }
    let widths = [
        Constraint::Min(16),
        Constraint::Length(5),
        Constraint::Length(5),
        Constraint::Length(11),
        Constraint::Length(15),
        Constraint::Length(22),
        Constraint::Length(8),
        Constraint::Length(9),
        Constraint::Length(6),
        Constraint::Length(5),
        Constraint::Min(12),
    ];
    let [caption, table] = Layout::vertical([Constraint::Length(1), Constraint::Min(1)]).areas(area);
    frame.render_widget(Paragraph::new(Line::from(head)), caption);
    frame.render_widget(Table::new(rows, widths).header(header).column_spacing(1), table);
}

fn draw_footer(frame: &mut Frame, area: Rect, view: &ViewState) {
    let line = if let Some(text) = &view.input {
        Line::from(vec![Span::styled("filter> ", Style::new().fg(Color::Yellow)), Span::raw(format!("{text}_"))])
    } else if let Some(message) = &view.message {
        Line::from(Span::styled(message.clone(), Style::new().fg(Color::Red)))
    } else {
        let keys = [
            ("q", "quit"),
            ("s/S", "sort"),
            ("/", "filter"),
            ("c", "clear"),
            ("p", "pause"),
            ("r", "reset"),
            ("?", "help"),
        ];
        Line::from(
            keys.iter()
                .flat_map(|(k, what)| {
                    [
                        Span::styled(format!(" {k} "), Style::new().add_modifier(Modifier::REVERSED)),
                        Span::raw(format!(" {what}  ")),
                    ]
                })
                .collect::<Vec<_>>(),
        )
    };
    frame.render_widget(Paragraph::new(line), area);
}

fn centered(area: Rect, width: u16, height: u16) -> Rect {
    let width = width.min(area.width);
    let height = height.min(area.height);
    Rect { x: area.x + (area.width - width) / 2, y: area.y + (area.height - height) / 2, width, height }
}

#[cfg(test)]
mod tests {
    use ratatui::{backend::TestBackend, Terminal};

    use super::*;
    use crate::{
        aggregate::SourceKey,
        hooks::KernelTotals,
        live::state::{LiveState, NetnsSample, TickInput},
        model::{ConnState, Protocol, Reason},
        netns::ConntrackStats,
    };

    const SEC: u64 = 1_000_000_000;

    /// A known state: a full table stormed by two sources, one rule drop.
    fn known_state() -> (Header, LiveState) {
        let header = Header {
            host: "testhost".into(),
            kernel: "6.18.0".into(),
            tier: "tier: tracepoint (tp_btf/kfree_skb)".into(),
            hooks: vec!["conntrack hooks: off on this tier".into()],
            fills_note: "needs the conntrack hooks".into(),
        };
        let mut state = LiveState::new(0, 64);
        // The server's namespace is a container's; one storming source is another's.
        let container = |name: &str| crate::workload::Workload {
            kind: crate::workload::Kind::Container,
            runtime: Some(crate::workload::Runtime::Podman),
            id: None,
            name: Some(name.into()),
            pod_namespace: None,
        };
        state.workloads.merge(crate::workload::Scan {
            namespaces: [(4026532177, container("server")), (4026532200, container("client-a"))].into(),
            addresses: vec![("198.18.0.3".parse().unwrap(), 4026532200)],
            ..Default::default()
        });
        let ns = |entries, drop| NetnsSample {
            netns: 4026532177,
            name: Some("srv".into()),
            stats: ConntrackStats { entries, drop, ..Default::default() },
        };
        state.tick(TickInput {
            now_ns: SEC,
            namespaces: vec![ns(60, 0)],
            max: Some(64),
            buckets: Some(8),
            ..Default::default()
        });
        let key = |src: &str, dport, reason| SourceKey {
            netns: 4026532177,
            src: src.parse().unwrap(),
            dport,
            proto: Protocol::Tcp,
            state: if reason == Reason::Ruleset { ConnState::Unknown } else { ConnState::SynSent },
            reason,
        };
        for i in 0..30 {
            state.count_drop(
                &key("198.18.0.3", 8080, Reason::TableFull),
                "198.18.0.1".parse().unwrap(),
                SEC + i * 10_000_000,
            );
        }
        for i in 0..20 {
            state.count_drop(
                &key("198.18.0.4", 8080, Reason::TableFull),
                "198.18.0.1".parse().unwrap(),
                SEC + i * 10_000_000,
            );
        }
        for _ in 0..5 {
            state.count_drop(&key("198.18.0.5", 9090, Reason::Ruleset), "198.18.0.1".parse().unwrap(), SEC);
        }
        state.tick(TickInput {
            now_ns: 2 * SEC,
            namespaces: vec![ns(64, 50)],
            max: Some(64),
            buckets: Some(8),
            kernel: KernelTotals {
                netfilter_drops: 55,
                netfilter_drops_no_entry: 50,
                lost_events: 0,
                lost_conntrack_events: 0,
                program_misses: Some(0),
                ..KernelTotals::default()
            },
        });
        (header, state)
    }

    fn screen(view: &ViewState) -> String {
        let (header, state) = known_state();
        let snap = state.snapshot(&view.query, 2 * SEC);
        let mut terminal = Terminal::new(TestBackend::new(132, 40)).unwrap();
        terminal.draw(|f| draw(f, &header, &snap, view)).unwrap();
        let buffer = terminal.backend().buffer();
        (0..buffer.area.height)
            .map(|y| (0..buffer.area.width).map(|x| buffer[(x, y)].symbol()).collect::<String>().trim_end().to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The whole screen, compared with a reviewed copy. After an intended
    /// change: `CTRACE_UPDATE_GOLDEN=1 cargo test`, then read the diff.
    #[test]
    fn screen_matches_the_golden_copy() {
        let got = screen(&ViewState::default());
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/live_view.txt");
        if std::env::var_os("CTRACE_UPDATE_GOLDEN").is_some() {
            std::fs::write(path, &got).unwrap();
        }
        let want = std::fs::read_to_string(path).expect("golden file");
        assert_eq!(got, want, "screen differs from {path}");
    }

    #[test]
    fn help_names_every_reason_the_filter_takes() {
        for reason in crate::model::Reason::ALL {
            assert!(HELP.contains(&format!("\n  {} ", reason.as_str())), "{reason} is not explained");
            assert!(Filter::parse(reason.as_str()).is_ok());
        }
    }

    #[test]
    fn storm_sources_lead_and_the_table_shows_full() {
        let got = screen(&ViewState::default());
        let rows: Vec<&str> = got.lines().filter(|l| l.starts_with("198.18.0.")).collect();
        assert!(rows[0].contains("198.18.0.3") && rows[0].contains("table_full"), "{got}");
        assert!(rows[1].contains("198.18.0.4"), "{got}");
        assert!(got.contains("64/64") && got.contains("FULL"), "{got}");
        assert!(got.contains("buckets < max/4"), "{got}");
    }

    #[test]
    fn keys_change_the_view() {
        let key = |c| KeyEvent::new(KeyCode::Char(c), KeyModifiers::NONE);
        let mut view = ViewState::default();
        assert_eq!(view.on_key(key('s')), Action::Redraw);
        assert!(screen(&view).contains("by total"));
        for c in "/ruleset".chars() {
            view.on_key(key(c));
        }
        assert!(screen(&view).contains("filter> ruleset_"));
        view.on_key(KeyEvent::new(KeyCode::Enter, KeyModifiers::NONE));
        let got = screen(&view);
        assert!(got.contains("filter: ruleset") && got.contains("198.18.0.5") && !got.contains("198.18.0.3"), "{got}");
        assert_eq!(view.on_key(key('?')), Action::Redraw);
        assert!(screen(&view).contains("source prefix"));
        assert_eq!(view.on_key(key('x')), Action::Redraw, "any key closes help");
        assert!(!view.help);
        assert_eq!(view.on_key(key('p')), Action::TogglePause);
        assert_eq!(view.on_key(key('r')), Action::Reset);
        assert_eq!(view.on_key(key('q')), Action::Quit);
        assert_eq!(view.on_key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)), Action::Quit);
    }

    #[test]
    fn a_bad_filter_says_why_and_keeps_the_old_one() {
        let key = |c| KeyEvent::new(KeyCode::Char(c), KeyModifiers::NONE);
        let mut view = ViewState::default();
        for c in "/:http".chars() {
            view.on_key(key(c));
        }
        view.on_key(KeyEvent::new(KeyCode::Enter, KeyModifiers::NONE));
        assert!(view.query.filter.is_empty());
        assert!(screen(&view).contains("not a port"));
    }
}
