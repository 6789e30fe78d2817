//! The ctrace binary as a user meets it: help, bad input, missing privileges,
//! and a short recording to stdout.
use std::process::{Command, Output};

use ctrace_tests::{ctrace_bin, require_root, TempDir};

fn ctrace(args: &[&str]) -> Output {
    Command::new(ctrace_bin()).args(args).output().expect("run ctrace")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn help_teaches_the_reasons_and_the_file() {
    let out = ctrace(&["record", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for word in ["table_full", "conntrack_other", "ruleset", "--duration", "--output"] {
        assert!(help.contains(word), "`record --help` does not mention {word}:\n{help}");
    }
}

#[test]
fn unknown_flags_and_bad_values_are_usage_errors() {
    let out = ctrace(&["record", "--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--no-such-flag"));

    let out = ctrace(&["record", "--duration", "soon"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("not a number of seconds"), "{}", stderr(&out));

    let out = ctrace(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(2));

    // doctor's 1 and 2 are verdicts: its usage errors are 3.
    for args in [&["doctor", "--bogus"][..], &["doctor", "--window", "0"], &["doctor", "--format", "yaml"]] {
        let out = ctrace(args);
        assert_eq!(out.status.code(), Some(3), "{args:?}: {}", stderr(&out));
        assert!(out.stdout.is_empty(), "no report on a usage error");
    }
    let out = ctrace(&["demo", "--cleanup", "--scenario", "invalid"]);
    assert_eq!(out.status.code(), Some(2), "--cleanup takes nothing else: {}", stderr(&out));
}

#[test]
fn an_unwritable_output_fails_before_attaching() {
    let out = ctrace(&["record", "--duration", "1", "--output", "/nonexistent-dir/x.json"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("/nonexistent-dir") && err.contains("does not exist"), "{err}");
    assert!(!err.contains("attached"), "attached before checking the output: {err}");
}

#[test]
fn serve_for_a_namespace_that_is_not_there_fails_before_attaching() {
    let out = ctrace(&["serve", "--listen", "127.0.0.1:0", "--netns", "ctrace-no-such-namespace"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("no network namespace ctrace-no-such-namespace"), "{err}");
    assert!(!err.contains("attached"), "attached before finding the namespace: {err}");
}

#[test]
fn serve_refuses_a_web_config_it_cannot_honour_before_attaching() {
    let dir = TempDir::new("cli-webcfg");
    let cases = [
        ("tls_server_config:\n  cert_file: a.crt\n  key_file: a.key\n  cipher_suites: [x]\n", "cipher_suites"),
        ("basic_auth_users:\n  prom: plaintext\n", "not a bcrypt hash"),
        ("tls_server_config:\n  cert_file: missing.crt\n  key_file: missing.key\n", "missing.crt"),
    ];
    for (text, said) in cases {
        let config = dir.0.join("web.yml");
        std::fs::write(&config, text).unwrap();
        let out = ctrace(&["serve", "--listen", "127.0.0.1:0", "--web-config", config.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{text}");
        let err = stderr(&out);
        assert!(err.contains(said), "{text}: {err}");
        assert!(!err.contains("attached"), "attached before reading the web config: {err}");
    }
}

/// Run as an unprivileged user (nobody): one clear sentence, non-zero exit.
#[test]
fn without_privileges_it_says_what_is_missing() {
    require_root();
    let dir = TempDir::new("unpriv");
    // The binary may sit under root's home; copy it where nobody can run it.
    let bin = dir.0.join("ctrace");
    std::fs::copy(ctrace_bin(), &bin).unwrap();
    let world = std::os::unix::fs::PermissionsExt::from_mode(0o755);
    std::fs::set_permissions(&dir.0, std::fs::Permissions::clone(&world)).unwrap();
    std::fs::set_permissions(&bin, world).unwrap();
    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"])
            .arg(&bin)
            .args(args)
            .output()
            .expect("setpriv")
    };
    let out = as_nobody(&["record", "--duration", "1", "--output", "-"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("needs root") && err.contains("CAP_BPF"), "{err}");
    assert_eq!(err.lines().count(), 1, "one sentence, not a backtrace: {err}");
    assert!(out.stdout.is_empty(), "no half file on stdout");

    // doctor: the same sentence, and 3 (it could not diagnose), not a verdict.
    let out = as_nobody(&["doctor", "--window", "1"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("needs root"), "{}", stderr(&out));
    assert!(out.stdout.is_empty());

    let out = as_nobody(&["demo", "--duration", "1"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("run it as root"), "{}", stderr(&out));
}

#[test]
fn a_short_recording_writes_a_complete_file_to_stdout() {
    require_root();
    let out = ctrace(&["record", "--duration", "1", "--output", "-"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let record: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(record["schema"], "ctrace.drops.v2");
    let tier = record["tier"].as_str().unwrap_or_default();
    assert!(["tracepoint", "kprobe", "fentry"].contains(&tier), "tier {tier}");
    let duration = record["duration_s"].as_f64().unwrap();
    assert!((0.9..5.0).contains(&duration), "duration_s {duration}");
    for field in ["kernel", "started_at", "totals", "kernel_counters", "sources"] {
        assert!(!record[field].is_null(), "missing {field}");
    }
    assert!(stderr(&out).contains("attached"), "the tier is reported: {}", stderr(&out));
}
