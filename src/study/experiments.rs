//! Stages that perturb: the ablation table, single-dimension norm scans, structured
//! perturbation of the top dimensions, generation side by side, super weights, forgetting.

use super::config::expand;
use super::stages::{core_name, read_json, region_file, score_files, texts};
use super::Ctx;
use crate::eval::{self, geomean};
use crate::generate::{generate, Sampling};
use crate::io::{atomic_write, write_json};
use crate::mask::{self, Mask};
use crate::model::Model;
use crate::perturb::ablate::{ablate, AblationSpec};
use crate::perturb::dims::NormSite;
use crate::perturb::ops::{self, Op};
use crate::perturb::scan::{self as pscan, ScanParams};
use crate::perturb::select::Control;
use crate::perturb::{spec, structured, superweights as sw};
use crate::progress::bar;
use anyhow::{bail, Result};
use serde_json::{json, Value};

fn geo(results: &[Value], key: &str) -> f64 {
    geomean(
        &results
            .iter()
            .map(|r| r[key].as_f64().unwrap_or(f64::NAN))
            .collect::<Vec<_>>(),
    )
}

/// Each core region × op and its controls (`perturb::ablate`, as `broca ablate` runs it).
pub fn ablation(ctx: &Ctx) -> Result<Vec<String>> {
    let c = ctx.cfg;
    let model = ctx.model()?;
    let langs = super::stages::eval_langs(c)?;
    let texts = texts(ctx, &c.eval.dir, &langs, c.eval.max_tokens)?;
    let op_list = ops::parse_ops(&c.regions.ops)?;
    let controls: Vec<Control> = c
        .regions
        .controls
        .iter()
        .map(|s| Control::parse(s))
        .collect::<Result<_>>()?;
    let mut regions: Vec<(String, Mask)> = Vec::new();
    for &k in &c.regions.k {
        regions.push((
            core_name(k),
            mask::load_for(&region_file(ctx, &core_name(k)), model)?,
        ));
    }
    // Σ_lang |score| per tensor (memory-mapped, one tensor at a time), for bottom/top
    let scores = if controls.iter().any(|c| *c != Control::Random) {
        Some(crate::region::scores::ScoreFiles::open(&score_files(ctx))?)
    } else {
        None
    };
    let spec = AblationSpec {
        regions: &regions,
        ops: &op_list,
        controls: &controls,
        scores: scores
            .as_ref()
            .map(|s| s as &dyn crate::perturb::select::TensorScores),
        texts: &texts,
        seq_len: c.eval.seq_len,
        seed: c.seed,
    };
    let out = ablate(model, &ctx.model_path.display().to_string(), &spec)?;
    write_json(&ctx.path("ablation.json"), &out)?;
    let mut csv = String::from("condition,op,lang,ppl,bits_per_byte\n");
    for cd in &out.conditions {
        for r in &cd.results {
            csv += &format!(
                "{},{},{},{},{}\n",
                cd.condition, cd.op, r.lang, r.ppl, r.bits_per_byte
            );
        }
        csv += &format!(
            "{},{},geomean,{},{}\n",
            cd.condition, cd.op, cd.geomean_ppl, cd.geomean_bits_per_byte
        );
    }
    atomic_write(&ctx.path("ablation.csv"), csv.as_bytes())?;
    Ok(vec!["ablation.json".into(), "ablation.csv".into()])
}

