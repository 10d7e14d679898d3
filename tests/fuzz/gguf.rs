//! Where the fields of a GGUF (v2/v3) header lie, and seeded mutations of them: integer
//! fields set to 0, 1, −1, huge or a lying nearby value, value types swapped, byte flips,
//! truncation inside the header.

use rand::rngs::StdRng;
use rand::Rng;

/// What a header field holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Count,
    KeyLen,
    ValueType,
    Scalar,
    StrLen,
    ArrType,
    ArrLen,
    NameLen,
    NDims,
    Dim,
    DType,
    Offset,
}

pub const KINDS: [Kind; 12] = [
    Kind::Count,
    Kind::KeyLen,
    Kind::ValueType,
    Kind::Scalar,
    Kind::StrLen,
    Kind::ArrType,
    Kind::ArrLen,
    Kind::NameLen,
    Kind::NDims,
    Kind::Dim,
    Kind::DType,
    Kind::Offset,
];

/// One field: byte offset, width (1, 2, 4 or 8 bytes), kind.
#[derive(Clone, Copy, Debug)]
pub struct Field {
    pub at: usize,
    pub size: usize,
    pub kind: Kind,
}

/// The fields of a header and where the tensor infos end.
pub struct Layout {
    pub fields: Vec<Field>,
    pub end: usize,
}

struct Walk<'a> {
    b: &'a [u8],
    pos: usize,
    fields: Vec<Field>,
}

impl Walk<'_> {
    fn field(&mut self, size: usize, kind: Kind, record: bool) -> u64 {
        let mut v = [0u8; 8];
        v[..size].copy_from_slice(&self.b[self.pos..self.pos + size]);
        if record {
            self.fields.push(Field {
                at: self.pos,
                size,
                kind,
            });
        }
        self.pos += size;
        u64::from_le_bytes(v)
    }

    fn string(&mut self, kind: Kind, record: bool) {
        let n = self.field(8, kind, record) as usize;
        self.pos += n;
    }

    fn value(&mut self, t: u64, record: bool) {
        match t {
            0 | 1 | 7 => drop(self.field(1, Kind::Scalar, record)),
            2 | 3 => drop(self.field(2, Kind::Scalar, record)),
            4..=6 => drop(self.field(4, Kind::Scalar, record)),
            10..=12 => drop(self.field(8, Kind::Scalar, record)),
            8 => self.string(Kind::StrLen, record),
            9 => {
                let et = self.field(4, Kind::ArrType, record);
                let n = self.field(8, Kind::ArrLen, record);
                // the first elements and every 1024th: the vocabulary must not drown the rest
                for i in 0..n {
                    self.value(et, record && (i < 32 || i % 1024 == 0));
                }
            }
            _ => panic!("unknown GGUF value type {t}"),
        }
    }
}

/// The fields of a GGUF v2/v3 header (the test's own input: panics when it is not one).
pub fn layout(b: &[u8]) -> Layout {
    assert_eq!(&b[..4], b"GGUF");
    let mut w = Walk {
        b,
        pos: 8,
        fields: Vec::new(),
    };
    let tensors = w.field(8, Kind::Count, true);
    let kvs = w.field(8, Kind::Count, true);
    for _ in 0..kvs {
        w.string(Kind::KeyLen, true);
        let t = w.field(4, Kind::ValueType, true);
        w.value(t, true);
    }
    for _ in 0..tensors {
        w.string(Kind::NameLen, true);
        let n = w.field(4, Kind::NDims, true);
        for _ in 0..n {
            w.field(8, Kind::Dim, true);
        }
        w.field(4, Kind::DType, true);
        w.field(8, Kind::Offset, true);
    }
    Layout {
        fields: w.fields,
        end: w.pos,
    }
}

/// A value for an integer field of `size` bytes that held `v`, at byte `at` of a file of
/// `len` bytes: 0, 1, −1, extremes, the file length, a random length that fits what
/// remains, or a value lying by a little.
pub fn int_value(rng: &mut StdRng, kind: Kind, v: u64, size: usize, at: usize, len: u64) -> u64 {
    let remaining = len.saturating_sub(at as u64).max(1);
    let x = match rng.gen_range(0..18) {
        0 => 0,
        1 => 1,
        2 => u64::MAX,
        3 => 1 << (size * 8 - 1),
        4 => (1 << (size * 8 - 1)) - 1,
        5 => u32::MAX as u64,
        6 => 1 << 32,
        7 => 1 << 62,
        8 => len,
        9 => rng.gen_range(0..remaining),
        // a length that the rest of the file could hold, log-uniform
        10 => remaining >> rng.gen_range(0..24),
        11 => v.wrapping_add(rng.gen_range(1..=8)),
        12 => v.wrapping_sub(rng.gen_range(1..=8)),
        13 => v.wrapping_mul(2),
        14 => v / 2,
        15 => rng.gen(),
        // types and dimension counts: small numbers, valid and not
        _ if matches!(
            kind,
            Kind::ValueType | Kind::ArrType | Kind::DType | Kind::NDims
        ) =>
        {
            rng.gen_range(0..40)
        }
        _ => v ^ (1 << rng.gen_range(0..size * 8)),
    };
    if size == 8 {
        x
    } else {
        x & ((1u64 << (size * 8)) - 1)
    }
}

