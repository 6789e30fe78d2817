//! What the top table shows: a filter and an order, typed by the user.
use std::net::IpAddr;

use crate::{
    aggregate::SourceKey,
    model::Reason,
    workload::{Kind, Workload},
};

/// Column the top table is ordered by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SortBy {
    #[default]
    Rate,
    Total,
    LastSeen,
    Source,
    Port,
    Reason,
    Netns,
}

impl SortBy {
    const ORDER: [SortBy; 7] =
        [SortBy::Rate, SortBy::Total, SortBy::LastSeen, SortBy::Source, SortBy::Port, SortBy::Reason, SortBy::Netns];

    /// The next column (the `s` key).
    pub fn next(self) -> Self {
        let i = Self::ORDER.iter().position(|s| *s == self).unwrap_or(0);
        Self::ORDER[(i + 1) % Self::ORDER.len()]
    }

    pub fn label(self) -> &'static str {
        match self {
            SortBy::Rate => "drops/s",
            SortBy::Total => "total",
            SortBy::LastSeen => "last seen",
            SortBy::Source => "source",
            SortBy::Port => "port",
            SortBy::Reason => "reason",
            SortBy::Netns => "netns",
        }
    }

    /// Numbers read best largest first, names in alphabetical order.
    pub fn natural_descending(self) -> bool {
        matches!(self, SortBy::Rate | SortBy::Total | SortBy::LastSeen)
    }
}

/// Which rows to show. Every given part must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// Source prefix: address and prefix length.
    pub src: Option<(IpAddr, u8)>,
    pub port: Option<u16>,
    pub reason: Option<Reason>,
    /// Namespace inode or name.
    pub netns: Option<String>,
    /// `pod=NAME|NS/NAME|UID` or `container=NAME|ID`: the source's or the
    /// namespace's workload.
    pub workload: Option<(Kind, String)>,
    text: String,
}

impl Filter {
    /// Parses words separated by spaces, in any order:
    /// `198.18.0.0/16` or `2001:db8::1` (source), `:80` or `port=80`,
    /// a reason ([`Reason::ALL`]), `ns=NAME|INODE`, `pod=NAME`, `container=NAME`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut filter = Filter { text: text.trim().to_string(), ..Default::default() };
        for word in text.split_whitespace() {
            if let Some(port) = word.strip_prefix(':').or_else(|| word.strip_prefix("port=")) {
                filter.port = Some(port.parse().map_err(|_| format!("`{word}`: not a port"))?);
            } else if let Some(ns) = word.strip_prefix("ns=").or_else(|| word.strip_prefix("netns=")) {
                filter.netns = Some(ns.to_string());
            } else if let Some(pod) = word.strip_prefix("pod=") {
                filter.workload = Some((Kind::Pod, pod.to_string()));
            } else if let Some(container) = word.strip_prefix("container=") {
                filter.workload = Some((Kind::Container, container.to_string()));
            } else if let Some(reason) = Reason::ALL.into_iter().find(|r| r.as_str() == word) {
                filter.reason = Some(reason);
            } else {
                filter.src = Some(parse_prefix(word)?);
            }
        }
        Ok(filter)
    }

    pub fn is_empty(&self) -> bool {
        self.src.is_none()
            && self.port.is_none()
            && self.reason.is_none()
            && self.netns.is_none()
            && self.workload.is_none()
    }

    /// The text it was parsed from.
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn matches(&self, key: &SourceKey, netns_name: Option<&str>) -> bool {
        self.src.is_none_or(|(net, len)| in_prefix(key.src, net, len))
            && self.port.is_none_or(|p| key.dport == p)
            && self.reason.is_none_or(|r| key.reason == r)
            && self.netns.as_deref().is_none_or(|ns| ns == key.netns.to_string() || Some(ns) == netns_name)
    }

    /// The workload part: `lookup` gives the namespace's and the source's
    /// workloads, asked for only when the filter has one.
    pub fn matches_workload(&self, lookup: impl FnOnce() -> (Option<Workload>, Option<Workload>)) -> bool {
        let Some((kind, wanted)) = &self.workload else { return true };
        let (netns, src) = lookup();
        [netns, src].iter().flatten().any(|w| w.matches(*kind, wanted))
    }
}

fn parse_prefix(word: &str) -> Result<(IpAddr, u8), String> {
    let (addr, len) = match word.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (word, None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| {
        let reasons: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        format!(
            "`{word}`: expected an address or prefix, :PORT, ns=NAME, pod=NAME, container=NAME, or a reason ({})",
            reasons.join(", ")
        )
    })?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = match len {
        Some(l) => l.parse::<u8>().ok().filter(|l| *l <= max).ok_or_else(|| format!("`{word}`: bad prefix length"))?,
        None => max,
    };
    Ok((addr, len))
}

