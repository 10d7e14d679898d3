//! Region statistics and heatmaps against brute force, model mismatch refusal, and the
//! `broca region` command line end to end.

mod common;

use broca::mask;
use broca::model::{Arch, Config, Model};
use broca::region::stats::{concentration, gini, region_stats, tensor_stats, HiddenAxis};
use broca::region::{self, heatmap, Bits, Region};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

fn random_bits(shape: &[usize], p: f64, r: &mut impl Rng) -> Bits {
    let n: usize = shape.iter().product();
    Bits {
        shape: shape.to_vec(),
        data: (0..n).map(|_| r.gen_bool(p) as u8).collect(),
    }
}

/// A two-layer region shaped like Config::tiny(Llama) (hidden 16, ffn 24, q 16, kv 8).
fn tiny_region(seed: u64, p: f64) -> Region {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    Config::tiny(Arch::Llama)
        .param_shapes()
        .into_iter()
        .filter(|(n, _)| n.starts_with("model.layers."))
        .map(|(n, s)| (n, random_bits(&s, p, &mut r)))
        .collect()
}

#[test]
fn gini_and_top_share_known_values() {
    assert_eq!(gini(&[1, 1, 1, 1]), 0.0);
    assert!((gini(&[0, 0, 0, 4]) - 0.75).abs() < 1e-12);
    // Σ_ij |x_i - x_j| / (2 n² mean) = 20 / 48
    assert!(
        (gini(&[0, 1, 2, 3]) - 20.0 / 48.0).abs() < 1e-12,
        "{}",
        gini(&[0, 1, 2, 3])
    );
    assert_eq!(gini(&[0, 0]), 0.0);
    let mut c = vec![1u64; 200];
    c[7] = 101;
    c[3] = 51;
    let k = concentration(&c);
    assert_eq!(k.top1pct_len, 2);
    assert!((k.top1pct_share - 152.0 / 350.0).abs() < 1e-12);
}

#[test]
fn stats_row_and_column_counts_match_brute_force() {
    let r = tiny_region(7, 0.2);
    let s = region_stats(&r);
    let mut layer_hidden: Vec<Vec<u64>> = vec![vec![0; 16]; 2];
    for t in &s.tensors {
        let b = &r[&t.name];
        assert_eq!(t.count, b.count(), "{}", t.name);
        if let [rows, cols] = b.shape[..] {
            for i in 0..rows {
                let want: u64 = (0..cols).map(|j| b.data[i * cols + j] as u64).sum();
                assert_eq!(t.row_counts[i], want, "{} row {i}", t.name);
            }
            for j in 0..cols {
                let want: u64 = (0..rows).map(|i| b.data[i * cols + j] as u64).sum();
                assert_eq!(t.col_counts[j], want, "{} col {j}", t.name);
            }
            // top rows: by count descending, then index
            let mut idx: Vec<usize> = (0..rows).filter(|&i| t.row_counts[i] > 0).collect();
            idx.sort_by(|&a, &c| t.row_counts[c].cmp(&t.row_counts[a]).then(a.cmp(&c)));
            let got: Vec<usize> = t.top_rows.iter().map(|x| x.index).collect();
            assert_eq!(
                got,
                idx.into_iter().take(10).collect::<Vec<_>>(),
                "{}",
                t.name
            );
            let reads = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]
                .iter()
                .any(|m| t.name.contains(m));
            let want_axis = if reads {
                HiddenAxis::Col
            } else {
                HiddenAxis::Row
            };
            assert_eq!(t.hidden_axis, want_axis, "{}", t.name);
            let l: usize = t.name.split('.').nth(2).unwrap().parse().unwrap();
            let hc = if reads { &t.col_counts } else { &t.row_counts };
            assert_eq!(hc.len(), 16, "{}: hidden axis has the hidden size", t.name);
            layer_hidden[l]
                .iter_mut()
                .zip(hc)
                .for_each(|(a, b)| *a += b);
        } else {
            assert_eq!(t.hidden_axis, HiddenAxis::Entry, "{}", t.name);
            let want: Vec<usize> = (0..b.data.len()).filter(|&i| b.data[i] == 1).collect();
            assert_eq!(t.selected, want);
        }
    }
    for l in &s.layers {
        assert_eq!(l.hidden_counts, layer_hidden[l.layer], "layer {}", l.layer);
        let top = &l.top_dims[0];
        assert_eq!(top.count, *layer_hidden[l.layer].iter().max().unwrap());
    }
    let g = s.global.as_ref().unwrap();
    let want: Vec<u64> = (0..16)
        .map(|d| layer_hidden[0][d] + layer_hidden[1][d])
        .collect();
    assert_eq!(g.hidden_counts, want);
}

