//! Memory budgets: how much this process may use (`--mem-limit`, by default 80% of what is
//! available, respecting cgroup and address-space limits), what a model's weights and a
//! forward or forward+backward will take, and the one-line plan each command prints.

use crate::model::{Model, Weight};
use anyhow::{bail, Result};
use std::fmt;

/// One GiB.
pub const GIB: f64 = (1u64 << 30) as f64;

/// A size for messages: `18.40 GiB`, `800.0 MiB` below one GiB, `64.0 KiB` below one MiB.
pub fn fmt_size(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= GIB {
        format!("{:.2} GiB", b / GIB)
    } else if bytes >= 1 << 20 {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

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
                "--mem-limit {} is too small for {what}: {self}",
                fmt_size(self.limit)
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

/// The plan of a command that edits and writes a model without running it (`perturb`): the
/// weights, plus one tensor at a time decoded to f32, copied to f64 while edited and encoded
/// while written.
pub fn edit_plan(model: &Model, limit: u64) -> Plan {
    let largest = model
        .params
        .iter()
        .map(|p| p.elem_count() as u64)
        .max()
        .unwrap_or(0);
    Plan {
        limit,
        parts: vec![
            (weights_label(model), ModelCost::of(model).weights),
            ("one tensor being written".into(), 16 * largest),
        ],
        note: String::new(),
    }
}

/// What training takes (`train`, `forget`), computed before a mapped model is decoded into
/// f32: per parameter 4 bytes of f32 weights per copy held, 4 of gradients (8 while
/// micro-batches accumulate), 8 of AdamW moments for every tensor with a trainable entry
/// (the moments are dense per tensor), plus one micro-batch's activations (forward, tapes of
/// every layer, backward).
#[derive(Clone, Copy, Debug)]
pub struct TrainNeed {
    /// Parameters of the model.
    pub params: u64,
    /// Parameters in tensors that get AdamW moments (not entirely frozen).
    pub trainable: u64,
    /// f32 copies of the weights held at once (the trained one, and a base for `forget`).
    pub copies: u64,
    /// Gradient sets held at once (2 with gradient accumulation).
    pub grad_sets: u64,
    /// Activation bytes of one micro-batch.
    pub activations: u64,
}

impl TrainNeed {
    /// The need of training `model` on micro-batches of `b` windows of `t` tokens;
    /// `trainable[i]` says whether parameter `i` has an entry that is not frozen.
    pub fn of(
        model: &Model,
        trainable: &[bool],
        b: usize,
        t: usize,
        grad_accum: usize,
        copies: u64,
    ) -> TrainNeed {
        let layers = model.config.num_layers as u64;
        // the model trains dense: no decoded matrices beside the weights
        let decoded = ModelCost::of(model).decoded_matrix;
        let activations = (forward_bytes(model, b, t) + backward_extra_bytes(model, b, t))
            .saturating_sub(2 * decoded)
            + layers * tape_bytes_per_layer(model, b, t);
        TrainNeed {
            params: model.num_params() as u64,
            trainable: model
                .params
                .iter()
                .zip(trainable)
                .filter(|(_, &t)| t)
                .map(|(p, _)| p.elem_count() as u64)
                .sum(),
            copies,
            grad_sets: if grad_accum > 1 { 2 } else { 1 },
            activations,
        }
    }

    /// Bytes per parameter of weights and gradients.
    fn per_param(&self) -> u64 {
        4 * self.copies + 4 * self.grad_sets
    }

    /// Total bytes.
    pub fn total(&self) -> u64 {
        self.params * self.per_param() + 8 * self.trainable + self.activations
    }

    /// The plan line's parts.
    pub fn plan(&self, limit: u64) -> Plan {
        Plan {
            limit,
            parts: vec![
                ("weights (dense f32)".into(), 4 * self.copies * self.params),
                ("gradients".into(), 4 * self.grad_sets * self.params),
                ("AdamW moments".into(), 8 * self.trainable),
                ("activations".into(), self.activations),
            ],
            note: String::new(),
        }
    }

    /// Errors with the arithmetic when training `what` (a model's name) needs more than
    /// `limit` bytes.
    pub fn check(&self, limit: u64, what: &str) -> Result<()> {
        if self.total() <= limit {
            return Ok(());
        }
        let params = if self.trainable == self.params {
            format!(
                "{:.1e} parameters × {} bytes",
                self.params as f64,
                self.per_param() + 8
            )
        } else {
            format!(
                "{:.1e} parameters × {} bytes + {:.1e} in trainable tensors × 8 bytes of AdamW moments",
                self.params as f64,
                self.per_param(),
                self.trainable as f64
            )
        };
        bail!(
            "--mem-limit {}: training {what} needs ~{:.1} GiB ({params} + activations {:.1} GiB); train a smaller model or use a machine with more memory",
            fmt_size(limit),
            self.total() as f64 / GIB,
            self.activations as f64 / GIB
        )
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
    fn training_need_is_the_arithmetic() {
        use crate::model::{Arch, Config};
        let m = Model::random(Config::tiny(Arch::Llama), candle_core::DType::F32, 0).unwrap();
        let n = m.num_params() as u64;
        let all = TrainNeed::of(&m, &vec![true; m.params.len()], 1, 8, 1, 1);
        assert!(all.activations > 0);
        assert_eq!(all.total(), 16 * n + all.activations);
        assert_eq!(all.plan(u64::MAX).peak(), all.total());
        // a frozen tensor has no moments; accumulation holds two gradient sets; forget holds
        // the base beside the trained copy
        let mut trainable = vec![true; m.params.len()];
        trainable[0] = false;
        let part = TrainNeed::of(&m, &trainable, 1, 8, 4, 2);
        let frozen = m.params[0].elem_count() as u64;
        assert_eq!(part.total(), 16 * n + 8 * (n - frozen) + part.activations);
        assert!(all.check(all.total(), "tiny").is_ok());
        let e = all.check(all.total() - 1, "tiny").unwrap_err().to_string();
        assert!(
            e.starts_with("--mem-limit ")
                && e.contains("training tiny needs ~")
                && e.contains("parameters × 16 bytes + activations"),
            "{e}"
        );
        let e = part
            .check(part.total() - 1, "tiny")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("× 16 bytes + ") && e.contains("× 8 bytes of AdamW moments"),
            "{e}"
        );
        assert_eq!(fmt_size(800 << 20), "800.0 MiB");
        assert_eq!(fmt_size(3 << 29), "1.50 GiB");
        assert_eq!(fmt_size(64 << 10), "64.0 KiB");
    }

    #[test]
    fn availability_is_positive_and_below_ram() {
        let a = available_bytes();
        assert!(a > 0);
        assert!(a <= meminfo_available().unwrap_or(u64::MAX));
        assert!(default_limit() < a);
    }
}
