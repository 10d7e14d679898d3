//! The two-stage single-dimension scan of one RMSNorm weight, as `broca dims` and
//! `broca reproduce` run it: every dimension screened on short texts (batched, prefix
//! cached), the most damaging (and the median) confirmed on the full texts, and the
//! agreement of the first-order (gradient) screen with the exact one; plus its files.

use super::dims::{self as scan, NormSite};
use super::ops::{self, Op};
use super::plot;
use crate::model::Model;
use crate::progress::bar;
use anyhow::{bail, Result};
use serde::Serialize;
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

/// What to scan.
pub struct ScanParams<'a> {
    pub site: NormSite,
    pub op: &'a Op,
    pub dims: &'a [usize],
    /// Tokens per text in the screen (the texts themselves are the confirmation length).
    pub screen_tokens: usize,
    /// How many of the most damaging dims are confirmed.
    pub confirm_top: usize,
    /// Tokens per text in the confirmation (sets the default batch).
    pub confirm_tokens: usize,
    /// Perturbed copies per forward (default: about 1024 tokens per forward).
    pub batch: Option<usize>,
    /// Screen exactly only this many dims: those whose first-order (gradient) prediction of
    /// the change in NLL is largest in magnitude (`None`: every dim), for wide models.
    pub exact_dims: Option<usize>,
    pub seed: u64,
}

/// How the exactly screened dims were chosen from the requested ones.
#[derive(Clone, Debug, Serialize)]
pub struct Preselection {
    /// Dims ranked by the first-order prediction.
    pub from: usize,
    /// Dims screened exactly (the largest |prediction|).
    pub kept: usize,
    pub by: &'static str,
}

/// One scanned dimension.
#[derive(Clone, Debug, Serialize)]
pub struct DimRow {
    pub dim: usize,
    pub weight: f64,
    pub new_value: f64,
    /// Geometric-mean PPL over languages at the screening length.
    pub screen_ppl: f64,
    /// Geometric-mean PPL at the full length (confirmed dims and the median dim only).
    pub ppl: Option<f64>,
    /// Per-language PPL at the confirmation length, else at the screening length.
    pub per_lang_ppl: Vec<f64>,
    /// First-order prediction of the change in mean NLL (nats) from the gradient.
    pub first_order_delta_nll: f64,
}

/// A whole scan (`dims --json`).
#[derive(Clone, Debug, Serialize)]
pub struct ScanOutput {
    pub model: String,
    pub norm: String,
    pub op: String,
    pub seed: u64,
    pub languages: Vec<String>,
    pub screen_tokens: Vec<usize>,
    pub max_tokens: Vec<usize>,
    pub base_screen_ppl: f64,
    pub base_ppl: f64,
    /// Ranked: confirmed dims by ppl, then the rest by screen_ppl (most damaging first).
    pub dims: Vec<DimRow>,
    pub median_dim: usize,
    /// Spearman correlation between the first-order prediction and the exact screen.
    pub spearman_first_order_vs_screen: f64,
    /// Spearman correlation between screen and confirmation over the confirmed dims.
    pub spearman_screen_vs_confirm: Option<f64>,
    /// Set when only the dims with the largest first-order prediction were screened.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preselected: Option<Preselection>,
    pub timing: serde_json::Value,
}

fn geo_ppl(nlls: &[f64]) -> f64 {
    (nlls.iter().sum::<f64>() / nlls.len() as f64).exp()
}

/// Perturbed copies per forward for windows of `t` tokens: `batch`, or about 1024 tokens
/// per forward.
pub fn batch_for(batch: Option<usize>, t: usize) -> usize {
    batch.unwrap_or((1024 / t.max(1)).max(1))
}

/// Positions of the `n` largest |pred| (all positions, in order, for `None` or `n ≥ len`),
/// returned in their original order; ties go to the lower position.
pub fn preselect(pred: &[f64], n: Option<usize>) -> Vec<usize> {
    let all: Vec<usize> = (0..pred.len()).collect();
    let Some(n) = n.filter(|&n| n < pred.len()) else {
        return all;
    };
    let mut order = all;
    order.sort_by(|&a, &b| pred[b].abs().total_cmp(&pred[a].abs()).then(a.cmp(&b)));
    order.truncate(n.max(1));
    order.sort_unstable();
    order
}