#[test]
fn a_planted_hidden_dimension_is_found() {
    // random 1% background plus all of column 5 in every reading matrix, row 5 in o/down
    let mut r = tiny_region(3, 0.01);
    for (n, b) in r.iter_mut() {
        if let [rows, cols] = b.shape[..] {
            let reads = !(n.contains("o_proj") || n.contains("down_proj"));
            for i in 0..rows {
                for j in 0..cols {
                    if (reads && j == 5) || (!reads && i == 5) {
                        b.data[i * cols + j] = 1;
                    }
                }
            }
        }
    }
    let s = region_stats(&r);
    let g = s.global.unwrap();
    assert_eq!(g.top_dims[0].dim, 5);
    assert_eq!(g.top_dims[0].layers_in_top10, 2);
    for l in &s.layers {
        assert_eq!(l.top_dims[0].dim, 5);
        assert_eq!(
            l.top_dims[0].matrices.len(),
            7,
            "{:?}",
            l.top_dims[0].matrices
        );
    }
    let q = tensor_stats(
        "model.layers.0.self_attn.q_proj.weight",
        &r["model.layers.0.self_attn.q_proj.weight"],
    );
    assert_eq!(q.top_cols[0].index, 5);
    assert!(q.hidden.unwrap().top1pct_share > 0.8);
}

#[test]
fn heatmap_pooling_sums_blocks_and_fits_512() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let b = random_bits(&[1100, 700], 0.01, &mut rng);
    let g = heatmap::tensor_grid(&b);
    assert_eq!((g.rows, g.cols), (367, 350)); // blocks of 3 rows × 2 columns
    assert_eq!(g.data.iter().sum::<f64>() as u64, b.count());
    for (pr, pc) in [(0, 0), (100, 200), (366, 349)] {
        let mut want = 0.0;
        for r in pr * 3..(pr * 3 + 3).min(1100) {
            for c in pc * 2..pc * 2 + 2 {
                want += b.data[r * 700 + c] as f64;
            }
        }
        assert_eq!(g.data[pr * g.cols + pc], want, "block ({pr},{pc})");
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("h.png");
    heatmap::write_grid(&p, &g, 64, heatmap::Scale::Counts).unwrap();
    let dec = png::Decoder::new(std::fs::File::open(&p).unwrap());
    let reader = dec.read_info().unwrap();
    let info = reader.info();
    assert_eq!((info.width, info.height), (350, 367));
    assert_eq!(heatmap::color(0.0), [0, 0, 4]);
    assert_eq!(heatmap::color(1.0), [252, 255, 164]);
}

/// Layer 0 and layer 29 of SmolLM2's parameter shapes as an all-zero mask.
fn smollm2_mask() -> mask::Mask {
    let cfg = broca::model::gguf::GgufFile::open(&common::asset(common::SMOLLM))
        .unwrap()
        .config()
        .unwrap();
    cfg.param_shapes()
        .into_iter()
        .filter(|(n, _)| n.starts_with("model.layers.0.") || n.starts_with("model.layers.29."))
        .map(|(n, s)| {
            let t = mask::MaskTensor::from_indices(&n, &s, []).unwrap();
            (n, t)
        })
        .collect()
}

