//! One program at a time: loading and attaching a family's programs on a
//! tier (all or none), the kernel's count of a program's skipped runs, and
//! load errors said as sentences about what is missing.
use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

use aya::{
    programs::{FEntry, FExit, KProbe, ProgramError},
    Ebpf, EbpfError,
};

use super::{conntrack, Tier};

/// A program's `recursion_misses` (Linux 5.12+; 0 before), from
/// BPF_OBJ_GET_INFO_BY_FD. aya 0.14 keeps that field of its program info
/// private, hence the call here.
pub(super) fn recursion_misses(program: BorrowedFd<'_>) -> io::Result<u64> {
    use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_prog_info};
    // SAFETY: both are plain C structs for which all-zero is valid.
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.info.bpf_fd = program.as_raw_fd() as u32;
    attr.info.info_len = std::mem::size_of::<bpf_prog_info>() as u32;
    attr.info.info = &mut info as *mut bpf_prog_info as u64;
    // SAFETY: the kernel writes at most info_len bytes into `info`, which
    // lives until the call returns; `attr` is a valid bpf_attr.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_OBJ_GET_INFO_BY_FD as libc::c_long,
            &mut attr as *mut bpf_attr,
            std::mem::size_of::<bpf_attr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info.recursion_misses)
}

/// Loads and attaches every program of a family on one tier, or none: on
/// a failure the ones already attached are unloaded. Returns what was
/// attached, or why not. (The plan has checked that the functions exist.)
pub(super) fn attach_family(
    ebpf: &mut Ebpf,
    family: &conntrack::Family,
    tier: Tier,
    split: &[&str],
    aya_btf: &aya::Btf,
) -> Result<String, String> {
    let mut done: Vec<(&conntrack::Hook, Target)> = Vec::new();
    for hook in family.hooks.iter().filter(|h| tier != Tier::Fentry || !h.fentry.is_empty()) {
        let target = Target::of(hook, tier, split);
        if let Err(err) = load_and_attach(ebpf, hook, &target, aya_btf) {
            for (undo, target) in done {
                unload(ebpf, undo, &target);
            }
            return Err(match &err {
                ProgramError::LoadError { io_error, .. } if is_permission_error(io_error) => {
                    format!("the kernel refused to load {} ({io_error})", target.program)
                }
                other => format!("{} on {}: {other}", target.program, target.symbol),
            });
        }
        done.push((hook, target));
    }
    Ok(conntrack::describe(family, tier, split))
}

/// Which program goes on which kernel symbol.
struct Target {
    tier: Tier,
    program: &'static str,
    symbol: String,
}

impl Target {
    fn of(hook: &conntrack::Hook, tier: Tier, split: &[&str]) -> Self {
        match tier {
            Tier::Fentry => Target { tier, program: hook.fentry, symbol: hook.function.into() },
            _ if split.contains(&hook.function) => Target { tier, program: hook.part, symbol: hook.part_symbol() },
            _ => Target { tier, program: hook.kprobe, symbol: hook.function.into() },
        }
    }
}

fn load_and_attach(
    ebpf: &mut Ebpf,
    hook: &conntrack::Hook,
    target: &Target,
    aya_btf: &aya::Btf,
) -> Result<(), ProgramError> {
    match (target.tier, hook.on_return) {
        (Tier::Fentry, false) => {
            let p: &mut FEntry = ebpf.program_mut(target.program).ok_or(ProgramError::NotLoaded)?.try_into()?;
            p.load(&target.symbol, aya_btf)?;
            p.attach().map(drop)
        }
        (Tier::Fentry, true) => {
            let p: &mut FExit = ebpf.program_mut(target.program).ok_or(ProgramError::NotLoaded)?.try_into()?;
            p.load(&target.symbol, aya_btf)?;
            p.attach().map(drop)
        }
        _ => {
            let p: &mut KProbe = ebpf.program_mut(target.program).ok_or(ProgramError::NotLoaded)?.try_into()?;
            p.load()?;
            p.attach(target.symbol.as_str(), 0).map(drop)
        }
    }
}

fn unload(ebpf: &mut Ebpf, hook: &conntrack::Hook, target: &Target) {
    let _ = match (target.tier, hook.on_return) {
        (Tier::Fentry, false) => {
            ebpf.program_mut(target.program).map(|p| <&mut FEntry>::try_from(p).map(|p| p.unload()))
        }
        (Tier::Fentry, true) => ebpf.program_mut(target.program).map(|p| <&mut FExit>::try_from(p).map(|p| p.unload())),
        _ => ebpf.program_mut(target.program).map(|p| <&mut KProbe>::try_from(p).map(|p| p.unload())),
    };
}

fn is_permission_error(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES))
}

/// Turns a load failure into a sentence about what is missing.
pub(super) fn explain_load_error(err: EbpfError) -> anyhow::Error {
    if let EbpfError::MapError(aya::maps::MapError::CreateError { io_error, .. }) = &err {
        if is_permission_error(io_error) {
            return anyhow::anyhow!(
                "the kernel refused to create BPF maps ({io_error}): run ctrace as root, or grant \
                 CAP_BPF and CAP_PERFMON"
            );
        }
    }
    anyhow::Error::new(err).context("loading ctrace's kernel programs")
}

pub(super) fn explain_program_error(err: ProgramError, doing: &str) -> anyhow::Error {
    let message = match &err {
        ProgramError::LoadError { io_error, .. } if is_permission_error(io_error) => {
            // The verifier log, if any, stays in the chain below.
            Some(format!("the kernel refused to load a tracing program ({io_error}): run ctrace as root, or grant CAP_BPF and CAP_PERFMON"))
        }
        ProgramError::SyscallError(e) if is_permission_error(&e.io_error) => {
            Some(format!("the kernel refused {doing} ({}): run ctrace as root", e.io_error))
        }
        _ => None,
    };
    let err = anyhow::Error::new(err).context(doing.to_string());
    match message {
        Some(message) => err.context(message),
        None => err,
    }
}
