//! `cargo xtask kernels`: every hook checked against every Debian kernel
//! line without booting it. Each package (cached, as for the guests) gives
//! vmlinux's BTF (decompressed from vmlinuz), nf_conntrack.ko's BTF and
//! function names, and the config's CONFIG_KPROBES; `ctrace kernel-check`
//! applies the checks ctrace makes before loading. The README's
//! compatibility table is made from docs/kernels.json; without `--write`
//! the run fails when a hook's verdict differs from that file (a new kernel
//! that renames or inlines a hooked function), not when only a package
//! version moved.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};
use serde_json::{json, Value};

use crate::{cargo, root, run, vm};

/// The Debian kernel lines checked (the built-in guest kernel is not a package).
const LINES: [vm::KernelChoice; 4] =
    [vm::KernelChoice::Debian510, vm::KernelChoice::Debian61, vm::KernelChoice::Debian612, vm::KernelChoice::Debian7];

const FILE: &str = "docs/kernels.json";

pub fn kernels(write: bool) -> anyhow::Result<()> {
    run(cargo().args(["build", "--bin", "ctrace"]))?;
    let ctrace = crate::ctrace_debug_bin();
    let mut lines = Vec::new();
    for choice in LINES {
        // A package that cannot be fetched (the registry unreachable) is
        // said, in the table too, not taken for a verdict.
        let kernel = match vm::prepare(choice) {
            Ok(kernel) => kernel,
            Err(e) => {
                eprintln!("xtask: NOT CHECKED: the {} kernel: {e:#}", choice.label());
                lines.push(json!({ "line": choice.label(), "not_checked": format!("{e:#}") }));
                continue;
            }
        };
        let work = std::env::temp_dir().join(format!("ctrace-kernels-{}-{}", choice.label(), std::process::id()));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work)?;
        let verdicts = check_kernel(&ctrace, &kernel, &work);
        let _ = std::fs::remove_dir_all(&work);
        let verdicts =
            verdicts.with_context(|| format!("checking the {} kernel ({})", choice.label(), kernel.release))?;
        eprintln!("xtask: {} ({}) checked", choice.label(), kernel.release);
        lines.push(json!({ "line": choice.label(), "release": kernel.release, "verdicts": verdicts }));
    }
    let now = json!({ "kernels": lines });
    print!("{}", markdown(&now));
    let path = root().join(FILE);
    if write {
        std::fs::write(&path, serde_json::to_string_pretty(&now)? + "\n")?;
        eprintln!("xtask: wrote {FILE}; the README's table: the output above");
        return Ok(());
    }
    let committed: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let changes = differences(&committed, &now);
    if !changes.is_empty() {
        bail!(
            "hook verdicts differ from {FILE}:\n  {}\n(if intended: cargo xtask kernels --write, and update the README)",
            changes.join("\n  ")
        );
    }
    Ok(())
}

