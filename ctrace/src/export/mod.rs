//! Record files and what they turn into: JSON (the full record), CSV,
//! OpenMetrics text, an SVG plot, and a readable text report. Every format
//! is made from the same [`json::RecordFile`], so `record --format X` and
//! `report --format X` give the same bytes.
pub mod csv;
pub mod json;
pub mod metrics;
pub mod svg;
pub mod text;

use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;

use crate::export::json::RecordFile;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// The full record (schema ctrace.drops.v2).
    Json,
    /// One row per source with its per-second counts (RFC 4180).
    Csv,
    /// The totals in the OpenMetrics text format.
    Openmetrics,
    /// Drops over time for the top sources, and drops per source.
    Svg,
    /// A readable summary: totals against the kernel's counters, top sources.
    Text,
}

/// Renders a record in `format`; `top` limits sources where a format shows
/// a selection (plot, text, per-source metrics).
pub fn render(record: &RecordFile, format: Format, top: usize) -> anyhow::Result<Vec<u8>> {
    Ok(match format {
        Format::Json => {
            let mut json = serde_json::to_vec_pretty(record)?;
            json.push(b'\n');
            json
        }
        Format::Csv => csv::render(record).into_bytes(),
        Format::Openmetrics => metrics::from_record(record, top).into_bytes(),
        Format::Svg => svg::render(record, top)?.into_bytes(),
        Format::Text => text::render(record, top).into_bytes(),
    })
}

/// Where output goes. A path is written atomically: a temporary file in the
/// same folder, renamed over the target once complete, so an interrupted or
/// failed write never leaves half a file in its place.
pub enum Output {
    Stdout,
    File { path: PathBuf, dir: PathBuf },
}

impl Output {
    /// Checks the destination before any work is done.
    pub fn prepare(path: &Path) -> anyhow::Result<Self> {
        if path.as_os_str() == "-" {
            return Ok(Output::Stdout);
        }
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !dir.is_dir() {
            anyhow::bail!("cannot write {}: folder {} does not exist", path.display(), dir.display());
        }
        if path.is_dir() {
            anyhow::bail!("cannot write {}: it is a folder", path.display());
        }
        Ok(Output::File { path: path.to_path_buf(), dir })
    }

    pub fn write(&self, bytes: &[u8]) -> anyhow::Result<()> {
        match self {
            Output::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(bytes)?;
                out.flush()?;
            }
            Output::File { path, dir } => write_atomic(path, dir, bytes)?,
        }
        Ok(())
    }

    pub fn describe(&self) -> String {
        match self {
            Output::Stdout => "stdout".into(),
            Output::File { path, .. } => path.display().to_string(),
        }
    }
}