/// Runs the scan over `texts` (language, ids at the confirmation length).
pub fn scan(
    model: &Model,
    model_label: &str,
    texts: &[(String, Vec<u32>)],
    p: &ScanParams,
) -> Result<ScanOutput> {
    let t0 = Instant::now();
    if p.screen_tokens < 2 {
        bail!("--screen-tokens must be at least 2");
    }
    if p.dims.is_empty() || texts.is_empty() {
        bail!("nothing to scan (no dimensions or no texts)");
    }
    let langs: Vec<String> = texts.iter().map(|(l, _)| l.clone()).collect();
    let screen: Vec<Vec<u32>> = texts
        .iter()
        .map(|(_, ids)| ids[..ids.len().min(p.screen_tokens)].to_vec())
        .collect();
    let full: Vec<Vec<u32>> = texts.iter().map(|(_, ids)| ids.clone()).collect();
    let name = p.site.param_name();
    let w = ops::values_f64(&model.values_of(&name)?)?;
    let all_values = scan::new_values(model, p.site, p.op, p.seed, p.dims)?;
    let batch_for = |t: usize| batch_for(p.batch, t);

    // first-order screen of every requested dim: ΔNLL ≈ g_d · (new − old)
    let tg = Instant::now();
    let g = scan::norm_gradient(model, p.site, &screen)?;
    let gradient_s = tg.elapsed().as_secs_f64();
    let all_pred: Vec<f64> = p
        .dims
        .iter()
        .zip(&all_values)
        .map(|(&d, &v)| g[d] * (v - w[d]))
        .collect();
    let keep = preselect(&all_pred, p.exact_dims);
    let preselected = (keep.len() < p.dims.len()).then_some(Preselection {
        from: p.dims.len(),
        kept: keep.len(),
        by: "largest |first-order ΔNLL| (gradient of the norm weight on the screening texts)",
    });
    let dims: Vec<usize> = keep.iter().map(|&i| p.dims[i]).collect();
    let values: Vec<f64> = keep.iter().map(|&i| all_values[i]).collect();
    let pred: Vec<f64> = keep.iter().map(|&i| all_pred[i]).collect();
    let dims = dims.as_slice();

    // baselines; the full-length one also times a naive evaluation of one dimension
    let base_screen = scan::base_nll(model, &screen)?;
    let tb = Instant::now();
    let base_full = scan::base_nll(model, &full)?;
    let naive_one_s = tb.elapsed().as_secs_f64();

    // stage 1: every dimension, short windows
    let ts = Instant::now();
    let pb = bar(
        (dims.len() * screen.len()) as u64,
        &format!("{name} screen"),
        "dims",
    );
    let scr = scan::scan_batched(
        model,
        p.site,
        dims,
        &values,
        &screen,
        batch_for(p.screen_tokens),
        &mut |n| pb.inc(n as u64),
    )?;
    pb.finish_and_clear();
    let screen_s = ts.elapsed().as_secs_f64();
    let screen_ppl: Vec<f64> = scr.iter().map(|v| geo_ppl(v)).collect();

    // stage 2: the most damaging dims (and the median one), full windows
    let mut order: Vec<usize> = (0..dims.len()).collect();
    order.sort_by(|&x, &y| {
        screen_ppl[y]
            .total_cmp(&screen_ppl[x])
            .then(dims[x].cmp(&dims[y]))
    });
    let median_i = order[order.len() / 2];
    let top_n = p.confirm_top.min(order.len());
    let mut confirm: Vec<usize> = order[..top_n].to_vec();
    if !confirm.contains(&median_i) {
        confirm.push(median_i);
    }
    let tc = Instant::now();
    let cdims: Vec<usize> = confirm.iter().map(|&i| dims[i]).collect();
    let cvals: Vec<f64> = confirm.iter().map(|&i| values[i]).collect();
    let pb = bar(
        (cdims.len() * full.len()) as u64,
        &format!("{name} confirm"),
        "dims",
    );
    let conf = scan::scan_batched(
        model,
        p.site,
        &cdims,
        &cvals,
        &full,
        batch_for(p.confirm_tokens),
        &mut |n| pb.inc(n as u64),
    )?;
    pb.finish_and_clear();
    let confirm_s = tc.elapsed().as_secs_f64();

    let base_mean = base_screen.iter().sum::<f64>() / base_screen.len() as f64;
    let exact: Vec<f64> = scr
        .iter()
        .map(|v| v.iter().sum::<f64>() / v.len() as f64 - base_mean)
        .collect();
    let rho = scan::spearman(&pred, &exact);

    let confirmed: HashMap<usize, &Vec<f64>> = confirm.iter().cloned().zip(conf.iter()).collect();
    let mut ranked: Vec<usize> = order[..top_n].to_vec();
    ranked.sort_by(|&x, &y| {
        geo_ppl(confirmed[&y])
            .total_cmp(&geo_ppl(confirmed[&x]))
            .then(dims[x].cmp(&dims[y]))
    });
    ranked.extend(order[top_n..].iter().cloned());
    let rows: Vec<DimRow> = ranked
        .into_iter()
        .map(|i| {
            let c = confirmed.get(&i);
            DimRow {
                dim: dims[i],
                weight: w[dims[i]],
                new_value: values[i],
                screen_ppl: screen_ppl[i],
                ppl: c.map(|v| geo_ppl(v)),
                per_lang_ppl: c.map_or(&scr[i], |v| *v).iter().map(|x| x.exp()).collect(),
                first_order_delta_nll: pred[i],
            }
        })
        .collect();
    let rho_sc = (top_n >= 3).then(|| {
        let s: Vec<f64> = confirm[..top_n].iter().map(|&i| screen_ppl[i]).collect();
        let f: Vec<f64> = conf[..top_n].iter().map(|v| geo_ppl(v)).collect();
        scan::spearman(&s, &f)
    });
    let total_s = t0.elapsed().as_secs_f64();
    let naive_s = naive_one_s * dims.len() as f64;
    Ok(ScanOutput {
        model: model_label.to_string(),
        norm: name,
        op: p.op.to_string(),
        seed: p.seed,
        languages: langs,
        screen_tokens: screen.iter().map(Vec::len).collect(),
        max_tokens: full.iter().map(Vec::len).collect(),
        base_screen_ppl: geo_ppl(&base_screen),
        base_ppl: geo_ppl(&base_full),
        dims: rows,
        median_dim: dims[median_i],
        spearman_first_order_vs_screen: rho,
        spearman_screen_vs_confirm: rho_sc,
        preselected,
        timing: serde_json::json!({
            "screen_s": screen_s, "confirm_s": confirm_s, "gradient_s": gradient_s, "total_s": total_s,
            "naive_full_eval_one_dim_s": naive_one_s,
            "naive_estimate_s": naive_s,
            "speedup_vs_naive": naive_s / (screen_s + confirm_s),
            "threads": candle_core::utils::get_num_threads(),
        }),
    })
}

