//! Memory budgets: how much this process may use (`--mem-limit`, by default 80% of what is
//! available, respecting cgroup and address-space limits), what a model's weights and a
//! forward or forward+backward will take, and the one-line plan each command prints.

use crate::model::{Model, Weight};
use anyhow::{bail, Result};
use std::fmt;

/// One GiB.
pub const GIB: f64 = (1u64 << 30) as f64;

/// Parses a size: a number with an optional binary suffix K, M, G or T (`16G`, `800M`,
/// `1.5G`, `123456` bytes).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => bail!("'{s}': unknown size suffix '{c}' (K, M, G or T)"),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let x: f64 = num
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("'{s}' is not a size (e.g. 16G, 800M)"))?;
    if !x.is_finite() || x <= 0.0 {
        bail!("'{s}': a size must be positive");
    }
    Ok((x * mult as f64) as u64)
}

/// Bytes this process can use now: the least of the memory available on the machine,
/// the cgroup's headroom and the address-space limit.
pub fn available_bytes() -> u64 {
    let mut avail = meminfo_available().unwrap_or(u64::MAX);
    if let Some(c) = cgroup_headroom() {
        avail = avail.min(c);
    }
    if let Some(a) = address_space_limit() {
        avail = avail.min(a);
    }
    avail
}

/// The default `--mem-limit`: 80% of [`available_bytes`].
pub fn default_limit() -> u64 {
    (available_bytes() as f64 * 0.8) as u64
}

/// `--mem-limit` if given, else the default.
pub fn limit_or_default(flag: Option<&str>) -> Result<u64> {
    match flag {
        Some(s) => parse_size(s).map_err(|e| anyhow::anyhow!("--mem-limit: {e}")),
        None => Ok(default_limit()),
    }
}

fn meminfo_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// cgroup v2 `memory.max − memory.current` (or v1's limit − usage) of this process's cgroup.
fn cgroup_headroom() -> Option<u64> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let num = |s: Option<String>| s.and_then(|s| s.trim().parse::<u64>().ok());
    let rel = read("/proc/self/cgroup")?
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_string))
        .unwrap_or_default();
    let base = format!("/sys/fs/cgroup{}", rel.trim_end_matches('/'));
    if let Some(max) = num(read(&format!("{base}/memory.max"))) {
        let cur = num(read(&format!("{base}/memory.current"))).unwrap_or(0);
        return Some(max.saturating_sub(cur));
    }
    let max = num(read("/sys/fs/cgroup/memory/memory.limit_in_bytes"))?;
    if max >= 1 << 60 {
        return None;
    }
    let cur = num(read("/sys/fs/cgroup/memory/memory.usage_in_bytes")).unwrap_or(0);
    Some(max.saturating_sub(cur))
}