/// One mutation: bytes to write at offsets of the file, or a truncation.
pub enum Mutation {
    Write(Vec<(usize, Vec<u8>)>),
    Truncate(usize),
}

/// A metadata key renamed to another key of the same length (a duplicate) or to
/// `general.alignment`, its integer value sometimes set to 0.
fn rename_key(rng: &mut StdRng, b: &[u8], l: &Layout) -> (Mutation, String) {
    let key = |f: &Field| {
        let n = u64::from_le_bytes(b[f.at..f.at + 8].try_into().unwrap()) as usize;
        (f.at + 8, &b[f.at + 8..f.at + 8 + n])
    };
    let keys: Vec<(usize, &[u8])> = l
        .fields
        .iter()
        .filter(|f| f.kind == Kind::KeyLen)
        .map(key)
        .collect();
    let align: &[u8] = b"general.alignment";
    let renamable: Vec<&(usize, &[u8])> = keys
        .iter()
        .filter(|(_, k)| {
            keys.iter().any(|(_, o)| o.len() == k.len() && o != k) || k.len() == align.len()
        })
        .collect();
    let &(at, old) = renamable[rng.gen_range(0..renamable.len())];
    let mut to: Vec<&[u8]> = keys
        .iter()
        .map(|k| k.1)
        .filter(|o| o.len() == old.len() && *o != old)
        .collect();
    if old.len() == align.len() {
        to.push(align);
        to.push(align);
    }
    let new = to[rng.gen_range(0..to.len())];
    let mut w = vec![(at, new.to_vec())];
    let vt = u32::from_le_bytes(b[at + old.len()..at + old.len() + 4].try_into().unwrap());
    if vt == 4 && rng.gen_bool(0.5) {
        w.push((at + old.len() + 4, 0u32.to_le_bytes().to_vec()));
    }
    let d = format!(
        "key {} renamed {}{}",
        String::from_utf8_lossy(old),
        String::from_utf8_lossy(new),
        if w.len() > 1 { ", value 0" } else { "" }
    );
    (Mutation::Write(w), d)
}

/// A seeded mutation of the header `b` (whose fields are `l`) of a file of `len` bytes,
/// and its description.
pub fn mutate(rng: &mut StdRng, b: &[u8], l: &Layout, len: u64) -> (Mutation, String) {
    match rng.gen_range(0..11) {
        10 => rename_key(rng, b, l),
        0..=5 => {
            let kind = KINDS[rng.gen_range(0..KINDS.len())];
            let of_kind: Vec<&Field> = l.fields.iter().filter(|f| f.kind == kind).collect();
            let f = *of_kind[rng.gen_range(0..of_kind.len())];
            let mut old = [0u8; 8];
            old[..f.size].copy_from_slice(&b[f.at..f.at + f.size]);
            let v = u64::from_le_bytes(old);
            let x = int_value(rng, kind, v, f.size, f.at, len);
            let bytes = x.to_le_bytes()[..f.size].to_vec();
            let d = format!("{kind:?} at byte {} ({v} -> {x})", f.at);
            (Mutation::Write(vec![(f.at, bytes)]), d)
        }
        6..=8 => {
            // byte flips: in the first 2 KiB (counts, config keys), anywhere, or in the tensor infos
            let (lo, hi) = match rng.gen_range(0..3) {
                0 => (0, 2048.min(l.end)),
                1 => (0, l.end),
                _ => (l.end.saturating_sub(16 << 10), l.end),
            };
            let n = rng.gen_range(1..=4);
            let w: Vec<(usize, Vec<u8>)> = (0..n)
                .map(|_| {
                    let at = rng.gen_range(lo..hi);
                    (at, vec![b[at] ^ rng.gen_range(1..=255u8)])
                })
                .collect();
            let at: Vec<usize> = w.iter().map(|x| x.0).collect();
            (Mutation::Write(w), format!("byte flips at {at:?}"))
        }
        _ => {
            let cut = rng.gen_range(0..l.end);
            (Mutation::Truncate(cut), format!("truncated at byte {cut}"))
        }
    }
}
