//! `ctrace serve`: the live engine behind an OpenMetrics endpoint.
//!
//! Two halves that never wait on each other. The engine loop is `live`'s:
//! records counted as they arrive, kernel counters sampled every second.
//! HTTP runs on hyper, one task per connection: reading a request, however
//! slowly a client sends it, happens there, so a client that connects and
//! says nothing cannot stop the ring buffer from being drained (it did when
//! one loop did both: 77% of a flood's records lost to 20 idle clients).
//! A complete `GET /metrics` asks the engine for a fresh encoding over a
//! channel; the engine answers between two drains.
//!
//! With `--web-config` (see [`web`]) connections are TLS and requests need
//! a password; both are checked on the connection's task too.
pub mod web;

use std::{convert::Infallible, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn, Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    signal::unix::{signal, SignalKind},
    sync::{mpsc, oneshot, Semaphore},
};

use crate::{
    engine::{monotonic_ns, Engine, OnlyNetns},
    export::metrics::encode_input,
    live::state::LiveState,
};

pub struct Options {
    pub listen: SocketAddr,
    /// Per-source series exported: the heaviest this many.
    pub top: usize,
    pub capacity: usize,
    pub hooks: crate::hooks::HookChoice,
    /// Only this namespace (`ip netns` name, `host`, `pid N` or inode).
    pub netns: Option<String>,
    /// TLS and basic auth (exporter-toolkit's web.yml).
    pub web_config: Option<PathBuf>,
}

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Connections served at once; more are closed at once (a scraper retries).
pub const MAX_CONNECTIONS: usize = 64;
/// Time for a client to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Time for a whole connection, answer included.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head read (hyper's smallest allowed buffer is 8 KiB).
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// A request for the current metrics, answered by the engine loop.
type Render = oneshot::Sender<String>;

pub async fn run(options: Options) -> anyhow::Result<()> {
    let web = match &options.web_config {
        Some(path) => web::WebConfig::load(path)?,
        None => web::WebConfig { tls: None, auth: None },
    };
    // Bind before attaching: a busy port is the likelier mistake.
    let listener =
        TcpListener::bind(options.listen).await.with_context(|| format!("cannot listen on {}", options.listen))?;
    let scope = match &options.netns {
        None => None,
        Some(selector) => Some(crate::netns::select(&crate::netns::discover(), selector).with_context(|| {
            format!("no network namespace {selector}: give an `ip netns` name, host, `pid N` or an inode number")
        })?),
    };
    let mut engine = Engine::start(options.hooks)?;
    let mut state = LiveState::new(monotonic_ns(), options.capacity);
    // One namespace's events and counters, or all of them.
    let drain = |engine: &mut Engine, state: &mut LiveState| match scope {
        Some(netns) => engine.drain(&mut OnlyNetns { netns, inner: state }),
        None => engine.drain(state),
    };
    let sample = |engine: &mut Engine| {
        let input = engine.sample();
        match scope {
            Some(netns) => input.only_netns(netns),
            None => input,
        }
    };
    state.tick(sample(&mut engine));
    state.refresh_workloads();
    let (render_tx, mut renders) = mpsc::channel::<Render>(MAX_CONNECTIONS);
    let scheme = if web.tls.is_some() { "https" } else { "http" };
    let password = if web.auth.is_some() { ", basic auth" } else { "" };
    tokio::spawn(accept_loop(listener, render_tx, web));
    // Before the readiness line: a SIGTERM from then on must stop cleanly.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    eprintln!(
        "ctrace: {} attached; serving {scheme}://{}/metrics{password}{}{}",
        engine.attached.tier,
        options.listen,
        match scope {
            Some(netns) => format!(" for namespace {netns} only"),
            None => String::new(),
        },
        match (options.listen.ip().is_loopback(), password.is_empty()) {
            (false, true) => " (not loopback, no password: anyone on the network can read it; see --web-config)",
            _ => "",
        }
    );

    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            woke = engine.wait() => {
                woke?;
                drain(&mut engine, &mut state);
            }
            _ = ticker.tick() => {
                drain(&mut engine, &mut state);
                state.tick(sample(&mut engine));
                state.refresh_workloads();
                for warning in state.workloads.take_warnings() {
                    eprintln!("ctrace: {warning}");
                }
            }
            Some(reply) = renders.recv() => {
                // Bring the counters up to date so a scrape sees every drop so far.
                drain(&mut engine, &mut state);
                let mut input = state.metrics(options.top);
                if let Ok(t) = engine.attached.conntrack_totals() {
                    if engine.attached.tier != crate::hooks::Tier::Tracepoint {
                        input.conntrack_events = t.named().to_vec();
                    }
                }
                let _ = reply.send(encode_input(&input));
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    Ok(())
}

