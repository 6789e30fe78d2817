//! A small reader for the kernel's BTF (`/sys/kernel/btf/*`).
//!
//! rustc emits no CO-RE relocations for eBPF programs, so ctrace looks up
//! every struct offset and enum value it needs here, at load time, and hands
//! them to the programs as read-only globals. Only what that needs is parsed:
//! type names, struct/union members (through anonymous members), enum values
//! and function prototypes. Split BTF (kernel modules) is read on top of its
//! base, so type ids and string offsets continue where the base ends.
use std::{fmt, path::Path};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum BtfError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("malformed BTF: {0}")]
    Malformed(&'static str),
    #[error("the kernel's BTF has no {kind} named `{name}`")]
    NoType { kind: &'static str, name: String },
    #[error("`{owner}` has no member `{member}` in this kernel")]
    NoMember { owner: String, member: String },
    #[error("`{owner}.{member}` is a bitfield; ctrace needs a byte offset")]
    Bitfield { owner: String, member: String },
    #[error("`enum {owner}` has no value `{name}` in this kernel")]
    NoEnumValue { owner: String, name: String },
}

pub type TypeId = u32;

/// What a BTF type is. Type references are ids into the same [`Btf`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Void,
    Int { size: u32 },
    Ptr(TypeId),
    Array { elem: TypeId, len: u32 },
    Struct { size: u32, members: Vec<Member> },
    Union { size: u32, members: Vec<Member> },
    Enum { size: u32, values: Vec<(u32, i64)> },
    Fwd,
    Typedef(TypeId),
    Volatile(TypeId),
    Const(TypeId),
    Restrict(TypeId),
    Func(TypeId),
    FuncProto { ret: TypeId, params: Vec<(u32, TypeId)> },
    Var(TypeId),
    Datasec,
    Float,
    DeclTag(TypeId),
    TypeTag(TypeId),
}

impl Kind {
    fn label(&self) -> &'static str {
        match self {
            Kind::Struct { .. } => "struct",
            Kind::Union { .. } => "union",
            Kind::Enum { .. } => "enum",
            Kind::Typedef(_) => "typedef",
            Kind::Func(_) => "function",
            _ => "type",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub name_off: u32,
    pub ty: TypeId,
    pub bit_offset: u32,
    /// Non-zero for bitfield members.
    pub bitfield_size: u32,
}

#[derive(Clone, Debug)]
struct Type {
    name_off: u32,
    kind: Kind,
}

/// Parsed BTF: the base's types and strings first, then a split file's.
#[derive(Clone)]
pub struct Btf {
    types: Vec<Type>, // index = type id; id 0 is void
    strings: Vec<u8>,
}

impl fmt::Debug for Btf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Btf({} types)", self.types.len())
    }
}

const MAGIC: u16 = 0xeb9f;

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn u32(&mut self) -> Result<u32, BtfError> {
        let end = self.pos + 4;
        let raw = self.bytes.get(self.pos..end).ok_or(BtfError::Malformed("type section ends inside a type"))?;
        self.pos = end;
        Ok(u32::from_le_bytes(raw.try_into().expect("4 bytes")))
    }
}

