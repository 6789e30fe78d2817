//! Exists only so that `ctrace`'s build script can depend on this crate (and be
//! rebuilt when it changes). The programs are in `main.rs`.
#![no_std]