/// Writes `dir/dims.json` (without the timing when `with_timing` is false, so reruns are
/// byte-identical), `dir/dims.csv` (by dimension) and `dir/dims.png` (the plot, top 10
/// labelled).
pub fn write_files(dir: &Path, out: &ScanOutput, with_timing: bool) -> Result<()> {
    let mut doc = serde_json::to_value(out)?;
    if !with_timing {
        if let Some(o) = doc.as_object_mut() {
            o.remove("timing");
        }
    }
    crate::io::write_json(&dir.join("dims.json"), &doc)?;
    let mut csv = String::from("dim,weight,new_value,screen_ppl,ppl,first_order_delta_nll\n");
    let mut by_dim: Vec<&DimRow> = out.dims.iter().collect();
    by_dim.sort_by_key(|r| r.dim);
    for r in &by_dim {
        let p = r.ppl.map_or(String::new(), |p| p.to_string());
        csv.push_str(&format!(
            "{},{},{},{},{},{}\n",
            r.dim, r.weight, r.new_value, r.screen_ppl, p, r.first_order_delta_nll
        ));
    }
    crate::io::atomic_write(&dir.join("dims.csv"), csv.as_bytes())?;
    let pd: Vec<usize> = by_dim.iter().map(|r| r.dim).collect();
    let pp: Vec<f64> = by_dim.iter().map(|r| r.screen_ppl).collect();
    let title = format!(
        "{} {}: screen ppl (geomean {}, log scale) vs dimension; dashed = base {:.2}",
        out.norm.trim_end_matches(".weight"),
        out.op,
        out.languages.join(" "),
        out.base_screen_ppl
    );
    plot::ppl_by_dim(
        &dir.join("dims.png"),
        &title,
        &pd,
        &pp,
        out.base_screen_ppl,
        10,
    )
}

#[cfg(test)]
mod tests {
    use super::preselect;

    #[test]
    fn preselect_keeps_the_largest_magnitudes_in_their_order() {
        let pred = [0.1, -3.0, 2.0, 0.0, -2.0, 5.0];
        assert_eq!(preselect(&pred, None), vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(preselect(&pred, Some(6)), vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(preselect(&pred, Some(2)), vec![1, 5]);
        // |2.0| = |-2.0|: the lower position wins the tie
        assert_eq!(preselect(&pred, Some(3)), vec![1, 2, 5]);
    }
}
