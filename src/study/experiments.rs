//! Stages that perturb: the ablation table, single-dimension norm scans, structured
//! perturbation of the top dimensions, generation side by side, super weights, forgetting.

use super::config::expand;
use super::stages::{core_name, read_json, region_file, score_files, texts};
use super::Ctx;
use crate::cli::progress::bar;
use crate::eval::{self, geomean};
use crate::generate::{generate, Sampling};
use crate::io::{atomic_write, write_json};
use crate::mask::{self, Mask};
use crate::model::Model;
use crate::perturb::dims::{self as scan, NormSite};
use crate::perturb::ops::{self, Op};
use crate::perturb::select::{self as psel, Control};
use crate::perturb::{plot, spec, structured, superweights as sw};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeMap;

fn geo(results: &[Value], key: &str) -> f64 {
    geomean(&results.iter().map(|r| r[key].as_f64().unwrap_or(f64::NAN)).collect::<Vec<_>>())
}

/// Each core region × op and its controls, in the shape of `broca ablate --json`.
pub fn ablation(ctx: &Ctx) -> Result<Vec<String>> {
    let c = ctx.cfg;
    let model = ctx.model()?;
    let base = read_json(ctx, "baseline.json")?;
    let langs: Vec<String> = base["results"].as_array().context("baseline.json: no results")?.iter().map(|r| r["lang"].as_str().unwrap_or("").to_string()).collect();
    let texts = texts(ctx, &c.eval.dir, &langs, c.eval.max_tokens)?;
    let op_list = ops::parse_ops(&c.regions.ops)?;
    let controls: Vec<Control> = c.regions.controls.iter().map(|s| Control::parse(s)).collect::<Result<_>>()?;
    let mut regions: Vec<(String, Mask)> = Vec::new();
    for &k in &c.regions.k {
        regions.push((core_name(k), mask::load_for(&region_file(ctx, &core_name(k)), model)?));
    }
    // Σ_lang |score| of the covered tensors (memory-mapped, in parallel), for bottom/top
    let scores: Option<BTreeMap<String, Vec<f32>>> = if controls.iter().any(|c| *c != Control::Random) {
        let (_, sum) = crate::region::scores::sum_abs(&score_files(ctx), crate::mask::Coverage::Layers)?;
        Some(sum.into_iter().map(|(n, d)| (n, d.data)).collect())
    } else {
        None
    };
    let base_results: Vec<Value> = base["results"].as_array().cloned().unwrap_or_default().iter().map(|r| json!({"lang": r["lang"], "ppl": r["ppl"], "bits_per_byte": r["bits_per_byte"]})).collect();
    let n_conds: usize = regions.len() * op_list.len() * (1 + controls.len());
    let pb = bar((n_conds * texts.len()) as u64, "ablation", "evals");
    let base_g = geo(&base_results, "ppl");
    let mut conds = vec![json!({"condition": "base", "op": "none", "geomean_ppl": base_g, "ratio_to_base": 1.0,
        "geomean_bits_per_byte": geo(&base_results, "bits_per_byte"), "results": base_results})];
    for (name, m) in &regions {
        let mut variants = vec![(name.clone(), m.clone())];
        for ctl in &controls {
            variants.push((ctl.label(name), psel::control(m, *ctl, scores.as_ref(), c.seed)?));
        }
        for op in &op_list {
            for (label, vm) in &variants {
                pb.set_message(format!("ablation {label} {op}"));
                let saved = ops::apply(model, vm, op, c.seed)?;
                let r = texts.iter().map(|(lang, ids)| {
                    let r = eval::perplexity(model, lang, ids, c.eval.seq_len, c.eval.seq_len, |_| {})?;
                    pb.inc(1);
                    Ok(json!({"lang": lang, "ppl": r.ppl, "bits_per_byte": r.bits_per_byte}))
                }).collect::<Result<Vec<Value>>>();
                ops::restore(model, saved)?;
                let r = r?;
                let g = geo(&r, "ppl");
                conds.push(json!({"condition": label, "op": op.to_string(), "geomean_ppl": g, "ratio_to_base": g / base_g,
                    "geomean_bits_per_byte": geo(&r, "bits_per_byte"), "results": r}));
            }
        }
    }
    pb.finish_and_clear();
    let doc = json!({"model": ctx.model_path.display().to_string(), "languages": langs, "conditions": conds});
    write_json(&ctx.path("ablation.json"), &doc)?;
    let mut csv = String::from("condition,op,lang,ppl,bits_per_byte\n");
    for cd in &conds {
        for r in cd["results"].as_array().into_iter().flatten() {
            csv += &format!("{},{},{},{},{}\n", cd["condition"].as_str().unwrap_or(""), cd["op"].as_str().unwrap_or(""), r["lang"].as_str().unwrap_or(""), r["ppl"], r["bits_per_byte"]);
        }
        csv += &format!("{},{},geomean,{},{}\n", cd["condition"].as_str().unwrap_or(""), cd["op"].as_str().unwrap_or(""), cd["geomean_ppl"], cd["geomean_bits_per_byte"]);
    }
    atomic_write(&ctx.path("ablation.csv"), csv.as_bytes())?;
    Ok(vec!["ablation.json".into(), "ablation.csv".into()])
}