/// The files `ctrace kernel-check` reads, extracted from an unpacked kernel.
fn check_kernel(ctrace: &Path, kernel: &vm::Kernel, work: &Path) -> anyhow::Result<Value> {
    let modules = kernel.root.join("lib/modules").join(&kernel.release);
    let vmlinux = work.join("vmlinux");
    decompress_vmlinux(&kernel.vmlinuz, &vmlinux)?;
    let vmlinux_btf = work.join("vmlinux.btf");
    section(&vmlinux, ".BTF", &vmlinux_btf)?;
    std::fs::remove_file(&vmlinux)?;
    let mut args: Vec<String> = vec!["kernel-check".into(), "--json".into(), "--btf".into(), path(&vmlinux_btf)];

    if let Some(module) = find_module(&modules.join("kernel/net/netfilter"), "nf_conntrack.ko")? {
        let ko = work.join("nf_conntrack.ko");
        decompress_to(&module, &ko)?;
        let btf = work.join("nf_conntrack.btf");
        section(&ko, ".BTF", &btf)?;
        // Modules before 5.11 have no BTF: objcopy leaves an empty file.
        if std::fs::metadata(&btf)?.len() > 0 {
            args.extend(["--module-btf".into(), path(&btf)]);
        }
        let symbols = output(Command::new("nm").arg("--defined-only").arg(&ko))?;
        let functions: Vec<&str> = symbols
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let (_, kind, name) = (f.next()?, f.next()?, f.next()?);
                matches!(kind, "t" | "T").then_some(name)
            })
            .collect();
        let list = work.join("nf_conntrack.functions");
        std::fs::write(&list, functions.join("\n"))?;
        args.extend(["--module-functions".into(), path(&list)]);
    }
    let config = [kernel.root.join(format!("boot/config-{}", kernel.release)), modules.join("config")]
        .into_iter()
        .find(|p| p.exists())
        .context("the package has no kernel config")?;
    if std::fs::read_to_string(&config)?.lines().any(|l| l == "CONFIG_KPROBES=y") {
        args.push("--kprobes".into());
    }
    Ok(serde_json::from_str(&output(Command::new(ctrace).args(&args))?)?)
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("cannot run {}", crate::describe(cmd)))?;
    if !out.status.success() {
        bail!("`{}` failed: {}", crate::describe(cmd), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `nf_conntrack.ko`, `.ko.xz` or `.ko.zst` in `dir`.
fn find_module(dir: &Path, name: &str) -> anyhow::Result<Option<PathBuf>> {
    Ok(["", ".xz", ".zst"].iter().map(|ext| dir.join(format!("{name}{ext}"))).find(|p| p.exists()))
}

fn decompress_to(from: &Path, to: &Path) -> anyhow::Result<()> {
    let tool = match from.extension().and_then(|e| e.to_str()) {
        Some("xz") => "xz",
        Some("zst") => "zstd",
        _ => {
            std::fs::copy(from, to)?;
            return Ok(());
        }
    };
    let out = Command::new(tool).arg("-dc").arg(from).output().with_context(|| format!("cannot run {tool}"))?;
    if !out.status.success() {
        bail!("{tool} could not decompress {}", from.display());
    }
    std::fs::write(to, out.stdout)?;
    Ok(())
}

/// The vmlinux ELF inside a bzImage: the compressed payload starts at its
/// format's magic; the first that decompresses to an ELF file is it.
fn decompress_vmlinux(vmlinuz: &Path, to: &Path) -> anyhow::Result<()> {
    let image = std::fs::read(vmlinuz).with_context(|| format!("reading {}", vmlinuz.display()))?;
    let formats: [(&[u8], &str); 3] =
        [(b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"\x1f\x8b\x08\x00", "gzip")];
    for (magic, tool) in formats {
        let Some(at) = image.windows(magic.len()).position(|w| w == magic) else { continue };
        let mut child = Command::new(tool)
            .arg("-dc")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("cannot run {tool}"))?;
        let mut stdin = child.stdin.take().expect("piped");
        let payload = image[at..].to_vec();
        // Written from a thread: the output is read at the same time.
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            let _ = stdin.write_all(&payload);
        });
        // Trailing data after the stream makes the tool complain; what it
        // wrote before is the image.
        let out = child.wait_with_output()?;
        let _ = writer.join();
        if out.stdout.starts_with(b"\x7fELF") {
            std::fs::write(to, out.stdout)?;
            return Ok(());
        }
    }
    bail!("no compressed vmlinux found in {}", vmlinuz.display())
}

/// One ELF section's bytes (binutils' objcopy; empty if it is not there).
fn section(elf: &Path, name: &str, to: &Path) -> anyhow::Result<()> {
    output(Command::new("objcopy").args(["-O", "binary", "--only-section", name]).arg(elf).arg(to))?;
    if !to.exists() {
        std::fs::write(to, b"")?;
    }
    Ok(())
}

/// The README's table: per kernel line, each hook family on each tier.
pub fn markdown(kernels: &Value) -> String {
    let mut out = String::from("| kernel | hook | tracepoint | fentry | kprobe |\n|---|---|---|---|---|\n");
    for line in kernels["kernels"].as_array().into_iter().flatten() {
        if let Some(why) = line["not_checked"].as_str() {
            let why = why.replace('|', "/");
            out.push_str(&format!("| {} | not checked: {why} | | | |\n", line["line"].as_str().unwrap_or("?")));
            continue;
        }
        let verdicts = line["verdicts"].as_array().cloned().unwrap_or_default();
        let mut hooks: Vec<&str> = verdicts.iter().filter_map(|v| v["hook"].as_str()).collect();
        hooks.dedup();
        for (i, hook) in hooks.iter().enumerate() {
            let cell = |tier: &str| {
                verdicts.iter().find(|v| v["hook"] == *hook && v["tier"] == tier).map_or("-".to_string(), |v| {
                    let detail = v["detail"].as_str().unwrap_or("").replace('|', "/");
                    if v["ok"] == true {
                        format!("ok: {detail}")
                    } else {
                        format!("no: {detail}")
                    }
                })
            };
            let kernel = if i == 0 {
                format!("{} (`{}`)", line["line"].as_str().unwrap_or("?"), line["release"].as_str().unwrap_or("?"))
            } else {
                String::new()
            };
            out.push_str(&format!(
                "| {kernel} | {hook} | {} | {} | {} |\n",
                cell("tracepoint"),
                cell("fentry"),
                cell("kprobe")
            ));
        }
    }
    out
}

