//! Running `ctrace doctor` in a test, and reading its JSON report.
use std::process::{Child, Command, ExitStatus};

use serde_json::Value;

use crate::{ctrace_bin, spawn_reading_stderr, wait_for, TempDir, HANG};

/// A running `ctrace doctor --format json`; its report once stopped.
pub struct Doctor {
    child: Child,
    out: TempDir,
}

impl Doctor {
    /// Starts doctor on one namespace with a window that only SIGINT ends,
    /// and waits until it watches.
    pub fn start(netns: &str) -> Self {
        Self::start_with(netns, &[])
    }

    /// [`Doctor::start`] with more arguments (`--invalid`).
    pub fn start_with(netns: &str, extra: &[&str]) -> Self {
        let out = TempDir::new("doctor");
        let stdout = std::fs::File::create(out.0.join("report.json")).expect("report file");
        let (mut child, rx) = spawn_reading_stderr(
            Command::new(ctrace_bin())
                .args(["doctor", "--format", "json", "--window", "3600", "--netns", netns])
                .args(extra)
                .stdout(stdout),
            "doctor",
        );
        loop {
            match rx.recv_timeout(HANG) {
                Ok(line) if line.contains("watching") => return Doctor { child, out },
                Ok(_) => {}
                Err(_) => panic!("ctrace doctor did not start watching (exit {:?})", child.try_wait()),
            }
        }
    }

    /// Ends the window (as Ctrl-C does); the exit status and the report.
    pub fn stop(mut self) -> (ExitStatus, Value) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let status = wait_for("ctrace doctor to report after SIGINT", || self.child.try_wait().expect("doctor"));
        let text = std::fs::read_to_string(self.out.0.join("report.json")).expect("report");
        let report = serde_json::from_str(&text).unwrap_or_else(|e| panic!("doctor's JSON: {e}: {text}"));
        (status, report)
    }
}

impl Drop for Doctor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn findings_for(report: &Value, netns: u32) -> Vec<&Value> {
    report["findings"].as_array().expect("findings").iter().filter(|f| f["netns"] == netns).collect()
}

pub fn namespace(report: &Value, netns: u32) -> &Value {
    report["evidence"]["namespaces"]
        .as_array()
        .expect("namespaces")
        .iter()
        .find(|n| n["netns"] == netns)
        .unwrap_or_else(|| panic!("namespace {netns} not in the report: {report:#}"))
}

/// The exit status is the worst finding's: 0 healthy, 1 warning, 2 critical.
pub fn check_status(status: ExitStatus, report: &Value) {
    let worst =
        report["findings"].as_array().unwrap().iter().map(|f| f["severity"].as_str().unwrap()).fold(0, |worst, s| {
            worst.max(match s {
                "critical" => 2,
                "warning" => 1,
                _ => 0,
            })
        });
    assert_eq!(status.code(), Some(worst), "exit status vs findings: {report:#}");
    assert_eq!(report["exit_code"], worst);
}