fn geo_ppl(nlls: &[f64]) -> f64 {
    (nlls.iter().sum::<f64>() / nlls.len() as f64).exp()
}

/// One norm scan: every dim screened on short texts, the most damaging confirmed on longer
/// ones, and the first-order (gradient) screen's agreement with the exact screen.
fn scan_layer(ctx: &Ctx, layer: usize, texts: &[(String, Vec<u32>)]) -> Result<Value> {
    let c = &ctx.cfg.dims;
    let model = ctx.model()?;
    let site = NormSite::parse(&c.norm, Some(layer), model)?;
    let op: Op = c.op.parse()?;
    let h = model.config.hidden_size;
    let dims: Vec<usize> = if c.dims.is_empty() { (0..h).collect() } else { c.dims.clone() };
    let screen: Vec<Vec<u32>> = texts.iter().map(|(_, ids)| ids[..ids.len().min(c.screen_tokens)].to_vec()).collect();
    let full: Vec<Vec<u32>> = texts.iter().map(|(_, ids)| ids.clone()).collect();
    let name = site.param_name();
    let w = ops::values_f64(model.param(&name).context("norm weight missing")?.as_tensor())?;
    let values = scan::new_values(model, site, &op, ctx.cfg.seed, &dims)?;
    let batch_for = |t: usize| (1024 / t.max(1)).max(1);
    let base_screen = scan::base_nll(model, &screen)?;
    let base_full = scan::base_nll(model, &full)?;
    let pb = bar((dims.len() * screen.len()) as u64, &format!("dims L{layer} screen"), "dims");
    let scr = scan::scan_batched(model, site, &dims, &values, &screen, batch_for(c.screen_tokens), &mut |n| pb.inc(n as u64))?;
    pb.finish_and_clear();
    let screen_ppl: Vec<f64> = scr.iter().map(|v| geo_ppl(v)).collect();
    let mut order: Vec<usize> = (0..dims.len()).collect();
    order.sort_by(|&x, &y| screen_ppl[y].total_cmp(&screen_ppl[x]).then(dims[x].cmp(&dims[y])));
    let median_i = order[order.len() / 2];
    let top_n = c.confirm_top.min(order.len());
    let mut confirm: Vec<usize> = order[..top_n].to_vec();
    if !confirm.contains(&median_i) {
        confirm.push(median_i);
    }
    let cdims: Vec<usize> = confirm.iter().map(|&i| dims[i]).collect();
    let cvals: Vec<f64> = confirm.iter().map(|&i| values[i]).collect();
    let pb = bar((cdims.len() * full.len()) as u64, &format!("dims L{layer} confirm"), "dims");
    let conf = scan::scan_batched(model, site, &cdims, &cvals, &full, batch_for(c.max_tokens), &mut |n| pb.inc(n as u64))?;
    pb.finish_and_clear();
    let g = scan::norm_gradient(model, site, &screen)?;
    let pred: Vec<f64> = dims.iter().zip(&values).map(|(&d, &v)| g[d] * (v - w[d])).collect();
    let base_mean = base_screen.iter().sum::<f64>() / base_screen.len() as f64;
    let exact: Vec<f64> = scr.iter().map(|v| v.iter().sum::<f64>() / v.len() as f64 - base_mean).collect();
    let rho = scan::spearman(&pred, &exact);
    let confirmed: BTreeMap<usize, &Vec<f64>> = confirm.iter().cloned().zip(conf.iter()).collect();
    let mut ranked: Vec<usize> = order[..top_n].to_vec();
    ranked.sort_by(|&x, &y| geo_ppl(confirmed[&y]).total_cmp(&geo_ppl(confirmed[&x])).then(dims[x].cmp(&dims[y])));
    ranked.extend(order[top_n..].iter().cloned());
    let rows: Vec<Value> = ranked
        .iter()
        .map(|&i| {
            let cf = confirmed.get(&i);
            let per: Vec<f64> = cf.map_or(&scr[i], |v| *v).iter().map(|x| x.exp()).collect();
            json!({"dim": dims[i], "weight": w[dims[i]], "new_value": values[i], "screen_ppl": screen_ppl[i],
                   "ppl": cf.map(|v| geo_ppl(v)), "per_lang_ppl": per, "first_order_delta_nll": pred[i]})
        })
        .collect();
    let rho_sc = (top_n >= 3).then(|| {
        let s: Vec<f64> = confirm[..top_n].iter().map(|&i| screen_ppl[i]).collect();
        let f: Vec<f64> = conf[..top_n].iter().map(|v| geo_ppl(v)).collect();
        scan::spearman(&s, &f)
    });
    let out = json!({
        "model": ctx.model_path.display().to_string(), "norm": name, "layer": layer, "op": op.to_string(), "seed": ctx.cfg.seed,
        "languages": texts.iter().map(|t| &t.0).collect::<Vec<_>>(),
        "screen_tokens": screen.iter().map(Vec::len).collect::<Vec<_>>(), "max_tokens": full.iter().map(Vec::len).collect::<Vec<_>>(),
        "base_screen_ppl": geo_ppl(&base_screen), "base_ppl": geo_ppl(&base_full), "dims": rows, "median_dim": dims[median_i],
        "spearman_first_order_vs_screen": rho, "spearman_screen_vs_confirm": rho_sc,
    });
    let dir = format!("dims/L{layer}");
    write_json(&ctx.path(&format!("{dir}/dims.json")), &out)?;
    let mut by_dim: Vec<&Value> = out["dims"].as_array().into_iter().flatten().collect();
    by_dim.sort_by_key(|r| r["dim"].as_u64());
    let mut csv = String::from("dim,weight,new_value,screen_ppl,ppl,first_order_delta_nll\n");
    for r in &by_dim {
        let p = r["ppl"].as_f64().map_or(String::new(), |p| p.to_string());
        csv += &format!("{},{},{},{},{},{}\n", r["dim"], r["weight"], r["new_value"], r["screen_ppl"], p, r["first_order_delta_nll"]);
    }
    atomic_write(&ctx.path(&format!("{dir}/dims.csv")), csv.as_bytes())?;
    let pd: Vec<usize> = by_dim.iter().map(|r| r["dim"].as_u64().unwrap_or(0) as usize).collect();
    let pp: Vec<f64> = by_dim.iter().map(|r| r["screen_ppl"].as_f64().unwrap_or(f64::NAN)).collect();
    let title = format!("{} {}: screen ppl (geomean, log scale) vs dimension; dashed = base {:.2}", name.trim_end_matches(".weight"), op, geo_ppl(&base_screen));
    plot::ppl_by_dim(&ctx.path(&format!("{dir}/dims.png")), &title, &pd, &pp, geo_ppl(&base_screen), 10)?;
    Ok(out)
}

