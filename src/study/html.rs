//! The study's report, `DIR/report.html`, built only from the stage outputs under DIR (so a
//! rerun with nothing changed just rewrites it): Summary, Perplexity, Regions, Dimension
//! scan, Generation, Super weights and, when run, Forgetting.

use super::{cache, config::ALL_STAGES, Ctx};
use crate::report::svg::{grouped_bars_log, line_chart, Series};
use crate::report::{figure, para, png_figure, table, Report};
use anyhow::Result;
use serde_json::Value;
use std::path::Path;

/// The section headings, in order (Forgetting only when that stage ran).
pub const SECTIONS: [&str; 7] = [
    "Summary",
    "Perplexity",
    "Regions",
    "Dimension scan",
    "Generation",
    "Super weights",
    "Forgetting",
];

fn read(dir: &Path, rel: &str) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(dir.join(rel)).ok()?).ok()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn s(v: &Value) -> String {
    match v {
        Value::String(x) => x.clone(),
        Value::Null => "-".into(),
        x => x.to_string(),
    }
}

/// A number for tables: fixed point while small, scientific when huge.
pub fn num(v: f64) -> String {
    if !v.is_finite() {
        format!("{v}")
    } else if v.abs() >= 1e5 {
        format!("{v:.3e}")
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// `YYYY-MM-DD HH:MM UTC` of a unix time.
pub fn utc(t: u64) -> String {
    let (days, secs) = ((t / 86400) as i64, t % 86400);
    // civil-from-days (Howard Hinnant)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        secs / 3600,
        secs / 60 % 60
    )
}

/// CPU model and core count of this machine.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|x| x.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    format!("{cpu}, {cores} cores")
}

fn no_data(stage: &str) -> String {
    para(&format!(
        "Stage '{stage}' has not run (or did not finish) in this folder."
    ))
}

fn summary(ctx: &Ctx, run: &Value) -> String {
    let dir = &ctx.dir;
    let base = read(dir, "baseline.json");
    let mut rows = vec![
        vec!["model".into(), ctx.model_path.display().to_string()],
        vec!["model sha256".into(), ctx.model_sha.clone()],
    ];
    if let Some(b) = &base {
        rows.push(vec![
            "parameters".into(),
            format!(
                "{} ({} layers, hidden {})",
                s(&b["params"]),
                s(&b["layers"]),
                s(&b["hidden_size"])
            ),
        ]);
    }
    let mut last = 0;
    let mut stage_rows = Vec::new();
    let mut total = 0.0;
    for st in ALL_STAGES {
        match cache::record(dir, st) {
            Some(r) => {
                last = last.max(r.finished_at);
                total += r.seconds;
                stage_rows.push(vec![
                    st.to_string(),
                    format!("{:.1}", r.seconds),
                    utc(r.finished_at),
                ]);
            }
            None => stage_rows.push(vec![st.to_string(), "-".into(), "not run".into()]),
        }
    }
    rows.push(vec![
        "date (last stage finished)".into(),
        if last > 0 { utc(last) } else { "-".into() },
    ]);
    rows.push(vec!["machine".into(), machine()]);
    rows.push(vec!["stage time, total".into(), format!("{total:.1} s")]);
    rows.push(vec![
        "this invocation".into(),
        format!(
            "{:.1} s; stages run: {}",
            f(&run["wall_s"]),
            run["executed"]
                .as_array()
                .map(|a| a.iter().map(s).collect::<Vec<_>>().join(", "))
                .filter(|x| !x.is_empty())
                .unwrap_or_else(|| "none (all up to date)".into())
        ),
    ]);
    let mut head = Vec::new();
    if let Some(b) = &base {
        head.push(format!(
            "base geometric-mean PPL {} ({} bits/byte) over {} languages",
            num(f(&b["geomean_ppl"])),
            num(f(&b["geomean_bits_per_byte"])),
            b["results"].as_array().map_or(0, Vec::len)
        ));
    }
    if let Some(a) = read(dir, "ablation.json") {
        for c in a["conditions"].as_array().into_iter().flatten().skip(1) {
            head.push(format!(
                "{} {}: geomean PPL {} (×{} base)",
                s(&c["condition"]),
                s(&c["op"]),
                num(f(&c["geomean_ppl"])),
                num(f(&c["ratio_to_base"]))
            ));
        }
    }
    if let Some(&l) = ctx.cfg.dims.layers.first() {
        if let Some(d) = read(dir, &format!("dims/L{l}/dims.json")) {
            if let Some(t) = d["dims"].get(0) {
                head.push(format!(
                    "most damaging {} dim: {} ({}): geomean PPL {} vs base {}",
                    s(&d["norm"]),
                    s(&t["dim"]),
                    s(&d["op"]),
                    num(f(&t["ppl"])),
                    num(f(&d["base_ppl"]))
                ));
            }
        }
    }
    if let Some(w) = read(dir, "superweights.json") {
        if let Some(c) = w["candidates"].as_array().and_then(|a| {
            a.iter()
                .max_by(|x, y| f(&x["ratio_to_base"]).total_cmp(&f(&y["ratio_to_base"])))
        }) {
            head.push(format!("strongest super-weight candidate: layer {} down_proj[{}, {}], zeroing it multiplies PPL by {}", s(&c["layer"]), s(&c["row"]), s(&c["col"]), num(f(&c["ratio_to_base"]))));
        }
    }
    let mut body = table(&["run", ""], &rows);
    body += "<h3>Headline numbers</h3><ul>";
    for h in &head {
        body += &format!("<li>{}</li>", crate::report::svg::esc(h));
    }
    body += "</ul><h3>Stages</h3>";
    body += &table(&["stage", "seconds", "finished"], &stage_rows);
    body += "<h3>Configuration (study.toml)</h3>";
    body += &format!(
        "<pre>{}</pre>",
        crate::report::svg::esc(&ctx.cfg.to_toml().unwrap_or_default())
    );
    body
}

