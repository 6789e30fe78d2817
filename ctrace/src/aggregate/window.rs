//! Rates over a sliding window of one-second buckets, for the live view's
//! "now" figures and its one-minute sparklines.
use std::collections::VecDeque;

/// Per-interval values of one series, newest last, at most `capacity` kept.
#[derive(Clone, Debug)]
pub struct Series {
    values: VecDeque<u64>,
    capacity: usize,
    total: u64,
}

impl Series {
    pub fn new(capacity: usize) -> Self {
        Series { values: VecDeque::with_capacity(capacity), capacity, total: 0 }
    }

    /// Appends the amount of the interval that just ended.
    pub fn push(&mut self, value: u64) {
        if self.values.len() == self.capacity {
            self.values.pop_front();
        }
        self.values.push_back(value);
        self.total += value;
    }

    /// The latest interval's amount.
    pub fn last(&self) -> u64 {
        self.values.back().copied().unwrap_or(0)
    }

    /// Sum since the series started (not only the window).
    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn values(&self) -> impl Iterator<Item = u64> + '_ {
        self.values.iter().copied()
    }
}

/// Turns a cumulative counter into per-interval amounts.
#[derive(Clone, Copy, Debug, Default)]
pub struct Delta {
    last: Option<u64>,
}

impl Delta {
    /// The increase since the previous reading (0 for the first, and for a
    /// counter that went backwards, e.g. a namespace that was recreated).
    pub fn next(&mut self, cumulative: u64) -> u64 {
        let delta = match self.last {
            Some(prev) if cumulative >= prev => cumulative - prev,
            _ => 0,
        };
        self.last = Some(cumulative);
        delta
    }
}

/// A rate from an amount over a duration in nanoseconds.
pub fn per_second(amount: u64, elapsed_ns: u64) -> f64 {
    if elapsed_ns == 0 {
        0.0
    } else {
        amount as f64 * 1e9 / elapsed_ns as f64
    }
}

/// Draws values as a one-line bar chart of eighth blocks, scaled to the
/// largest value; zero is a space.
pub fn sparkline(values: impl IntoIterator<Item = u64>) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let values: Vec<u64> = values.into_iter().collect();
    let max = values.iter().copied().max().unwrap_or(0);
    values
        .iter()
        .map(|&v| if v == 0 || max == 0 { ' ' } else { BARS[((v * 8).div_ceil(max) as usize).clamp(1, 8) - 1] })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_keeps_a_window_and_a_total() {
        let mut s = Series::new(3);
        for v in [1, 2, 3, 4] {
            s.push(v);
        }
        assert_eq!(s.values().collect::<Vec<_>>(), [2, 3, 4]);
        assert_eq!(s.last(), 4);
        assert_eq!(s.total(), 10);
        assert_eq!(Series::new(3).last(), 0);
    }

    #[test]
    fn deltas_of_cumulative_counters() {
        let mut d = Delta::default();
        assert_eq!(d.next(100), 0);
        assert_eq!(d.next(130), 30);
        assert_eq!(d.next(130), 0);
        assert_eq!(d.next(5), 0, "a reset counter is not a negative rate");
        assert_eq!(d.next(8), 3);
    }

    #[test]
    fn rates() {
        assert_eq!(per_second(50, 500_000_000), 100.0);
        assert_eq!(per_second(50, 0), 0.0);
    }

    #[test]
    fn sparklines() {
        assert_eq!(sparkline([0, 1, 7, 14]), " ▁▄█");
        assert_eq!(sparkline([0, 0]), "  ");
        assert_eq!(sparkline([5]), "█");
        assert_eq!(sparkline([]), "");
    }
}
