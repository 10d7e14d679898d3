//! Line plots as PNG, drawn by hand: a grid of panels (one per language), one coloured line
//! per condition, simple axes with tick labels (a built-in 5×7 pixel font), optional
//! log-scale y axis, and a legend on top.

use anyhow::Result;
use std::path::Path;

/// One line.
#[derive(Clone, Debug)]
pub struct Series {
    pub label: String,
    /// (x, y) points, drawn in order.
    pub points: Vec<(f64, f64)>,
}

/// One panel (e.g. one language).
#[derive(Clone, Debug)]
pub struct Panel {
    pub title: String,
    /// Series `i` gets colour `i` (the legend is taken from the first panel's labels).
    pub series: Vec<Series>,
}

/// Colours of series 0, 1, 2, …
pub const COLORS: [[u8; 3]; 6] = [
    [31, 119, 180],
    [214, 39, 40],
    [44, 160, 44],
    [255, 127, 14],
    [148, 103, 189],
    [110, 110, 110],
];

const PANEL_W: usize = 380;
const PANEL_H: usize = 270;
const LEFT: usize = 78;
const RIGHT: usize = 14;
const TOP: usize = 30;
const BOTTOM: usize = 40;
const SCALE: usize = 2;
/// Title, caption and up to two legend rows.
const HEADER: usize = 100;

/// An RGB image.
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

    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let i = (y as usize * self.w + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    fn rect(&mut self, x: i64, y: i64, w: i64, h: i64, c: [u8; 3]) {
        for yy in y..y + h {
            for xx in x..x + w {
                self.set(xx, yy, c);
            }
        }
    }

    /// A line `width` pixels thick (Bresenham, square pen).
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), width: i64, c: [u8; 3]) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.rect(x - width / 2, y - width / 2, width, width, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Text with its top-left corner at (x, y); returns its width in pixels.
    fn text(&mut self, x: i64, y: i64, s: &str, c: [u8; 3]) -> i64 {
        let mut cx = x;
        for ch in s.chars() {
            let g = glyph(ch);
            for (row, bits) in g.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        self.rect(
                            cx + (col * SCALE) as i64,
                            y + (row * SCALE) as i64,
                            SCALE as i64,
                            SCALE as i64,
                            c,
                        );
                    }
                }
            }
            cx += (6 * SCALE) as i64;
        }
        cx - x
    }

    fn save(&self, path: &Path) -> Result<()> {
        let mut bytes = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut bytes, self.w as u32, self.h as u32);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            let mut wr = enc.write_header()?;
            wr.write_image_data(&self.px)?;
        }
        crate::io::atomic_write(path, &bytes)
    }
}

/// Width in pixels of `s` in the built-in font.
fn text_width(s: &str) -> i64 {
    (s.chars().count() * 6 * SCALE) as i64
}

/// A short label for a tick value.
pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(0.01..100_000.0).contains(&a) {
        let e = a.log10().floor() as i32;
        format!("{:.1}e{}", v / 10f64.powi(e), e)
    } else if v.fract() == 0.0 || a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Draws `panels` in a grid (`cols` per row) under `title`, with a legend, and writes a PNG.
