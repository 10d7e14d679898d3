//! How a region concentrates on hidden dimensions: per tensor the selected count of every row
//! and column, the top rows/columns, and concentration indices; per layer the hidden
//! dimensions that recur across q/k/v/o/gate/up/down; over all layers the top hidden dims.
//!
//! In HF layout ([out, in]) hidden dimension d is column d of q/k/v/gate/up (and of the
//! embedding and lm_head), row d of o_proj/down_proj, entry d of an RMSNorm weight.

use super::{Bits, Region};
use rayon::prelude::*;
use serde::Serialize;
use std::collections::BTreeMap;

/// Which axis of a parameter indexes the hidden dimension.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HiddenAxis {
    /// Column d (the matrix reads the residual stream).
    Col,
    /// Row d (the matrix writes the residual stream).
    Row,
    /// Entry d (an RMSNorm weight).
    Entry,
    /// No hidden axis (biases).
    None,
}

const READS: [&str; 7] = [
    "q_proj.weight",
    "k_proj.weight",
    "v_proj.weight",
    "gate_proj.weight",
    "up_proj.weight",
    "embed_tokens.weight",
    "lm_head.weight",
];
const WRITES: [&str; 2] = ["o_proj.weight", "down_proj.weight"];

/// The hidden axis of parameter `name` with `rank` dimensions.
pub fn hidden_axis(name: &str, rank: usize) -> HiddenAxis {
    match rank {
        2 if READS.iter().any(|s| name.ends_with(s)) => HiddenAxis::Col,
        2 if WRITES.iter().any(|s| name.ends_with(s)) => HiddenAxis::Row,
        1 if name.ends_with("layernorm.weight") || name == "model.norm.weight" => HiddenAxis::Entry,
        _ => HiddenAxis::None,
    }
}

/// The layer index of `model.layers.{l}.…`.
pub fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// The short name of a parameter: `q_proj`, `down_proj`, `input_layernorm`, `q_proj.bias`.
pub fn short_name(name: &str) -> String {
    let parts: Vec<&str> = name.split('.').collect();
    match parts.as_slice() {
        [.., m, "weight"] => m.to_string(),
        [.., m, last] => format!("{m}.{last}"),
        _ => name.to_string(),
    }
}

/// An index with its selected count and its share of the total.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Ranked {
    pub index: usize,
    pub count: u64,
    pub share: f64,
}

/// Concentration of counts along one axis.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Concentration {
    /// Gini coefficient of the counts (0 = even, → 1 = all in one index).
    pub gini: f64,
    /// Share of the selection in the top 1% of indices (at least one index).
    pub top1pct_share: f64,
    /// How many indices the top 1% is.
    pub top1pct_len: usize,
}

/// Gini coefficient of non-negative counts (0 when all are zero).
pub fn gini(counts: &[u64]) -> f64 {
    let n = counts.len();
    let total: u64 = counts.iter().sum();
    if n == 0 || total == 0 {
        return 0.0;
    }
    let mut s = counts.to_vec();
    s.sort_unstable();
    let weighted: f64 = s
        .iter()
        .enumerate()
        .map(|(i, &x)| (i + 1) as f64 * x as f64)
        .sum();
    2.0 * weighted / (n as f64 * total as f64) - (n as f64 + 1.0) / n as f64
}

/// Gini and top-1% share of `counts`.
pub fn concentration(counts: &[u64]) -> Concentration {
    let total: u64 = counts.iter().sum();
    let m = counts.len().div_ceil(100).max(1).min(counts.len());
    let mut s = counts.to_vec();
    s.sort_unstable_by(|a, b| b.cmp(a));
    let top: u64 = s.iter().take(m).sum();
    Concentration {
        gini: gini(counts),
        top1pct_share: if total == 0 {
            0.0
        } else {
            top as f64 / total as f64
        },
        top1pct_len: m,
    }
}

/// The `n` largest counts (ties: lower index first), with shares of `total`.
pub fn top_n(counts: &[u64], n: usize, total: u64) -> Vec<Ranked> {
    let mut idx: Vec<usize> = (0..counts.len()).filter(|&i| counts[i] > 0).collect();
    idx.sort_by(|&a, &b| counts[b].cmp(&counts[a]).then(a.cmp(&b)));
    idx.truncate(n);
    idx.into_iter()
        .map(|i| Ranked {
            index: i,
            count: counts[i],
            share: if total == 0 {
                0.0
            } else {
                counts[i] as f64 / total as f64
            },
        })
        .collect()
}

/// Selected count of every row and every column of a 2-D 0/1 tensor.
pub fn row_col_counts(b: &Bits) -> (Vec<u64>, Vec<u64>) {
    let (r, c) = (b.shape[0], b.shape[1]);
    let mut rows = vec![0u64; r];
    let mut cols = vec![0u64; c];
    for (i, row) in b.data.chunks_exact(c.max(1)).enumerate().take(r) {
        let mut s = 0u64;
        for (j, &v) in row.iter().enumerate() {
            s += v as u64;
            cols[j] += v as u64;
        }
        rows[i] = s;
    }
    (rows, cols)
}