/// One norm scan (`perturb::scan`, as `broca dims` runs it) into `dims/L<layer>/`.
fn scan_layer(ctx: &Ctx, layer: usize, texts: &[(String, Vec<u32>)]) -> Result<()> {
    let c = &ctx.cfg.dims;
    let model = ctx.model()?;
    let op: Op = c.op.parse()?;
    let dims: Vec<usize> = if c.dims.is_empty() {
        (0..model.config.hidden_size).collect()
    } else {
        c.dims.clone()
    };
    let params = ScanParams {
        site: NormSite::parse(&c.norm, Some(layer), model)?,
        op: &op,
        dims: &dims,
        screen_tokens: c.screen_tokens,
        confirm_top: c.confirm_top,
        confirm_tokens: c.max_tokens,
        batch: None,
        exact_dims: c.exact_dims_for(model.config.hidden_size),
        seed: ctx.cfg.seed,
    };
    let out = pscan::scan(model, &ctx.model_path.display().to_string(), texts, &params)?;
    pscan::write_files(&ctx.path(&format!("dims/L{layer}")), &out, false)
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
    let Some(&layer) = ctx.cfg.dims.layers.first() else {
        bail!("dims.layers is empty")
    };
    let d = read_json(ctx, &format!("dims/L{layer}/dims.json"))?;
    let dims: Vec<usize> = d["dims"]
        .as_array()
        .into_iter()
        .flatten()
        .take(n)
        .filter_map(|r| r["dim"].as_u64().map(|x| x as usize))
        .collect();
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
    let pb = bar(
        ((1 + dims.len()) * texts.len()) as u64,
        "structured",
        "evals",
    );
    let one_window = |m: &Model| -> Result<Vec<Value>> {
        texts
            .iter()
            .map(|(lang, ids)| {
                let r = eval::perplexity(m, lang, ids, ids.len(), ids.len(), |_| {})?;
                pb.inc(1);
                Ok(json!({"lang": lang, "ppl": r.ppl, "bits_per_byte": r.bits_per_byte}))
            })
            .collect()
    };
    let base = one_window(model)?;
    let base_g = geo(&base, "ppl");
    let mut conds = vec![
        json!({"condition": "base", "dim": null, "role": "base", "op": "none", "entries": 0, "geomean_ppl": base_g, "ratio_to_base": 1.0, "results": base}),
    ];
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
    write_json(
        &ctx.path("structured.json"),
        &json!({"model": ctx.model_path.display().to_string(), "layers": "all", "languages": langs, "conditions": conds}),
    )?;
    let mut csv = String::from("condition,role,op,entries,geomean_ppl,ratio_to_base\n");
    for cd in &conds {
        csv += &format!(
            "{},{},{},{},{},{}\n",
            cd["condition"].as_str().unwrap_or(""),
            cd["role"].as_str().unwrap_or(""),
            cd["op"].as_str().unwrap_or(""),
            cd["entries"],
            cd["geomean_ppl"],
            cd["ratio_to_base"]
        );
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
    let Some(&k) = c.regions.k.first() else {
        bail!("regions.k is empty")
    };
    let mut specs = vec![format!(
        "{}:zero",
        region_file(ctx, &core_name(k)).display()
    )];
    let mut labels = vec![format!("{} zeroed", core_name(k))];
    if let Some(&d) = top.first() {
        specs.push(format!("norm:{layer}:{}:{d}:scale:10", c.dims.norm));
        labels.push(format!("layer {layer} {} norm dim {d} ×10", c.dims.norm));
    }
    let parsed: Vec<spec::Spec> = specs
        .iter()
        .map(|s| spec::parse(s, model))
        .collect::<Result<_>>()?;
    let s = Sampling::default();
    let steps = c.generation.prompts.len() * (2 + parsed.len());
    let pb = bar(steps as u64, "generation", "texts");
    let mut rows = Vec::new();
    for prompt in &c.generation.prompts {
        let mut comps = vec![
            json!({"condition": "base", "text": generate(model, prompt, c.generation.max_tokens, &s)?}),
        ];
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
    write_json(
        &ctx.path("generation.json"),
        &json!({"model": ctx.model_path.display().to_string(), "max_tokens": c.generation.max_tokens, "prompts": rows}),
    )?;
    Ok(vec!["generation.json".into()])
}

/// Super-weight candidates, each verified by zeroing it.
pub fn superweights(ctx: &Ctx) -> Result<Vec<String>> {
    let c = &ctx.cfg.superweights;
    let model = ctx.model()?;
    let texts = texts(
        ctx,
        &ctx.cfg.eval.dir,
        std::slice::from_ref(&c.eval_lang),
        c.eval_tokens,
    )?;
    let ids = &texts[0].1;
    let prompt_ids = model.tokenizer()?.encode(&c.prompt)?;
    if prompt_ids.is_empty() {
        bail!("superweights.prompt: no tokens");
    }
    let (base, verified) = sw::find_and_verify(model, &prompt_ids, ids, c.top)?;
    let rows: Vec<Value> = verified
        .iter()
        .map(serde_json::to_value)
        .collect::<Result<_, _>>()?;
    let doc = json!({"model": ctx.model_path.display().to_string(), "prompt": c.prompt, "prompt_tokens": prompt_ids.len(),
        "eval_lang": c.eval_lang, "eval_tokens": ids.len(), "base_ppl": base, "candidates": rows});
    write_json(&ctx.path("superweights.json"), &doc)?;
    let mut csv = String::from(
        "layer,row,col,token,output_activation,input_activation,weight,ppl_zeroed,ratio_to_base\n",
    );
    for r in &rows {
        csv += &format!(
            "{},{},{},{},{},{},{},{},{}\n",
            r["layer"],
            r["row"],
            r["col"],
            r["token"],
            r["output_activation"],
            r["input_activation"],
            r["weight"],
            r["ppl_zeroed"],
            r["ratio_to_base"]
        );
    }
    atomic_write(&ctx.path("superweights.csv"), csv.as_bytes())?;
    Ok(vec!["superweights.json".into(), "superweights.csv".into()])
}

/// Further pretraining on a new language with the core region frozen vs nothing vs random.
pub fn forgetting(ctx: &Ctx) -> Result<Vec<String>> {
    use crate::train::forget::{self, ForgetSpec};
    use crate::train::trainer::TrainConfig;
    let c = &ctx.cfg.forgetting;
    let Some(&k) = ctx.cfg.regions.k.first() else {
        bail!("regions.k is empty")
    };
    let train_dir = expand(&c.train_dir);
    let eval_dir = expand(&ctx.cfg.eval.dir);
    let eval_langs: Vec<String> = c
        .eval_languages
        .iter()
        .filter(|l| eval_dir.join(format!("{l}.txt")).exists())
        .cloned()
        .collect();
    let spec = ForgetSpec {
        model: ctx.model_path.clone(),
        train: super::stages::inputs(
            &train_dir.to_string_lossy(),
            std::slice::from_ref(&c.train_lang),
        )?,
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
        mem_limit: crate::memory::default_limit(),
    };
    forget::run(&spec)?;
    Ok(vec![
        "forgetting/forget.json".into(),
        "forgetting/curves.csv".into(),
        "forgetting/forgetting.png".into(),
    ])
}