pub fn render(
    path: &Path,
    title: &str,
    panels: &[Panel],
    x_label: &str,
    y_label: &str,
    log_y: bool,
    cols: usize,
) -> Result<()> {
    let cols = cols.max(1).min(panels.len().max(1));
    let rows = panels.len().div_ceil(cols).max(1);
    let header = HEADER;
    let mut cv = Canvas::new(cols * PANEL_W, header + rows * PANEL_H);
    let black = [0, 0, 0];
    let grey = [200, 200, 200];
    cv.text(10, 8, title, black);
    let cap = format!(
        "x: {x_label}   y: {y_label}{}",
        if log_y { " (log scale)" } else { "" }
    );
    cv.text(10, 30, &cap, [90, 90, 90]);
    // legend
    let labels: Vec<String> = panels
        .first()
        .map(|p| p.series.iter().map(|s| s.label.clone()).collect())
        .unwrap_or_default();
    let (mut lx, mut ly) = (10i64, 56i64);
    for (i, l) in labels.iter().enumerate() {
        let w = 30 + text_width(l) + 24;
        if lx + w > cv.w as i64 {
            lx = 10;
            ly += 22;
        }
        let c = COLORS[i % COLORS.len()];
        cv.rect(lx, ly + 5, 24, 4, c);
        cv.text(lx + 30, ly, l, black);
        lx += w;
    }
    let ty = |v: f64| if log_y { v.max(1e-300).ln() } else { v };
    for (pi, panel) in panels.iter().enumerate() {
        let ox = (pi % cols * PANEL_W) as i64;
        let oy = (header + pi / cols * PANEL_H) as i64;
        let (px0, py0) = (ox + LEFT as i64, oy + TOP as i64);
        let (pw, ph) = (
            (PANEL_W - LEFT - RIGHT) as i64,
            (PANEL_H - TOP - BOTTOM) as i64,
        );
        cv.text(
            px0 + (pw - text_width(&panel.title)) / 2,
            oy + 8,
            &panel.title,
            black,
        );
        let pts: Vec<(f64, f64)> = panel
            .series
            .iter()
            .flat_map(|s| s.points.iter().copied())
            .filter(|p| p.1.is_finite() && (!log_y || p.1 > 0.0))
            .collect();
        if pts.is_empty() {
            continue;
        }
        let (mut x0, mut x1) = pts
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
        let (mut y0, mut y1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| {
            (a.min(ty(p.1)), b.max(ty(p.1)))
        });
        if x1 <= x0 {
            x1 = x0 + 1.0;
            x0 -= 0.0;
        }
        if y1 - y0 < 1e-9 {
            y0 -= 0.5;
            y1 += 0.5;
        }
        let pad = (y1 - y0) * 0.05;
        let (y0, y1) = (y0 - pad, y1 + pad);
        let map = |x: f64, y: f64| -> (i64, i64) {
            let sx = px0 + ((x - x0) / (x1 - x0) * pw as f64).round() as i64;
            let sy = py0 + ph - ((ty(y) - y0) / (y1 - y0) * ph as f64).round() as i64;
            (sx, sy)
        };
        // grid and y ticks
        for k in 0..5 {
            let f = k as f64 / 4.0;
            let yv = y0 + f * (y1 - y0);
            let sy = py0 + ph - (f * ph as f64).round() as i64;
            cv.line((px0, sy), (px0 + pw, sy), 1, grey);
            let v = if log_y { yv.exp() } else { yv };
            let s = fmt_num(v);
            cv.text(px0 - 6 - text_width(&s), sy - 7, &s, black);
        }
        // x ticks
        for k in 0..3 {
            let f = k as f64 / 2.0;
            let xv = x0 + f * (x1 - x0);
            let sx = px0 + (f * pw as f64).round() as i64;
            cv.line((sx, py0 + ph), (sx, py0 + ph + 4), 1, black);
            let s = fmt_num(xv.round());
            cv.text(sx - text_width(&s) / 2, py0 + ph + 8, &s, black);
        }
        cv.line((px0, py0), (px0, py0 + ph), 1, black);
        cv.line((px0, py0 + ph), (px0 + pw, py0 + ph), 1, black);
        for (si, s) in panel.series.iter().enumerate() {
            let c = COLORS[si % COLORS.len()];
            let sp: Vec<(i64, i64)> = s
                .points
                .iter()
                .filter(|p| p.1.is_finite() && (!log_y || p.1 > 0.0))
                .map(|p| map(p.0, p.1))
                .collect();
            for w in sp.windows(2) {
                cv.line(w[0], w[1], 2, c);
            }
            for &(x, y) in &sp {
                cv.rect(x - 2, y - 2, 5, 5, c);
            }
        }
    }
    cv.save(path)
}

