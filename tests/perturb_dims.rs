//! Single-dimension norm scans: the prefix-cached, batched scan equals naive full
//! evaluations; the first-order screen's gradient matches finite differences.

use broca::model::{Arch, Config, Model};
use broca::perturb::dims::{self, NormSite};
use broca::perturb::ops::Op;
use candle_core::DType;
use std::path::PathBuf;

fn smollm() -> Model {
    let dir = broca::data::assets_dir();
    let dir = if dir.is_relative() {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(dir)
    } else {
        dir
    };
    let p = dir.join("smollm2-135m-instruct-q4_1.gguf");
    assert!(
        p.exists(),
        "asset {} missing: run scripts/fetch-assets",
        p.display()
    );
    Model::load(&p).unwrap()
}

fn fixture_ids(model: &Model, name: &str, n: usize) -> Vec<u32> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut ids = model.tokenizer().unwrap().encode(&text).unwrap();
    ids.truncate(n);
    ids
}

fn max_abs_diff(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn batched_scan_equals_naive_on_a_tiny_model_for_every_norm_site() {
    for arch in [Arch::Llama, Arch::Qwen2] {
        let model = Model::random(Config::tiny(arch), DType::F64, 7).unwrap();
        let texts = vec![vec![1u32, 5, 9, 2, 30, 11, 4], vec![3u32, 3, 8, 20, 1]];
        let dims_all: Vec<usize> = (0..16).collect();
        for site in [
            NormSite::Input(0),
            NormSite::Input(1),
            NormSite::PostAttention(0),
            NormSite::PostAttention(1),
            NormSite::Final,
        ] {
            for op in [Op::Scale(10.0), Op::Zero, Op::Randomize] {
                let vals = dims::new_values(&model, site, &op, 3, &dims_all).unwrap();
                let fast =
                    dims::scan_batched(&model, site, &dims_all, &vals, &texts, 5, &mut |_| {})
                        .unwrap();
                let slow = dims::scan_naive(&model, site, &dims_all, &vals, &texts).unwrap();
                let d = max_abs_diff(&fast, &slow);
                assert!(
                    d < 1e-10,
                    "{arch:?} {site:?} {op}: batched vs naive differ by {d}"
                );
                // the perturbation does something
                let base = dims::base_nll(&model, &texts).unwrap();
                assert!(
                    slow.iter().any(|v| (v[0] - base[0]).abs() > 1e-6),
                    "{site:?} {op}: no effect"
                );
            }
        }
    }
}

#[test]
fn batched_scan_equals_naive_full_evaluation_on_smollm2() {
    let model = smollm();
    let texts = vec![
        fixture_ids(&model, "udhr-en.txt", 24),
        fixture_ids(&model, "udhr-zh.txt", 20),
    ];
    let dims_sel = [0usize, 1, 100, 575];
    for (site, op) in [
        (NormSite::Input(0), Op::Scale(10.0)),
        (NormSite::PostAttention(3), Op::Zero),
        (NormSite::Final, Op::Scale(4.0)),
    ] {
        let vals = dims::new_values(&model, site, &op, 0, &dims_sel).unwrap();
        let fast =
            dims::scan_batched(&model, site, &dims_sel, &vals, &texts, 3, &mut |_| {}).unwrap();
        let slow = dims::scan_naive(&model, site, &dims_sel, &vals, &texts).unwrap();
        let d = max_abs_diff(&fast, &slow);
        // f32: a few ulps of the NLL (values ~2-10 nats)
        assert!(
            d < 2e-4,
            "{site:?} {op}: batched vs naive mean NLL differ by {d}"
        );
        assert!(fast.iter().flatten().all(|v| v.is_finite() && *v > 0.0));
    }
}

#[test]
fn out_of_range_dimension_is_an_error() {
    let model = Model::random(Config::tiny(Arch::Llama), DType::F64, 7).unwrap();
    let e = dims::new_values(&model, NormSite::Input(0), &Op::Zero, 0, &[16])
        .unwrap_err()
        .to_string();
    assert!(e.contains("out of range"), "{e}");
    let e = NormSite::parse("input", Some(2), &model)
        .unwrap_err()
        .to_string();
    assert!(e.contains("layer 2 out of range"), "{e}");
    let e = NormSite::parse("middle", Some(0), &model)
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown norm"), "{e}");
}

#[test]
fn norm_gradient_matches_finite_differences() {
    let model = Model::random(Config::tiny(Arch::Llama), DType::F64, 9).unwrap();
    let texts = vec![vec![1u32, 5, 9, 2, 30, 11, 4], vec![3u32, 3, 8, 20, 1]];
    for site in [
        NormSite::Input(1),
        NormSite::PostAttention(0),
        NormSite::Final,
    ] {
        let g = dims::norm_gradient(&model, site, &texts).unwrap();
        let w = broca::perturb::ops::values_f64(
            model
                .param(&site.param_name())
                .unwrap()
                .var()
                .unwrap()
                .as_tensor(),
        )
        .unwrap();
        let eps = 1e-5;
        let ds: Vec<usize> = (0..16).collect();
        let plus: Vec<f64> = ds.iter().map(|&d| w[d] + eps).collect();
        let minus: Vec<f64> = ds.iter().map(|&d| w[d] - eps).collect();
        let lp = dims::scan_batched(&model, site, &ds, &plus, &texts, 16, &mut |_| {}).unwrap();
        let lm = dims::scan_batched(&model, site, &ds, &minus, &texts, 16, &mut |_| {}).unwrap();
        for d in 0..16 {
            let mean = |v: &Vec<f64>| v.iter().sum::<f64>() / v.len() as f64;
            let fd = (mean(&lp[d]) - mean(&lm[d])) / (2.0 * eps);
            assert!(
                (fd - g[d]).abs() < 1e-6 * (1.0 + fd.abs()),
                "{site:?} dim {d}: grad {} vs finite diff {fd}",
                g[d]
            );
        }
    }
}

#[test]
fn spearman_known_values() {
    assert!((dims::spearman(&[1., 2., 3., 4.], &[10., 20., 30., 40.]) - 1.0).abs() < 1e-12);
    assert!((dims::spearman(&[1., 2., 3., 4.], &[4., 3., 2., 1.]) + 1.0).abs() < 1e-12);
    // ties get average ranks: ranks a = [0.5,0.5,2,3], b = [0,1,2,3] → rho = 0.9486833
    assert!(
        (dims::spearman(&[1., 1., 2., 3.], &[1., 2., 3., 4.]) - 0.9486832980505138).abs() < 1e-9
    );
}
