//! Table occupancy over time: how fast a namespace's conntrack table fills
//! and when it will be full.
use std::collections::VecDeque;

use serde::Serialize;

/// Entry counts sampled over the last `window_s` seconds.
#[derive(Clone, Debug)]
pub struct Trend {
    samples: VecDeque<(f64, u64)>,
    window_s: f64,
}

/// When the table will be full, at the current rate.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "seconds")]
pub enum TimeToFull {
    /// At or above the maximum now.
    Full,
    /// Not filling (flat or draining), or too few samples to say.
    Never,
    /// Seconds until full.
    In(f64),
}

impl Trend {
    pub fn new(window_s: f64) -> Self {
        Trend { samples: VecDeque::new(), window_s }
    }

    /// Adds a sample at `t_s` seconds; older ones leave the window.
    pub fn push(&mut self, t_s: f64, entries: u64) {
        self.samples.push_back((t_s, entries));
        while let Some(&(t0, _)) = self.samples.front() {
            if t_s - t0 > self.window_s {
                self.samples.pop_front();
            } else {
                break;
            }
        }
    }

    pub fn latest(&self) -> Option<u64> {
        self.samples.back().map(|s| s.1)
    }

    /// Entries per second: least-squares slope over the window.
    pub fn rate(&self) -> f64 {
        let n = self.samples.len() as f64;
        if self.samples.len() < 2 {
            return 0.0;
        }
        let mean_t = self.samples.iter().map(|s| s.0).sum::<f64>() / n;
        let mean_e = self.samples.iter().map(|s| s.1 as f64).sum::<f64>() / n;
        let (mut num, mut den) = (0.0, 0.0);
        for &(t, e) in &self.samples {
            num += (t - mean_t) * (e as f64 - mean_e);
            den += (t - mean_t) * (t - mean_t);
        }
        if den == 0.0 {
            0.0
        } else {
            num / den
        }
    }

    pub fn time_to_full(&self, max: u64) -> TimeToFull {
        match self.latest() {
            Some(entries) if entries >= max => TimeToFull::Full,
            Some(entries) => {
                let rate = self.rate();
                if rate > 0.0 {
                    TimeToFull::In((max - entries) as f64 / rate)
                } else {
                    TimeToFull::Never
                }
            }
            None => TimeToFull::Never,
        }
    }
}

/// The kernel's advice: buckets between a quarter and a half of the maximum.
/// Fewer buckets than max/4 mean long hash chains when the table is full.
pub fn too_few_buckets(buckets: u64, max: u64) -> bool {
    buckets < max / 4
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filling_table_has_a_time_to_full() {
        let mut t = Trend::new(10.0);
        for s in 0..5 {
            t.push(s as f64, 100 + 10 * s);
        }
        assert!((t.rate() - 10.0).abs() < 1e-9);
        match t.time_to_full(240) {
            TimeToFull::In(secs) => assert!((secs - 10.0).abs() < 1e-9),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn full_flat_and_draining() {
        let mut t = Trend::new(10.0);
        t.push(0.0, 64);
        assert_eq!(t.time_to_full(64), TimeToFull::Full);
        let mut flat = Trend::new(10.0);
        flat.push(0.0, 10);
        flat.push(1.0, 10);
        assert_eq!(flat.time_to_full(64), TimeToFull::Never);
        let mut draining = Trend::new(10.0);
        draining.push(0.0, 50);
        draining.push(1.0, 40);
        assert_eq!(draining.time_to_full(64), TimeToFull::Never);
        assert_eq!(Trend::new(1.0).time_to_full(64), TimeToFull::Never);
    }

    #[test]
    fn old_samples_leave_the_window() {
        let mut t = Trend::new(2.0);
        t.push(0.0, 1000); // would dominate the slope if kept
        for s in 5..8 {
            t.push(s as f64, 10 * s);
        }
        assert!((t.rate() - 10.0).abs() < 1e-9);
    }

    #[test]
    fn bucket_advice() {
        assert!(too_few_buckets(1000, 262_144));
        assert!(!too_few_buckets(65_536, 262_144));
    }
}