fn perplexity(dir: &Path) -> String {
    let Some(a) = read(dir, "ablation.json").or_else(|| {
        read(dir, "baseline.json").map(|b| serde_json::json!({"languages": b["results"].as_array().map(|r| r.iter().map(|x| x["lang"].clone()).collect::<Vec<_>>()),
            "conditions": [{"condition": "base", "op": "none", "geomean_ppl": b["geomean_ppl"], "ratio_to_base": 1.0, "geomean_bits_per_byte": b["geomean_bits_per_byte"], "results": b["results"]}]}))
    }) else {
        return no_data("baseline");
    };
    let langs: Vec<String> = a["languages"]
        .as_array()
        .into_iter()
        .flatten()
        .map(s)
        .collect();
    let conds: Vec<&Value> = a["conditions"].as_array().into_iter().flatten().collect();
    let series: Vec<String> = conds
        .iter()
        .map(|c| format!("{} {}", s(&c["condition"]), s(&c["op"])))
        .collect();
    let values: Vec<Vec<f64>> = conds
        .iter()
        .map(|c| {
            c["results"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| f(&r["ppl"]))
                .collect()
        })
        .collect();
    let mut body = figure(&grouped_bars_log("PPL per language and condition (log scale)", &langs, &series, &values, "PPL"), "Perplexity per evaluation language under each condition; numbers in ablation.csv / ablation.json (baseline.csv for the base model).");
    let rows: Vec<Vec<String>> = conds
        .iter()
        .map(|c| {
            vec![
                s(&c["condition"]),
                s(&c["op"]),
                num(f(&c["geomean_ppl"])),
                num(f(&c["ratio_to_base"])),
                num(f(&c["geomean_bits_per_byte"])),
            ]
        })
        .collect();
    body += &table(
        &[
            "condition",
            "op",
            "geomean PPL",
            "ratio to base",
            "geomean bits/byte",
        ],
        &rows,
    );
    let mut head: Vec<&str> = vec!["lang"];
    head.extend(series.iter().map(String::as_str));
    let per: Vec<Vec<String>> = langs
        .iter()
        .enumerate()
        .map(|(i, l)| {
            std::iter::once(l.clone())
                .chain(values.iter().map(|v| num(*v.get(i).unwrap_or(&f64::NAN))))
                .collect()
        })
        .collect();
    body += "<h3>PPL per language</h3>";
    body += &table(&head, &per);
    body += &para("PPL = exp(token-weighted mean NLL in nats); bits per byte = summed NLL / ln 2 / UTF-8 bytes of the scored tokens.");
    body
}