/// Is `addr` inside `net/len`? Families never match each other.
pub fn in_prefix(addr: IpAddr, net: IpAddr, len: u8) -> bool {
    match (addr, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if len == 0 { 0 } else { u128::MAX << (128 - len) };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// Filter, order and size of the top table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    pub filter: Filter,
    pub sort: SortBy,
    pub descending: bool,
    pub limit: usize,
}

impl Default for Query {
    fn default() -> Self {
        Query { filter: Filter::default(), sort: SortBy::Rate, descending: true, limit: 20 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ConnState, Protocol};

    fn key(src: &str, dport: u16, reason: Reason) -> SourceKey {
        SourceKey {
            netns: 42,
            src: src.parse().unwrap(),
            dport,
            proto: Protocol::Tcp,
            state: ConnState::SynSent,
            reason,
        }
    }

    #[test]
    fn prefixes() {
        let a = "198.18.0.3".parse().unwrap();
        assert!(in_prefix(a, "198.18.0.0".parse().unwrap(), 16));
        assert!(in_prefix(a, "198.18.0.3".parse().unwrap(), 32));
        assert!(!in_prefix(a, "198.19.0.0".parse().unwrap(), 16));
        assert!(in_prefix(a, "0.0.0.0".parse().unwrap(), 0));
        assert!(!in_prefix(a, "::".parse().unwrap(), 0));
        let v6 = "2001:db8::5".parse().unwrap();
        assert!(in_prefix(v6, "2001:db8::".parse().unwrap(), 32));
    }

    #[test]
    fn parses_filters() {
        let f = Filter::parse("198.18.0.0/16 :8080 table_full ns=srv").unwrap();
        assert_eq!(f.port, Some(8080));
        assert_eq!(f.reason, Some(Reason::TableFull));
        assert_eq!(f.netns.as_deref(), Some("srv"));
        assert!(f.matches(&key("198.18.0.3", 8080, Reason::TableFull), Some("srv")));
        assert!(!f.matches(&key("198.18.0.3", 8080, Reason::TableFull), Some("other")));
        assert!(!f.matches(&key("198.18.0.3", 80, Reason::TableFull), Some("srv")));
        assert!(!f.matches(&key("10.0.0.1", 8080, Reason::TableFull), Some("srv")));
        assert!(Filter::parse("port=22").unwrap().matches(&key("10.0.0.1", 22, Reason::Ruleset), None));
        assert!(Filter::parse("ns=42").unwrap().matches(&key("10.0.0.1", 22, Reason::Ruleset), None));
        assert!(Filter::parse("").unwrap().is_empty());
    }

    #[test]
    fn workload_filters_match_the_source_or_the_namespace() {
        let container = |name: &str| Workload {
            kind: Kind::Container,
            runtime: None,
            id: Some(format!("{name}-0123456789")),
            name: Some(name.into()),
            pod_namespace: None,
        };
        let f = Filter::parse("container=cli-a").unwrap();
        assert_eq!(f.workload, Some((Kind::Container, "cli-a".into())));
        assert!(!f.is_empty());
        assert!(f.matches_workload(|| (Some(container("srv")), Some(container("cli-a")))), "the source's");
        assert!(f.matches_workload(|| (Some(container("cli-a")), None)), "the namespace's");
        assert!(!f.matches_workload(|| (Some(container("srv")), None)));
        let pod = Filter::parse("pod=shop/web").unwrap();
        assert!(!pod.matches_workload(|| (Some(container("web")), None)), "a container is not a pod");
        assert!(Filter::parse(":80").unwrap().matches_workload(|| unreachable!("no lookup without a workload filter")));
    }

    #[test]
    fn rejects_nonsense_with_a_hint() {
        assert!(Filter::parse(":http").unwrap_err().contains("not a port"));
        assert!(Filter::parse("10.0.0.0/33").unwrap_err().contains("prefix length"));
        assert!(Filter::parse("banana").unwrap_err().contains("expected an address"));
    }

    #[test]
    fn sort_cycles_through_every_column() {
        let mut s = SortBy::Rate;
        for _ in 0..SortBy::ORDER.len() {
            s = s.next();
        }
        assert_eq!(s, SortBy::Rate);
        assert_eq!(SortBy::Rate.next(), SortBy::Total);
    }
}
