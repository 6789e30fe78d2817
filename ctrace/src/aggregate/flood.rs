//! Flood-aware summaries, for when the sources are too many to list: how
//! many distinct sources there are, which destinations the drops go to, and
//! which source prefixes stand out, all in fixed memory.
//!
//! The commonest conntrack incident is a random-source SYN flood: millions
//! of spoofed addresses, one or two packets each. A per-source table then
//! holds noise; these summaries say what the engineer needs instead: "a
//! random-source flood to 198.18.0.1:8080, about 3.5 M distinct sources".
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use serde::{Deserialize, Serialize};

use super::heavy::SpaceSaving;
use crate::model::Protocol;

/// Register-index bits of the distinct counter: 4,096 one-byte registers.
const HLL_BITS: u32 = 12;
const HLL_REGISTERS: usize = 1 << HLL_BITS;

/// Distinct elements, estimated with HyperLogLog (Flajolet, Fusy, Gandouet
/// and Meunier, 2007) in 4 KiB, with linear counting for small sets.
#[derive(Clone)]
pub struct Distinct {
    registers: Box<[u8; HLL_REGISTERS]>,
}

impl Default for Distinct {
    fn default() -> Self {
        Distinct { registers: Box::new([0; HLL_REGISTERS]) }
    }
}

impl Distinct {
    /// The estimate's standard error, relative: 1.04 / sqrt(registers).
    pub const RELATIVE_ERROR: f64 = 1.04 / 64.0;

    #[inline]
    pub fn add(&mut self, addr: &IpAddr) {
        self.add_hash(hash_addr(addr));
    }

    /// Adds an element by its [`hash_addr`] (one hash for several counters).
    #[inline]
    fn add_hash(&mut self, hash: u64) {
        let register = (hash >> (64 - HLL_BITS)) as usize;
        // The rank of the first 1 bit after the index bits; the low guard
        // bit caps it at 64 - HLL_BITS + 1.
        let rest = (hash << HLL_BITS) | (1 << (HLL_BITS - 1));
        let rank = rest.leading_zeros() as u8 + 1;
        let slot = &mut self.registers[register];
        *slot = (*slot).max(rank);
    }

    pub fn estimate(&self) -> u64 {
        let m = HLL_REGISTERS as f64;
        let alpha = 0.7213 / (1.0 + 1.079 / m);
        let mut sum = 0.0;
        let mut zeros = 0usize;
        for &r in self.registers.iter() {
            sum += f64::powi(2.0, -i32::from(r));
            zeros += usize::from(r == 0);
        }
        let raw = alpha * m * m / sum;
        // Below 2.5 m the raw estimate is biased; empty registers count better.
        let estimate = if raw <= 2.5 * m && zeros > 0 { m * (m / zeros as f64).ln() } else { raw };
        estimate.round() as u64
    }

    pub fn clear(&mut self) {
        self.registers.fill(0);
    }
}

/// A 64-bit mix of an address (the splitmix64 finaliser), so that the
/// register index and rank bits are uniform even for sequential addresses.
fn hash_addr(addr: &IpAddr) -> u64 {
    fn mix(mut x: u64) -> u64 {
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }
    match addr {
        IpAddr::V4(a) => mix(u64::from(u32::from(*a)) | 4 << 32),
        IpAddr::V6(a) => {
            let bits = u128::from(*a);
            mix((bits >> 64) as u64 ^ mix(bits as u64))
        }
    }
}

/// Where dropped packets were going.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Destination {
    pub netns: u32,
    pub dst: IpAddr,
    pub dport: u16,
    pub proto: Protocol,
}

impl Destination {
    /// Where a drop counted under `key` was going.
    pub fn of(key: &super::SourceKey, dst: IpAddr) -> Self {
        Destination { netns: key.netns, dst, dport: key.dport, proto: key.proto }
    }
}