impl Btf {
    /// Reads `/sys/kernel/btf/vmlinux` (or another base BTF file).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, BtfError> {
        let path = path.as_ref();
        let bytes =
            std::fs::read(path).map_err(|source| BtfError::Read { path: path.display().to_string(), source })?;
        Self::parse(&bytes, None)
    }

    /// Parses `bytes`; with `base`, as split BTF on top of it.
    pub fn parse(bytes: &[u8], base: Option<&Btf>) -> Result<Self, BtfError> {
        let field = |at: usize| -> Result<u32, BtfError> {
            let raw = bytes.get(at..at + 4).ok_or(BtfError::Malformed("short header"))?;
            Ok(u32::from_le_bytes(raw.try_into().expect("4 bytes")))
        };
        if bytes.len() < 24 || u16::from_le_bytes([bytes[0], bytes[1]]) != MAGIC {
            return Err(BtfError::Malformed("bad magic (big-endian BTF is not supported)"));
        }
        let hdr_len = field(4)? as usize;
        let (type_off, type_len) = (field(8)? as usize, field(12)? as usize);
        let (str_off, str_len) = (field(16)? as usize, field(20)? as usize);
        let section = |off: usize, len: usize| {
            bytes.get(hdr_len + off..hdr_len + off + len).ok_or(BtfError::Malformed("section outside the file"))
        };
        let type_bytes = section(type_off, type_len)?;
        let own_strings = section(str_off, str_len)?;

        let (mut types, mut strings) = match base {
            Some(base) => (base.types.clone(), base.strings.clone()),
            None => (vec![Type { name_off: 0, kind: Kind::Void }], Vec::new()),
        };
        strings.extend_from_slice(own_strings);

        let mut cur = Cursor { bytes: type_bytes, pos: 0 };
        while cur.pos < type_bytes.len() {
            types.push(Self::parse_type(&mut cur)?);
        }
        Ok(Btf { types, strings })
    }

    fn parse_type(cur: &mut Cursor<'_>) -> Result<Type, BtfError> {
        let name_off = cur.u32()?;
        let info = cur.u32()?;
        let size_or_type = cur.u32()?;
        let vlen = info & 0xffff;
        let kind_flag = info >> 31 == 1;
        let members = |cur: &mut Cursor<'_>| -> Result<Vec<Member>, BtfError> {
            (0..vlen)
                .map(|_| {
                    let (name_off, ty, offset) = (cur.u32()?, cur.u32()?, cur.u32()?);
                    let (bit_offset, bitfield_size) =
                        if kind_flag { (offset & 0xff_ffff, offset >> 24) } else { (offset, 0) };
                    Ok(Member { name_off, ty, bit_offset, bitfield_size })
                })
                .collect()
        };
        let kind = match (info >> 24) & 0x1f {
            1 => {
                cur.u32()?;
                Kind::Int { size: size_or_type }
            }
            2 => Kind::Ptr(size_or_type),
            3 => {
                let elem = cur.u32()?;
                let _index = cur.u32()?;
                Kind::Array { elem, len: cur.u32()? }
            }
            4 => Kind::Struct { size: size_or_type, members: members(cur)? },
            5 => Kind::Union { size: size_or_type, members: members(cur)? },
            6 => {
                let values =
                    (0..vlen).map(|_| Ok((cur.u32()?, cur.u32()? as i32 as i64))).collect::<Result<_, BtfError>>()?;
                Kind::Enum { size: size_or_type, values }
            }
            7 => Kind::Fwd,
            8 => Kind::Typedef(size_or_type),
            9 => Kind::Volatile(size_or_type),
            10 => Kind::Const(size_or_type),
            11 => Kind::Restrict(size_or_type),
            12 => Kind::Func(size_or_type),
            13 => {
                let params = (0..vlen).map(|_| Ok((cur.u32()?, cur.u32()?))).collect::<Result<_, BtfError>>()?;
                Kind::FuncProto { ret: size_or_type, params }
            }
            14 => {
                cur.u32()?;
                Kind::Var(size_or_type)
            }
            15 => {
                for _ in 0..vlen * 3 {
                    cur.u32()?;
                }
                Kind::Datasec
            }
            16 => Kind::Float,
            17 => {
                cur.u32()?;
                Kind::DeclTag(size_or_type)
            }
            18 => Kind::TypeTag(size_or_type),
            19 => {
                let values = (0..vlen)
                    .map(|_| {
                        let name = cur.u32()?;
                        let (lo, hi) = (cur.u32()? as u64, cur.u32()? as u64);
                        Ok((name, (hi << 32 | lo) as i64))
                    })
                    .collect::<Result<_, BtfError>>()?;
                Kind::Enum { size: size_or_type, values }
            }
            _ => return Err(BtfError::Malformed("unknown type kind")),
        };
        Ok(Type { name_off, kind })
    }

    /// The name at a string offset ("" for anonymous types).
    pub fn name_at(&self, off: u32) -> &str {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    pub fn name(&self, id: TypeId) -> &str {
        self.types.get(id as usize).map_or("", |t| self.name_at(t.name_off))
    }

    pub fn kind(&self, id: TypeId) -> Option<&Kind> {
        self.types.get(id as usize).map(|t| &t.kind)
    }

    /// The name at `off` is `name`: compares bytes in place (a kernel has
    /// 100,000+ types to look through; no need to measure each name).
    fn name_is(&self, off: u32, name: &str) -> bool {
        let (start, len) = (off as usize, name.len());
        self.strings.get(start..start + len) == Some(name.as_bytes()) && self.strings.get(start + len) == Some(&0)
    }

    /// Finds a named type whose kind `want` accepts.
    fn find(&self, name: &str, want: fn(&Kind) -> bool) -> Option<TypeId> {
        self.types.iter().position(|t| self.name_is(t.name_off, name) && want(&t.kind)).map(|i| i as TypeId)
    }

    /// Skips typedefs and qualifiers.
    pub fn resolve(&self, mut id: TypeId) -> TypeId {
        for _ in 0..32 {
            match self.kind(id) {
                Some(
                    Kind::Typedef(next)
                    | Kind::Volatile(next)
                    | Kind::Const(next)
                    | Kind::Restrict(next)
                    | Kind::TypeTag(next),
                ) => id = *next,
                _ => break,
            }
        }
        id
    }

    /// `sizeof(struct name)`.
    pub fn struct_size(&self, name: &str) -> Option<u32> {
        match self.kind(self.find(name, |k| matches!(k, Kind::Struct { .. }))?)? {
            Kind::Struct { size, .. } => Some(*size),
            _ => None,
        }
    }

    /// Byte offset of `path` ("a.b.c") inside `struct owner`, looking through
    /// anonymous struct and union members as C does.
    pub fn member_offset(&self, owner: &str, path: &str) -> Result<u32, BtfError> {
        let mut id = self
            .find(owner, |k| matches!(k, Kind::Struct { .. }))
            .ok_or_else(|| BtfError::NoType { kind: "struct", name: owner.to_string() })?;
        let mut bits = 0u32;
        for segment in path.split('.') {
            let (member_bits, member) = self
                .find_member(id, segment)
                .ok_or_else(|| BtfError::NoMember { owner: owner.to_string(), member: path.to_string() })?;
            if member.bitfield_size != 0 {
                return Err(BtfError::Bitfield { owner: owner.to_string(), member: path.to_string() });
            }
            bits += member_bits;
            id = self.resolve(member.ty);
        }
        if !bits.is_multiple_of(8) {
            return Err(BtfError::Bitfield { owner: owner.to_string(), member: path.to_string() });
        }
        Ok(bits / 8)
    }

    /// Finds a member by name in a struct or union, descending into anonymous
    /// members. Returns its bit offset from the start of `id` and the member.
    fn find_member(&self, id: TypeId, name: &str) -> Option<(u32, &Member)> {
        let members = match self.kind(self.resolve(id))? {
            Kind::Struct { members, .. } | Kind::Union { members, .. } => members,
            _ => return None,
        };
        for member in members {
            if member.name_off != 0 && self.name_at(member.name_off) == name {
                return Some((member.bit_offset, member));
            }
        }
        members
            .iter()
            .filter(|m| m.name_off == 0)
            .find_map(|m| self.find_member(m.ty, name).map(|(off, inner)| (m.bit_offset + off, inner)))
    }

    /// Value of `name` in `enum owner` (ENUM or ENUM64).
    pub fn enum_value(&self, owner: &str, name: &str) -> Result<i64, BtfError> {
        let id = self
            .find(owner, |k| matches!(k, Kind::Enum { .. }))
            .ok_or_else(|| BtfError::NoType { kind: "enum", name: owner.to_string() })?;
        let Some(Kind::Enum { values, .. }) = self.kind(id) else { unreachable!("find returned an enum") };
        values
            .iter()
            .find(|(off, _)| self.name_at(*off) == name)
            .map(|(_, v)| *v)
            .ok_or_else(|| BtfError::NoEnumValue { owner: owner.to_string(), name: name.to_string() })
    }

    /// Parameter types of the function prototype a typedef points to
    /// (tracepoints are described as `typedef void (*btf_trace_X)(void *, ...)`).
    pub fn typedef_fn_params(&self, typedef: &str) -> Result<Vec<TypeId>, BtfError> {
        let missing = || BtfError::NoType { kind: "typedef", name: typedef.to_string() };
        let id = self.find(typedef, |k| matches!(k, Kind::Typedef(_))).ok_or_else(missing)?;
        let mut target = self.resolve(id);
        if let Some(Kind::Ptr(to)) = self.kind(target) {
            target = self.resolve(*to);
        }
        match self.kind(target) {
            Some(Kind::FuncProto { params, .. }) => Ok(params.iter().map(|(_, ty)| *ty).collect()),
            _ => Err(missing()),
        }
    }

    /// The parameter count of a function (BTF FUNC), if the kernel has it.
    pub fn function_params(&self, name: &str) -> Option<usize> {
        let id = self.find(name, |k| matches!(k, Kind::Func(_)))?;
        let Some(Kind::Func(proto)) = self.kind(id) else { return None };
        match self.kind(*proto) {
            Some(Kind::FuncProto { params, .. }) => Some(params.len()),
            _ => None,
        }
    }

    /// A short C-like description of a type, for error messages and checks:
    /// `struct sk_buff *`, `enum skb_drop_reason`, `void *`.
    pub fn describe(&self, id: TypeId) -> String {
        let id = self.resolve(id);
        match self.kind(id) {
            Some(Kind::Void) | None => "void".into(),
            Some(Kind::Ptr(to)) => format!("{} *", self.describe(*to)),
            Some(k @ (Kind::Struct { .. } | Kind::Union { .. } | Kind::Enum { .. })) => {
                format!("{} {}", k.label(), self.name(id))
            }
            Some(_) => self.name(id).to_string(),
        }
    }
}

