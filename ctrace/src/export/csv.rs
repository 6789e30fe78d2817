//! CSV: one row per source key, its total, and its drops per second.
use std::fmt::Write as _;

use crate::export::json::RecordFile;

/// Quotes a field as RFC 4180 asks: fields with a comma, quote or line
/// break are enclosed in quotes, and quotes inside are doubled.
pub fn field(text: &str) -> String {
    if text.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

/// Header, then a row per source; lines end in CRLF (RFC 4180). Per-second
/// columns are named by their offset from the start: `s0`, `s1`, ...
pub fn render(record: &RecordFile) -> String {
    let buckets = record.sources.iter().map(|s| s.histogram.counts.len()).max().unwrap_or(0);
    let mut out = String::new();
    let mut header: Vec<String> =
        ["netns", "netns_name", "workload", "src", "src_workload", "dport", "proto", "state", "reason", "drops"]
            .map(String::from)
            .to_vec();
    header.extend((0..buckets).map(|i| format!("s{i}")));
    out.push_str(&header.join(","));
    out.push_str("\r\n");
    let names = |netns: u32| {
        record.kernel_counters.iter().find(|c| c.netns == netns).and_then(|c| c.name.clone()).unwrap_or_default()
    };
    for s in &record.sources {
        let mut row = vec![
            s.netns.to_string(),
            field(&names(s.netns)),
            field(&record.workload_of(s.netns).map(|w| w.label()).unwrap_or_default()),
            field(&s.src.to_string()),
            field(&s.src_workload.as_ref().map(|w| w.label()).unwrap_or_default()),
            s.dport.to_string(),
            field(&s.proto.to_string()),
            field(&s.state.to_string()),
            field(s.reason.as_str()),
            s.drops.to_string(),
        ];
        row.extend((0..buckets).map(|i| s.histogram.counts.get(i).copied().unwrap_or(0).to_string()));
        let _ = write!(out, "{}\r\n", row.join(","));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(field("plain"), "plain");
        assert_eq!(field("a,b"), "\"a,b\"");
        assert_eq!(field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(field("two\nlines"), "\"two\nlines\"");
        assert_eq!(field("2001:db8::1"), "2001:db8::1");
    }

    #[test]
    fn rows_have_the_header_width() {
        let csv = render(&crate::export::tests::fixture());
        let widths: Vec<usize> = csv.split("\r\n").filter(|l| !l.is_empty()).map(|l| l.split(',').count()).collect();
        assert!(widths.len() > 1);
        assert!(widths.iter().all(|w| *w == widths[0]), "{widths:?}");
    }
}
