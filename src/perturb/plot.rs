//! A small PNG scatter plot: PPL (log scale) against dimension, the baseline as a grey line,
//! the top dimensions labelled with their index, a title line. Text uses a built-in 3×5 font.

use anyhow::Result;
use std::path::Path;

type Rgb = [u8; 3];
const BLACK: Rgb = [0, 0, 0];
const GREY: Rgb = [170, 170, 170];
const BLUE: Rgb = [40, 90, 200];
const RED: Rgb = [210, 30, 30];

/// 3×5 glyphs (digits, lowercase letters, a little punctuation), rows top to bottom,
/// 3 bits each (MSB left). Upper case is drawn as lower case.
fn glyph(c: char) -> Option<[u8; 5]> {
    Some(match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        '+' => [0, 2, 7, 2, 0],
        'a' => [0, 3, 5, 5, 3],
        'b' => [4, 6, 5, 5, 6],
        'c' => [0, 3, 4, 4, 3],
        'd' => [1, 3, 5, 5, 3],
        'e' => [0, 3, 7, 4, 3],
        'f' => [3, 4, 6, 4, 4],
        'g' => [3, 5, 3, 1, 6],
        'h' => [4, 6, 5, 5, 5],
        'i' => [2, 0, 2, 2, 2],
        'j' => [1, 0, 1, 5, 2],
        'k' => [4, 5, 6, 5, 5],
        'l' => [6, 2, 2, 2, 7],
        'm' => [0, 7, 7, 5, 5],
        'n' => [0, 6, 5, 5, 5],
        'o' => [0, 2, 5, 5, 2],
        'p' => [0, 6, 5, 6, 4],
        'q' => [0, 3, 5, 3, 1],
        'r' => [0, 3, 4, 4, 4],
        's' => [0, 3, 6, 1, 6],
        't' => [2, 7, 2, 2, 1],
        'u' => [0, 5, 5, 5, 3],
        'v' => [0, 5, 5, 5, 2],
        'w' => [0, 5, 5, 7, 7],
        'x' => [0, 5, 2, 2, 5],
        'y' => [0, 5, 3, 1, 6],
        'z' => [0, 7, 1, 2, 7],
        '(' => [1, 2, 2, 2, 1],
        ')' => [4, 2, 2, 2, 4],
        ':' => [0, 2, 0, 2, 0],
        ',' => [0, 0, 0, 2, 4],
        '=' => [0, 7, 0, 7, 0],
        ';' => [0, 2, 0, 2, 4],
        '_' => [0, 0, 0, 0, 7],
        '/' => [1, 1, 2, 4, 4],
        _ => return None,
    })
}

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Canvas {
        Canvas {
            w,
            h,
            px: vec![255; w * h * 3],
        }
    }
    fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let i = (y as usize * self.w + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: Rgb, dash: bool) {
        let n = (x1 - x0).abs().max((y1 - y0).abs()).max(1);
        for s in 0..=n {
            if dash && (s / 6) % 2 == 1 {
                continue;
            }
            self.set(x0 + (x1 - x0) * s / n, y0 + (y1 - y0) * s / n, c);
        }
    }
    fn dot(&mut self, x: i64, y: i64, r: i64, c: Rgb) {
        for dy in -r..=r {
            for dx in -r..=r {
                self.set(x + dx, y + dy, c);
            }
        }
    }
    /// Text with its top-left corner at (x, y), glyphs scaled by `s`.
    fn text(&mut self, x: i64, y: i64, t: &str, s: i64, c: Rgb) {
        for (k, ch) in t.chars().enumerate() {
            let Some(g) = glyph(ch.to_ascii_lowercase()) else {
                continue;
            };
            for (r, bits) in g.iter().enumerate() {
                for b in 0..3 {
                    if bits >> (2 - b) & 1 == 1 {
                        for dy in 0..s {
                            for dx in 0..s {
                                self.set(
                                    x + k as i64 * 4 * s + b * s + dx,
                                    y + r as i64 * s + dy,
                                    c,
                                );
                            }
                        }
                    }
                }
            }
        }
    }
    fn text_width(t: &str, s: i64) -> i64 {
        t.chars().count() as i64 * 4 * s
    }
    fn png(&self) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        let mut enc = png::Encoder::new(&mut buf, self.w as u32, self.h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.write_header()?.write_image_data(&self.px)?;
        Ok(buf)
    }
}

