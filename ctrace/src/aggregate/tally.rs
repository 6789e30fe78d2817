//! Exact counts per key where keys are few (namespaces by reason): the
//! previous event's key is remembered, since a storm repeats it, and a
//! repeat costs a comparison instead of a hash and a probe.
use std::hash::Hash;

use rustc_hash::FxHashMap;

pub struct Tally<K> {
    /// Each key's place in `counts`.
    index: FxHashMap<K, usize>,
    counts: Vec<(K, u64)>,
    /// The place of the previous event's key (past the end before any).
    last: usize,
}

impl<K> Default for Tally<K> {
    fn default() -> Self {
        Tally { index: FxHashMap::default(), counts: Vec::new(), last: usize::MAX }
    }
}

impl<K: Hash + Eq + Copy> Tally<K> {
    #[inline]
    pub fn add(&mut self, key: K) {
        if let Some((k, n)) = self.counts.get_mut(self.last) {
            if *k == key {
                *n += 1;
                return;
            }
        }
        let place = match self.index.get(&key) {
            Some(&place) => place,
            None => {
                self.counts.push((key, 0));
                self.index.insert(key, self.counts.len() - 1);
                self.counts.len() - 1
            }
        };
        self.counts[place].1 += 1;
        self.last = place;
    }

    /// Every key counted, with its count, in the order first seen.
    pub fn iter(&self) -> impl Iterator<Item = (&K, u64)> {
        self.counts.iter().map(|(k, n)| (k, *n))
    }

    pub fn clear(&mut self) {
        *self = Tally::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_and_alternations_count_the_same() {
        let stream = [3, 3, 3, 1, 3, 1, 1, 2, 3, 3];
        let mut tally = Tally::default();
        for k in stream {
            tally.add(k);
        }
        let mut counts: Vec<_> = tally.iter().map(|(k, n)| (*k, n)).collect();
        counts.sort();
        assert_eq!(counts, [(1, 3), (2, 1), (3, 6)]);
        tally.clear();
        assert_eq!(tally.iter().count(), 0);
        tally.add(1);
        assert_eq!(tally.iter().collect::<Vec<_>>(), [(&1, 1)]);
    }
}
