//! ctrace: who is being dropped by Linux connection tracking, and why.
//!
//! Data flows hooks -> records -> decoding -> aggregation -> exports:
//! `hooks` loads the kernel programs, `engine` drains their ring buffer,
//! `decode` turns records into the `model`, `classify` names the reason,
//! `aggregate` counts per source (and sums floods up), `export` writes files;
//! `record`, `live`, `serve` and `doctor` are front ends over the engine. `netns`
//! reads the kernel's own counters to compare; `demo` makes an incident to
//! watch, in namespaces of its own.
pub mod aggregate;
pub mod btf;
pub mod census;
pub mod classify;
pub mod decode;
pub mod demo;
pub mod doctor;
pub mod engine;
pub mod export;
pub mod hooks;
pub mod kallsyms;
pub mod live;
pub mod model;
pub mod netns;
pub mod privileges;
pub mod record;
pub mod serve;
#[cfg(test)]
pub mod testing;
pub mod workload;