/// Accepts connections and serves each on its own task, at most
/// [`MAX_CONNECTIONS`] at once.
async fn accept_loop(listener: TcpListener, renders: mpsc::Sender<Render>, web: web::WebConfig) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let tls = web.tls.map(tokio_rustls::TlsAcceptor::from);
    let auth = web.auth.map(Arc::new);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors, say: back off rather than spin.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream); // full: closed at once
            continue;
        };
        let (renders, tls, auth) = (renders.clone(), tls.clone(), auth.clone());
        tokio::spawn(async move {
            // The handshake counts against the connection's time too.
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, async {
                match tls {
                    Some(acceptor) => {
                        if let Ok(stream) = acceptor.accept(stream).await {
                            serve_connection(stream, renders, auth).await;
                        }
                    }
                    None => serve_connection(stream, renders, auth).await,
                }
            })
            .await;
            drop(slot);
        });
    }
}

/// One connection, plain or TLS: a request head, then the answer.
async fn serve_connection(
    stream: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
    renders: mpsc::Sender<Render>,
    auth: Option<Arc<web::BasicAuth>>,
) {
    let service = service_fn(move |request: Request<Incoming>| answer(request, renders.clone(), auth.clone()));
    let _ = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

/// One request: metrics come from the engine, the rest from [`route`].
async fn answer(
    request: Request<Incoming>,
    renders: mpsc::Sender<Render>,
    auth: Option<Arc<web::BasicAuth>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut route = route(request.method().as_str(), request.uri().path());
    if let Some(auth) = auth {
        // /healthz says only that ctrace is up: probes get it without a password.
        let header = request.headers().get(hyper::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        if !is_health_check(&route) && !auth.allows(header).await {
            route = Route::Fixed { status: 401, body: "unauthorized\n" };
        }
    }
    let unauthorized = matches!(route, Route::Fixed { status: 401, .. });
    let (status, content_type, body) = match route {
        Route::Metrics => {
            let (tx, rx) = oneshot::channel();
            let rendered = match renders.send(tx).await {
                Ok(()) => rx.await.ok(),
                Err(_) => None,
            };
            match rendered {
                Some(text) => (200, CONTENT_TYPE, text),
                None => (503, TEXT, "ctrace is stopping\n".to_string()),
            }
        }
        Route::Fixed { status, body } => (status, TEXT, body.to_string()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    if unauthorized {
        response.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            hyper::header::HeaderValue::from_static("Basic realm=\"ctrace\", charset=\"UTF-8\""),
        );
    }
    Ok(response)
}

const TEXT: &str = "text/plain; charset=utf-8";

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Metrics,
    Fixed { status: u16, body: &'static str },
}

const HEALTHY: Route = Route::Fixed { status: 200, body: "ok\n" };

fn is_health_check(route: &Route) -> bool {
    *route == HEALTHY
}

/// Routes a request by method and path (the query is ignored).
pub fn route(method: &str, path: &str) -> Route {
    match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => Route::Metrics,
        ("GET", "/") => Route::Fixed { status: 200, body: "ctrace: metrics at /metrics\n" },
        // Liveness: answered once the programs are attached (connections
        // wait in the listen queue until then).
        ("GET", "/healthz") => HEALTHY,
        ("GET", _) => Route::Fixed { status: 404, body: "not found; try /metrics\n" },
        _ => Route::Fixed { status: 405, body: "only GET\n" },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route("GET", "/metrics"), Route::Metrics);
        assert_eq!(route("GET", "/metrics?x=1"), Route::Metrics);
        assert_eq!(route("GET", "/healthz"), Route::Fixed { status: 200, body: "ok\n" });
        assert_eq!(route("GET", "/nope"), Route::Fixed { status: 404, body: "not found; try /metrics\n" });
        assert!(matches!(route("POST", "/metrics"), Route::Fixed { status: 405, .. }));
        assert!(matches!(route("", ""), Route::Fixed { status: 405, .. }));
    }
}
