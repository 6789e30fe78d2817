//! `/proc/kallsyms`, read and parsed once at start-up: the hooks ask
//! whether a function exists under its own name and where two data symbols
//! live; classification keeps the address ranges of the few functions that
//! free dropped packets. The table itself is dropped once attached.
//!
//! Names are kept in one string, each symbol pointing into it, so a
//! kernel's 100,000+ symbols cost a few allocations and one sort. (Under an
//! emulated CPU, a set of every function name took 9 s to build.) The file
//! is read a line at a time: addresses, types and module names are not
//! kept as text, which halves the table's megabytes at start-up (the
//! process's peak).
use std::{
    io::{BufRead, BufReader},
    ops::Range,
};

/// One line: `ADDRESS TYPE NAME [MODULE]`.
#[derive(Clone, Copy, Debug)]
struct Sym {
    addr: u64,
    /// Start of the name in `names`, and its length.
    name_at: u32,
    name_len: u16,
    /// The type letter (`t`/`T` text, `d`/`D`/`b`/`B`/`r`/`R` data, ...).
    kind: u8,
    /// The line names a module (`[nf_conntrack]`).
    in_module: bool,
}

impl Sym {
    fn is_function(&self) -> bool {
        matches!(self.kind, b't' | b'T')
    }

    fn name_range(&self) -> Range<usize> {
        self.name_at as usize..self.name_at as usize + self.name_len as usize
    }
}

pub struct Kallsyms {
    names: String,
    /// Sorted by address (hidden addresses, all zero, first).
    syms: Vec<Sym>,
}

impl Kallsyms {
    /// Reads `/proc/kallsyms`. Unreadable, it is empty: no function is
    /// known, and the callers say what that turns off.
    pub fn read() -> Self {
        match std::fs::File::open("/proc/kallsyms") {
            Ok(file) => Self::from_reader(BufReader::with_capacity(64 * 1024, file)),
            Err(_) => Self::parse(String::new()),
        }
    }

    pub fn parse(text: String) -> Self {
        Self::from_reader(text.as_bytes())
    }