#[test]
fn a_smollm2_mask_is_refused_for_qwen() {
    let m = smollm2_mask();
    let smol = mask::model_shapes(&common::asset(common::SMOLLM)).unwrap();
    mask::check_against_shapes(&m, &smol).expect("SmolLM2 mask fits SmolLM2");
    let qwen = mask::model_shapes(&common::asset(common::QWEN)).unwrap();
    let err = mask::check_against_shapes(&m, &qwen)
        .unwrap_err()
        .to_string();
    assert!(err.contains("another model"), "{err}");
    // names alone: layer 29 does not exist in Qwen's 24 layers
    let only29: mask::Mask = m
        .into_iter()
        .filter(|(n, _)| n.starts_with("model.layers.29."))
        .collect();
    let err = mask::check_against_shapes(&only29, &qwen)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.layers.29.") && err.contains("not a parameter"),
        "{err}"
    );

    // the command line refuses it too, with a one-line error naming the mask
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("smol.safetensors");
    mask::save(
        &path,
        &smollm2_mask(),
        serde_json::json!({"method": "test"}),
    )
    .unwrap();
    let out = broca(&[
        "region",
        "stats",
        path.to_str().unwrap(),
        "--model",
        common::asset(common::QWEN).to_str().unwrap(),
        "--out",
        dir.path().join("st").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = common::error_line(&stderr);
    assert!(
        line.contains("smol.safetensors") && line.contains("another model"),
        "{stderr}"
    );
    assert!(
        !dir.path().join("st").exists(),
        "nothing written on refusal"
    );
}

fn broca(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_broca"))
        .args(args)
        .output()
        .expect("run broca")
}

fn run_json(args: &[&str]) -> serde_json::Value {
    let out = broca(args);
    assert!(
        out.status.success(),
        "broca {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("broca {args:?}: stdout is not one JSON object: {e}"))
}

/// Score files for a tiny llama: every parameter, random positive values.
fn tiny_scores(dir: &Path, langs: &[&str]) -> Vec<String> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut out = Vec::new();
    for lang in langs {
        let tensors: Vec<(String, Tensor)> = Config::tiny(Arch::Llama)
            .param_shapes()
            .into_iter()
            .map(|(n, s)| {
                let len: usize = s.iter().product();
                let v: Vec<f32> = (0..len).map(|_| rng.gen::<f32>()).collect();
                (n, Tensor::from_vec(v, s.as_slice(), &Device::Cpu).unwrap())
            })
            .collect();
        let meta: HashMap<String, String> = [("lang".to_string(), lang.to_string())].into();
        let p = dir.join(format!("{lang}.safetensors"));
        broca::model::hf::save_safetensors(&p, &tensors, Some(meta)).unwrap();
        out.push(p.to_string_lossy().to_string());
    }
    out
}

#[test]
fn region_cli_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).to_string_lossy().to_string();
    let files = tiny_scores(dir.path(), &["ar", "es", "zh"]);
    let model_dir = d("model");
    Model::random(Config::tiny(Arch::Llama), DType::F32, 1)
        .unwrap()
        .save_hf(Path::new(&model_dir))
        .unwrap();
    let scores = files.join(",");

    let v = run_json(&[
        "region",
        "core",
        "--scores",
        &scores,
        "--k",
        "0.1",
        "--model",
        &model_dir,
        "--out",
        &d("core.safetensors"),
        "--json",
    ]);
    assert!(v["total"]["count"].as_u64().unwrap() > 0);
    let core = region::load(Path::new(&d("core.safetensors"))).unwrap();
    for (n, b) in &core {
        assert!(
            n.starts_with("model.layers."),
            "{n} is not covered by default"
        );
        assert_eq!(b.count(), (0.1 * b.data.len() as f64).floor() as u64, "{n}");
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d("core.json")).unwrap()).unwrap();
    assert_eq!(summary["how"]["method"], "core");
    assert_eq!(
        summary["how"]["languages"],
        serde_json::json!(["ar", "es", "zh"])
    );
    assert_eq!(summary["how"]["scope"], "per-tensor");

    let v = run_json(&[
        "region",
        "core",
        "--scores",
        &files[0],
        "--scores",
        &files[1],
        "--k",
        "0.05",
        "--select",
        "bottom",
        "--scope",
        "global",
        "--include",
        "all",
        "--out",
        &d("bottom.safetensors"),
        "--json",
    ]);
    let total = Config::tiny(Arch::Llama).num_params() as f64;
    assert_eq!(
        v["total"]["count"].as_u64().unwrap(),
        (0.05 * total).floor() as u64
    );

    run_json(&[
        "region",
        "mono",
        "--target",
        "es",
        "--scores",
        &scores,
        "--k",
        "0.1",
        "--out",
        &d("mono.safetensors"),
        "--json",
    ]);
    run_json(&[
        "region",
        "random",
        "--like",
        &d("core.safetensors"),
        "--seed",
        "3",
        "--out",
        &d("rnd.safetensors"),
        "--json",
    ]);
    run_json(&[
        "region",
        "ops",
        "union",
        &d("core.safetensors"),
        &d("rnd.safetensors"),
        "--out",
        &d("u.safetensors"),
        "--json",
    ]);
    let c = run_json(&[
        "region",
        "compare",
        &d("core.safetensors"),
        &d("u.safetensors"),
        "--json",
    ]);
    assert_eq!(c["total"]["of_a"], 1.0, "core ⊆ core ∪ random: {c}");
    assert_eq!(c["total"]["a"], region::total_count(&core));
    let s = run_json(&[
        "region",
        "stats",
        &d("core.safetensors"),
        "--model",
        &model_dir,
        "--out",
        &d("stats"),
        "--json",
    ]);
    assert!(
        Path::new(&d("stats/stats.json")).exists() && Path::new(&d("stats/overview.png")).exists()
    );
    for img in s["images"].as_array().unwrap() {
        assert!(Path::new(img["path"].as_str().unwrap()).exists());
    }

    // bad input: one-line errors naming the problem, nothing written
    let out = broca(&[
        "region",
        "core",
        "--scores",
        &scores,
        "--k",
        "1.5",
        "--out",
        &d("bad.safetensors"),
    ]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--k 1.5"));
    let out = broca(&[
        "region",
        "compare",
        &d("core.safetensors"),
        &d("bottom.safetensors"),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("bottom.safetensors") && err.contains("do not match"),
        "{err}"
    );
    assert!(!Path::new(&d("bad.safetensors")).exists());
}