fn png(dir: &Path, rel: &str, caption: &str) -> String {
    match std::fs::read(dir.join(rel)) {
        Ok(b) => png_figure(&b, caption),
        Err(_) => para(&format!("({rel} missing)")),
    }
}

fn regions(dir: &Path) -> String {
    let Some(r) = read(dir, "regions/summary.json") else {
        return no_data("regions");
    };
    let mut body = String::from("<h3>Sizes</h3>");
    let core: Vec<Vec<String>> = r["core"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            vec![
                s(&c["name"]),
                s(&c["k"]),
                s(&c["count"]),
                s(&c["numel"]),
                format!("{:.4}%", 100.0 * f(&c["fraction"])),
            ]
        })
        .collect();
    body += &table(&["core region", "k", "entries", "of", "fraction"], &core);
    let mono: Vec<Vec<String>> = r["mono"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            vec![
                s(&c["name"]),
                s(&c["count"]),
                s(&c["top_count"]),
                format!("{:.1}%", 100.0 * f(&c["share_of_top"])),
                s(&c["in_core"]),
            ]
        })
        .collect();
    if !mono.is_empty() {
        body += &table(
            &[
                "monolingual region",
                "entries",
                "own top-k",
                "share of own top-k",
                "also in the first core region",
            ],
            &mono,
        );
    }
    if let Some(langs) = r["top_k_overlap"]["languages"].as_array() {
        body += &format!(
            "<h3>Overlap of the languages' top-{} (Jaccard)</h3>",
            s(&r["top_k_overlap"]["k"])
        );
        let names: Vec<String> = langs.iter().map(s).collect();
        let mut head: Vec<&str> = vec![""];
        head.extend(names.iter().map(String::as_str));
        let rows: Vec<Vec<String>> = r["top_k_overlap"]["jaccard"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
            .map(|(i, row)| {
                std::iter::once(names[i].clone())
                    .chain(
                        row.as_array()
                            .into_iter()
                            .flatten()
                            .map(|v| format!("{:.3}", f(v))),
                    )
                    .collect()
            })
            .collect();
        body += &table(&head, &rows);
    }
    body += &para(
        "Numbers: regions/summary.json and regions/summary.csv; masks: regions/*.safetensors.",
    );
    let Some(c) = read(dir, "concentration/stats.json") else {
        return body + &no_data("concentration");
    };
    body += &format!(
        "<h3>Concentration of {} on hidden dimensions</h3>",
        s(&c["region"])
    );
    if let Some(g) = c["stats"]["global"].as_object() {
        let conc = &g["concentration"];
        body += &para(&format!("Over all layers (hidden size {}): Gini {:.3}; the top 1% of hidden dims ({} dims) hold {:.1}% of the region's entries in matrices with a hidden axis.", s(&g["hidden_size"]), f(&conc["gini"]), s(&conc["top1pct_len"]), 100.0 * f(&conc["top1pct_share"])));
        let rows: Vec<Vec<String>> = g["top_dims"]
            .as_array()
            .into_iter()
            .flatten()
            .take(12)
            .map(|d| {
                vec![
                    s(&d["dim"]),
                    s(&d["count"]),
                    format!("{:.2}%", 100.0 * f(&d["share"])),
                    s(&d["layers_in_top10"]),
                    s(&d["norm_layers"]),
                ]
            })
            .collect();
        body += &table(
            &[
                "top hidden dim",
                "entries",
                "share",
                "layers where top-10",
                "norm layers",
            ],
            &rows,
        );
    }
    if let Some(o) = c["overview"].as_str() {
        body += &png(dir, o, "Entries per hidden dimension (columns) and layer (rows), relative to a uniform spread (concentration/overview.png).");
    }
    for im in c["images"].as_array().into_iter().flatten() {
        if let Some(p) = im["path"].as_str() {
            body += &png(
                dir,
                p,
                &format!(
                    "{}: selected entries (pooled counts); {}",
                    s(&im["tensor"]),
                    p
                ),
            );
        }
    }
    body += &para("Numbers: concentration/stats.json, concentration/top_dims.csv.");
    body
}

