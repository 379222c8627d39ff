//! Just enough of BTF (the kernel's type information, /sys/kernel/btf/vmlinux) to find a struct
//! member's byte offset: the `skb:kfree_skb` program reads `struct sk_buff` at the running kernel's
//! offsets. Members of anonymous structs and unions (`struct_group`) are searched through.

use std::collections::HashMap;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("not BTF: {0}")]
    Format(&'static str),
    #[error("struct {0} is not in the kernel's BTF")]
    NoStruct(String),
    #[error("struct {strukt} has no member {member} in the kernel's BTF")]
    NoMember { strukt: String, member: String },
    #[error("{strukt}.{member} is a bitfield")]
    Bitfield { strukt: String, member: String },
}

const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

struct Member {
    name: u32,
    ty: u32,
    /// Bit offset, and the bitfield size (0: not a bitfield).
    bit_offset: u32,
    bitfield: u32,
}

struct Type {
    name: u32,
    kind: u32,
    /// The referenced type (typedef, const, ...).
    ty: u32,
    members: Vec<Member>,
}

/// The types of one BTF blob (type id = index + 1).
pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
    by_name: HashMap<Vec<u8>, u32>,
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, BtfError> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(BtfError::Format("truncated"))
}

impl Btf {
    /// Parses a little-endian BTF blob.
    pub fn parse(b: &[u8]) -> Result<Self, BtfError> {
        if b.len() < 24 || b[0..2] != [0x9f, 0xeb] {
            return Err(BtfError::Format("bad magic (or not little-endian)"));
        }
        let hdr_len = u32_at(b, 4)? as usize;
        let (type_off, type_len) = (u32_at(b, 8)? as usize, u32_at(b, 12)? as usize);
        let (str_off, str_len) = (u32_at(b, 16)? as usize, u32_at(b, 20)? as usize);
        let types_at = hdr_len + type_off;
        let strs_at = hdr_len + str_off;
        let strings = b
            .get(strs_at..strs_at + str_len)
            .ok_or(BtfError::Format("string section out of bounds"))?
            .to_vec();
        let end = types_at + type_len;
        if end > b.len() {
            return Err(BtfError::Format("type section out of bounds"));
        }
        let mut types = vec![];
        let mut off = types_at;
        while off < end {
            let name = u32_at(b, off)?;
            let info = u32_at(b, off + 4)?;
            let ty = u32_at(b, off + 8)?;
            off += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kflag = info >> 31 == 1;
            let mut members = vec![];
            off += match kind {
                1 => 4,  // INT
                3 => 12, // ARRAY
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = off + i * 12;
                        let raw = u32_at(b, m + 8)?;
                        let (bit_offset, bitfield) = if kflag {
                            (raw & 0x00ff_ffff, raw >> 24)
                        } else {
                            (raw, 0)
                        };
                        members.push(Member {
                            name: u32_at(b, m)?,
                            ty: u32_at(b, m + 4)?,
                            bit_offset,
                            bitfield,
                        });
                    }
                    vlen * 12
                }
                6 => vlen * 8,             // ENUM
                13 => vlen * 8,            // FUNC_PROTO
                14 => 4,                   // VAR
                15 => vlen * 12,           // DATASEC
                17 => 4,                   // DECL_TAG
                19 => vlen * 12,           // ENUM64
                2 | 7..=12 | 16 | 18 => 0, // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
                _ => return Err(BtfError::Format("unknown type kind")),
            };
            types.push(Type {
                name,
                kind,
                ty,
                members,
            });
        }
        let mut btf = Self {
            types,
            strings,
            by_name: HashMap::new(),
        };
        for (i, t) in btf.types.iter().enumerate() {
            if t.kind == KIND_STRUCT && t.name != 0 {
                let name = btf.string(t.name).to_vec();
                btf.by_name.entry(name).or_insert(i as u32 + 1);
            }
        }
        Ok(btf)
    }

    /// The running kernel's BTF.
    pub fn vmlinux() -> std::io::Result<Self> {
        let bytes = std::fs::read("/sys/kernel/btf/vmlinux")?;
        Self::parse(&bytes).map_err(std::io::Error::other)
    }

    fn string(&self, off: u32) -> &[u8] {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        &rest[..rest.iter().position(|&c| c == 0).unwrap_or(rest.len())]
    }

    fn ty(&self, id: u32) -> Option<&Type> {
        self.types.get((id as usize).checked_sub(1)?)
    }

    /// Follows typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.ty(id)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.ty
                }
                _ => return Some(t),
            }
        }
        None
    }

    /// Byte offset of `member` in `struct strukt`, looking through anonymous struct/union members.
    pub fn member_offset(&self, strukt: &str, member: &str) -> Result<u32, BtfError> {
        self.path_offset(strukt, &[member])
    }

    /// Byte offset of a nested member (`sock`, `["__sk_common", "skc_net"]`): each step a named
    /// member of the previous one's struct or union type (anonymous ones looked through).
    pub fn path_offset(&self, strukt: &str, path: &[&str]) -> Result<u32, BtfError> {
        let id = *self
            .by_name
            .get(strukt.as_bytes())
            .ok_or_else(|| BtfError::NoStruct(strukt.to_owned()))?;
        let mut t = self.ty(id).ok_or(BtfError::Format("bad type id"))?;
        let mut bits = 0;
        let name = || format!("{strukt}.{}", path.join("."));
        for (i, member) in path.iter().enumerate() {
            let (off, bitfield, ty) =
                self.find(t, member.as_bytes(), 0, 0)
                    .ok_or_else(|| BtfError::NoMember {
                        strukt: strukt.to_owned(),
                        member: path[..=i].join("."),
                    })?;
            if bitfield != 0 {
                return Err(BtfError::Bitfield {
                    strukt: strukt.to_owned(),
                    member: path.join("."),
                });
            }
            bits += off;
            if i + 1 < path.len() {
                t = self
                    .resolve(ty)
                    .filter(|t| t.kind == KIND_STRUCT || t.kind == KIND_UNION)
                    .ok_or_else(|| BtfError::NoMember {
                        strukt: strukt.to_owned(),
                        member: format!("{} (not a struct)", name()),
                    })?;
            }
        }
        if bits % 8 != 0 {
            return Err(BtfError::Bitfield {
                strukt: strukt.to_owned(),
                member: path.join("."),
            });
        }
        Ok(bits / 8)
    }

    /// (bit offset, bitfield size, type) of `name` in `t`.
    fn find(&self, t: &Type, name: &[u8], base: u32, depth: u32) -> Option<(u32, u32, u32)> {
        if depth > 8 {
            return None;
        }
        for m in &t.members {
            if m.name != 0 && self.string(m.name) == name {
                return Some((base + m.bit_offset, m.bitfield, m.ty));
            }
        }
        for m in t.members.iter().filter(|m| m.name == 0) {
            if let Some(inner) = self.resolve(m.ty)
                && (inner.kind == KIND_STRUCT || inner.kind == KIND_UNION)
                && let Some(found) = self.find(inner, name, base + m.bit_offset, depth + 1)
            {
                return Some(found);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-built blob: struct s { int a; union { struct { short b; }; int c; }; }.
    fn blob() -> Vec<u8> {
        let strings = b"\0s\0a\0b\0c\0int\0short\0".to_vec();
        let (s, a, b, c, int, short) = (1u32, 3u32, 5u32, 7u32, 9u32, 13u32);
        let mut types: Vec<u32> = vec![];
        // 1: int (INT, 4 bytes)
        types.extend([int, 1 << 24, 4, 32]);
        // 2: short
        types.extend([short, 1 << 24, 2, 16]);
        // 3: anonymous struct { short b; } at 0
        types.extend([0, (KIND_STRUCT << 24) | 1, 2, b, 2, 0]);
        // 4: anonymous union { struct 3; int c; }
        types.extend([0, (KIND_UNION << 24) | 2, 4, 0, 3, 0, c, 1, 0]);
        // 5: struct s { int a; union 4 at 32 bits }
        types.extend([s, (KIND_STRUCT << 24) | 2, 8, a, 1, 0, 0, 4, 32]);
        let type_bytes: Vec<u8> = types.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut out = vec![0x9f, 0xeb, 1, 0];
        for v in [
            24u32,
            0,
            type_bytes.len() as u32,
            type_bytes.len() as u32,
            strings.len() as u32,
        ] {
            out.extend(v.to_le_bytes());
        }
        out.extend(type_bytes);
        out.extend(strings);
        out
    }

    #[test]
    fn members_are_found_through_anonymous_structs_and_unions() {
        let btf = Btf::parse(&blob()).unwrap();
        assert_eq!(btf.member_offset("s", "a"), Ok(0));
        assert_eq!(btf.member_offset("s", "b"), Ok(4));
        assert_eq!(btf.member_offset("s", "c"), Ok(4));
        assert!(matches!(
            btf.member_offset("s", "d"),
            Err(BtfError::NoMember { .. })
        ));
        // A path through named members: s.a is an int, not a struct.
        assert!(matches!(
            btf.path_offset("s", &["a", "b"]),
            Err(BtfError::NoMember { .. })
        ));
        assert!(matches!(
            btf.member_offset("t", "a"),
            Err(BtfError::NoStruct(_))
        ));
    }

    #[test]
    fn garbage_is_refused() {
        assert!(Btf::parse(b"hello, this is not BTF at all").is_err());
        let mut b = blob();
        b.truncate(40);
        assert!(Btf::parse(&b).is_err());
    }

    #[test]
    fn the_running_kernel_has_sk_buff_head_and_network_header() {
        // Every kernel vpcgate supports has BTF (README, Requirements); without it this test says so.
        let btf = Btf::vmlinux().expect("/sys/kernel/btf/vmlinux");
        let head = btf.member_offset("sk_buff", "head").unwrap();
        let nh = btf.member_offset("sk_buff", "network_header").unwrap();
        assert!(head > 0 && nh > 0 && head != nh);
        assert!(btf.member_offset("net_device", "ifindex").unwrap() > 0);
        let skc_net = btf
            .path_offset("sock", &["__sk_common", "skc_net"])
            .unwrap();
        let inum = btf.path_offset("net", &["ns", "inum"]).unwrap();
        assert!(skc_net > 0 && inum > 0);
    }
}
