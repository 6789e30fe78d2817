//! Stability, measured: each end-to-end test's passes over repeated runs
//! of the suites (`cargo xtask test --repeat N`, `vm-test --repeat N`).
use std::collections::BTreeMap;

/// One test's outcome in one run, read from libtest's output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    Failed,
    Ignored,
}

/// Outcomes from the standard output of one test binary run with
/// `--nocapture`: "test NAME ... ok" (the result may come on a later line
/// when the test prints to standard output itself).
pub fn outcomes(stdout: &str) -> Vec<(String, Outcome)> {
    let result = |word: &str| match word {
        "ok" => Some(Outcome::Passed),
        "FAILED" => Some(Outcome::Failed),
        "ignored" => Some(Outcome::Ignored),
        _ => None,
    };
    let mut found = Vec::new();
    let mut pending: Option<String> = None;
    for line in stdout.lines() {
        let line = line.trim_end();
        if let Some((name, rest)) = line.strip_prefix("test ").and_then(|l| l.split_once(" ...")) {
            if let Some(stale) = pending.take() {
                found.push((stale, Outcome::Failed)); // never finished
            }
            match result(rest.split_whitespace().last().unwrap_or("")) {
                Some(outcome) => found.push((name.to_string(), outcome)),
                None => pending = Some(name.to_string()),
            }
        } else if let Some(outcome) = line.split_whitespace().last().and_then(result) {
            if let Some(name) = pending.take() {
                found.push((name, outcome));
            }
        }
    }
    if let Some(name) = pending {
        found.push((name, Outcome::Failed));
    }
    found
}

/// Passes and runs per (where, test).
#[derive(Default)]
pub struct Tally {
    runs: BTreeMap<(String, String), (u32, u32)>,
}

impl Tally {
    /// Adds one run's outcomes; `suite` names the test binary (its tests'
    /// names are only unique within it).
    pub fn add(&mut self, place: &str, suite: &str, outcomes: &[(String, Outcome)]) {
        for (name, outcome) in outcomes {
            if *outcome == Outcome::Ignored {
                continue;
            }
            let entry = self.runs.entry((place.to_string(), format!("{suite}::{name}"))).or_default();
            entry.1 += 1;
            if *outcome == Outcome::Passed {
                entry.0 += 1;
            }
        }
    }

    /// A whole run that gave no outcome (a guest that did not boot, a
    /// binary that crashed before its first test).
    pub fn add_broken_run(&mut self, place: &str, what: &str) {
        let entry = self.runs.entry((place.to_string(), format!("({what})"))).or_default();
        entry.1 += 1;
    }

    pub fn report(&self) -> String {
        let mut out = format!("{:<14} {:<86} PASSED\n", "WHERE", "TEST");
        for ((place, test), (passed, runs)) in &self.runs {
            let flag = if passed == runs { "" } else { "  <- FLAKY OR FAILING" };
            out.push_str(&format!("{place:<14} {test:<86} {passed}/{runs}{flag}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_on_the_same_line_or_after_the_tests_own_output() {
        let stdout = "\nrunning 3 tests\n\
                      test a ... ok\n\
                      test b ... printed by the test\n\
                      more output\n\
                      FAILED\n\
                      test c ... ignored\n\
                      test d ... \n";
        assert_eq!(
            outcomes(stdout),
            [
                ("a".into(), Outcome::Passed),
                ("b".into(), Outcome::Failed),
                ("c".into(), Outcome::Ignored),
                ("d".into(), Outcome::Failed), // started, never finished: a crash
            ]
        );
    }

    #[test]
    fn counts_passes_per_place_and_test() {
        let mut tally = Tally::default();
        tally.add("host", "cli", &[("help".into(), Outcome::Passed)]);
        tally.add("host", "cli", &[("help".into(), Outcome::Passed)]);
        tally.add("6.1", "cli", &[("help".into(), Outcome::Failed), ("skip".into(), Outcome::Ignored)]);
        tally.add_broken_run("6.12", "guest run");
        let report = tally.report();
        assert!(report.contains("host           cli::help"), "{report}");
        assert!(report.contains("2/2"), "{report}");
        assert!(report.contains("0/1  <- FLAKY OR FAILING"), "{report}");
        assert!(!report.contains("skip"), "ignored tests are not runs: {report}");
    }
}
