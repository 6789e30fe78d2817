//! Bounded heavy hitters: the Space-Saving algorithm (Metwally, Agrawal and
//! El Abbadi, 2005) on a stream-summary structure.
//!
//! At most `capacity` keys are tracked. A new key arriving when all slots are
//! taken replaces a key with the smallest count and inherits that count as
//! its possible overestimate (`error`). Guarantees, for N events:
//! - every tracked count is within `[count - error, count]` of the truth;
//! - `error <= min_count <= N / capacity`;
//! - every key with true count above `N / capacity` is tracked;
//! - the tracked counts sum to exactly N.
//!
//! Counts grow by one, so keys with equal counts share a bucket and the
//! buckets form an ascending list: an increment moves a key to the next
//! bucket, an eviction takes any key of the first. Both are O(1), which
//! matters under a spoofed-source flood where every event is a new key.
//!
//! The index holds slot numbers only, found by the key's hash (kept in
//! its counter): in a flood every event evicts a key, and a small index
//! stays in cache where one holding the keys did not.
//!
//! The previous event's slot is remembered: a storm repeats its key many
//! times in a row (one source's SYN retries, its one destination, its
//! prefixes), and comparing one key costs less than hashing it and probing
//! the index.
//!
//! [`SpaceSaving::offer`] puts a doorkeeper in front of evictions (the
//! admission filter of TinyLFU, Einziger, Friedman and Manes, 2017): once
//! every slot is taken, a key not tracked replaces one only on its second
//! sighting within a filter epoch; its first only sets a bit. A spoofed
//! flood's one-off sources then cost a hash, a probe and a bit each, not an
//! eviction (several cache misses into a table of megabytes), and they no
//! longer push out keys that repeat. The events counted are then a plain
//! Space-Saving run over the stream less its declined sightings, so the
//! guarantees above hold with N' = N - [`SpaceSaving::declined`] for N and
//! each key's sightings less its declined ones, `d`, for its true count:
//! - the tracked counts sum to N', and a tracked key's true count is within
//!   `[count - error, count + d]`;
//! - `d` is at most one per epoch in which the key was not tracked when
//!   first seen (a bit already set by another key's hash admits at once);
//! - every key with more than `N' / capacity` sightings counted is tracked.
//!
//! While slots are free nothing is declined: counts stay exact.
use std::hash::{BuildHasher, Hash};

use hashbrown::HashTable;
use rustc_hash::FxBuildHasher;

const NIL: u32 = u32::MAX;

/// A tracked key.
#[derive(Clone, Debug)]
pub struct Counter<K> {
    pub key: K,
    /// Events counted for this key (may overcount by up to `error`).
    pub count: u64,
    /// Count inherited from the evicted key this slot replaced.
    pub error: u64,
    /// Timestamp of the key's latest event.
    pub last_seen_ns: u64,
    /// `count` at the last [`SpaceSaving::mark`].
    pub marked: u64,
    /// Events between the last two marks: the latest interval's rate.
    pub last_interval: u64,
    /// The key's hash, for the index.
    hash: u64,
}

/// A counter's place in its bucket's list. Apart from the counters: an
/// eviction relinks two or three slots, and 12 bytes a slot stay in cache
/// where whole counters did not.
#[derive(Clone, Copy, Debug)]
struct Link {
    bucket: u32,
    prev: u32,
    next: u32,
}

#[derive(Clone, Debug)]
struct Bucket {
    count: u64,
    /// First counter in this bucket.
    head: u32,
    prev: u32,
    next: u32,
}

/// Where [`SpaceSaving::add`] counted an event.
#[derive(Debug, PartialEq, Eq)]
pub struct Added<K> {
    pub slot: usize,
    /// The key that slot held until now, when the event's key replaced
    /// it, with the events counted for it there (its count less what it
    /// had inherited): exact, and now in no slot.
    pub replaced: Option<(K, u64)>,
}

