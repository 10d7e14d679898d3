//! Stages that measure and select: baseline perplexity, importance scores, regions (core at
//! each k, monolingual, overlaps) and the core region's concentration on hidden dimensions.

use super::config::{expand, StudyConfig};
use super::Ctx;
use crate::data::TextInput;
use crate::eval::{self, geomean};
use crate::io::{atomic_write, write_json};
use crate::mask::{self, Coverage};
use crate::progress::bar;
use crate::region::select::{Direction, Scope};
use crate::region::{self, build, heatmap, stats};
use crate::score::run as score_run;
use anyhow::{bail, Result};
use serde_json::{json, Value};
use std::path::PathBuf;

/// The evaluation languages: the configured list, or every `*.txt` of the folder.
pub fn eval_langs(c: &StudyConfig) -> Result<Vec<String>> {
    if !c.eval.languages.is_empty() {
        return Ok(c.eval.languages.clone());
    }
    Ok(crate::data::from_dir(&expand(&c.eval.dir))?
        .into_iter()
        .map(|t| t.lang)
        .collect())
}

/// `DIR/<lang>.txt` for each language, checked to exist.
pub fn inputs(dir: &str, langs: &[String]) -> Result<Vec<TextInput>> {
    let d = expand(dir);
    langs
        .iter()
        .map(|l| {
            let path = d.join(format!("{l}.txt"));
            if !path.exists() {
                bail!(
                    "{}: text missing (run scripts/fetch-assets)",
                    path.display()
                );
            }
            Ok(TextInput {
                lang: l.clone(),
                path,
            })
        })
        .collect()
}

/// Tokenized texts of `langs` from `dir`, at most `cap` tokens each.
pub fn texts(
    ctx: &Ctx,
    dir: &str,
    langs: &[String],
    cap: usize,
) -> Result<Vec<(String, Vec<u32>)>> {
    crate::train::forget::tokenize(ctx.model()?, &inputs(dir, langs)?, Some(cap))
}

/// The name of the core region at fraction `k`.
pub fn core_name(k: f64) -> String {
    format!("core-k{k}")
}

/// `regions/<name>.safetensors`.
pub fn region_file(ctx: &Ctx, name: &str) -> PathBuf {
    ctx.path(&format!("regions/{name}.safetensors"))
}

/// Score files of the importance languages.
pub fn score_files(ctx: &Ctx) -> Vec<PathBuf> {
    ctx.cfg
        .importance
        .languages
        .iter()
        .map(|l| score_run::final_path(&ctx.path("scores"), l))
        .collect()
}

/// Reads a JSON output of an earlier stage.
pub fn read_json(ctx: &Ctx, rel: &str) -> Result<Value> {
    let p = ctx.path(rel);
    let s = std::fs::read_to_string(&p)
        .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", p.display()))?;
    serde_json::from_str(&s).map_err(|e| anyhow::anyhow!("{}: invalid JSON: {e}", p.display()))
}

/// Baseline PPL and bits per byte per evaluation language.
pub fn baseline(ctx: &Ctx) -> Result<Vec<String>> {
    let c = &ctx.cfg.eval;
    let langs = eval_langs(ctx.cfg)?;
    let texts = texts(ctx, &c.dir, &langs, c.max_tokens)?;
    let model = ctx.model()?;
    let pb = bar(texts.len() as u64, "baseline", "langs");
    let mut results = Vec::new();
    for (lang, ids) in &texts {
        pb.set_message(format!("baseline {lang}"));
        results.push(eval::perplexity(
            model,
            lang,
            ids,
            c.seq_len,
            c.seq_len,
            |_| {},
        )?);
        pb.inc(1);
    }
    pb.finish_and_clear();
    let ppl: Vec<f64> = results.iter().map(|r| r.ppl).collect();
    let bpb: Vec<f64> = results.iter().map(|r| r.bits_per_byte).collect();
    let doc = json!({
        "model": ctx.model_path.display().to_string(), "model_sha256": ctx.model_sha,
        "params": model.num_params(), "layers": model.config.num_layers, "hidden_size": model.config.hidden_size,
        "seq_len": c.seq_len, "max_tokens": c.max_tokens,
        "geomean_ppl": geomean(&ppl), "geomean_bits_per_byte": geomean(&bpb), "results": results,
    });
    write_json(&ctx.path("baseline.json"), &doc)?;
    let mut csv = String::from("lang,tokens,nll,ppl,bits_per_byte\n");
    for r in &results {
        csv += &format!(
            "{},{},{},{},{}\n",
            r.lang, r.tokens, r.nll, r.ppl, r.bits_per_byte
        );
    }
    atomic_write(&ctx.path("baseline.csv"), csv.as_bytes())?;
    Ok(vec!["baseline.json".into(), "baseline.csv".into()])
}

