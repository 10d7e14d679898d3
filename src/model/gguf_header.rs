//! A walk over a GGUF header before candle parses it, skipping strings and scalar arrays
//! instead of reading them. Candle sizes its vectors by the header's own counts (an array
//! whose length lies may be read from the tensor data as millions of values) and divides by
//! `general.alignment` unchecked; the walk refuses such headers first, and names every
//! structural fault (with its byte offset) so that candle only ever parses a well-formed
//! header, from memory.

use anyhow::{bail, Result};
use candle_core::quantized::gguf_file::Value;
use std::io::{Read, Seek};
use std::path::Path;

/// Most memory the parsed header (metadata values, strings, tensor infos) may take. Real
/// headers take a few MiB (Qwen2.5's 151,643 tokens and 151,387 merges: about 20 MiB).
pub const MAX_HEADER_MEMORY: u64 = 256 << 20;

/// Bytes of one parsed metadata value.
const VALUE: u64 = std::mem::size_of::<Value>() as u64;
/// Bytes of one tensor info in candle's map (name, shape, dtype, offset, slot).
const TENSOR_INFO: u64 = 128;
/// Candle's limits: nesting of arrays, counts, dimensions.
const MAX_DEPTH: usize = 64;
const MAX_COUNT: u64 = 1 << 30;
const MAX_DIMS: u32 = 4;

type Step<T> = std::result::Result<T, String>;

struct Walk<R> {
    r: R,
    pos: u64,
    len: u64,
    /// Length prefixes are u64 (GGUF v2, v3) rather than u32 (v1).
    wide: bool,
    memory: u64,
}

impl<R: Read + Seek> Walk<R> {
    fn left(&self) -> u64 {
        self.len - self.pos
    }

    fn read<const N: usize>(&mut self) -> Step<[u8; N]> {
        let mut b = [0u8; N];
        if self.left() < N as u64 || self.r.read_exact(&mut b).is_err() {
            return Err(format!(
                "truncated: the file ends at byte {} inside the header",
                self.len
            ));
        }
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self) -> Step<u32> {
        Ok(u32::from_le_bytes(self.read()?))
    }

    fn length(&mut self) -> Step<u64> {
        match self.wide {
            true => Ok(u64::from_le_bytes(self.read()?)),
            false => self.u32().map(u64::from),
        }
    }

    fn prefix(&self) -> u64 {
        if self.wide {
            8
        } else {
            4
        }
    }

    /// Skips `n` bytes of something `what` that starts at `at`.
    fn skip(&mut self, n: u64, what: &str, at: u64) -> Step<()> {
        if n > self.left() {
            return Err(format!(
                "{what} at byte {at} needs {n} bytes but only {} are left (truncated, or a length that lies)",
                self.left()
            ));
        }
        self.r
            .seek_relative(n as i64)
            .map_err(|e| format!("cannot read: {e}"))?;
        self.pos += n;
        Ok(())
    }

    fn charge(&mut self, bytes: u64) -> Step<()> {
        self.memory = self.memory.saturating_add(bytes);
        if self.memory > MAX_HEADER_MEMORY {
            return Err(format!(
                "its header would take more than {} MiB in memory at byte {} (a count or length that lies?)",
                MAX_HEADER_MEMORY >> 20,
                self.pos
            ));
        }
        Ok(())
    }

    /// A string (raw bytes plus a lossy UTF-8 copy of up to 3 bytes per byte); its bytes
    /// when it is at most `keep` long.
    fn string(&mut self, keep: usize) -> Step<Option<Vec<u8>>> {
        let at = self.pos;
        let n = self.length()?;
        if n > self.left() {
            return Err(format!(
                "string at byte {at} claims {n} bytes but only {} are left",
                self.left()
            ));
        }
        self.charge(4 * n)?;
        if n as usize <= keep {
            let mut b = vec![0u8; n as usize];
            self.r
                .read_exact(&mut b)
                .map_err(|e| format!("cannot read: {e}"))?;
            self.pos += n;
            return Ok(Some(b));
        }
        self.skip(n, "string", at)?;
        Ok(None)
    }