/// The 5×7 glyph of a character (rows top to bottom, bit 4 = leftmost pixel).
fn glyph(c: char) -> [u8; 7] {
    let c = c.to_ascii_lowercase();
    match c {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        'a' => [0x00, 0x00, 0x0E, 0x01, 0x0F, 0x11, 0x0F],
        'b' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1E],
        'c' => [0x00, 0x00, 0x0E, 0x10, 0x10, 0x11, 0x0E],
        'd' => [0x01, 0x01, 0x0D, 0x13, 0x11, 0x11, 0x0F],
        'e' => [0x00, 0x00, 0x0E, 0x11, 0x1F, 0x10, 0x0E],
        'f' => [0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08],
        'g' => [0x00, 0x00, 0x0F, 0x11, 0x0F, 0x01, 0x0E],
        'h' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11],
        'i' => [0x04, 0x00, 0x0C, 0x04, 0x04, 0x04, 0x0E],
        'j' => [0x02, 0x00, 0x06, 0x02, 0x02, 0x12, 0x0C],
        'k' => [0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12],
        'l' => [0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'm' => [0x00, 0x00, 0x1A, 0x15, 0x15, 0x11, 0x11],
        'n' => [0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11],
        'o' => [0x00, 0x00, 0x0E, 0x11, 0x11, 0x11, 0x0E],
        'p' => [0x00, 0x00, 0x1E, 0x11, 0x1E, 0x10, 0x10],
        'q' => [0x00, 0x00, 0x0D, 0x13, 0x0F, 0x01, 0x01],
        'r' => [0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10],
        's' => [0x00, 0x00, 0x0E, 0x10, 0x0E, 0x01, 0x1E],
        't' => [0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06],
        'u' => [0x00, 0x00, 0x11, 0x11, 0x11, 0x13, 0x0D],
        'v' => [0x00, 0x00, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'w' => [0x00, 0x00, 0x11, 0x11, 0x15, 0x15, 0x0A],
        'x' => [0x00, 0x00, 0x11, 0x0A, 0x04, 0x0A, 0x11],
        'y' => [0x00, 0x00, 0x11, 0x11, 0x0F, 0x01, 0x0E],
        'z' => [0x00, 0x00, 0x1F, 0x02, 0x04, 0x08, 0x1F],
        '.' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C],
        '-' => [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00],
        '+' => [0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '=' => [0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00],
        '_' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F],
        '/' => [0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00],
        ':' => [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00],
        ',' => [0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        '[' => [0x0E, 0x08, 0x08, 0x08, 0x08, 0x08, 0x0E],
        ']' => [0x0E, 0x02, 0x02, 0x02, 0x02, 0x02, 0x0E],
        ' ' => [0; 7],
        _ => [0x1F, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1F],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_png_of_the_expected_size() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.png");
        let s = |l: &str, k: f64| Series {
            label: l.into(),
            points: (0..5)
                .map(|i| (i as f64 * 10.0, k * (1.0 + i as f64)))
                .collect(),
        };
        let panels = vec![
            Panel {
                title: "en".into(),
                series: vec![s("none", 10.0), s("core", 20.0)],
            },
            Panel {
                title: "zh (trained)".into(),
                series: vec![s("none", 5.0), s("core", 7.0)],
            },
        ];
        render(&p, "test", &panels, "step", "ppl", true, 3).unwrap();
        let dec = png::Decoder::new(std::fs::File::open(&p).unwrap());
        let r = dec.read_info().unwrap();
        assert_eq!(
            (r.info().width, r.info().height),
            (2 * PANEL_W as u32, (HEADER + PANEL_H) as u32)
        );
        assert_eq!(fmt_num(1234.0), "1234");
        assert_eq!(fmt_num(123456.0), "1.2e5");
        assert_eq!(fmt_num(7.5), "7.50");
        assert_eq!(fmt_num(2.0), "2");
    }
}
