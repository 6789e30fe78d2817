//! `ctrace serve`: the live engine behind an OpenMetrics endpoint.
//!
//! The same loop as `live` (records counted as they arrive, kernel counters
//! sampled every second) with a minimal HTTP/1.1 server in place of a view:
//! `GET /metrics` encodes the current state; anything else is 404.
use std::{net::SocketAddr, time::Duration};

use anyhow::Context as _;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    signal::unix::{signal, SignalKind},
};

use crate::{
    classify::{Classifier, Symbols},
    export::metrics::encode_input,
    hooks::{kernel_btf, Attached},
    live::{consume, sample, state::LiveState},
    netns::Namespaces,
    record::{monotonic_ns, DRAIN_EVERY},
};

pub struct Options {
    pub listen: SocketAddr,
    /// Per-source series exported: the heaviest this many.
    pub top: usize,
    pub capacity: usize,
    pub hooks: crate::hooks::HookChoice,
}

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub async fn run(options: Options) -> anyhow::Result<()> {
    // Bind before attaching: a busy port is the likelier mistake.
    let listener =
        TcpListener::bind(options.listen).await.with_context(|| format!("cannot listen on {}", options.listen))?;
    let btf = kernel_btf()?;
    let (attached, events) = Attached::attach(&btf, options.hooks)?;
    let mut classifier = Classifier::new(Symbols::new(attached.kallsyms.clone()), Namespaces::new())
        .with_table_full_hooks(attached.table_full_hooked);
    let mut state = LiveState::new(monotonic_ns(), options.capacity);
    state.tick(sample(&attached, &mut classifier.namespaces));
    eprintln!(
        "ctrace: {} attached; serving http://{}/metrics{}",
        attached.tier,
        options.listen,
        if options.listen.ip().is_loopback() { "" } else { " (not loopback: reachable from the network)" }
    );

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let mut drain = tokio::time::interval(DRAIN_EVERY);
    let mut events = crate::hooks::poll_events(events)?;
    loop {
        tokio::select! {
            ready = events.readable_mut() => {
                let mut guard = ready?;
                consume(guard.get_inner_mut(), &mut classifier, &attached.tcp_states, &mut state);
                guard.clear_ready();
            }
            _ = drain.tick() => consume(events.get_mut(), &mut classifier, &attached.tcp_states, &mut state),
            _ = ticker.tick() => state.tick(sample(&attached, &mut classifier.namespaces)),
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                // Bring the counters up to date so a scrape sees every drop so far.
                consume(events.get_mut(), &mut classifier, &attached.tcp_states, &mut state);
                let mut input = state.metrics(options.top);
                if let Ok(t) = attached.conntrack_totals() {
                    if attached.tier != crate::hooks::Tier::Tracepoint {
                        input.conntrack_events = t.named().to_vec();
                    }
                }
                let body = encode_input(&input);
                // One request per connection; a slow client gets 2 s.
                let _ = tokio::time::timeout(Duration::from_secs(2), respond(stream, &body)).await;
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    Ok(())
}

/// Reads one request head and answers it.
async fn respond(mut stream: TcpStream, metrics: &str) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let (status, content_type, body) = route(&String::from_utf8_lossy(&head), metrics);
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// Status, content type and body for a request head.
pub fn route<'a>(head: &str, metrics: &'a str) -> (&'static str, &'static str, std::borrow::Cow<'a, str>) {
    let mut words = head.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => ("200 OK", CONTENT_TYPE, metrics.into()),
        ("GET", "/") => ("200 OK", "text/plain; charset=utf-8", "ctrace: metrics at /metrics\n".into()),
        ("GET", _) => ("404 Not Found", "text/plain; charset=utf-8", "not found; try /metrics\n".into()),
        _ => ("405 Method Not Allowed", "text/plain; charset=utf-8", "only GET\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", "m").0, "200 OK");
        assert_eq!(route("GET /metrics?x=1 HTTP/1.1\r\n\r\n", "m").2, "m");
        assert_eq!(route("GET /nope HTTP/1.1\r\n\r\n", "m").0, "404 Not Found");
        assert_eq!(route("POST /metrics HTTP/1.1\r\n\r\n", "m").0, "405 Method Not Allowed");
        assert_eq!(route("", "m").0, "405 Method Not Allowed");
    }
}