    fn from_reader(mut reader: impl BufRead) -> Self {
        let (mut names, mut syms) = (String::new(), Vec::new());
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let mut fields = line.split_ascii_whitespace();
            let (Some(addr), Some(kind), Some(name)) = (fields.next(), fields.next(), fields.next()) else {
                continue;
            };
            let (Ok(addr), [kind], Ok(name_len)) =
                (u64::from_str_radix(addr, 16), kind.as_bytes(), name.len().try_into())
            else {
                continue;
            };
            let in_module = fields.next().is_some_and(|m| m.starts_with('['));
            syms.push(Sym { addr, name_at: names.len() as u32, name_len, kind: *kind, in_module });
            names.push_str(name);
        }
        names.shrink_to_fit();
        syms.shrink_to_fit();
        syms.sort_unstable_by_key(|s| s.addr);
        Kallsyms { names, syms }
    }

    fn name(&self, sym: &Sym) -> &str {
        &self.names[sym.name_range()]
    }

    fn named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sym> + 'a {
        self.syms.iter().filter(move |s| s.name_len as usize == name.len() && self.name(s) == name)
    }

    /// A function of that exact name exists (an inlined function, or one
    /// emitted only as `name.constprop.0`, does not: nothing to hook).
    pub fn has_function(&self, name: &str) -> bool {
        self.named(name).any(Sym::is_function)
    }

    /// Whether the function lives in a module (its line ends in
    /// `[module]`); None when there is no such function.
    pub fn function_in_module(&self, name: &str) -> Option<bool> {
        self.named(name).find(|s| s.is_function()).map(|s| s.in_module)
    }

    /// The address of a data symbol (a variable), if shown (not zero: root
    /// and kptr_restrict below 2).
    pub fn data_address(&self, name: &str) -> Option<u64> {
        self.named(name).find(|s| !s.is_function()).map(|s| s.addr).filter(|a| *a != 0)
    }

    /// Each function `kind` recognises by name, with the addresses it spans
    /// (up to the next function's start): what a reader keeps of the table
    /// once start-up is over, instead of the whole table.
    pub fn function_ranges<K>(&self, kind: impl Fn(&str) -> Option<K>) -> Vec<(Range<u64>, K)> {
        let functions: Vec<&Sym> = self.syms.iter().filter(|s| s.is_function() && s.addr != 0).collect();
        functions
            .iter()
            .enumerate()
            .filter_map(|(i, sym)| {
                let kind = kind(self.name(sym))?;
                let end = functions[i + 1..].iter().map(|next| next.addr).find(|&a| a > sym.addr).unwrap_or(u64::MAX);
                Some((sym.addr..end, kind))
            })
            .collect()
    }

    /// No function address is known (unreadable, or hidden from this user).
    pub fn addresses_hidden(&self) -> bool {
        !self.syms.iter().any(|s| s.is_function() && s.addr != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
ffffffff81f2af50 T nf_hook_slow
ffffffff81f2b100 T nf_hook_slow_list
ffffffff81f653d0 T nft_do_chain
ffffffff82000000 D some_data
ffffffffc0a01000 t __nf_conntrack_alloc\t[nf_conntrack]
ffffffffc0a02000 t early_drop.constprop.0\t[nf_conntrack]
ffffffffc0a10000 b nf_conntrack_net_id\t[nf_conntrack]
ffffffffc0a10010 d nf_conntrack_max\t[nf_conntrack]
";

    /// The function containing `addr`, through the ranges readers keep.
    fn function_at(k: &Kallsyms, addr: u64) -> Option<String> {
        k.function_ranges(|name| Some(name.to_string()))
            .into_iter()
            .find(|(range, _)| range.contains(&addr))
            .map(|(_, name)| name)
    }

    #[test]
    fn functions_by_their_own_name_and_data_by_address() {
        let k = Kallsyms::parse(TEXT.into());
        assert!(k.has_function("__nf_conntrack_alloc"));
        assert!(!k.has_function("early_drop"), "a renamed copy is not the function");
        assert!(!k.has_function("nf_conntrack_max"), "data is not a function");
        assert_eq!(k.data_address("nf_conntrack_net_id"), Some(0xffffffffc0a10000));
        // Where a function lives: vmlinux or a module (5.10 has no module BTF to ask).
        assert_eq!(k.function_in_module("__nf_conntrack_alloc"), Some(true));
        assert_eq!(k.function_in_module("nf_hook_slow"), Some(false));
        assert_eq!(k.function_in_module("nf_hook_slow_list"), Some(false), "the next line's module is not its");
        assert_eq!(k.function_in_module("nf_conntrack_in"), None);
        assert_eq!(k.data_address("nf_conntrack_max"), Some(0xffffffffc0a10010));
        assert_eq!(k.data_address("nf_hook_slow"), None, "a function is not data");
        assert!(!k.addresses_hidden());
    }

    #[test]
    fn locations_resolve_to_the_enclosing_function() {
        let k = Kallsyms::parse(TEXT.into());
        assert_eq!(function_at(&k, 0xffffffff81f2af50 + 0x7d).as_deref(), Some("nf_hook_slow"));
        assert_eq!(function_at(&k, 0xffffffff81f653d0 + 0x10).as_deref(), Some("nft_do_chain"));
        // Past a data symbol, the function before it still encloses nothing
        // better: data is skipped, the nearest function is named.
        assert_eq!(function_at(&k, 0xffffffff82000010).as_deref(), Some("nft_do_chain"));
        assert_eq!(function_at(&k, 0x1000), None);
    }

    #[test]
    fn hidden_addresses_name_functions_but_locate_nothing() {
        // kptr_restrict: every address reads as zero.
        let hidden: String = TEXT.lines().map(|l| format!("0000000000000000{}\n", &l[16..])).collect();
        let k = Kallsyms::parse(hidden);
        assert!(k.has_function("__nf_conntrack_alloc"), "names are still listed");
        assert_eq!(k.data_address("nf_conntrack_max"), None);
        assert_eq!(function_at(&k, 0xffffffff81f2af50), None);
        assert!(k.addresses_hidden());
    }

    #[test]
    fn malformed_lines_are_skipped() {
        let k = Kallsyms::parse("garbage\nffffffff81000000 T\nzz T x\nffffffff81000000 T real\n".into());
        assert!(k.has_function("real"));
        assert_eq!(k.syms.len(), 1);
        assert!(Kallsyms::parse(String::new()).addresses_hidden());
    }
}