/// Norm scans of the configured layers.
pub fn dims(ctx: &Ctx) -> Result<Vec<String>> {
    let c = &ctx.cfg.dims;
    if c.screen_tokens < 2 || c.max_tokens < 2 {
        bail!("dims.screen_tokens and dims.max_tokens must be at least 2");
    }
    let texts = texts(ctx, &ctx.cfg.eval.dir, &c.languages, c.max_tokens)?;
    let mut outs = Vec::new();
    for &l in &c.layers {
        scan_layer(ctx, l, &texts)?;
        for f in ["dims.json", "dims.csv", "dims.png"] {
            outs.push(format!("dims/L{l}/{f}"));
        }
    }
    Ok(outs)
}

/// The top `n` dims of the first scanned layer (most damaging first) and its median dim.
fn top_dims(ctx: &Ctx, n: usize) -> Result<(usize, Vec<usize>, usize)> {
    let Some(&layer) = ctx.cfg.dims.layers.first() else { bail!("dims.layers is empty") };
    let d = read_json(ctx, &format!("dims/L{layer}/dims.json"))?;
    let dims: Vec<usize> = d["dims"].as_array().into_iter().flatten().take(n).filter_map(|r| r["dim"].as_u64().map(|x| x as usize)).collect();
    Ok((layer, dims, d["median_dim"].as_u64().unwrap_or(0) as usize))
}

