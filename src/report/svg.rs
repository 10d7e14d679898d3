//! Small, dependency-free SVG charts for the HTML report: grouped bar charts on a log
//! scale and line charts. Every chart is self-contained markup (no scripts, no network).

use std::fmt::Write;

/// Escapes text for XML/HTML.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const PALETTE: [&str; 8] = [
    "#4e79a7", "#e15759", "#59a14f", "#f28e2b", "#b07aa1", "#76b7b2", "#edc948", "#9c755f",
];

/// Color of series `i`.
pub fn color(i: usize) -> &'static str {
    PALETTE[i % PALETTE.len()]
}

fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let (a, b) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
    (a..=b).map(|e| 10f64.powi(e)).collect()
}

fn fmt_num(v: f64) -> String {
    if !(1e-2..1e5).contains(&v) {
        format!("{v:.0e}")
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    }
}

/// Grouped bars: one group per category (x axis), one bar per series, log-scale y.
/// `values[s][c]` is series `s` at category `c`; non-finite or non-positive values are skipped.
pub fn grouped_bars_log(
    title: &str,
    categories: &[String],
    series: &[String],
    values: &[Vec<f64>],
    y_label: &str,
) -> String {
    let finite: Vec<f64> = values
        .iter()
        .flatten()
        .cloned()
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    let (lo, hi) = finite
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let (lo, hi) = if finite.is_empty() {
        (1.0, 10.0)
    } else {
        (lo.min(hi / 10.0).max(1e-3), hi)
    };
    let ticks = log_ticks(lo, hi);
    let (ylo, yhi) = (
        ticks[0].log10(),
        ticks[ticks.len() - 1].log10().max(ticks[0].log10() + 1.0),
    );
    let group_w = (series.len() as f64 * 7.0 + 6.0).max(18.0);
    let (ml, mr, mt, mb) = (60.0, 20.0, 30.0, 60.0);
    let plot_w = group_w * categories.len() as f64;
    let plot_h = 260.0;
    let (w, h) = (
        ml + plot_w + mr,
        mt + plot_h + mb + 18.0 * series.len().div_ceil(4) as f64,
    );
    let y = |v: f64| mt + plot_h - (v.log10() - ylo) / (yhi - ylo) * plot_h;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0}" height="{h:.0}" viewBox="0 0 {w:.0} {h:.0}" font-family="sans-serif" font-size="11">"#
    );
    let _ = write!(
        s,
        r#"<text x="{ml}" y="18" font-size="13" font-weight="bold">{}</text>"#,
        esc(title)
    );
    for t in &ticks {
        let yy = y(*t);
        let _ = write!(
            s,
            r##"<line x1="{ml}" x2="{:.1}" y1="{yy:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            ml + plot_w,
            ml - 4.0,
            yy + 4.0,
            fmt_num(*t)
        );
    }
    let _ = write!(
        s,
        r#"<text transform="translate(14,{:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
        mt + plot_h / 2.0,
        esc(y_label)
    );
    let bw = 6.0;
    for (c, cat) in categories.iter().enumerate() {
        let gx = ml + c as f64 * group_w + 3.0;
        for (si, vals) in values.iter().enumerate() {
            let v = vals.get(c).cloned().unwrap_or(f64::NAN);
            if !(v.is_finite() && v > 0.0) {
                continue;
            }
            let top = y(v.max(ticks[0]));
            let _ = write!(
                s,
                r#"<rect x="{:.1}" y="{top:.1}" width="{bw}" height="{:.1}" fill="{}"><title>{} {}: {}</title></rect>"#,
                gx + si as f64 * (bw + 1.0),
                (mt + plot_h - top).max(0.5),
                color(si),
                esc(cat),
                esc(&series[si]),
                fmt_num(v)
            );
        }
        let _ = write!(
            s,
            r#"<text transform="translate({:.1},{:.1}) rotate(-60)" text-anchor="end">{}</text>"#,
            gx + group_w / 2.0,
            mt + plot_h + 12.0,
            esc(cat)
        );
    }
    let _ = write!(
        s,
        r##"<line x1="{ml}" x2="{ml}" y1="{mt}" y2="{:.1}" stroke="#333"/>"##,
        mt + plot_h
    );
    legend(&mut s, series, ml, mt + plot_h + 50.0);
    s.push_str("</svg>");
    s
}

fn legend(s: &mut String, series: &[String], x0: f64, y0: f64) {
    for (i, name) in series.iter().enumerate() {
        let (x, y) = (x0 + (i % 4) as f64 * 170.0, y0 + (i / 4) as f64 * 18.0);
        let _ = write!(
            s,
            r#"<rect x="{x:.1}" y="{:.1}" width="10" height="10" fill="{}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            y - 9.0,
            color(i),
            x + 14.0,
            y,
            esc(name)
        );
    }
}