/// Builds BTF blobs for tests: the same wire format the kernel writes.
#[cfg(test)]
pub mod build {
    #[derive(Default)]
    pub struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
        pub next_id: u32,
        str_base: u32,
    }

    impl Builder {
        pub fn new() -> Self {
            Builder { strings: vec![0], next_id: 1, ..Default::default() }
        }

        /// A builder for split BTF on top of a base with `base_types` ids
        /// (void included) and `base_strings` bytes of strings.
        pub fn split(base_types: u32, base_strings: u32) -> Self {
            Builder { next_id: base_types, str_base: base_strings, ..Default::default() }
        }

        pub fn string(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0; // offset 0 is the empty string, in base and split alike
            }
            let off = self.str_base + self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            off
        }

        fn push(&mut self, name: &str, kind: u32, vlen: u32, kind_flag: bool, size_or_type: u32, extra: &[u32]) -> u32 {
            let name_off = self.string(name);
            let info = (kind << 24) | vlen | if kind_flag { 1 << 31 } else { 0 };
            for word in [name_off, info, size_or_type].iter().chain(extra) {
                self.types.extend_from_slice(&word.to_le_bytes());
            }
            self.next_id += 1;
            self.next_id - 1
        }

        pub fn int(&mut self, name: &str, size: u32) -> u32 {
            self.push(name, 1, 0, false, size, &[size * 8])
        }

        pub fn ptr(&mut self, to: u32) -> u32 {
            self.push("", 2, 0, false, to, &[])
        }

        pub fn typedef(&mut self, name: &str, to: u32) -> u32 {
            self.push(name, 8, 0, false, to, &[])
        }

        /// `members`: (name, type, bit offset, bitfield size).
        pub fn composite(&mut self, union: bool, name: &str, size: u32, members: &[(&str, u32, u32, u32)]) -> u32 {
            let kind_flag = members.iter().any(|m| m.3 != 0);
            let mut extra = Vec::new();
            for (member, ty, bits, bitfield) in members {
                let off = self.string(member);
                let offset = if kind_flag { bitfield << 24 | bits } else { *bits };
                extra.extend([off, *ty, offset]);
            }
            self.push(name, if union { 5 } else { 4 }, members.len() as u32, kind_flag, size, &extra)
        }

        pub fn enumeration(&mut self, name: &str, values: &[(&str, i32)]) -> u32 {
            let mut extra = Vec::new();
            for (variant, value) in values {
                extra.extend([self.string(variant), *value as u32]);
            }
            self.push(name, 6, values.len() as u32, false, 4, &extra)
        }

        pub fn func_proto(&mut self, ret: u32, params: &[u32]) -> u32 {
            let extra: Vec<u32> = params.iter().flat_map(|p| [0, *p]).collect();
            self.push("", 13, params.len() as u32, false, ret, &extra)
        }

        pub fn func(&mut self, name: &str, proto: u32) -> u32 {
            self.push(name, 12, 0, false, proto, &[])
        }

        pub fn finish(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&0xeb9fu16.to_le_bytes());
            out.extend_from_slice(&[1, 0]);
            for word in [24u32, 0, self.types.len() as u32, self.types.len() as u32, self.strings.len() as u32] {
                out.extend_from_slice(&word.to_le_bytes());
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{build::Builder, *};

    /// struct inner { int a; int b; };
    /// struct outer { long x; union { struct inner in; long y; }; struct { int z; }; int bits:3; };
    fn sample() -> Vec<u8> {
        let mut b = Builder::new();
        let int = b.int("int", 4);
        let long = b.int("long", 8);
        let inner = b.composite(false, "inner", 8, &[("a", int, 0, 0), ("b", int, 32, 0)]);
        let anon_union = b.composite(true, "", 8, &[("in", inner, 0, 0), ("y", long, 0, 0)]);
        let anon_struct = b.composite(false, "", 4, &[("z", int, 0, 0)]);
        let inner_td = b.typedef("inner_t", inner);
        b.composite(
            false,
            "outer",
            32,
            &[
                ("x", long, 0, 0),
                ("", anon_union, 64, 0),
                ("", anon_struct, 128, 0),
                ("bits", int, 160, 3),
                ("t", inner_td, 192, 0),
            ],
        );
        b.enumeration("colour", &[("RED", 0), ("GREEN", 12)]);
        let ptr = b.ptr(inner);
        let void_ptr = b.ptr(0);
        let proto = b.func_proto(0, &[void_ptr, ptr, int]);
        let fp = b.ptr(proto);
        b.typedef("btf_trace_sample", fp);
        b.func("sample_fn", proto);
        b.finish()
    }

    #[test]
    fn offsets_through_anonymous_members_and_typedefs() {
        let btf = Btf::parse(&sample(), None).unwrap();
        assert_eq!(btf.member_offset("outer", "x").unwrap(), 0);
        assert_eq!(btf.member_offset("outer", "y").unwrap(), 8);
        assert_eq!(btf.member_offset("outer", "in.b").unwrap(), 12);
        assert_eq!(btf.member_offset("outer", "z").unwrap(), 16);
        assert_eq!(btf.member_offset("outer", "t.b").unwrap(), 28);
        assert_eq!(btf.struct_size("outer"), Some(32));
        assert_eq!(btf.struct_size("inner"), Some(8));
        assert_eq!(btf.struct_size("colour"), None, "an enum is not a struct");
    }

    #[test]
    fn missing_things_are_named_in_the_error() {
        let btf = Btf::parse(&sample(), None).unwrap();
        let err = btf.member_offset("outer", "in.nope").unwrap_err().to_string();
        assert!(err.contains("in.nope"), "{err}");
        assert!(matches!(btf.member_offset("nope", "x"), Err(BtfError::NoType { .. })));
        assert!(matches!(btf.member_offset("outer", "bits"), Err(BtfError::Bitfield { .. })));
        assert!(matches!(btf.enum_value("colour", "BLUE"), Err(BtfError::NoEnumValue { .. })));
    }

    #[test]
    fn enum_values_and_tracepoint_prototypes() {
        let btf = Btf::parse(&sample(), None).unwrap();
        assert_eq!(btf.enum_value("colour", "GREEN").unwrap(), 12);
        let params = btf.typedef_fn_params("btf_trace_sample").unwrap();
        let described: Vec<String> = params.iter().map(|p| btf.describe(*p)).collect();
        assert_eq!(described, ["void *", "struct inner *", "int"]);
        assert_eq!(btf.function_params("sample_fn"), Some(3));
        assert_eq!(btf.function_params("nope"), None);
    }

    #[test]
    fn split_btf_continues_ids_and_strings() {
        let base_bytes = sample();
        let base = Btf::parse(&base_bytes, None).unwrap();
        let base_strings = base.strings.len() as u32;
        let mut b = Builder::split(base.types.len() as u32, base_strings);
        // struct module_thing { struct inner i; int k; } using the base's `inner` (id 3).
        let int_id = 1;
        b.composite(false, "module_thing", 12, &[("i", 3, 0, 0), ("k", int_id, 64, 0)]);
        let split = Btf::parse(&b.finish(), Some(&base)).unwrap();
        assert_eq!(split.member_offset("module_thing", "i.b").unwrap(), 4);
        assert_eq!(split.member_offset("module_thing", "k").unwrap(), 8);
        // The base's types are still there.
        assert_eq!(split.member_offset("outer", "z").unwrap(), 16);
    }

    #[test]
    fn garbage_is_rejected_not_panicked_on() {
        assert!(Btf::parse(b"", None).is_err());
        assert!(Btf::parse(&[0u8; 64], None).is_err());
        let mut truncated = sample();
        truncated.truncate(40);
        assert!(Btf::parse(&truncated, None).is_err());
    }
}