pub struct SpaceSaving<K> {
    capacity: usize,
    /// Slots, by their keys' hashes.
    index: HashTable<u32>,
    counters: Vec<Counter<K>>,
    /// Each counter's [`Link`], by slot.
    links: Vec<Link>,
    buckets: Vec<Bucket>,
    free_buckets: Vec<u32>,
    /// Bucket with the smallest count.
    min: u32,
    /// The slot the previous event was counted in (NIL before any).
    last: u32,
    total: u64,
    evictions: u64,
    /// Keys seen once since the epoch began, for [`Self::offer`].
    doorkeeper: Doorkeeper,
    declined: u64,
}

/// One bit per hashed key, the bits 64 times the slots; cleared after a
/// sixteenth of them were set, so that at most one in sixteen keys seen
/// for the first time is let in by another key's bit. Sized on first use:
/// tables that never fill, or are only [`SpaceSaving::add`]ed to, keep none.
#[derive(Default)]
struct Doorkeeper {
    bits: Vec<u64>,
    /// log2 of the bit count.
    order: u32,
    /// Bits set since the last clear.
    set: usize,
}

impl Doorkeeper {
    fn new(capacity: usize) -> Self {
        let order = (capacity * 64).next_power_of_two().trailing_zeros().max(6);
        Doorkeeper { bits: vec![0; 1 << (order - 6)], order, set: 0 }
    }

    /// Records a sighting of the key with `hash`; says whether one was
    /// recorded before (this epoch).
    #[inline]
    fn seen_before(&mut self, hash: u64) -> bool {
        // FxHash mixes into the high bits.
        let bit = (hash >> (64 - self.order)) as usize;
        let (word, mask) = (&mut self.bits[bit / 64], 1u64 << (bit % 64));
        if *word & mask != 0 {
            return true;
        }
        *word |= mask;
        self.set += 1;
        if self.set << 4 >= 1 << self.order {
            self.bits.fill(0);
            self.set = 0;
        }
        false
    }
}