/// The top dims perturbed everywhere they appear (every layer, every kind), plus the median
/// dim as a control.
pub fn structured(ctx: &Ctx) -> Result<Vec<String>> {
    let c = ctx.cfg;
    let model = ctx.model()?;
    let (_, top, median) = top_dims(ctx, c.structured.top_dims)?;
    let op: Op = c.structured.op.parse()?;
    let texts = texts(ctx, &c.eval.dir, &c.dims.languages, c.dims.max_tokens)?;
    let layers: Vec<usize> = (0..model.config.num_layers).collect();
    let kinds: Vec<&str> = structured::KINDS.iter().map(|(s, _)| *s).collect();
    let mut dims: Vec<(String, usize)> = top.iter().map(|&d| ("top".to_string(), d)).collect();
    if !top.contains(&median) {
        dims.push(("median".into(), median));
    }
    let pb = bar(((1 + dims.len()) * texts.len()) as u64, "structured", "evals");
    let one_window = |m: &Model| -> Result<Vec<Value>> {
        texts.iter().map(|(lang, ids)| {
            let r = eval::perplexity(m, lang, ids, ids.len(), ids.len(), |_| {})?;
            pb.inc(1);
            Ok(json!({"lang": lang, "ppl": r.ppl, "bits_per_byte": r.bits_per_byte}))
        }).collect()
    };
    let base = one_window(model)?;
    let base_g = geo(&base, "ppl");
    let mut conds = vec![json!({"condition": "base", "dim": null, "role": "base", "op": "none", "entries": 0, "geomean_ppl": base_g, "ratio_to_base": 1.0, "results": base})];
    for (role, d) in &dims {
        let m = structured::stripe_mask(model, *d, &layers, &kinds)?;
        let saved = ops::apply(model, &m, &op, c.seed)?;
        let entries = saved.count();
        let r = one_window(model);
        ops::restore(model, saved)?;
        let r = r?;
        let g = geo(&r, "ppl");
        conds.push(json!({"condition": format!("dim {d}"), "dim": d, "role": role, "op": op.to_string(), "entries": entries, "geomean_ppl": g, "ratio_to_base": g / base_g, "results": r}));
    }
    pb.finish_and_clear();
    let langs: Vec<&String> = texts.iter().map(|t| &t.0).collect();
    write_json(&ctx.path("structured.json"), &json!({"model": ctx.model_path.display().to_string(), "layers": "all", "languages": langs, "conditions": conds}))?;
    let mut csv = String::from("condition,role,op,entries,geomean_ppl,ratio_to_base\n");
    for cd in &conds {
        csv += &format!("{},{},{},{},{},{}\n", cd["condition"].as_str().unwrap_or(""), cd["role"].as_str().unwrap_or(""), cd["op"].as_str().unwrap_or(""), cd["entries"], cd["geomean_ppl"], cd["ratio_to_base"]);
    }
    atomic_write(&ctx.path("structured.csv"), csv.as_bytes())?;
    Ok(vec!["structured.json".into(), "structured.csv".into()])
}