    /// A value of GGUF type `t` (read at `at`); its integer value when it is an integer
    /// scalar of at most 32 bits.
    fn value(&mut self, t: u32, at: u64, depth: usize) -> Step<Option<i64>> {
        if depth > MAX_DEPTH {
            return Err(format!(
                "arrays nested deeper than {MAX_DEPTH} at byte {at}"
            ));
        }
        Ok(match t {
            0 => Some(self.read::<1>()?[0] as i64),
            1 => Some(self.read::<1>()?[0] as i8 as i64),
            2 => Some(u16::from_le_bytes(self.read()?) as i64),
            3 => Some(i16::from_le_bytes(self.read()?) as i64),
            4 => Some(self.u32()? as i64),
            5 => Some(self.u32()? as i32 as i64),
            7 => match self.read::<1>()?[0] {
                0 | 1 => None,
                b => return Err(format!("boolean at byte {} is {b}", self.pos - 1)),
            },
            6 | 10..=12 => {
                self.skip(scalar_size(t), "value", self.pos)?;
                None
            }
            8 => {
                self.string(0)?;
                None
            }
            9 => {
                let et = self.u32()?;
                let n = self.length()?;
                let least = match et {
                    0..=7 | 10..=12 => scalar_size(et),
                    8 => self.prefix(),
                    9 => 4 + self.prefix(),
                    _ => return Err(format!("unknown value type {et} at byte {at}")),
                };
                if n > MAX_COUNT || n.saturating_mul(least) > self.left() {
                    return Err(format!(
                        "array at byte {at} claims {n} elements but only {} bytes are left",
                        self.left()
                    ));
                }
                // a vector of n values, grown by doubling
                self.charge(n.saturating_mul(2 * VALUE))?;
                match et {
                    8 | 9 => {
                        for _ in 0..n {
                            let at = self.pos;
                            self.value(et, at, depth + 1)?;
                        }
                    }
                    7 => {
                        for _ in 0..n {
                            self.value(7, self.pos, depth + 1)?;
                        }
                    }
                    _ => self.skip(n * least, "array", at)?,
                }
                None
            }
            _ => return Err(format!("unknown value type {t} at byte {}", at)),
        })
    }

    fn header(&mut self) -> Step<()> {
        let magic = self.read::<4>()?;
        // candle takes the byte-swapped magic too (and reads the rest little-endian)
        if &magic != b"GGUF" && &magic != b"FUGG" {
            return Err(format!("it starts with bytes {magic:02x?}, not GGUF"));
        }
        self.wide = match self.u32()? {
            1 => false,
            2 | 3 => true,
            v => return Err(format!("unsupported GGUF version {v}")),
        };
        let tensors = self.length()?;
        let kvs = self.length()?;
        let least = kvs
            .saturating_mul(self.prefix() + 5)
            .saturating_add(tensors.saturating_mul(self.prefix() + 16));
        if tensors > MAX_COUNT || kvs > MAX_COUNT || least > self.left() {
            return Err(format!(
                "the header claims {tensors} tensors and {kvs} metadata entries, more than its {} bytes hold",
                self.len
            ));
        }
        for _ in 0..kvs {
            let key = self.string(64)?;
            self.charge(2 * (VALUE + 24))?;
            let at = self.pos;
            let t = self.u32()?;
            let v = self.value(t, at, 0)?;
            if key.as_deref() == Some(b"general.alignment".as_slice()) && v == Some(0) {
                return Err("general.alignment is 0".into());
            }
        }
        for i in 0..tensors {
            let at = self.pos;
            let name = self.string(256)?;
            let name = name.map_or(format!("#{i}"), |n| String::from_utf8_lossy(&n).into());
            self.charge(TENSOR_INFO)?;
            let dims = self.u32()?;
            if dims > MAX_DIMS {
                return Err(format!(
                    "tensor {name} (byte {at}) has {dims} dimensions, at most {MAX_DIMS}"
                ));
            }
            let mut numel = Some(1u64);
            for _ in 0..dims {
                let d = self.length()?;
                numel = numel.and_then(|n| n.checked_mul(d));
            }
            self.read::<12>()?; // dtype, offset: checked by candle and the file bounds
            if numel.is_none_or(|n| n > usize::MAX as u64) {
                return Err(format!(
                    "tensor {name}: its dimensions multiply beyond 2^64 elements"
                ));
            }
        }
        Ok(())
    }
}

fn scalar_size(t: u32) -> u64 {
    match t {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        _ => 8,
    }
}

/// Walks the header of `r` (a file of `len` bytes at `path`, positioned at its start);
/// returns where the tensor infos end, or an error naming the file and the first fault.
pub fn check(r: &mut (impl Read + Seek), len: u64, path: &Path) -> Result<u64> {
    let mut w = Walk {
        r,
        pos: 0,
        len,
        wide: true,
        memory: 0,
    };
    match w.header() {
        Ok(()) => Ok(w.pos),
        Err(why) => bail!("{}: not a valid GGUF file: {why}", path.display()),
    }
}