/// A source prefix: the address with all but `len` bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl Prefix {
    pub fn of(addr: IpAddr, len: u8) -> Prefix {
        let addr = match addr {
            IpAddr::V4(a) => {
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)))
            }
            IpAddr::V6(a) => {
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)))
            }
        };
        Prefix { addr, len }
    }

    /// Whether `other` lies inside this prefix.
    pub fn contains(&self, other: &Prefix) -> bool {
        other.len >= self.len && Prefix::of(other.addr, self.len) == *self
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Source prefixes counted at three levels, most specific first: IPv4
/// /24, /16, /8 and IPv6 /64, /48, /32. IPv4 /8 is counted exactly in an
/// array; the other levels in Space-Saving tables, keyed by the masked
/// bits. (An exact /16 array, 512 KiB, took a cache miss on every drop of
/// a random-source flood: a fifth of ctrace's time there. A table of 256
/// tracks every /16 above 0.4 % of the drops, well below what is shown.)
struct PrefixCounts {
    v4_8: Vec<u64>,
    v4_16: SpaceSaving<u32>,
    v4_24: SpaceSaving<u32>,
    v6: [SpaceSaving<u128>; LEVELS],
}

const LEVELS: usize = 3;
const V6_LENS: [u8; LEVELS] = [64, 48, 32];

impl Default for PrefixCounts {
    fn default() -> Self {
        PrefixCounts {
            v4_8: vec![0; 1 << 8],
            v4_16: SpaceSaving::new(PREFIXES),
            v4_24: SpaceSaving::new(PREFIXES),
            v6: std::array::from_fn(|_| SpaceSaving::new(PREFIXES)),
        }
    }
}

impl PrefixCounts {
    #[inline]
    fn add(&mut self, src: IpAddr, ts_ns: u64) {
        match src {
            IpAddr::V4(a) => {
                let bits = u32::from(a);
                self.v4_8[(bits >> 24) as usize] += 1;
                self.v4_16.offer(&(bits & 0xffff_0000), ts_ns);
                self.v4_24.offer(&(bits & 0xffff_ff00), ts_ns);
            }
            IpAddr::V6(a) => {
                let bits = u128::from(a);
                for (table, len) in self.v6.iter_mut().zip(V6_LENS) {
                    table.offer(&(bits & (u128::MAX << (128 - len))), ts_ns);
                }
            }
        }
    }

    /// Every counted prefix of a level with its drops (a lower bound).
    fn level(&self, level: usize) -> Vec<(Prefix, u64)> {
        fn exact(counts: &[u64], len: u8) -> impl Iterator<Item = (Prefix, u64)> + '_ {
            let shift = 32 - u32::from(len);
            counts
                .iter()
                .enumerate()
                .filter(|(_, n)| **n > 0)
                .map(move |(i, n)| (Prefix { addr: IpAddr::V4(Ipv4Addr::from((i as u32) << shift)), len }, *n))
        }
        fn tracked(table: &SpaceSaving<u32>, len: u8) -> impl Iterator<Item = (Prefix, u64)> + '_ {
            table.iter().map(move |c| (Prefix { addr: IpAddr::V4(Ipv4Addr::from(c.key)), len }, c.count - c.error))
        }
        let mut rows: Vec<(Prefix, u64)> = match level {
            0 => tracked(&self.v4_24, 24).collect(),
            1 => tracked(&self.v4_16, 16).collect(),
            _ => exact(&self.v4_8, 8).collect(),
        };
        rows.extend(
            self.v6[level]
                .iter()
                .map(|c| (Prefix { addr: IpAddr::V6(Ipv6Addr::from(c.key)), len: V6_LENS[level] }, c.count - c.error)),
        );
        rows
    }
}

/// Destinations tracked (Space-Saving), each with its own distinct counter.
pub const DESTINATIONS: usize = 32;
/// Prefixes tracked by each Space-Saving level (IPv4 /24, the IPv6 levels).
const PREFIXES: usize = 256;
/// A prefix is shown once the drops it alone explains reach this share.
pub const PREFIX_SHARE: f64 = 0.05;
/// Fewer drops than this to a destination are never called a flood.
pub const FLOOD_MIN_DROPS: u64 = 1000;
/// Distinct sources per drop from which a destination is called a
/// random-source flood: with D sources over N drops, at least 2D - N
/// sources were seen once, so at 0.75 at least half the drops came from
/// sources seen only once.
pub const FLOOD_DISTINCT_RATIO: f64 = 0.75;

/// Distinct sources, destinations and source prefixes of a stream of drops.
pub struct FloodStats {
    sources: Distinct,
    destinations: SpaceSaving<Destination>,
    /// Distinct sources per destination slot, since its destination took it.
    sources_by_slot: Vec<Distinct>,
    prefixes: PrefixCounts,
}