/// Importance scores per language (resumable through score's own `.partial` state).
pub fn importance(ctx: &Ctx) -> Result<Vec<String>> {
    let c = &ctx.cfg.importance;
    let texts = texts(ctx, &c.corpus_dir, &c.languages, c.tokens)?;
    let out = ctx.path("scores");
    std::fs::create_dir_all(&out)?;
    let model = ctx.model()?;
    let job = score_run::Job {
        model,
        model_sha256: &ctx.model_sha,
        out: &out,
    };
    let passes = crate::score::plan::plan(
        model,
        crate::score::plan::Include::Layers,
        None,
        c.batch,
        c.seq_len,
        crate::memory::default_limit(),
    )?;
    eprintln!("study: importance {}", passes.plan);
    let opts = score_run::Options {
        seq_len: c.seq_len,
        batch: c.batch,
        checkpoint_secs: 60.0,
        checkpoint_windows: ctx.opts.importance_stop_after_windows.map(|_| 1),
        stop_after_windows: ctx.opts.importance_stop_after_windows,
        groups: passes.groups.clone(),
        ..Default::default()
    };
    let total: usize = texts.iter().map(|(_, ids)| ids.len()).sum();
    let pb = bar((total * opts.groups.len()) as u64, "importance", "tok");
    let mut outs = Vec::new();
    for (lang, ids) in &texts {
        pb.set_message(format!("importance {lang}"));
        let o = score_run::score_language(&job, lang, ids, &opts, &mut |n| pb.inc(n as u64))?;
        eprintln!(
            "study: importance {lang}: {} ({} windows, {:.1}s)",
            o.status, o.windows, o.seconds
        );
        outs.push(format!("scores/{lang}.safetensors"));
    }
    pb.finish_and_clear();
    Ok(outs)
}

