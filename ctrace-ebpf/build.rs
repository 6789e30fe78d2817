//! The kernel programs link with bpf-linker, which cargo does not know about.
//! Rebuild when the linker binary changes, and fail early with a hint when it
//! is missing.
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => panic!("bpf-linker not found ({err}): run `cargo xtask setup`"),
    }
}