impl Default for FloodStats {
    fn default() -> Self {
        FloodStats {
            sources: Distinct::default(),
            destinations: SpaceSaving::new(DESTINATIONS),
            sources_by_slot: Vec::new(),
            prefixes: PrefixCounts::default(),
        }
    }
}

impl FloodStats {
    /// Counts one drop. On the per-event path.
    #[inline]
    pub fn add(&mut self, src: IpAddr, destination: Destination, ts_ns: u64) {
        let hash = hash_addr(&src);
        self.sources.add_hash(hash);
        let added = self.destinations.add(&destination, ts_ns);
        if added.slot == self.sources_by_slot.len() {
            self.sources_by_slot.push(Distinct::default());
        } else if added.replaced.is_some() {
            self.sources_by_slot[added.slot].clear();
        }
        self.sources_by_slot[added.slot].add_hash(hash);
        self.prefixes.add(src, ts_ns);
    }

    pub fn clear(&mut self) {
        *self = FloodStats::default();
    }

    /// The `top` heaviest destinations and the prefixes that stand out.
    pub fn summary(&self, top: usize) -> FloodSummary {
        let drops = self.destinations.total();
        let mut destinations: Vec<DestinationRow> = (0..self.destinations.len())
            .map(|slot| {
                let c = self.destinations.slot(slot);
                let distinct_sources = self.sources_by_slot[slot].estimate();
                let lower = c.count - c.error;
                DestinationRow {
                    netns: c.key.netns,
                    dst: c.key.dst,
                    dport: c.key.dport,
                    proto: c.key.proto,
                    drops: c.count,
                    error: c.error,
                    distinct_sources,
                    random_sources: lower >= FLOOD_MIN_DROPS
                        && distinct_sources as f64 >= FLOOD_DISTINCT_RATIO * lower as f64,
                }
            })
            .collect();
        destinations.sort_by(|a, b| b.drops.cmp(&a.drops).then(a.key().cmp(&b.key())));
        destinations.truncate(top);
        let verdict = destinations.iter().find(|d| d.random_sources).map(|d| {
            format!(
                "random-source flood to {}: {} drops from about {} distinct sources (±{:.0}%)",
                d.endpoint(),
                d.drops,
                d.distinct_sources,
                200.0 * Distinct::RELATIVE_ERROR
            )
        });
        FloodSummary {
            drops,
            distinct_sources: self.sources.estimate(),
            relative_error: Distinct::RELATIVE_ERROR,
            destinations,
            prefixes: self.heavy_prefixes(drops),
            verdict,
        }
    }

    /// Hierarchical heavy hitters: from the most specific level up, a
    /// prefix is shown when the drops it explains beyond the prefixes
    /// already shown inside it reach [`PREFIX_SHARE`]. Counts are lower
    /// bounds (count less inherited error), so no prefix is shown on error.
    fn heavy_prefixes(&self, drops: u64) -> Vec<PrefixRow> {
        let threshold = (PREFIX_SHARE * drops as f64).ceil().max(1.0) as u64;
        let mut shown: Vec<(Prefix, u64)> = Vec::new();
        for level in 0..LEVELS {
            let mut level: Vec<(Prefix, u64)> = self
                .prefixes
                .level(level)
                .into_iter()
                .filter(|(prefix, lower)| {
                    let inside: u64 = shown.iter().filter(|(p, _)| prefix.contains(p)).map(|(_, n)| n).sum();
                    lower.saturating_sub(inside) >= threshold
                })
                .collect();
            level.sort();
            shown.extend(level);
        }
        let mut rows: Vec<PrefixRow> = shown
            .into_iter()
            .map(|(prefix, n)| PrefixRow {
                prefix: prefix.to_string(),
                drops: n,
                share: if drops == 0 { 0.0 } else { n as f64 / drops as f64 },
            })
            .collect();
        rows.sort_by(|a, b| b.drops.cmp(&a.drops).then(a.prefix.cmp(&b.prefix)));
        rows
    }
}

