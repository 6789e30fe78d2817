//! The bench's figures under fixed keys, for `cargo xtask bench --json
//! FILE`: every key is always written, with null and the reason where this
//! run could not measure it, so runs on different machines compare key by
//! key.
use std::collections::BTreeMap;

/// Every key a bench writes (the file lists them sorted by name).
pub const KEYS: &[&str] = &[
    "storm.ctrace.kernel_ns_per_drop",
    "storm.bpftrace.kernel_ns_per_drop",
    "storm.ctrace.cpu_share",
    "storm.bpftrace.cpu_share",
    "storm.ctrace.drops_per_s",
    "storm.bpftrace.drops_per_s",
    "storm.off.machine_ns_per_drop",
    "storm.ctrace.machine_ns_per_drop",
    "storm.bpftrace.machine_ns_per_drop",
    "storm.ctrace.sampled_ns_per_drop",
    "storm.bpftrace.sampled_ns_per_drop",
    "storm.ctrace.sampled_cpu_share",
    "storm.bpftrace.sampled_cpu_share",
    "flood.drops_per_s",
    "flood.ctrace.lost_events",
    "flood.ctrace.cpu_share",
    "flood.bpftrace.cpu_share",
    "flood.off.machine_ns_per_drop",
    "flood.ctrace.machine_ns_per_drop",
    "flood.bpftrace.machine_ns_per_drop",
    "flood.ctrace.sampled_ns_per_drop",
    "flood.bpftrace.sampled_ns_per_drop",
    "flood.ctrace.sampled_cpu_share",
    "flood.bpftrace.sampled_cpu_share",
    "rss.attached_peak_kib",
    "rss.attached_steady_kib",
    "idle.ctrace.cpu_share",
    "idle.serve.cpu_share",
    "idle.bpftrace.cpu_share",
    "synthetic.events_per_s",
    "connections.off.per_s",
    "connections.kprobe.per_s",
    "connections.kprobe_invalid.per_s",
    "connections.off_builtin.per_s",
    "connections.fentry.per_s",
    "connections.fentry_invalid.per_s",
    "connections.kprobe.program_ns_per_conn",
    "connections.fentry.program_ns_per_conn",
];

#[derive(Default)]
pub struct Figures {
    values: BTreeMap<&'static str, f64>,
    not_measured: BTreeMap<&'static str, String>,
}

impl Figures {
    pub fn set(&mut self, key: &'static str, value: f64) {
        debug_assert!(KEYS.contains(&key), "{key} is not a bench key");
        self.values.insert(key, value);
    }

    /// Says why `key` has no value in this run.
    pub fn skip(&mut self, key: &'static str, why: impl Into<String>) {
        debug_assert!(KEYS.contains(&key), "{key} is not a bench key");
        self.not_measured.insert(key, why.into());
    }

    /// The JSON document: every key, a number or null, and the reasons.
    pub fn to_json(&self, machine: &str) -> serde_json::Value {
        let figures: serde_json::Map<String, serde_json::Value> =
            KEYS.iter().map(|&key| (key.to_string(), self.values.get(key).copied().into())).collect();
        let not_measured: serde_json::Map<String, serde_json::Value> = KEYS
            .iter()
            .filter(|key| !self.values.contains_key(*key))
            .map(|&key| {
                let why = self.not_measured.get(key).map_or("not part of this run", String::as_str);
                (key.to_string(), why.into())
            })
            .collect();
        serde_json::json!({ "machine": machine, "figures": figures, "not_measured": not_measured })
    }
}

/// The README's table of a `--json` file: one row per key, in [`KEYS`]
/// order, the value in the unit it reads best in, or why it is missing.
pub fn markdown(json: &serde_json::Value) -> String {
    let mut table =
        format!("Measured on {}:\n\n| figure | value |\n|---|---|\n", json["machine"].as_str().unwrap_or("?"));
    for key in KEYS {
        let value = match json["figures"][key].as_f64() {
            Some(v) if key.ends_with("ns_per_drop") || key.ends_with("ns_per_conn") => format!("{v:.0} ns"),
            // A fixed cost is a fraction of a percent: two decimals.
            Some(v) if key.ends_with("cpu_share") && v < 0.01 => format!("{:.2} % of a core", 100.0 * v),
            Some(v) if key.ends_with("cpu_share") => format!("{:.1} % of a core", 100.0 * v),
            Some(v) if key.ends_with("_kib") => format!("{:.1} MiB", v / 1024.0),
            Some(v) if key.ends_with("per_s") => format!("{:.0} /s", v),
            Some(v) => format!("{v}"),
            None => format!("not measured: {}", json["not_measured"][key].as_str().unwrap_or("not part of the run")),
        };
        table.push_str(&format!("| `{key}` | {value} |\n"));
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_is_written_measured_or_not() {
        let mut figures = Figures::default();
        figures.set("storm.ctrace.kernel_ns_per_drop", 297.0);
        figures.skip("connections.off.per_s", "guest kernels only");
        let json = figures.to_json("test machine");
        assert_eq!(json["figures"].as_object().unwrap().len(), KEYS.len());
        assert_eq!(json["figures"]["storm.ctrace.kernel_ns_per_drop"], 297.0);
        assert!(json["figures"]["connections.off.per_s"].is_null());
        assert_eq!(json["not_measured"]["connections.off.per_s"], "guest kernels only");
        assert_eq!(json["not_measured"]["flood.drops_per_s"], "not part of this run");
        assert!(json["not_measured"].get("storm.ctrace.kernel_ns_per_drop").is_none());
    }

    /// The README's table is the one the committed figures make: it cannot
    /// drift from them (regenerate with `cargo xtask bench-table`).
    #[test]
    fn the_readme_table_is_made_from_the_committed_figures() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(root.join("docs/bench.json")).unwrap()).unwrap();
        let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
        assert!(
            readme.contains(&markdown(&json)),
            "README.md's table differs from docs/bench.json:\n{}",
            markdown(&json)
        );
    }
}