/// Greedy completions: base, the core region zeroed, the top dim's norm entry ×10, and the
/// top dim zeroed everywhere.
pub fn generation(ctx: &Ctx) -> Result<Vec<String>> {
    let c = ctx.cfg;
    let model = ctx.model()?;
    let (layer, top, _) = top_dims(ctx, 1)?;
    let Some(&k) = c.regions.k.first() else { bail!("regions.k is empty") };
    let mut specs = vec![format!("{}:zero", region_file(ctx, &core_name(k)).display())];
    let mut labels = vec![format!("{} zeroed", core_name(k))];
    if let Some(&d) = top.first() {
        specs.push(format!("norm:{layer}:{}:{d}:scale:10", c.dims.norm));
        labels.push(format!("layer {layer} {} norm dim {d} ×10", c.dims.norm));
    }
    let parsed: Vec<spec::Spec> = specs.iter().map(|s| spec::parse(s, model)).collect::<Result<_>>()?;
    let s = Sampling::default();
    let steps = c.generation.prompts.len() * (2 + parsed.len());
    let pb = bar(steps as u64, "generation", "texts");
    let mut rows = Vec::new();
    for prompt in &c.generation.prompts {
        let mut comps = vec![json!({"condition": "base", "text": generate(model, prompt, c.generation.max_tokens, &s)?})];
        pb.inc(1);
        for (sp, label) in parsed.iter().zip(&labels) {
            let saved = sp.apply(model, c.seed)?;
            let t = generate(model, prompt, c.generation.max_tokens, &s);
            ops::restore(model, saved)?;
            comps.push(json!({"condition": label, "text": t?}));
            pb.inc(1);
        }
        if let Some(&d) = top.first() {
            let layers: Vec<usize> = (0..model.config.num_layers).collect();
            let kinds: Vec<&str> = structured::KINDS.iter().map(|(s, _)| *s).collect();
            let m = structured::stripe_mask(model, d, &layers, &kinds)?;
            let saved = ops::apply(model, &m, &Op::Zero, c.seed)?;
            let t = generate(model, prompt, c.generation.max_tokens, &s);
            ops::restore(model, saved)?;
            comps.push(json!({"condition": format!("dim {d} zeroed everywhere"), "text": t?}));
        }
        pb.inc(1);
        rows.push(json!({"prompt": prompt, "completions": comps}));
    }
    pb.finish_and_clear();
    write_json(&ctx.path("generation.json"), &json!({"model": ctx.model_path.display().to_string(), "max_tokens": c.generation.max_tokens, "prompts": rows}))?;
    Ok(vec!["generation.json".into()])
}