/// The soft RLIMIT_AS, when one is set.
fn address_space_limit() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = s.lines().find(|l| l.starts_with("Max address space"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Peak resident set size of this process so far, in bytes (VmHWM).
pub fn peak_rss_bytes() -> u64 {
    (crate::bench::peak_rss_mb() * 1e6) as u64
}

/// What one model costs, in bytes.
#[derive(Clone, Copy, Debug)]
pub struct ModelCost {
    /// Weights as held: dense values plus the mapped encodings the process keeps resident.
    pub weights: u64,
    /// f32 values of the largest decoded matrix of a layer (a mapped model decodes one at a
    /// time; the backward may hold two).
    pub decoded_matrix: u64,
    /// Parameters per decoder layer.
    pub layer_params: u64,
}

impl ModelCost {
    /// The costs of `model` as loaded.
    pub fn of(model: &Model) -> ModelCost {
        let c = &model.config;
        let h = c.hidden_size as u64;
        let layer_params: u64 = model
            .params
            .iter()
            .filter(|p| p.name.starts_with("model.layers.0."))
            .map(|p| p.elem_count() as u64)
            .sum();
        let mapped_layer: u64 = model
            .params
            .iter()
            .filter(|p| p.name.starts_with("model.layers.0."))
            .filter_map(|p| p.mapped().map(|m| m.bytes() as u64))
            .sum();
        let mut weights = 0u64;
        for p in &model.params {
            weights += match &p.weight {
                Weight::Dense(v) => (v.elem_count() * v.dtype().size_in_bytes()) as u64,
                Weight::Mapped(m) if !model.releases_pages() => m.bytes() as u64,
                Weight::Mapped(_) => 0,
            };
        }
        if model.releases_pages() {
            // about one layer's pages and one head block's stay mapped at a time
            weights += 2 * mapped_layer + crate::model::HEAD_BLOCK_BYTES as u64;
        }
        let decoded_matrix = if model.is_dense() {
            0
        } else {
            4 * h * (c.intermediate_size as u64).max(c.num_heads as u64 * c.head_dim as u64)
        };
        ModelCost {
            weights,
            decoded_matrix,
            layer_params,
        }
    }
}

/// Bytes of activations a forward over `b` windows of `t` tokens holds at its peak (one
/// layer's intermediates, the logits and their softmax).
pub fn forward_bytes(model: &Model, b: usize, t: usize) -> u64 {
    let c = &model.config;
    let n = (b * t) as u64;
    let layer = 4 * n * (4 * c.hidden_size as u64 + 3 * c.intermediate_size as u64)
        + 4 * n * 3 * (c.num_heads * c.head_dim) as u64;
    let logits = 4 * n * c.vocab_size as u64 * 2;
    layer + logits + ModelCost::of(model).decoded_matrix
}

/// Bytes one layer's tape takes in the manual backward (`b` windows of `t` tokens).
pub fn tape_bytes_per_layer(model: &Model, b: usize, t: usize) -> u64 {
    let c = &model.config;
    let n = (b * t) as u64;
    let q = (c.num_heads * c.head_dim) as u64;
    let kv = (c.num_kv_heads * c.head_dim) as u64;
    4 * n * (4 * c.hidden_size as u64 + 2 * q + 2 * kv + 3 * c.intermediate_size as u64)
}

/// Extra bytes of the backward beyond the tapes: the logits' gradient, a weight gradient
/// and its decoded weight.
pub fn backward_extra_bytes(model: &Model, b: usize, t: usize) -> u64 {
    let c = &model.config;
    let n = (b * t) as u64;
    let big = 4 * c.hidden_size as u64 * c.intermediate_size as u64;
    4 * n * c.vocab_size as u64 + 2 * big + ModelCost::of(model).decoded_matrix
}

/// A command's memory plan, printed on stderr before it starts.
pub struct Plan {
    pub limit: u64,
    /// Named parts of the expected peak, in bytes.
    pub parts: Vec<(String, u64)>,
    /// Extra words (passes, layers per pass).
    pub note: String,
}

impl Plan {
    /// The expected peak: the sum of the parts.
    pub fn peak(&self) -> u64 {
        self.parts.iter().map(|(_, b)| b).sum()
    }

    /// Errors with the arithmetic when the peak exceeds the limit.
    pub fn check(&self, what: &str) -> Result<()> {
        if self.peak() > self.limit {
            bail!(
                "--mem-limit {:.2} GiB is too small for {what}: {self}",
                self.limit as f64 / GIB
            );
        }
        Ok(())
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .parts
            .iter()
            .map(|(n, b)| format!("{n} {:.2}", *b as f64 / GIB))
            .collect();
        write!(
            f,
            "memory plan: {} GiB = peak ~{:.2} GiB of limit {:.2} GiB",
            parts.join(" + "),
            self.peak() as f64 / GIB,
            self.limit as f64 / GIB
        )?;
        if !self.note.is_empty() {
            write!(f, "; {}", self.note)?;
        }
        Ok(())
    }
}

/// The plan of a forward-only command (ppl, generate, ablate, dims…) over `b` windows of
/// `t` tokens.
pub fn forward_plan(model: &Model, b: usize, t: usize, limit: u64) -> Plan {
    let cost = ModelCost::of(model);
    Plan {
        limit,
        parts: vec![
            (weights_label(model), cost.weights),
            ("activations".into(), forward_bytes(model, b, t)),
        ],
        note: String::new(),
    }
}

/// "weights (mapped Q4K…)" or "weights (dense f32)".
pub fn weights_label(model: &Model) -> String {
    let mut kinds: Vec<String> = model
        .params
        .iter()
        .filter_map(|p| p.mapped().map(|m| format!("{:?}", m.dtype)))
        .collect();
    kinds.sort();
    kinds.dedup();
    if kinds.is_empty() {
        "weights (dense f32)".into()
    } else {
        format!("weights (mapped {})", kinds.join("/"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("16G").unwrap(), 16 << 30);
        assert_eq!(parse_size("800M").unwrap(), 800 << 20);
        assert_eq!(parse_size("1.5g").unwrap(), 3 << 29);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        for bad in ["", "G", "-1G", "0", "12X", "nanG", "abc"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn availability_is_positive_and_below_ram() {
        let a = available_bytes();
        assert!(a > 0);
        assert!(a <= meminfo_available().unwrap_or(u64::MAX));
        assert!(default_limit() < a);
    }
}