/// One line series: name and (x, y) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Line chart with optional log-scale y and labelled points `(x, y, label)`.
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    log_y: bool,
    labels: &[(f64, f64, String)],
) -> String {
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().cloned())
        .filter(|p| p.0.is_finite() && p.1.is_finite() && (!log_y || p.1 > 0.0))
        .collect();
    let (mut x0, mut x1, mut y0, mut y1) = pts
        .iter()
        .fold((f64::MAX, f64::MIN, f64::MAX, f64::MIN), |a, p| {
            (a.0.min(p.0), a.1.max(p.0), a.2.min(p.1), a.3.max(p.1))
        });
    if pts.is_empty() {
        (x0, x1, y0, y1) = (0.0, 1.0, 1.0, 10.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let tf = |v: f64| if log_y { v.log10() } else { v };
    let (mut ty0, mut ty1) = (tf(y0), tf(y1));
    if ty1 - ty0 < 1e-9 {
        ty0 -= 0.5;
        ty1 += 0.5;
    }
    let pad = (ty1 - ty0) * 0.05;
    let (ty0, ty1) = (ty0 - pad, ty1 + pad);
    let (ml, mt, pw, ph) = (70.0, 30.0, 640.0, 280.0);
    let (w, h) = (
        ml + pw + 20.0,
        mt + ph + 60.0 + 18.0 * series.len().div_ceil(4) as f64,
    );
    let px = |x: f64| ml + (x - x0) / (x1 - x0) * pw;
    let py = |y: f64| mt + ph - (tf(y) - ty0) / (ty1 - ty0) * ph;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0}" height="{h:.0}" viewBox="0 0 {w:.0} {h:.0}" font-family="sans-serif" font-size="11">"#
    );
    let _ = write!(
        s,
        r#"<text x="{ml}" y="18" font-size="13" font-weight="bold">{}</text>"#,
        esc(title)
    );
    let yt: Vec<f64> = if log_y {
        log_ticks(10f64.powf(ty0), 10f64.powf(ty1))
            .into_iter()
            .filter(|t| tf(*t) >= ty0 && tf(*t) <= ty1)
            .collect()
    } else {
        (0..=4)
            .map(|i| ty0 + (ty1 - ty0) * i as f64 / 4.0)
            .collect()
    };
    for t in yt {
        let yy = py(t);
        let _ = write!(
            s,
            r##"<line x1="{ml}" x2="{:.1}" y1="{yy:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            ml + pw,
            ml - 4.0,
            yy + 4.0,
            fmt_num(t)
        );
    }
    for i in 0..=5 {
        let xv = x0 + (x1 - x0) * i as f64 / 5.0;
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            px(xv),
            mt + ph + 16.0,
            fmt_num(xv.round())
        );
    }
    let _ = write!(
        s,
        r##"<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##
    );
    let _ = write!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        ml + pw / 2.0,
        mt + ph + 34.0,
        esc(x_label)
    );
    let _ = write!(
        s,
        r#"<text transform="translate(14,{:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
        mt + ph / 2.0,
        esc(y_label)
    );
    for (i, se) in series.iter().enumerate() {
        let path: Vec<String> = se
            .points
            .iter()
            .filter(|p| p.1.is_finite() && (!log_y || p.1 > 0.0))
            .map(|p| format!("{:.1},{:.1}", px(p.0), py(p.1)))
            .collect();
        if path.len() > 1 {
            let _ = write!(
                s,
                r#"<polyline fill="none" stroke="{}" stroke-width="1.5" points="{}"/>"#,
                color(i),
                path.join(" ")
            );
        } else if let Some(p) = path.first() {
            let (a, b) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = write!(
                s,
                r#"<circle cx="{a}" cy="{b}" r="3" fill="{}"/>"#,
                color(i)
            );
        }
    }
    for (x, y, label) in labels {
        if y.is_finite() && (!log_y || *y > 0.0) {
            let _ = write!(
                s,
                r##"<circle cx="{:.1}" cy="{:.1}" r="3" fill="#e15759"/><text x="{:.1}" y="{:.1}" font-size="10">{}</text>"##,
                px(*x),
                py(*y),
                px(*x) + 4.0,
                py(*y) - 4.0,
                esc(label)
            );
        }
    }
    let names: Vec<String> = series.iter().map(|s| s.name.clone()).collect();
    legend(&mut s, &names, ml, mt + ph + 56.0);
    s.push_str("</svg>");
    s
}