/// Super-weight candidates, each verified by zeroing it.
pub fn superweights(ctx: &Ctx) -> Result<Vec<String>> {
    let c = &ctx.cfg.superweights;
    let model = ctx.model()?;
    let texts = texts(ctx, &ctx.cfg.eval.dir, std::slice::from_ref(&c.eval_lang), c.eval_tokens)?;
    let ids = &texts[0].1;
    let prompt_ids = model.tokenizer()?.encode(&c.prompt)?;
    if prompt_ids.is_empty() {
        bail!("superweights.prompt: no tokens");
    }
    let ppl = |m: &Model| -> Result<f64> { Ok(eval::perplexity(m, "eval", ids, ids.len(), ids.len(), |_| {})?.ppl) };
    let base = ppl(model)?;
    let mut cands = sw::candidates(model, &prompt_ids)?;
    cands.sort_by(|x, y| y.output_activation.abs().total_cmp(&x.output_activation.abs()));
    cands.truncate(c.top);
    let pb = bar(cands.len() as u64, "superweights", "weights");
    let mut rows = Vec::new();
    let cols = model.config.intermediate_size;
    for cd in cands {
        let name = format!("model.layers.{}.mlp.down_proj.weight", cd.layer);
        let saved = ops::apply_values(model, &name, &[cd.row * cols + cd.col], &[0.0])?;
        let p = ppl(model);
        ops::restore(model, saved)?;
        let p = p?;
        pb.inc(1);
        let mut v = serde_json::to_value(&cd)?;
        v["ppl_zeroed"] = json!(p);
        v["ratio_to_base"] = json!(p / base);
        rows.push(v);
    }
    pb.finish_and_clear();
    let doc = json!({"model": ctx.model_path.display().to_string(), "prompt": c.prompt, "prompt_tokens": prompt_ids.len(),
        "eval_lang": c.eval_lang, "eval_tokens": ids.len(), "base_ppl": base, "candidates": rows});
    write_json(&ctx.path("superweights.json"), &doc)?;
    let mut csv = String::from("layer,row,col,token,output_activation,input_activation,weight,ppl_zeroed,ratio_to_base\n");
    for r in &rows {
        csv += &format!("{},{},{},{},{},{},{},{},{}\n", r["layer"], r["row"], r["col"], r["token"], r["output_activation"], r["input_activation"], r["weight"], r["ppl_zeroed"], r["ratio_to_base"]);
    }
    atomic_write(&ctx.path("superweights.csv"), csv.as_bytes())?;
    Ok(vec!["superweights.json".into(), "superweights.csv".into()])
}

/// Further pretraining on a new language with the core region frozen vs nothing vs random.
pub fn forgetting(ctx: &Ctx) -> Result<Vec<String>> {
    use crate::train::forget::{self, ForgetSpec};
    use crate::train::trainer::TrainConfig;
    let c = &ctx.cfg.forgetting;
    let Some(&k) = ctx.cfg.regions.k.first() else { bail!("regions.k is empty") };
    let train_dir = expand(&c.train_dir);
    let eval_dir = expand(&ctx.cfg.eval.dir);
    let eval_langs: Vec<String> = c.eval_languages.iter().filter(|l| eval_dir.join(format!("{l}.txt")).exists()).cloned().collect();
    let spec = ForgetSpec {
        model: ctx.model_path.clone(),
        train: super::stages::inputs(&train_dir.to_string_lossy(), std::slice::from_ref(&c.train_lang))?,
        eval: super::stages::inputs(&eval_dir.to_string_lossy(), &eval_langs)?,
        region: region_file(ctx, &core_name(k)),
        config: TrainConfig {
            steps: c.steps,
            lr: c.lr,
            seq_len: c.seq_len,
            warmup: (c.steps / 10).max(1),
            seed: ctx.cfg.seed,
            eval_every: c.eval_every,
            eval_seq_len: c.seq_len,
            checkpoint_every: c.eval_every.max(1),
            save_model: false,
            ..TrainConfig::default()
        },
        eval_tokens: Some(c.eval_tokens),
        data_tokens: None,
        compensation: false,
        resume: true,
        out: ctx.path("forgetting"),
    };
    forget::run(&spec)?;
    Ok(vec!["forgetting/forget.json".into(), "forgetting/curves.csv".into(), "forgetting/forgetting.png".into()])
}