fn write_atomic(path: &Path, dir: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|_| f.sync_all()))
        .and_then(|_| std::fs::rename(&tmp, path));
    if let Err(err) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(err).with_context(|| format!("cannot write {}", path.display()));
    }
    Ok(())
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A fixed record: the golden files of every format are made from it.
    pub fn fixture() -> RecordFile {
        serde_json::from_str(include_str!("../../tests/golden/record.json")).expect("fixture parses")
    }

    fn golden(name: &str, got: &[u8]) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name);
        if std::env::var_os("CTRACE_UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, got).unwrap();
        }
        let want = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(got == want, "{} differs; if intended, CTRACE_UPDATE_GOLDEN=1 and review the diff", path.display());
    }

    #[test]
    fn every_format_matches_its_golden_file() {
        let record = fixture();
        golden("record.csv", &render(&record, Format::Csv, 5).unwrap());
        golden("record.openmetrics", &render(&record, Format::Openmetrics, 5).unwrap());
        golden("record.svg", &render(&record, Format::Svg, 5).unwrap());
        golden("record.txt", &render(&record, Format::Text, 5).unwrap());
        // JSON round-trips exactly.
        let json = render(&record, Format::Json, 5).unwrap();
        assert!(json == include_bytes!("../../tests/golden/record.json"), "the JSON does not round-trip");
    }

    /// A byte-level mutation of a record's text: most keep it JSON with odd
    /// values (numbers replaced by 0, huge or negative ones, strings
    /// emptied), the rest break it (bytes flipped, ranges cut or doubled).
    fn mutate(text: &str, rng: &mut crate::testing::Rng) -> String {
        let mut bytes = text.as_bytes().to_vec();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(bytes.len().max(1));
            match rng.below(6) {
                0 | 1 => {
                    // Replace the number that starts at or after `at`.
                    let Some(start) = bytes[at..].iter().position(u8::is_ascii_digit).map(|i| at + i) else { continue };
                    let end =
                        bytes[start..].iter().position(|b| !b.is_ascii_digit()).map_or(bytes.len(), |i| start + i);
                    let odd = ["0", "18446744073709551615", "-1", "1e308", "0.0", "4294967296", "99999999999999999999"];
                    bytes.splice(start..end, odd[rng.below(odd.len())].bytes());
                }
                2 => {
                    // Empty the string that starts at or after `at`.
                    let Some(open) = bytes[at..].iter().position(|b| *b == b'"').map(|i| at + i) else { continue };
                    if let Some(close) = bytes[open + 1..].iter().position(|b| *b == b'"') {
                        bytes.drain(open + 1..open + 1 + close);
                    }
                }
                3 => {
                    let last = bytes.len().saturating_sub(1);
                    bytes[at.min(last)] = rng.next_u64() as u8;
                }
                4 => {
                    let end = (at + rng.below(64)).min(bytes.len());
                    bytes.drain(at..end);
                }
                _ => {
                    let end = (at + rng.below(64)).min(bytes.len());
                    let copy = bytes[at..end].to_vec();
                    bytes.splice(at..at, copy);
                }
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The record reader and every renderer on mutated records: each one is
    /// read or refused with an error, and whatever is read renders in every
    /// format, without a panic. A fixed budget of cases, the same every run.
    #[test]
    fn mutated_records_are_read_or_refused_never_panicked_on() {
        let good = include_str!("../../tests/golden/record.json");
        let mut rng = crate::testing::Rng::seeded(0xc0ffee);
        let (mut read, mut refused) = (0, 0);
        for _ in 0..3000 {
            let text = mutate(good, &mut rng);
            match RecordFile::parse(&text, "mutated") {
                Ok(record) => {
                    read += 1;
                    for format in [Format::Json, Format::Csv, Format::Openmetrics, Format::Svg, Format::Text] {
                        let _ = render(&record, format, 5);
                    }
                }
                Err(err) => {
                    refused += 1;
                    assert!(format!("{err:#}").starts_with("mutated "), "{err:#}");
                }
            }
        }
        assert!(read >= 50 && refused >= 50, "both paths taken: {read} read, {refused} refused");
    }

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ctrace-export-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn atomic_write_replaces_whole_files() {
        let dir = scratch("ok");
        let path = dir.join("out.json");
        std::fs::write(&path, "old").unwrap();
        Output::prepare(&path).unwrap().write(b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(leftovers.len(), 1, "temporary file left behind: {leftovers:?}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn failed_writes_name_the_path_and_leave_nothing() {
        let err = Output::prepare(Path::new("/nonexistent-ctrace/x.json")).err().unwrap().to_string();
        assert!(err.contains("/nonexistent-ctrace") && err.contains("does not exist"), "{err}");

        let dir = scratch("fail");
        let err = Output::prepare(&dir).err().unwrap().to_string();
        assert!(err.contains("is a folder"), "{err}");

        // The target turns into a folder between prepare and write: rename
        // fails, the old content stays, and no temporary file is left.
        let path = dir.join("out.json");
        let output = Output::prepare(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("keep"), "x").unwrap();
        let err = format!("{:#}", output.write(b"new").unwrap_err());
        assert!(err.contains(&path.display().to_string()), "{err}");
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(names, [std::ffi::OsString::from("out.json")], "temporary file left behind");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
