//! The perturbation commands end to end: bad SPECs fail cleanly, `generate --perturb`,
//! `ablate --json` shape and control labels, `perturb --save`, `dims` outputs.

mod common;

use broca::mask::Mask;
use broca::model::{Arch, Config, Model};
use candle_core::{DType, Device, Tensor};
use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn smollm_path() -> PathBuf {
    let dir = broca::data::assets_dir();
    let dir = if dir.is_relative() {
        root().join(dir)
    } else {
        dir
    };
    let p = dir.join("smollm2-135m-instruct-q4_1.gguf");
    assert!(
        p.exists(),
        "asset {} missing: run scripts/fetch-assets",
        p.display()
    );
    p
}

fn broca(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_broca"))
        .args(args)
        .current_dir(root())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn bad_specs_fail_with_one_clear_line() {
    let model = smollm_path();
    let m = model.to_str().unwrap();
    for (spec, want) in [
        ("norm:0:input:9999:zero", "dimension 9999 out of range"),
        ("norm:final:576:scale:10", "dimension 576 out of range"),
        ("norm:99:input:1:zero", "layer 99 out of range"),
        ("norm:x:input:1:zero", "'x' is not a layer number"),
        ("norm:0:sideways:1:zero", "unknown norm 'sideways'"),
        ("norm:0:input:1:explode", "unknown op 'explode'"),
        ("norm:0:input:1:scale", "needs a value"),
        ("norm:0:input:1:scale:big", "not a number"),
        ("no/such/mask.safetensors:zero", "no such mask file"),
    ] {
        let (code, stdout, stderr) = broca(&[
            "generate",
            "--model",
            m,
            "--prompt",
            "Hi",
            "--max-tokens",
            "1",
            "--perturb",
            spec,
        ]);
        assert_ne!(code, 0, "{spec}: should fail");
        assert!(stdout.is_empty(), "{spec}: printed {stdout}");
        let line = common::error_line(&stderr);
        assert!(line.contains(want), "{spec}: got '{line}', want '{want}'");
        assert!(
            line.contains(spec),
            "{spec}: the error should name the SPEC: {line}"
        );
    }
}

#[test]
fn generate_prints_baseline_then_each_perturbed_completion() {
    let model = smollm_path();
    let specs = ["norm:0:input:5:scale:10", "norm:final:3:zero"];
    let (code, stdout, stderr) = broca(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "3",
        "--perturb",
        specs[0],
        specs[1],
        "--json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let c = v["completions"].as_array().unwrap();
    let labels: Vec<&str> = c.iter().map(|x| x["condition"].as_str().unwrap()).collect();
    assert_eq!(labels, ["base", specs[0], specs[1]]);
    assert!(c.iter().all(|x| !x["text"].as_str().unwrap().is_empty()));
}

fn tiny_checkpoint(dir: &std::path::Path) -> Model {
    let model = Model::random(Config::tiny(Arch::Llama), DType::F32, 1).unwrap();
    model.save_hf(dir).unwrap();
    model
}

#[test]
fn perturb_save_writes_only_the_region_changed() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("base");
    let model = tiny_checkpoint(&ckpt);
    let name = "model.layers.1.mlp.down_proj.weight";
    let dims = model.param(name).unwrap().shape.clone();
    let mut m = vec![0u8; dims.iter().product()];
    for i in [0usize, 7, 100] {
        m[i] = 1;
    }
    let mut mask = Mask::new();
    mask.insert(
        name.to_string(),
        broca::mask::MaskTensor::from_bits(name, &dims, &m).unwrap(),
    );
    let mpath = tmp.path().join("r.safetensors");
    broca::mask::save(&mpath, &mask, serde_json::json!({})).unwrap();
    let out = tmp.path().join("zeroed");
    let (code, _, stderr) = broca(&[
        "perturb",
        "--model",
        ckpt.to_str().unwrap(),
        "--region",
        mpath.to_str().unwrap(),
        "--op",
        "zero",
        "--save",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let saved = Model::load(&out).unwrap();
    for p in &model.params {
        let a: Vec<f32> = p
            .var()
            .unwrap()
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let b: Vec<f32> = saved
            .param(&p.name)
            .unwrap()
            .var()
            .unwrap()
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            if p.name == name && [0, 7, 100].contains(&i) {
                assert_eq!(*y, 0.0);
            } else {
                assert_eq!(x.to_bits(), y.to_bits(), "{}[{i}] changed", p.name);
            }
        }
    }
}

#[test]
fn ablate_json_has_the_contract_shape_and_labels() {
    let model_path = smollm_path();
    let model = Model::load(&model_path).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let names = [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.29.mlp.down_proj.weight",
    ];
    let mut mask = Mask::new();
    let mut scores = Vec::new();
    for (k, n) in names.iter().enumerate() {
        let d = model.param(n).unwrap().shape.clone();
        let numel: usize = d.iter().product();
        let m: Vec<u8> = (0..numel).map(|i| (i % 97 == k) as u8).collect();
        mask.insert(
            n.to_string(),
            broca::mask::MaskTensor::from_bits(n, &d, &m).unwrap(),
        );
        let s: Vec<f32> = (0..numel)
            .map(|i| ((i * 7919) % 1000) as f32 - 500.0)
            .collect();
        scores.push((
            n.to_string(),
            Tensor::from_vec(s, d.as_slice(), &Device::Cpu).unwrap(),
        ));
    }
    let mpath = tmp.path().join("core.safetensors");
    broca::mask::save(&mpath, &mask, serde_json::json!({})).unwrap();
    let spath = tmp.path().join("en.safetensors");
    broca::model::hf::save_safetensors(&spath, &scores, None).unwrap();
    let region = format!("core={}", mpath.display());
    let fix = |l: &str| {
        format!(
            "{l}={}",
            root()
                .join(format!("tests/fixtures/udhr-{l}.txt"))
                .display()
        )
    };
    let (code, stdout, stderr) = broca(&[
        "ablate",
        "--model",
        model_path.to_str().unwrap(),
        "--region",
        &region,
        "--op",
        "zero,scale:2",
        "--controls",
        "random,bottom,top",
        "--scores",
        spath.to_str().unwrap(),
        "--eval",
        &fix("en"),
        &fix("zh"),
        "--max-tokens",
        "16",
        "--seq-len",
        "16",
        "--json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("stdout is one JSON object");
    assert_eq!(v["languages"], serde_json::json!(["en", "zh"]));
    let conds = v["conditions"].as_array().unwrap();
    let got: Vec<(String, String)> = conds
        .iter()
        .map(|c| {
            (
                c["condition"].as_str().unwrap().into(),
                c["op"].as_str().unwrap().into(),
            )
        })
        .collect();
    let mut want = vec![("base".to_string(), "none".to_string())];
    for op in ["zero", "scale:2"] {
        for c in ["core", "random(core)", "bottom(core)", "top(core)"] {
            want.push((c.into(), op.into()));
        }
    }
    assert_eq!(got, want);
    let base = conds[0]["geomean_ppl"].as_f64().unwrap();
    assert_eq!(conds[0]["ratio_to_base"].as_f64().unwrap(), 1.0);
    for c in conds {
        let r = c["results"].as_array().unwrap();
        assert_eq!(r.len(), 2);
        let ppls: Vec<f64> = r.iter().map(|x| x["ppl"].as_f64().unwrap()).collect();
        assert!(r.iter().all(|x| x["bits_per_byte"].as_f64().unwrap() > 0.0));
        let g = (ppls.iter().map(|p| p.ln()).sum::<f64>() / 2.0).exp();
        assert!((c["geomean_ppl"].as_f64().unwrap() - g).abs() < 1e-9 * g);
        assert!((c["ratio_to_base"].as_f64().unwrap() - g / base).abs() < 1e-9);
    }
    // zeroing 1% of two tensors changes the PPL
    assert_ne!(conds[1]["geomean_ppl"], conds[0]["geomean_ppl"]);
}

#[test]
fn dims_writes_json_csv_and_png() {
    let model = smollm_path();
    let tmp = tempfile::tempdir().unwrap();
    let en = format!("en={}", root().join("tests/fixtures/udhr-en.txt").display());
    let (code, stdout, stderr) = broca(&[
        "dims",
        "--model",
        model.to_str().unwrap(),
        "--layer",
        "0",
        "--norm",
        "input",
        "--op",
        "scale:10",
        "--dims",
        "0-5",
        "--screen-tokens",
        "8",
        "--confirm-top",
        "2",
        "--max-tokens",
        "16",
        "--eval",
        &en,
        "--out",
        tmp.path().to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let rows = v["dims"].as_array().unwrap();
    assert_eq!(rows.len(), 6);
    // the two confirmed dims come first and have a full-length ppl
    assert!(rows[..2].iter().all(|r| r["ppl"].is_f64()));
    assert!(rows[0]["ppl"].as_f64().unwrap() >= rows[1]["ppl"].as_f64().unwrap());
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("dims.json")).unwrap())
            .unwrap();
    assert_eq!(file["dims"], v["dims"]);
    let csv = std::fs::read_to_string(tmp.path().join("dims.csv")).unwrap();
    assert_eq!(csv.lines().count(), 7);
    let png = std::fs::read(tmp.path().join("dims.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    // bad layer: clean error
    let (code, _, stderr) = broca(&[
        "dims",
        "--model",
        model.to_str().unwrap(),
        "--layer",
        "30",
        "--norm",
        "input",
        "--op",
        "zero",
    ]);
    assert_ne!(code, 0);
    assert!(stderr.contains("layer 30 out of range"), "{stderr}");
}

/// One loader checks every mask the same way: a mask holding a value other than 0 and 1 is
/// refused by every command that reads masks, naming the file, the tensor and the value.
#[test]
fn a_mask_holding_2_is_refused_by_every_command() {
    use broca::safetensors_writer::{write, Entry};
    let model = smollm_path();
    let m = model.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let en = tmp.path().join("en.txt");
    std::fs::write(
        &en,
        "All human beings are born free and equal in dignity and rights.",
    )
    .unwrap();
    let en_pair = format!("en={}", en.display());
    for value in [2u8, 255] {
        let bad = tmp.path().join(format!("bad{value}.safetensors"));
        let name = "model.layers.0.input_layernorm.weight";
        let mut v = vec![0u8; 576];
        v[3] = 1;
        v[10] = value;
        let t = Tensor::from_vec(v, 576, &Device::Cpu).unwrap();
        write(&bad, vec![Entry::tensor(name, t)], None).unwrap();
        let b = bad.to_str().unwrap();
        let region = format!("core={b}");
        let spec = format!("{b}:zero");
        let out = tmp.path().join(format!("out{value}"));
        let o = out.to_str().unwrap();
        let runs: Vec<Vec<&str>> = vec![
            vec![
                "perturb", "--model", m, "--region", b, "--op", "zero", "--save", o,
            ],
            vec![
                "ablate",
                "--model",
                m,
                "--region",
                &region,
                "--eval",
                &en_pair,
                "--max-tokens",
                "8",
            ],
            vec![
                "generate",
                "--model",
                m,
                "--prompt",
                "Hello",
                "--max-tokens",
                "2",
                "--perturb",
                &spec,
            ],
            vec![
                "train", "--model", m, "--data", &en_pair, "--freeze", b, "--steps", "1", "--out",
                o,
            ],
            vec!["region", "stats", b, "--out", o],
            vec!["region", "compare", b, b],
            vec!["region", "random", "--like", b, "--out", o],
        ];
        for args in runs {
            let (code, _, stderr) = broca(&args);
            assert_eq!(code, 1, "{args:?}: {stderr}");
            let line = common::error_line(&stderr);
            assert!(
                line.contains(b)
                    && line.contains(name)
                    && line.contains(&format!("value {value} at flat index 10")),
                "{args:?}: {line}"
            );
            assert!(!out.exists(), "{args:?} left {}", out.display());
        }
    }
}