/// Verdicts whose ok-ness changed, per line, hook and tier (releases and
/// wording may move).
fn differences(committed: &Value, now: &Value) -> Vec<String> {
    let index = |v: &Value| -> Vec<(String, String, String, bool, String)> {
        v["kernels"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|line| {
                let name = line["line"].as_str().unwrap_or("").to_string();
                line["verdicts"].as_array().cloned().unwrap_or_default().into_iter().map(move |v| {
                    (
                        name.clone(),
                        v["hook"].as_str().unwrap_or("").to_string(),
                        v["tier"].as_str().unwrap_or("").to_string(),
                        v["ok"] == true,
                        v["detail"].as_str().unwrap_or("").to_string(),
                    )
                })
            })
            .collect()
    };
    // A line not checked this time (or last time) is not compared.
    let unchecked = |v: &Value| -> Vec<String> {
        v["kernels"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|l| l.get("not_checked").is_some())
            .filter_map(|l| l["line"].as_str().map(str::to_string))
            .collect()
    };
    let skip: Vec<String> = [unchecked(committed), unchecked(now)].concat();
    let keep = |rows: Vec<(String, String, String, bool, String)>| {
        rows.into_iter().filter(|r| !skip.contains(&r.0)).collect::<Vec<_>>()
    };
    let (before, after) = (keep(index(committed)), keep(index(now)));
    let mut changes = Vec::new();
    for (line, hook, tier, ok, detail) in &after {
        match before.iter().find(|b| (&b.0, &b.1, &b.2) == (line, hook, tier)) {
            Some(b) if b.3 == *ok => {}
            Some(_) => changes.push(format!("{line} {hook} {tier}: now {} ({detail})", if *ok { "ok" } else { "no" })),
            None => changes.push(format!("{line} {hook} {tier}: new ({detail})")),
        }
    }
    for (line, hook, tier, ..) in &before {
        if !after.iter().any(|a| (&a.0, &a.1, &a.2) == (line, hook, tier)) {
            changes.push(format!("{line} {hook} {tier}: no longer checked"));
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(ok: bool) -> Value {
        json!({"kernels": [{"line": "5.10", "release": "5.10.0-32-amd64", "verdicts": [
            {"hook": "drops", "tier": "tracepoint", "ok": true, "detail": "by location"},
            {"hook": "table_full", "tier": "fentry", "ok": false, "detail": "conntrack is a module"},
            {"hook": "table_full", "tier": "kprobe", "ok": ok, "detail": "kprobes on early_drop"}
        ]}]})
    }

    #[test]
    fn a_changed_verdict_is_a_difference_a_new_release_is_not() {
        assert!(differences(&sample(true), &sample(true)).is_empty());
        let mut moved = sample(true);
        moved["kernels"][0]["release"] = json!("5.10.0-33-amd64");
        assert!(differences(&sample(true), &moved).is_empty());
        let changes = differences(&sample(true), &sample(false));
        assert_eq!(changes, ["5.10 table_full kprobe: now no (kprobes on early_drop)"]);
        // A line that could not be fetched is said, not compared.
        let unreachable = json!({"kernels": [{"line": "5.10", "not_checked": "no Debian package matches"}]});
        assert!(differences(&sample(true), &unreachable).is_empty());
        assert!(markdown(&unreachable).contains("| 5.10 | not checked: no Debian package matches | | | |"));
    }

    #[test]
    fn the_table_has_a_row_per_hook_and_a_column_per_tier() {
        let table = markdown(&sample(true));
        assert!(table.contains("| 5.10 (`5.10.0-32-amd64`) | drops | ok: by location | - | - |"), "{table}");
        assert!(
            table.contains("|  | table_full | - | no: conntrack is a module | ok: kprobes on early_drop |"),
            "{table}"
        );
    }

    /// The README's table is the one docs/kernels.json makes.
    #[test]
    fn the_readme_table_is_made_from_the_committed_verdicts() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let json: Value = serde_json::from_str(&std::fs::read_to_string(root.join(FILE)).unwrap()).unwrap();
        let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
        assert!(readme.contains(&markdown(&json)), "README.md's table differs from {FILE}:\n{}", markdown(&json));
    }
}
