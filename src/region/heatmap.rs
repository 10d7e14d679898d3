//! Heatmap PNGs of regions, at most 512×512 pixels: a tensor's selected counts sum-pooled,
//! and a layers × hidden-dims overview of enrichment (count / the layer's mean), max-pooled.
//! Fixed log colour scales: black = nothing (or no more than the mean), through purple and
//! orange to pale yellow = a fully selected block (or 32× the mean).

use super::Bits;
use anyhow::Result;
use std::path::Path;

/// The largest image side.
pub const MAX_SIDE: usize = 512;

/// A grid of non-negative values, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Grid {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f64>,
    /// Source cells pooled into one value.
    pub block: usize,
}

/// How a block of cells becomes one pixel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    Sum,
    Max,
}

/// Pools a `rows`×`cols` grid (given by `at(r, c)`) into blocks so that each side is at most
/// `max_side`.
pub fn pool(
    rows: usize,
    cols: usize,
    max_side: usize,
    how: Pooling,
    at: impl Fn(usize, usize) -> f64,
) -> Grid {
    let fr = rows.div_ceil(max_side).max(1);
    let fc = cols.div_ceil(max_side).max(1);
    let (pr, pc) = (rows.div_ceil(fr), cols.div_ceil(fc));
    let mut data = vec![0.0; pr * pc];
    for r in 0..rows {
        for c in 0..cols {
            let cell = &mut data[(r / fr) * pc + c / fc];
            match how {
                Pooling::Sum => *cell += at(r, c),
                Pooling::Max => *cell = cell.max(at(r, c)),
            }
        }
    }
    Grid {
        rows: pr,
        cols: pc,
        data,
        block: fr * fc,
    }
}

/// The pooled grid of a 0/1 tensor (a 1-D tensor is one row).
pub fn tensor_grid(b: &Bits) -> Grid {
    let (rows, cols) = match b.shape.as_slice() {
        [r, c] => (*r, *c),
        _ => (1, b.data.len()),
    };
    pool(rows, cols, MAX_SIDE, Pooling::Sum, |r, c| {
        b.data[r * cols + c] as f64
    })
}

/// Layers × hidden dims: enrichment `counts[l][d]` / (layer l's mean count per dim), max-pooled
/// along d so a single hot dimension stays visible.
pub fn overview_grid(counts: &[Vec<u64>]) -> Grid {
    let cols = counts.iter().map(Vec::len).max().unwrap_or(0);
    let means: Vec<f64> = counts
        .iter()
        .map(|c| c.iter().sum::<u64>() as f64 / c.len().max(1) as f64)
        .collect();
    pool(counts.len(), cols, MAX_SIDE, Pooling::Max, |r, c| {
        let v = counts[r].get(c).copied().unwrap_or(0) as f64;
        if means[r] > 0.0 {
            v / means[r]
        } else {
            0.0
        }
    })
}

const STOPS: [(f64, [f64; 3]); 5] = [
    (0.0, [0.0, 0.0, 4.0]),
    (0.25, [87.0, 16.0, 110.0]),
    (0.5, [188.0, 55.0, 84.0]),
    (0.75, [249.0, 142.0, 9.0]),
    (1.0, [252.0, 255.0, 164.0]),
];

/// An inferno-like colour for t in [0, 1].
pub fn color(t: f64) -> [u8; 3] {
    let t = t.clamp(0.0, 1.0);
    let i = STOPS.iter().position(|(s, _)| *s >= t).unwrap_or(4).max(1);
    let ((s0, c0), (s1, c1)) = (STOPS[i - 1], STOPS[i]);
    let f = (t - s0) / (s1 - s0);
    std::array::from_fn(|k| (c0[k] + f * (c1[k] - c0[k])).round() as u8)
}

/// Enrichment at which the overview's colour scale tops out (× the layer's mean).
pub const ENRICHMENT_TOP: f64 = 32.0;

/// Colour scales, fixed so that images of different regions compare.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scale {
    /// Selected counts: log(1+v) / log(1+cells per pixel), so a fully selected block is the
    /// top colour; 0 is black.
    Counts,
    /// Ratios to a mean: log(v) / log([`ENRICHMENT_TOP`]) above 1; at or below the mean is
    /// black.
    Enrichment,
}

/// RGB pixels of a grid on a log scale; each grid row is drawn `row_height` pixels tall.
pub fn render(g: &Grid, row_height: usize, scale: Scale) -> Vec<u8> {
    let full = (1.0 + g.block as f64).ln();
    let t = |v: f64| match scale {
        Scale::Counts if v > 0.0 => Some((1.0 + v).ln() / full),
        Scale::Enrichment if v > 1.0 => Some(v.ln() / ENRICHMENT_TOP.ln()),
        _ => None,
    };
    let mut out = Vec::with_capacity(g.rows * row_height * g.cols * 3);
    for r in 0..g.rows {
        let line: Vec<u8> = g.data[r * g.cols..(r + 1) * g.cols]
            .iter()
            .flat_map(|&v| t(v).map_or([0, 0, 0], color))
            .collect();
        for _ in 0..row_height {
            out.extend_from_slice(&line);
        }
    }
    out
}

/// Encodes RGB pixels as PNG bytes.
pub fn encode_png(rgb: &[u8], width: usize, height: usize) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut buf, width as u32, height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header()?;
        w.write_image_data(rgb)?;
    }
    Ok(buf)
}

/// Writes a grid as a PNG (atomically), stretching short grids so the image is at least
/// `min_height` pixels tall (never above [`MAX_SIDE`]).
pub fn write_grid(path: &Path, g: &Grid, min_height: usize, scale: Scale) -> Result<()> {
    let rh = min_height
        .div_ceil(g.rows.max(1))
        .clamp(1, (MAX_SIDE / g.rows.max(1)).max(1));
    let rgb = render(g, rh, scale);
    crate::io::atomic_write(path, &encode_png(&rgb, g.cols, g.rows * rh)?)
}