/// Statistics of one tensor of a region.
#[derive(Clone, Debug, Serialize)]
pub struct TensorStats {
    pub name: String,
    pub shape: Vec<usize>,
    pub count: u64,
    pub numel: u64,
    pub hidden_axis: HiddenAxis,
    /// Concentration along the hidden axis (2-D tensors with one).
    pub hidden: Option<Concentration>,
    /// 2-D only: concentration over rows and over columns.
    pub rows: Option<Concentration>,
    pub cols: Option<Concentration>,
    pub top_rows: Vec<Ranked>,
    pub top_cols: Vec<Ranked>,
    /// 2-D: selected count per row and per column (HF layout [out, in]).
    pub row_counts: Vec<u64>,
    pub col_counts: Vec<u64>,
    /// 1-D: the selected indices.
    pub selected: Vec<usize>,
}

impl TensorStats {
    /// Counts along the hidden axis (empty when the tensor has none or is 1-D).
    pub fn hidden_counts(&self) -> &[u64] {
        match self.hidden_axis {
            HiddenAxis::Col => &self.col_counts,
            HiddenAxis::Row => &self.row_counts,
            _ => &[],
        }
    }
}

/// Statistics of one tensor.
pub fn tensor_stats(name: &str, b: &Bits) -> TensorStats {
    let count = b.count();
    let axis = hidden_axis(name, b.shape.len());
    let mut t = TensorStats {
        name: name.to_string(),
        shape: b.shape.clone(),
        count,
        numel: b.data.len() as u64,
        hidden_axis: axis,
        hidden: None,
        rows: None,
        cols: None,
        top_rows: vec![],
        top_cols: vec![],
        row_counts: vec![],
        col_counts: vec![],
        selected: vec![],
    };
    if b.shape.len() == 2 {
        let (rows, cols) = row_col_counts(b);
        t.top_rows = top_n(&rows, 10, count);
        t.top_cols = top_n(&cols, 10, count);
        t.rows = Some(concentration(&rows));
        t.cols = Some(concentration(&cols));
        t.hidden = match axis {
            HiddenAxis::Col => t.cols.clone(),
            HiddenAxis::Row => t.rows.clone(),
            _ => None,
        };
        t.row_counts = rows;
        t.col_counts = cols;
    } else if b.shape.len() == 1 {
        t.selected = b
            .data
            .iter()
            .enumerate()
            .filter(|(_, &v)| v != 0)
            .map(|(i, _)| i)
            .collect();
    }
    t
}

/// A hidden dimension within a layer: its count summed over the layer's matrices and the
/// matrices where it is among the top 10 hidden dims.
#[derive(Clone, Debug, Serialize)]
pub struct LayerDim {
    pub dim: usize,
    pub count: u64,
    pub share: f64,
    pub matrices: Vec<String>,
}

/// Per-layer summary along the hidden axis.
#[derive(Clone, Debug, Serialize)]
pub struct LayerStats {
    pub layer: usize,
    /// Selected entries in the layer's matrices with a hidden axis.
    pub count: u64,
    pub concentration: Concentration,
    pub top_dims: Vec<LayerDim>,
    /// RMSNorm weights: the selected hidden dims, by short name.
    pub norm_dims: BTreeMap<String, Vec<usize>>,
    /// Count per hidden dim summed over q/k/v/o/gate/up/down.
    pub hidden_counts: Vec<u64>,
}

/// A hidden dimension over all layers.
#[derive(Clone, Debug, Serialize)]
pub struct GlobalDim {
    pub dim: usize,
    pub count: u64,
    pub share: f64,
    /// Layers where this dim is among the layer's top 10.
    pub layers_in_top10: usize,
    /// Layers where an RMSNorm entry of this dim is selected.
    pub norm_layers: usize,
}

/// Over all layers.
#[derive(Clone, Debug, Serialize)]
pub struct GlobalStats {
    pub hidden_size: usize,
    pub count: u64,
    pub concentration: Concentration,
    pub top_dims: Vec<GlobalDim>,
    pub hidden_counts: Vec<u64>,
}

/// A tensor ranked by concentration along its hidden axis.
#[derive(Clone, Debug, Serialize)]
pub struct Concentrated {
    pub name: String,
    pub top1pct_share: f64,
    pub gini: f64,
    pub top_dims: Vec<Ranked>,
}

/// Everything `region stats` reports.
#[derive(Clone, Debug, Serialize)]
pub struct RegionStats {
    pub count: u64,
    pub numel: u64,
    pub most_concentrated: Vec<Concentrated>,
    pub global: Option<GlobalStats>,
    pub layers: Vec<LayerStats>,
    pub tensors: Vec<TensorStats>,
}