fn dims(ctx: &Ctx) -> String {
    let dir = &ctx.dir;
    let mut body = String::new();
    for &l in &ctx.cfg.dims.layers {
        let Some(d) = read(dir, &format!("dims/L{l}/dims.json")) else {
            body += &no_data("dims");
            continue;
        };
        let rows: Vec<&Value> = d["dims"].as_array().into_iter().flatten().collect();
        let mut pts: Vec<(f64, f64)> = rows
            .iter()
            .map(|r| (f(&r["dim"]), f(&r["screen_ppl"])))
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let base = f(&d["base_screen_ppl"]);
        let (x0, x1) = (
            pts.first().map_or(0.0, |p| p.0),
            pts.last().map_or(1.0, |p| p.0),
        );
        let labels: Vec<(f64, f64, String)> = rows
            .iter()
            .take(5)
            .map(|r| {
                (
                    f(&r["dim"]),
                    f(&r["screen_ppl"]),
                    format!("dim {}", s(&r["dim"])),
                )
            })
            .collect();
        let series = [
            Series {
                name: format!("{} {} (screen)", s(&d["norm"]), s(&d["op"])),
                points: pts,
            },
            Series {
                name: "base".into(),
                points: vec![(x0, base), (x1, base)],
            },
        ];
        body += &format!(
            "<h3>{} {}</h3>",
            crate::report::svg::esc(&s(&d["norm"])),
            crate::report::svg::esc(&s(&d["op"]))
        );
        body += &figure(&line_chart(&format!("layer {l}: geomean PPL when one norm entry is changed"), "hidden dimension", "PPL (screen)", &series, true, &labels), &format!("Screen at {:?} tokens per language ({}); top 5 labelled; numbers in dims/L{l}/dims.csv and dims.json.", d["screen_tokens"].as_array().map(|a| a.iter().map(s).collect::<Vec<_>>()).unwrap_or_default(), d["languages"].as_array().map(|a| a.iter().map(s).collect::<Vec<_>>().join(" ")).unwrap_or_default()));
        let trows: Vec<Vec<String>> = rows
            .iter()
            .take(ctx.cfg.dims.confirm_top.clamp(1, 10))
            .enumerate()
            .map(|(i, r)| {
                vec![
                    (i + 1).to_string(),
                    s(&r["dim"]),
                    num(f(&r["weight"])),
                    num(f(&r["new_value"])),
                    num(f(&r["screen_ppl"])),
                    num(f(&r["ppl"])),
                    format!("{:.4}", f(&r["first_order_delta_nll"])),
                ]
            })
            .collect();
        body += &table(
            &[
                "rank",
                "dim",
                "weight",
                "new value",
                "screen PPL",
                "confirmed PPL",
                "first-order ΔNLL",
            ],
            &trows,
        );
        body += &para(&format!(
            "Base geomean PPL {} (screen) / {} (confirmation length). Agreement of the first-order (gradient) screen with the exact screen: Spearman {:.3}; screen vs confirmation over the confirmed dims: {}. Median dim {}.",
            num(base), num(f(&d["base_ppl"])), f(&d["spearman_first_order_vs_screen"]),
            d["spearman_screen_vs_confirm"].as_f64().map_or("-".into(), |v| format!("{v:.3}")), s(&d["median_dim"])
        ));
        if let Some(p) = d.get("preselected") {
            body += &para(&format!(
                "A wide model: of {} dims, only the {} with the {} were screened exactly (`dims.exact_dims`); the median and the Spearman figures are over those.",
                s(&p["from"]), s(&p["kept"]), s(&p["by"])
            ));
        }
    }
    match read(dir, "structured.json") {
        Some(st) => {
            body += "<h3>Structured perturbation: the top dims everywhere (every layer, every matrix and norm)</h3>";
            let rows: Vec<Vec<String>> = st["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| {
                    vec![
                        s(&c["condition"]),
                        s(&c["role"]),
                        s(&c["op"]),
                        s(&c["entries"]),
                        num(f(&c["geomean_ppl"])),
                        num(f(&c["ratio_to_base"])),
                    ]
                })
                .collect();
            body += &table(
                &["condition", "role", "op", "entries", "geomean PPL", "ratio"],
                &rows,
            );
            body += &para("Numbers: structured.json, structured.csv.");
        }
        None => body += &no_data("structured"),
    }
    body
}

