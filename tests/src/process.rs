//! ctrace itself as the tests run it: `serve` as a daemon with its HTTP
//! endpoint, `record` as a recording, and reading a child's stderr.
use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use crate::{ctrace_bin, HANG};

/// A child process killed (SIGINT, then SIGKILL) on drop.
pub struct Daemon {
    pub child: Child,
    pub name: &'static str,
}

impl Daemon {
    pub fn spawn(name: &'static str, cmd: &mut Command) -> anyhow::Result<Self> {
        let child = cmd.spawn().with_context(|| format!("cannot start {name}"))?;
        Ok(Daemon { child, name })
    }

    /// Fails if the process has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited early: {status}", self.name);
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ctrace serve` on a free loopback port, once it says it is serving
/// (its later lines are echoed). Returns the daemon and its port.
pub fn serve() -> anyhow::Result<(Daemon, u16)> {
    serve_with(&[])
}

/// [`serve`] with more arguments (`--netns NAME`, `--web-config FILE`).
pub fn serve_with(args: &[&str]) -> anyhow::Result<(Daemon, u16)> {
    let port = free_port();
    let mut ctrace = Daemon::spawn(
        "ctrace serve",
        Command::new(ctrace_bin())
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    )?;
    let mut lines = BufReader::new(ctrace.child.stderr.take().expect("piped")).lines();
    let first = lines.next().context("ctrace serve said nothing")??;
    if !first.contains("serving") {
        bail!("ctrace serve: {first}");
    }
    std::thread::spawn(move || lines.for_each(|l| eprintln!("[ctrace] {}", l.unwrap_or_default())));
    Ok((ctrace, port))
}

/// A free TCP port on loopback (bound and released: a small race is possible).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port()
}

/// A plain HTTP/1.0 GET on loopback; returns status code and body.
pub fn http_get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").context("no HTTP head")?;
    let status = head.split_whitespace().nth(1).context("no status")?.parse()?;
    Ok((status, body.to_string()))
}

/// Percent-encodes a query-string value.
pub fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A running `ctrace record`, stopped with SIGINT (as Ctrl-C would) or
/// killed on drop.
pub struct Recording {
    child: Option<Child>,
    pub output: PathBuf,
    stderr_lines: mpsc::Receiver<String>,
}

impl Recording {
    /// Starts `ctrace record` writing to `output` and waits until it has
    /// attached (its "attached" line on stderr).
    pub fn start(output: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_command(Command::new(ctrace_bin()).args(["record", "--output"]).arg(output).args(extra), output)
    }

    /// [`Recording::start`] for a command that runs `ctrace record --output
    /// OUTPUT` some other way (in a container, say) and passes SIGINT on.
    pub fn start_command(command: &mut Command, output: &Path) -> anyhow::Result<Self> {
        let mut child = command.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().context("spawn ctrace")?;
        let stderr = child.stderr.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[ctrace] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut recording = Recording { child: Some(child), output: output.to_path_buf(), stderr_lines: rx };
        let started = Instant::now();
        loop {
            match recording.stderr_lines.recv_timeout(HANG.saturating_sub(started.elapsed())) {
                Ok(line) if line.contains("attached") => {
                    eprintln!("ctrace record attached after {:.1} s", started.elapsed().as_secs_f64());
                    return Ok(recording);
                }
                Ok(_) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = recording.child.as_mut().map(|c| c.wait()).transpose()?;
                    bail!("ctrace exited before it attached ({status:?})");
                }
                Err(mpsc::RecvTimeoutError::Timeout) => bail!("ctrace did not attach within {HANG:?}: a hang"),
            }
        }
    }

    /// The process's peak resident memory so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        peak_rss_kib(self.child.as_ref()?.id())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Fails the test at once, with the exit status, if ctrace is no longer
    /// running (a wait on it would otherwise only end as a hang).
    pub fn assert_running(&mut self) {
        let child = self.child.as_mut().expect("running");
        if let Ok(Some(status)) = child.try_wait() {
            let said: Vec<String> = self.stderr_lines.try_iter().collect();
            panic!("ctrace record exited while it should be recording: {status}; it said {said:?}");
        }
    }

    /// Sends SIGINT and waits for a clean exit; returns the record file.
    pub fn stop(self) -> anyhow::Result<serde_json::Value> {
        let child = self.child.as_ref().expect("running");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        self.wait()
    }

    /// Waits for ctrace to finish by itself (`--duration`); returns the record.
    pub fn wait(mut self) -> anyhow::Result<serde_json::Value> {
        let mut child = self.child.take().expect("running");
        let status = child.wait()?;
        if !status.success() {
            bail!("ctrace exited with {status}");
        }
        let text = std::fs::read_to_string(&self.output).with_context(|| format!("read {}", self.output.display()))?;
        Ok(serde_json::from_str(&text)?)
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Spawns `command` with its stderr read line by line on a thread: each
/// line echoed (prefixed with `[tag]`) and sent on the returned channel.
pub fn spawn_reading_stderr(command: &mut Command, tag: &'static str) -> (Child, mpsc::Receiver<String>) {
    let mut child = command.stderr(Stdio::piped()).spawn().unwrap_or_else(|e| panic!("spawn {tag}: {e}"));
    let stderr = child.stderr.take().expect("piped");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        // Drains to the end even when nobody listens any more, so the child
        // never meets a full or closed pipe.
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[{tag}] {line}");
            let _ = tx.send(line);
        }
    });
    (child, lines)
}

/// A process's peak resident memory so far (VmHWM), in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmHWM:")?.trim().trim_end_matches("kB").trim().parse().ok())
}

/// A real Prometheus on a free loopback port with this configuration (its
/// storage under `dir`), once it says it is ready. Returns it and its port.
pub fn prometheus(dir: &Path, config: &str) -> (Daemon, u16) {
    let port = free_port();
    let path = dir.join("prometheus.yml");
    std::fs::write(&path, config).expect("prometheus.yml");
    let mut daemon = Daemon::spawn(
        "prometheus",
        Command::new("prometheus")
            .arg(format!("--config.file={}", path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .expect("prometheus is not installed: run `cargo xtask setup`");
    crate::wait_for("prometheus to be ready", || {
        daemon.check_running().unwrap();
        matches!(http_get(port, "/-/ready"), Ok((200, _))).then_some(())
    });
    (daemon, port)
}

/// Seconds since the epoch, as Prometheus stamps samples.
pub fn now_unix() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}