/// Computes all statistics of a region.
pub fn region_stats(r: &Region) -> RegionStats {
    let tensors: Vec<TensorStats> = r
        .par_iter()
        .map(|(n, b)| tensor_stats(n, b))
        .collect::<Vec<_>>();
    let layers = layer_stats(&tensors);
    let global = global_stats(&layers);
    let mut conc: Vec<Concentrated> = tensors
        .iter()
        .filter(|t| t.count > 0 && layer_of(&t.name).is_some())
        .filter_map(|t| {
            let h = t.hidden.as_ref()?;
            Some(Concentrated {
                name: t.name.clone(),
                top1pct_share: h.top1pct_share,
                gini: h.gini,
                top_dims: top_n(t.hidden_counts(), 5, t.count),
            })
        })
        .collect();
    conc.sort_by(|a, b| {
        b.top1pct_share
            .total_cmp(&a.top1pct_share)
            .then(a.name.cmp(&b.name))
    });
    conc.truncate(10);
    RegionStats {
        count: tensors.iter().map(|t| t.count).sum(),
        numel: tensors.iter().map(|t| t.numel).sum(),
        most_concentrated: conc,
        global,
        layers,
        tensors,
    }
}

/// Per layer: hidden-axis counts summed over its matrices, top dims and where they recur.
pub fn layer_stats(tensors: &[TensorStats]) -> Vec<LayerStats> {
    let mut by_layer: BTreeMap<usize, Vec<&TensorStats>> = BTreeMap::new();
    for t in tensors {
        if let Some(l) = layer_of(&t.name) {
            by_layer.entry(l).or_default().push(t);
        }
    }
    let mut out = Vec::new();
    for (layer, ts) in by_layer {
        let mats: Vec<&&TensorStats> = ts
            .iter()
            .filter(|t| !t.hidden_counts().is_empty())
            .collect();
        let Some(h) = mats.first().map(|t| t.hidden_counts().len()) else {
            continue;
        };
        let mut counts = vec![0u64; h];
        let mut tops: Vec<(String, Vec<usize>)> = Vec::new();
        for t in mats.iter().filter(|t| t.hidden_counts().len() == h) {
            counts
                .iter_mut()
                .zip(t.hidden_counts())
                .for_each(|(a, b)| *a += b);
            let top = top_n(t.hidden_counts(), 10, t.count)
                .into_iter()
                .map(|r| r.index)
                .collect();
            tops.push((short_name(&t.name), top));
        }
        let total: u64 = counts.iter().sum();
        let top_dims = top_n(&counts, 10, total)
            .into_iter()
            .map(|r| LayerDim {
                dim: r.index,
                count: r.count,
                share: r.share,
                matrices: tops
                    .iter()
                    .filter(|(_, t)| t.contains(&r.index))
                    .map(|(n, _)| n.clone())
                    .collect(),
            })
            .collect();
        let norm_dims = ts
            .iter()
            .filter(|t| t.hidden_axis == HiddenAxis::Entry)
            .map(|t| (short_name(&t.name), t.selected.clone()))
            .collect();
        out.push(LayerStats {
            layer,
            count: total,
            concentration: concentration(&counts),
            top_dims,
            norm_dims,
            hidden_counts: counts,
        });
    }
    out
}

/// Over all layers: hidden-axis counts summed, top dims with how many layers they recur in.
pub fn global_stats(layers: &[LayerStats]) -> Option<GlobalStats> {
    let h = layers.first()?.hidden_counts.len();
    let mut counts = vec![0u64; h];
    for l in layers.iter().filter(|l| l.hidden_counts.len() == h) {
        counts
            .iter_mut()
            .zip(&l.hidden_counts)
            .for_each(|(a, b)| *a += b);
    }
    let total: u64 = counts.iter().sum();
    let top_dims = top_n(&counts, 20, total)
        .into_iter()
        .map(|r| GlobalDim {
            dim: r.index,
            count: r.count,
            share: r.share,
            layers_in_top10: layers
                .iter()
                .filter(|l| l.top_dims.iter().any(|d| d.dim == r.index))
                .count(),
            norm_layers: layers
                .iter()
                .filter(|l| l.norm_dims.values().any(|v| v.contains(&r.index)))
                .count(),
        })
        .collect();
    Some(GlobalStats {
        hidden_size: h,
        count: total,
        concentration: concentration(&counts),
        top_dims,
        hidden_counts: counts,
    })
}

/// Tensors worth a heatmap: layer 0's q_proj, the last layer's down_proj and the `extra`
/// most concentrated others (present in the region).
pub fn default_heatmap_tensors(r: &Region, s: &RegionStats, extra: usize) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut wanted = vec!["model.layers.0.self_attn.q_proj.weight".to_string()];
    if let Some(l) = s.layers.iter().map(|l| l.layer).max() {
        wanted.push(format!("model.layers.{l}.mlp.down_proj.weight"));
    }
    for n in wanted {
        if r.contains_key(&n) {
            out.push(n);
        }
    }
    let fixed = out.len();
    for c in &s.most_concentrated {
        if out.len() >= fixed + extra {
            break;
        }
        if r.contains_key(&c.name) && !out.contains(&c.name) {
            out.push(c.name.clone());
        }
    }
    out
}