/// A tick label: plain for moderate values, `1e7` style otherwise.
fn fmt_tick(v: f64) -> String {
    if (0.01..1e6).contains(&v) {
        let s = format!("{v:.2}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!("{v:.0e}")
    }
}

/// Log-scale ticks between 10^lo and 10^hi: m·10^k with m in 1..9, thinned to at most ~10.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    for ms in [
        &[1., 2., 3., 4., 5., 6., 7., 8., 9.][..],
        &[1., 2., 5.],
        &[1.],
    ] {
        let mut t = Vec::new();
        for k in lo.floor() as i32..=hi.ceil() as i32 {
            for m in ms {
                let v = m * 10f64.powi(k);
                if v.log10() >= lo && v.log10() <= hi {
                    t.push(v);
                }
            }
        }
        if t.len() <= 10 {
            return t;
        }
    }
    Vec::new()
}

/// Writes the plot of `ppl[i]` at dimension `dims[i]`, baseline `base`, labelling the
/// `label_top` highest points, with `title` on top.
pub fn ppl_by_dim(
    path: &Path,
    title: &str,
    dims: &[usize],
    ppl: &[f64],
    base: f64,
    label_top: usize,
) -> Result<()> {
    let (w, h) = (1200usize, 560usize);
    let (left, right, top, bottom) = (80i64, 30i64, 30i64, 50i64);
    let mut cv = Canvas::new(w, h);
    let finite: Vec<f64> = ppl
        .iter()
        .cloned()
        .chain([base])
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    let mut lo = finite.iter().cloned().fold(f64::INFINITY, f64::min).log10();
    let mut hi = finite
        .iter()
        .cloned()
        .fold(f64::NEG_INFINITY, f64::max)
        .log10();
    let pad = ((hi - lo) * 0.05).max(0.01);
    lo -= pad;
    hi += pad;
    let xmax = dims.iter().cloned().max().unwrap_or(1).max(1) as f64;
    let (pw, ph) = (w as i64 - left - right, h as i64 - top - bottom);
    let px = |d: f64| left + (d / xmax * pw as f64).round() as i64;
    let py = |v: f64| {
        let l = if v.is_finite() && v > 0.0 {
            v.log10()
        } else {
            hi
        };
        top + ((hi - l.clamp(lo, hi)) / (hi - lo) * ph as f64).round() as i64
    };
    // axes and ticks
    cv.line((left, top), (left, top + ph), BLACK, false);
    cv.line((left, top + ph), (left + pw, top + ph), BLACK, false);
    for t in log_ticks(lo, hi) {
        let y = py(t);
        cv.line((left - 5, y), (left, y), BLACK, false);
        cv.line((left + 1, y), (left + pw, y), [235, 235, 235], false);
        let s = fmt_tick(t);
        cv.text(left - 8 - Canvas::text_width(&s, 2), y - 5, &s, 2, BLACK);
    }
    let step = if xmax > 2000.0 {
        500
    } else if xmax > 400.0 {
        100
    } else if xmax > 40.0 {
        10
    } else {
        1
    };
    for d in (0..=xmax as usize).step_by(step) {
        let x = px(d as f64);
        cv.line((x, top + ph), (x, top + ph + 5), BLACK, false);
        let s = d.to_string();
        cv.text(
            x - Canvas::text_width(&s, 2) / 2,
            top + ph + 10,
            &s,
            2,
            BLACK,
        );
    }
    cv.line((left, py(base)), (left + pw, py(base)), GREY, true);
    for (&d, &v) in dims.iter().zip(ppl) {
        cv.dot(px(d as f64), py(v), 2, BLUE);
    }
    let mut order: Vec<usize> = (0..ppl.len()).collect();
    order.sort_by(|&a, &b| ppl[b].total_cmp(&ppl[a]));
    for &i in order.iter().take(label_top) {
        let (x, y) = (px(dims[i] as f64), py(ppl[i]));
        cv.dot(x, y, 3, RED);
        cv.text(x + 6, (y - 12).max(2), &dims[i].to_string(), 2, RED);
    }
    cv.text(left, 6, title, 2, BLACK);
    crate::io::atomic_write(path, &cv.png()?)
}