/// Core regions at each k, monolingual regions at mono_k, and their sizes and overlaps.
pub fn regions(ctx: &Ctx) -> Result<Vec<String>> {
    let c = &ctx.cfg.regions;
    let files = score_files(ctx);
    let mut outs = Vec::new();
    let pb = bar(2, "regions", "steps");
    pb.set_message("regions: core");
    for &k in &c.k {
        region::check_fraction(k)?;
    }
    let (langs, cores) = build::core(
        &files,
        &c.k,
        Direction::Top,
        Scope::PerTensor,
        Coverage::Layers,
    )?;
    let mut core = Vec::new();
    for (&k, r) in c.k.iter().zip(&cores) {
        let name = core_name(k);
        let how = json!({"method": "core", "k": k, "select": "top", "scope": "per-tensor", "include": "layers", "languages": langs});
        mask::save(&region_file(ctx, &name), r, how)?;
        let count: u64 = r.values().map(|t| t.count() as u64).sum();
        let numel: u64 = r.values().map(|t| t.numel() as u64).sum();
        core.push(json!({"name": name, "k": k, "count": count, "numel": numel, "fraction": count as f64 / numel.max(1) as f64}));
        outs.push(format!("regions/{name}.safetensors"));
        outs.push(format!("regions/{name}.json"));
    }
    pb.inc(1);
    let mut mono_rows = Vec::new();
    let mut overlap = Value::Null;
    if c.mono_k > 0.0 && langs.len() >= 2 {
        pb.set_message("regions: monolingual");
        let m = build::mono_all(&files, c.mono_k, Scope::PerTensor, Coverage::Layers)?;
        let n = m.langs.len();
        let jac: Vec<Vec<f64>> = (0..n)
            .map(|i| {
                (0..n)
                    .map(|j| match i == j {
                        true => 1.0,
                        false => {
                            build::compare(&m.tops[i.min(j)], &m.tops[i.max(j)])
                                .1
                                .jaccard
                        }
                    })
                    .collect()
            })
            .collect();
        for (i, own) in m.monos.iter().enumerate() {
            let lang = &m.langs[i];
            let name = format!("mono-{lang}");
            let how = json!({"method": "mono", "target": lang, "k": c.mono_k, "select": "top", "scope": "per-tensor", "include": "layers", "languages": langs});
            mask::save(&region_file(ctx, &name), own, how)?;
            let count: u64 = own.values().map(|t| t.count() as u64).sum();
            let top: u64 = m.tops[i].values().map(|t| t.count() as u64).sum();
            let vs_core = cores.first().map(|cr| build::compare(own, cr).1.both);
            mono_rows.push(
                json!({"lang": lang, "name": name, "count": count, "top_count": top,
                "share_of_top": count as f64 / top.max(1) as f64, "in_core": vs_core}),
            );
            outs.push(format!("regions/{name}.safetensors"));
            outs.push(format!("regions/{name}.json"));
        }
        overlap = json!({"k": c.mono_k, "languages": m.langs, "jaccard": jac});
    }
    pb.inc(1);
    pb.finish_and_clear();
    let doc =
        json!({"languages": langs, "core": core, "mono": mono_rows, "top_k_overlap": overlap});
    write_json(&ctx.path("regions/summary.json"), &doc)?;
    let mut csv = String::from("region,k,count,numel_or_top,fraction\n");
    for r in &core {
        csv += &format!(
            "{},{},{},{},{}\n",
            r["name"].as_str().unwrap_or(""),
            r["k"],
            r["count"],
            r["numel"],
            r["fraction"]
        );
    }
    for r in &mono_rows {
        csv += &format!(
            "{},{},{},{},{}\n",
            r["name"].as_str().unwrap_or(""),
            c.mono_k,
            r["count"],
            r["top_count"],
            r["share_of_top"]
        );
    }
    atomic_write(&ctx.path("regions/summary.csv"), csv.as_bytes())?;
    outs.push("regions/summary.json".into());
    outs.push("regions/summary.csv".into());
    Ok(outs)
}

/// A file name for a tensor's heatmap.
fn heatmap_name(tensor: &str) -> String {
    format!("{}.png", tensor.replace(['/', '\\'], "_"))
}

/// Concentration of the first core region on hidden dimensions: stats and heatmaps.
pub fn concentration(ctx: &Ctx) -> Result<Vec<String>> {
    let Some(&k) = ctx.cfg.regions.k.first() else {
        bail!("regions.k is empty")
    };
    let name = core_name(k);
    let r = region::load(&region_file(ctx, &name))?;
    let s = stats::region_stats(&r);
    let mut outs = Vec::new();
    let mut images = Vec::new();
    for n in stats::default_heatmap_tensors(&r, &s, 3) {
        let rel = format!("concentration/heatmaps/{}", heatmap_name(&n));
        heatmap::write_grid(
            &ctx.path(&rel),
            &heatmap::tensor_grid(&r[&n]),
            64,
            heatmap::Scale::Counts,
        )?;
        images.push(json!({"tensor": n, "path": rel}));
        outs.push(rel);
    }
    let mut overview = Value::Null;
    if !s.layers.is_empty() {
        let counts: Vec<Vec<u64>> = s.layers.iter().map(|l| l.hidden_counts.clone()).collect();
        heatmap::write_grid(
            &ctx.path("concentration/overview.png"),
            &heatmap::overview_grid(&counts),
            480,
            heatmap::Scale::Enrichment,
        )?;
        overview = json!("concentration/overview.png");
        outs.push("concentration/overview.png".into());
    }
    let mut csv = String::from("dim,count,share,layers_in_top10,norm_layers\n");
    if let Some(g) = &s.global {
        for d in &g.top_dims {
            csv += &format!(
                "{},{},{},{},{}\n",
                d.dim, d.count, d.share, d.layers_in_top10, d.norm_layers
            );
        }
    }
    atomic_write(&ctx.path("concentration/top_dims.csv"), csv.as_bytes())?;
    let doc = json!({"region": name, "overview": overview, "images": images, "stats": s});
    write_json(&ctx.path("concentration/stats.json"), &doc)?;
    outs.push("concentration/top_dims.csv".into());
    outs.push("concentration/stats.json".into());
    Ok(outs)
}