impl<K: Hash + Eq + Clone> SpaceSaving<K> {
    pub fn new(capacity: usize) -> Self {
        assert!(capacity > 0 && capacity < NIL as usize, "capacity out of range");
        SpaceSaving {
            capacity,
            index: HashTable::with_capacity(capacity),
            counters: Vec::with_capacity(capacity),
            links: Vec::with_capacity(capacity),
            buckets: Vec::new(),
            free_buckets: Vec::new(),
            min: NIL,
            last: NIL,
            total: 0,
            evictions: 0,
            doorkeeper: Doorkeeper::default(),
            declined: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Events seen.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Keys replaced so far; zero (with nothing [`Self::declined`]) means
    /// every count is exact.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Events [`Self::offer`] counted in no slot: first sightings of keys
    /// not tracked while every slot was taken.
    pub fn declined(&self) -> u64 {
        self.declined
    }

    /// The largest possible overcount of any tracked key.
    pub fn error_bound(&self) -> u64 {
        if self.evictions == 0 || self.min == NIL {
            0
        } else {
            self.buckets[self.min as usize].count
        }
    }

    pub fn len(&self) -> usize {
        self.counters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.counters.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Counter<K>> {
        self.counters.iter()
    }

    pub fn get(&self, key: &K) -> Option<&Counter<K>> {
        self.find(key, FxBuildHasher.hash_one(key)).map(|slot| &self.counters[slot as usize])
    }

    /// The slot that holds `key`, whose hash is `hash`.
    #[inline]
    fn find(&self, key: &K, hash: u64) -> Option<u32> {
        let counters = &self.counters;
        self.index.find(hash, |&slot| counters[slot as usize].key == *key).copied()
    }

    /// Indexes `slot`, whose key's hash is `hash` (never there already).
    #[inline]
    fn index_slot(&mut self, slot: u32, hash: u64) {
        let counters = &self.counters;
        self.index.insert_unique(hash, slot, |&s| counters[s as usize].hash);
    }

    /// Ends an interval: each counter's events since the previous mark
    /// become its `last_interval`.
    pub fn mark(&mut self) {
        for c in &mut self.counters {
            c.last_interval = c.count - c.marked;
            c.marked = c.count;
        }
    }

    /// Counts one event of `key`; says in which slot, and which key, if
    /// any, that slot held before (callers keeping per-slot data move it).
    pub fn add(&mut self, key: &K, ts_ns: u64) -> Added<K> {
        self.count(key, ts_ns, false).expect("add admits every key")
    }

    /// Counts one event of `key` as [`Self::add`] does, except that with
    /// every slot taken a key not tracked takes one only when seen before
    /// in this filter epoch (see the module's comment). Says whether the
    /// event is in a slot.
    #[inline]
    pub fn offer(&mut self, key: &K, ts_ns: u64) -> bool {
        self.count(key, ts_ns, true).is_some()
    }

    #[inline]
    fn count(&mut self, key: &K, ts_ns: u64, doorkeeper: bool) -> Option<Added<K>> {
        self.total += 1;
        // The same key as the previous event: no hash, no probe. (The slot
        // may hold another key by now; the comparison tells.)
        if let Some(counter) = self.counters.get_mut(self.last as usize) {
            if counter.key == *key {
                counter.last_seen_ns = ts_ns;
                self.increment(self.last);
                return Some(Added { slot: self.last as usize, replaced: None });
            }
        }
        let hash = FxBuildHasher.hash_one(key);
        if let Some(slot) = self.find(key, hash) {
            self.last = slot;
            self.counters[slot as usize].last_seen_ns = ts_ns;
            self.increment(slot);
            return Some(Added { slot: slot as usize, replaced: None });
        }
        if self.counters.len() < self.capacity {
            let slot = self.counters.len() as u32;
            self.counters.push(Counter {
                key: key.clone(),
                count: 0,
                error: 0,
                last_seen_ns: ts_ns,
                marked: 0,
                last_interval: 0,
                hash,
            });
            self.links.push(Link { bucket: NIL, prev: NIL, next: NIL });
            self.index_slot(slot, hash);
            self.insert_new(slot);
            self.last = slot;
            return Some(Added { slot: slot as usize, replaced: None });
        }
        if doorkeeper {
            if self.doorkeeper.bits.is_empty() {
                self.doorkeeper = Doorkeeper::new(self.capacity);
            }
            if !self.doorkeeper.seen_before(hash) {
                self.declined += 1;
                return None;
            }
        }
        // Replace a key with the smallest count.
        let min = self.buckets[self.min as usize].count;
        let slot = self.buckets[self.min as usize].head;
        let counter = &mut self.counters[slot as usize];
        let old = std::mem::replace(&mut counter.key, key.clone());
        let own = min - counter.error;
        let old_hash = std::mem::replace(&mut counter.hash, hash);
        counter.error = min;
        counter.marked = min;
        counter.last_interval = 0;
        counter.last_seen_ns = ts_ns;
        // Found by slot number: the old key is not compared.
        if let Ok(entry) = self.index.find_entry(old_hash, |&s| s == slot) {
            entry.remove();
        }
        self.index_slot(slot, hash);
        self.evictions += 1;
        self.increment(slot);
        self.last = slot;
        Some(Added { slot: slot as usize, replaced: Some((old, own)) })
    }

    /// The counter in `slot` (slots are [`Self::iter`]'s positions).
    pub fn slot(&self, slot: usize) -> &Counter<K> {
        &self.counters[slot]
    }

    /// Places a fresh counter (count 0) into the bucket of count 1.
    fn insert_new(&mut self, slot: u32) {
        let target = if self.min != NIL && self.buckets[self.min as usize].count == 1 {
            self.min
        } else {
            let b = self.new_bucket(1, NIL, self.min);
            if self.min != NIL {
                self.buckets[self.min as usize].prev = b;
            }
            self.min = b;
            b
        };
        self.counters[slot as usize].count = 1;
        self.push_into(target, slot);
    }

    /// Moves a counter from its bucket to the one with count + 1.
    fn increment(&mut self, slot: u32) {
        let link = self.links[slot as usize];
        let from = link.bucket;
        let count = self.buckets[from as usize].count + 1;
        let next = self.buckets[from as usize].next;
        let next_fits = next != NIL && self.buckets[next as usize].count == count;
        if link.prev == NIL && link.next == NIL && !next_fits {
            // Alone in its bucket, and no bucket holds count + 1: the bucket
            // itself moves up, still below the next. The common case of a
            // storm's few sources, whose counts all differ.
            self.buckets[from as usize].count = count;
            self.counters[slot as usize].count = count;
            return;
        }
        let target = if next_fits {
            next
        } else {
            let b = self.new_bucket(count, from, next);
            self.buckets[from as usize].next = b;
            if next != NIL {
                self.buckets[next as usize].prev = b;
            }
            b
        };
        self.unlink(slot);
        self.counters[slot as usize].count = count;
        self.push_into(target, slot);
    }

    fn new_bucket(&mut self, count: u64, prev: u32, next: u32) -> u32 {
        let bucket = Bucket { count, head: NIL, prev, next };
        match self.free_buckets.pop() {
            Some(b) => {
                self.buckets[b as usize] = bucket;
                b
            }
            None => {
                self.buckets.push(bucket);
                (self.buckets.len() - 1) as u32
            }
        }
    }

    fn push_into(&mut self, bucket: u32, slot: u32) {
        let head = self.buckets[bucket as usize].head;
        self.links[slot as usize] = Link { bucket, prev: NIL, next: head };
        if head != NIL {
            self.links[head as usize].prev = slot;
        }
        self.buckets[bucket as usize].head = slot;
    }

    /// Takes a counter out of its bucket, freeing the bucket if it empties.
    fn unlink(&mut self, slot: u32) {
        let Link { bucket, prev, next } = self.links[slot as usize];
        if prev != NIL {
            self.links[prev as usize].next = next;
        } else {
            self.buckets[bucket as usize].head = next;
        }
        if next != NIL {
            self.links[next as usize].prev = prev;
        }
        if self.buckets[bucket as usize].head == NIL {
            let (bprev, bnext) = (self.buckets[bucket as usize].prev, self.buckets[bucket as usize].next);
            if bprev != NIL {
                self.buckets[bprev as usize].next = bnext;
            } else {
                self.min = bnext;
            }
            if bnext != NIL {
                self.buckets[bnext as usize].prev = bprev;
            }
            self.free_buckets.push(bucket);
        }
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        *self = SpaceSaving::new(self.capacity);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// Structural invariants: buckets ascend, each counter sits in the bucket
    /// of its count, counts sum to the total.
    fn check<K: Hash + Eq + Clone + std::fmt::Debug>(s: &SpaceSaving<K>) {
        let mut seen = 0;
        let mut b = s.min;
        let mut last = 0;
        let mut prev = NIL;
        while b != NIL {
            let bucket = &s.buckets[b as usize];
            assert!(bucket.count > last, "buckets must ascend");
            assert_eq!(bucket.prev, prev);
            last = bucket.count;
            let mut c = bucket.head;
            assert_ne!(c, NIL, "empty bucket left in the list");
            while c != NIL {
                let counter = &s.counters[c as usize];
                assert_eq!(s.links[c as usize].bucket, b);
                assert_eq!(counter.count, bucket.count);
                assert_eq!(s.find(&counter.key, counter.hash), Some(c));
                assert_eq!(counter.hash, FxBuildHasher.hash_one(&counter.key));
                seen += 1;
                c = s.links[c as usize].next;
            }
            prev = b;
            b = bucket.next;
        }
        assert_eq!(seen, s.counters.len());
        assert_eq!(s.index.len(), s.counters.len());
        assert_eq!(s.counters.iter().map(|c| c.count).sum::<u64>(), s.total - s.declined);
    }

    #[test]
    fn exact_while_keys_fit() {
        let mut s = SpaceSaving::new(8);
        let stream = [1, 2, 1, 3, 1, 2, 4, 1, 5, 5];
        for (t, k) in stream.iter().enumerate() {
            s.add(k, t as u64);
            check(&s);
        }
        assert_eq!(s.evictions(), 0);
        assert_eq!(s.error_bound(), 0);
        assert_eq!(s.get(&1).unwrap().count, 4);
        assert_eq!(s.get(&2).unwrap().count, 2);
        assert_eq!(s.get(&5).unwrap().count, 2);
        assert_eq!(s.get(&5).unwrap().last_seen_ns, 9);
        assert_eq!(s.total(), 10);
    }

    #[test]
    fn few_keys_at_uneven_rates_stay_exact_and_ordered() {
        // A storm's few sources at rates that shift: counts mostly differ,
        // so keys sit alone in their buckets and move up in place, and now
        // and then two counts meet and share a bucket.
        let mut s = SpaceSaving::new(8);
        let mut truth = [0u64; 8];
        let mut t = 0;
        for round in 0..40 {
            for k in 0..8u64 {
                for _ in 0..=(k + round) % 5 {
                    s.add(&k, t);
                    truth[k as usize] += 1;
                    t += 1;
                    check(&s);
                }
            }
        }
        for (k, n) in truth.iter().enumerate() {
            assert_eq!(s.get(&(k as u64)).unwrap().count, *n);
        }
        assert_eq!(s.evictions(), 0);
    }

    #[test]
    fn bounded_error_when_keys_do_not_fit() {
        // A skewed stream: a few heavy keys among many one-off keys, as in a
        // storm mixed with a spoofed flood.
        let capacity = 32;
        let mut s = SpaceSaving::new(capacity);
        let mut truth: HashMap<u64, u64> = HashMap::new();
        let mut x = 12345u64;
        for t in 0..20_000u64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let key = match (x >> 33) % 10 {
                0..=2 => 1,
                3..=4 => 2,
                5 => 3,
                _ => 1000 + (x >> 20) % 50_000,
            };
            *truth.entry(key).or_default() += 1;
            s.add(&key, t);
            if t % 97 == 0 {
                check(&s);
            }
        }
        check(&s);
        let n = s.total();
        assert!(s.evictions() > 0);
        assert!(s.error_bound() <= n / capacity as u64);
        for c in s.iter() {
            let real = truth[&c.key];
            assert!(c.count >= real && c.count - c.error <= real, "{:?} vs {real}", c.key);
            assert!(c.error <= s.error_bound());
        }
        // Every key above N/capacity is tracked, with its count bracketing the truth.
        for (key, real) in &truth {
            if *real > n / capacity as u64 {
                assert!(s.get(key).is_some(), "heavy key {key} lost");
            }
        }
        assert!(s.len() <= capacity);
    }

    #[test]
    fn runs_of_one_key_count_as_single_events_do() {
        // Runs (the remembered slot) mixed with evictions that hand the
        // remembered slot to another key: the same counts as one event at
        // a time, whatever the order.
        let mut runs = SpaceSaving::new(3);
        let mut singles = SpaceSaving::new(3);
        let stream: Vec<u64> = [(1, 5), (2, 1), (3, 1), (4, 1), (1, 3), (5, 1), (5, 4), (1, 1), (6, 2), (1, 2)]
            .iter()
            .flat_map(|&(k, n)| std::iter::repeat_n(k, n))
            .collect();
        for (t, k) in stream.iter().enumerate() {
            let added = runs.add(k, t as u64);
            assert_eq!(runs.slot(added.slot).key, *k);
            check(&runs);
        }
        // The reference: each event after an unrelated key, so nothing is
        // remembered from one event to the next.
        for (t, k) in stream.iter().enumerate() {
            singles.last = NIL;
            singles.add(k, t as u64);
        }
        let counts = |s: &SpaceSaving<u64>| {
            let mut c: Vec<_> = s.iter().map(|c| (c.key, c.count, c.error, c.last_seen_ns)).collect();
            c.sort();
            c
        };
        assert_eq!(counts(&runs), counts(&singles));
        assert_eq!(runs.evictions(), singles.evictions());
        assert_eq!(runs.get(&1).unwrap().last_seen_ns, stream.len() as u64 - 1);
    }

    #[test]
    fn offer_declines_nothing_while_slots_are_free() {
        let (mut offered, mut added) = (SpaceSaving::new(8), SpaceSaving::new(8));
        for (t, k) in [1, 2, 1, 3, 4, 5, 6, 7, 8, 8, 1].iter().enumerate() {
            assert!(offered.offer(k, t as u64));
            added.add(k, t as u64);
        }
        check(&offered);
        assert_eq!(offered.declined(), 0);
        for c in added.iter() {
            let o = offered.get(&c.key).unwrap();
            assert_eq!((o.count, o.error), (c.count, c.error));
        }
    }

    #[test]
    fn offer_lets_a_new_key_in_on_its_second_sighting() {
        let mut s = SpaceSaving::new(2);
        assert!(s.offer(&1u64, 0) && s.offer(&2, 1) && s.offer(&1, 2));
        // Full: 3's first sighting is counted in the total, not in a slot.
        assert!(!s.offer(&3, 3));
        assert_eq!((s.declined(), s.evictions(), s.total()), (1, 0, 4));
        assert!(s.get(&3).is_none());
        check(&s);
        // Its second replaces the smallest count (2's), inheriting it as error.
        assert!(s.offer(&3, 4));
        let three = s.get(&3).unwrap();
        assert_eq!((three.count, three.error), (2, 1));
        assert!(s.get(&2).is_none());
        assert_eq!(s.evictions(), 1);
        check(&s);
        // Tracked keys count at once.
        assert!(s.offer(&1, 5));
        assert_eq!(s.get(&1).unwrap().count, 3);
    }

    #[test]
    fn offer_keeps_repeating_keys_among_one_off_keys() {
        // A spoofed flood (every other event a key never seen again) mixed
        // with a few sources that repeat: the guarantees hold over the
        // events counted, the repeating keys stay tracked, and the one-off
        // keys mostly cost no eviction.
        let capacity = 64;
        let mut s = SpaceSaving::new(capacity);
        let mut truth: HashMap<u64, u64> = HashMap::new();
        let mut declined: HashMap<u64, u64> = HashMap::new();
        let mut x = 777u64;
        for t in 0..50_000u64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let key = match (x >> 33) % 16 {
                0..=2 => 1 + (x >> 40) % 4,
                3..=7 => 100 + (x >> 40) % 40,
                _ => 1 << 32 | t,
            };
            *truth.entry(key).or_default() += 1;
            if !s.offer(&key, t) {
                *declined.entry(key).or_default() += 1;
            }
            if t % 997 == 0 {
                check(&s);
            }
        }
        check(&s);
        let counted = s.total() - s.declined();
        assert_eq!(s.declined(), declined.values().sum::<u64>());
        assert!(s.error_bound() <= counted / capacity as u64);
        for c in s.iter() {
            let real = truth[&c.key] - declined.get(&c.key).copied().unwrap_or(0);
            assert!(c.count >= real && c.count - c.error <= real, "{:?}: {c:?} vs {real}", c.key);
        }
        for (key, real) in &truth {
            let real = real - declined.get(key).copied().unwrap_or(0);
            if real > counted / capacity as u64 {
                assert!(s.get(key).is_some(), "heavy key {key} lost");
            }
        }
        for key in 1..5 {
            assert!(declined.get(&key).copied().unwrap_or(0) <= 1, "a heavy key declined more than once");
        }
        // One in sixteen one-off keys at most gets in on another's bit.
        let one_off = truth.keys().filter(|k| **k >> 32 == 1).count() as u64;
        assert!(s.evictions() < one_off / 8, "{} evictions for {one_off} one-off keys", s.evictions());
    }

    #[test]
    fn the_doorkeeper_forgets_after_its_epoch() {
        let mut d = Doorkeeper::new(1);
        // 64 bits; cleared once 4 are set.
        assert_eq!((d.order, d.bits.len()), (6, 1));
        let hash = |bit: u64| bit << 58;
        assert!(!d.seen_before(hash(1)));
        assert!(d.seen_before(hash(1)));
        assert!(!d.seen_before(hash(2)) && !d.seen_before(hash(3)));
        // The fourth bit ends the epoch: 1 is new again.
        assert!(!d.seen_before(hash(4)));
        assert!(!d.seen_before(hash(1)));
    }

    #[test]
    fn every_event_a_new_key() {
        let mut s = SpaceSaving::new(4);
        for k in 0..1000u64 {
            s.add(&k, k);
        }
        check(&s);
        assert_eq!(s.len(), 4);
        assert_eq!(s.total(), 1000);
        assert_eq!(s.evictions(), 996);
    }

    #[test]
    fn marks_give_rates_and_clear_forgets() {
        let mut s = SpaceSaving::new(4);
        s.add(&"a", 1);
        s.mark();
        s.add(&"a", 2);
        s.add(&"a", 3);
        s.mark();
        let a = s.get(&"a").unwrap();
        assert_eq!(a.last_interval, 2);
        s.clear();
        assert!(s.is_empty());
        assert_eq!(s.total(), 0);
    }
}