/// What the flood summaries say, as views, records and metrics show it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FloodSummary {
    /// Drops summarised.
    pub drops: u64,
    /// Distinct source addresses, estimated.
    pub distinct_sources: u64,
    /// The estimates' standard error, relative (0.016: 1.6%).
    pub relative_error: f64,
    /// The heaviest destinations, heaviest first.
    pub destinations: Vec<DestinationRow>,
    /// Source prefixes that explain at least 5% of the drops each.
    pub prefixes: Vec<PrefixRow>,
    /// One sentence when a destination is under a random-source flood
    /// (most of its drops from sources seen once, two standard errors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DestinationRow {
    pub netns: u32,
    pub dst: IpAddr,
    pub dport: u16,
    pub proto: Protocol,
    /// Drops to this destination; over by at most `error`.
    pub drops: u64,
    pub error: u64,
    /// Distinct sources among those drops, estimated.
    pub distinct_sources: u64,
    /// Most drops came from sources seen once: a random-source flood.
    pub random_sources: bool,
}

impl DestinationRow {
    fn key(&self) -> (u32, IpAddr, u16, Protocol) {
        (self.netns, self.dst, self.dport, self.proto)
    }

    /// `198.18.0.1:8080/tcp`, `[2001:db8::1]:53/udp`.
    pub fn endpoint(&self) -> String {
        match self.dst {
            IpAddr::V4(a) => format!("{a}:{}/{}", self.dport, self.proto),
            IpAddr::V6(a) => format!("[{a}]:{}/{}", self.dport, self.proto),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrefixRow {
    pub prefix: String,
    /// Drops from inside the prefix (a lower bound).
    pub drops: u64,
    pub share: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(n))
    }

    #[test]
    fn distinct_counts_are_exact_when_small_and_within_the_error_when_large() {
        let mut d = Distinct::default();
        assert_eq!(d.estimate(), 0);
        for _ in 0..3 {
            for i in 0..100 {
                d.add(&v4(0xc612_0000 + i));
            }
        }
        assert!((99..=101).contains(&d.estimate()), "{}", d.estimate());
        for n in [10_000u32, 1_000_000] {
            let mut d = Distinct::default();
            for i in 0..n {
                d.add(&v4(0x0a00_0000 + i));
            }
            let error = (d.estimate() as f64 - f64::from(n)).abs() / f64::from(n);
            assert!(error < 4.0 * Distinct::RELATIVE_ERROR, "{n}: estimate {} ({error})", d.estimate());
        }
        let mut six = Distinct::default();
        for i in 0..50_000u128 {
            six.add(&IpAddr::V6(Ipv6Addr::from(0x2001_0db8u128 << 96 | i << 64)));
        }
        let error = (six.estimate() as f64 - 50_000.0).abs() / 50_000.0;
        assert!(error < 4.0 * Distinct::RELATIVE_ERROR, "v6 estimate {}", six.estimate());
    }

    #[test]
    fn prefixes_mask_and_contain() {
        let p = Prefix::of("198.18.7.9".parse().unwrap(), 16);
        assert_eq!(p.to_string(), "198.18.0.0/16");
        assert!(p.contains(&Prefix::of("198.18.200.1".parse().unwrap(), 24)));
        assert!(!p.contains(&Prefix::of("198.19.0.1".parse().unwrap(), 24)));
        assert!(!p.contains(&Prefix::of("198.18.0.1".parse().unwrap(), 8)), "a shorter prefix is not inside");
        assert_eq!(Prefix::of("2001:db8:1:2:3::1".parse().unwrap(), 48).to_string(), "2001:db8:1::/48");
        assert_eq!(Prefix::of("1.2.3.4".parse().unwrap(), 0).to_string(), "0.0.0.0/0");
    }

    const WEB: Destination =
        Destination { netns: 1, dst: IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)), dport: 8080, proto: Protocol::Tcp };
    const DNS: Destination =
        Destination { netns: 1, dst: IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)), dport: 53, proto: Protocol::Udp };

    /// A stand-in for a random source: scattered over the whole space.
    fn scattered(i: u32) -> IpAddr {
        v4(i.wrapping_mul(2_654_435_761))
    }

    #[test]
    fn a_random_source_flood_is_named_with_its_destination_and_no_prefix() {
        let mut f = FloodStats::default();
        for i in 0..50_000 {
            f.add(scattered(i), WEB, u64::from(i));
        }
        // A few clients that retry, to another service.
        for i in 0..3000 {
            f.add(v4(0xc612_0100 + i % 3), DNS, 0);
        }
        let s = f.summary(5);
        assert_eq!(s.drops, 53_000);
        assert_eq!((s.destinations[0].dport, s.destinations[0].drops), (8080, 50_000));
        assert!(s.destinations[0].random_sources);
        assert_eq!(s.destinations[1].distinct_sources, 3);
        assert!(!s.destinations[1].random_sources, "three sources retrying are not a random flood");
        let verdict = s.verdict.clone().expect("verdict");
        assert!(verdict.starts_with("random-source flood to 198.18.0.1:8080/tcp: 50000 drops"), "{verdict}");
        // The three DNS clients share a /24 with 5.7% of the drops; the flood's
        // sources share no prefix.
        let prefixes: Vec<&str> = s.prefixes.iter().map(|p| p.prefix.as_str()).collect();
        assert_eq!(prefixes, ["198.18.1.0/24"]);
        assert!((s.distinct_sources as f64 - 50_003.0).abs() < 50_003.0 * 4.0 * Distinct::RELATIVE_ERROR);
    }

    #[test]
    fn prefixes_roll_up_only_what_their_children_do_not_explain() {
        let mut f = FloodStats::default();
        // 60% from one /24, 30% spread over 198.18.0.0/16 outside it, 10% scattered.
        for i in 0..6000 {
            f.add(v4(0xc612_0500 + i % 200), WEB, 0);
        }
        for i in 0..3000 {
            f.add(v4(0xc612_0000 | (i % 240 + 10) << 8 | 7), WEB, 0);
        }
        for i in 0..1000 {
            f.add(scattered(i), WEB, 0);
        }
        let s = f.summary(5);
        let rows: Vec<(&str, u64)> = s.prefixes.iter().map(|p| (p.prefix.as_str(), p.drops)).collect();
        // The /16 counts its /24 too (9000) but is shown for the 3000 only it explains.
        assert_eq!(rows, [("198.18.0.0/16", 9000), ("198.18.5.0/24", 6000)]);
        assert!(!s.destinations[0].random_sources, "9,000 of 10,000 drops from repeat sources");
        assert_eq!(s.verdict, None);
    }

    #[test]
    fn a_heavy_16_stands_out_of_a_random_flood() {
        let mut f = FloodStats::default();
        // One drop in ten from 198.18.0.0/16, spread over its /24s; the
        // rest scattered: far more /16s than the table tracks.
        let mut inside = 0;
        for i in 0..50_000u32 {
            let src = if i % 10 == 0 { v4(0xc612_0000 | (i / 10 % 250) << 8 | 1) } else { scattered(i) };
            inside += u64::from(Prefix::of(src, 16) == Prefix::of(v4(0xc612_0000), 16));
            f.add(src, WEB, 0);
        }
        let s = f.summary(1);
        let rows: Vec<(&str, u64)> = s.prefixes.iter().map(|p| (p.prefix.as_str(), p.drops)).collect();
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0].0, "198.18.0.0/16");
        // A lower bound, short by at most what the slot inherited.
        assert!(rows[0].1 <= inside && rows[0].1 + 50_000 / PREFIXES as u64 >= inside, "{rows:?}");
    }

    #[test]
    fn ipv6_sources_roll_up_to_their_48() {
        let mut f = FloodStats::default();
        let dst = Destination { dst: "2001:db8::1".parse().unwrap(), ..WEB };
        // 100 /64s of one /48, one address each, sixty times over.
        for i in 0..6000u128 {
            let src = 0x2001_0db8_0007u128 << 80 | (i % 100) << 64 | 1;
            f.add(IpAddr::V6(Ipv6Addr::from(src)), dst, 0);
        }
        let s = f.summary(1);
        let rows: Vec<(&str, u64)> = s.prefixes.iter().map(|p| (p.prefix.as_str(), p.drops)).collect();
        assert_eq!(rows, [("2001:db8:7::/48", 6000)]);
        assert_eq!(s.destinations[0].endpoint(), "[2001:db8::1]:8080/tcp");
        assert!((98..=102).contains(&s.distinct_sources), "{}", s.distinct_sources);
    }

    #[test]
    fn few_drops_are_never_a_flood() {
        let mut f = FloodStats::default();
        for i in 0..(FLOOD_MIN_DROPS as u32 - 1) {
            f.add(scattered(i), WEB, 0);
        }
        assert_eq!(f.summary(1).verdict, None);
    }
}