fn generation(dir: &Path) -> String {
    let Some(g) = read(dir, "generation.json") else {
        return no_data("generation");
    };
    let mut body = para(&format!(
        "Greedy continuations, at most {} tokens (generation.json).",
        s(&g["max_tokens"])
    ));
    for p in g["prompts"].as_array().into_iter().flatten() {
        let rows: Vec<Vec<String>> = p["completions"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                vec![
                    s(&c["condition"]),
                    format!("{}{}", s(&p["prompt"]), s(&c["text"])),
                ]
            })
            .collect();
        body += &table(&["condition", "text"], &rows);
    }
    body
}

fn superweights(dir: &Path) -> String {
    let Some(w) = read(dir, "superweights.json") else {
        return no_data("superweights");
    };
    let rows: Vec<Vec<String>> = w["candidates"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            vec![
                s(&c["layer"]),
                s(&c["row"]),
                s(&c["col"]),
                s(&c["token"]),
                num(f(&c["output_activation"])),
                num(f(&c["input_activation"])),
                format!("{:.4}", f(&c["weight"])),
                num(f(&c["ppl_zeroed"])),
                num(f(&c["ratio_to_base"])),
            ]
        })
        .collect();
    let mut body = para(&format!("Candidates from the down_proj activations on {:?}; each zeroed alone, PPL on the first {} tokens of {} (base {}). Numbers: superweights.csv.", s(&w["prompt"]), s(&w["eval_tokens"]), s(&w["eval_lang"]), num(f(&w["base_ppl"]))));
    body += &table(
        &[
            "layer",
            "row",
            "col",
            "token",
            "output act.",
            "input act.",
            "weight",
            "PPL zeroed",
            "ratio",
        ],
        &rows,
    );
    body
}

fn forgetting(dir: &Path) -> String {
    let Some(r) = read(dir, "forgetting/forget.json") else {
        return no_data("forgetting");
    };
    let mut body = png(dir, "forgetting/forgetting.png", "PPL during further pretraining with nothing / the core region / a random region frozen (forgetting/curves.csv).");
    let mut rows = Vec::new();
    for c in r["conditions"].as_array().into_iter().flatten() {
        for sm in c["summary"].as_array().into_iter().flatten() {
            rows.push(vec![
                s(&c["condition"]),
                s(&sm["lang"]),
                num(f(&sm["ppl_start"])),
                num(f(&sm["ppl_end"])),
                num(f(&sm["ratio"])),
            ]);
        }
    }
    body += &table(
        &["condition", "lang", "PPL start", "PPL end", "ratio"],
        &rows,
    );
    body
}

/// Writes `DIR/report.html` (and `DIR/run.json`, this invocation's timing).
pub(crate) fn write(ctx: &Ctx, run: &Value) -> Result<()> {
    let dir = &ctx.dir;
    crate::io::write_json(&dir.join("run.json"), run)?;
    let mut r = Report::new(&format!(
        "Broca study: {}",
        ctx.model_path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default()
    ));
    r.section(SECTIONS[0], summary(ctx, run));
    r.section(SECTIONS[1], perplexity(dir));
    r.section(SECTIONS[2], regions(dir));
    r.section(SECTIONS[3], dims(ctx));
    r.section(SECTIONS[4], generation(dir));
    r.section(SECTIONS[5], superweights(dir));
    if cache::record(dir, "forgetting").is_some() {
        r.section(SECTIONS[6], forgetting(dir));
    }
    crate::io::atomic_write(&dir.join("report.html"), r.render().as_bytes())
}
