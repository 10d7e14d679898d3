//! Training SmolLM2 for a few steps on a small real corpus: the loss falls, and the saved
//! model loads back with `broca ppl` giving the same PPL as the model in memory.

use broca::data::TextInput;
use broca::model::Model;
use broca::train::{self, forget, AdamWConfig, RunOptions, Schedule, TrainConfig, TrainInputs};
use std::path::PathBuf;

fn asset(rel: &str) -> PathBuf {
    let dir = broca::data::assets_dir();
    let dir = if dir.is_relative() {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(dir)
    } else {
        dir
    };
    let p = dir.join(rel);
    assert!(
        p.exists(),
        "asset {} missing: run scripts/fetch-assets",
        p.display()
    );
    p
}

#[test]
fn smollm2_loss_falls_and_saved_model_gives_same_ppl() {
    let model_path = asset("smollm2-135m-instruct-q4_1.gguf");
    let text = asset("udhr/en.txt");
    let mut model = train::into_f32(Model::load(&model_path).unwrap()).unwrap();
    let input = vec![TextInput {
        lang: "en".into(),
        path: text.clone(),
    }];
    let data = forget::tokenize(&model, &input, Some(1024)).unwrap();
    let eval = forget::tokenize(&model, &input, Some(256)).unwrap();
    assert_eq!((data[0].1.len(), eval[0].1.len()), (1024, 256));
    let cfg = TrainConfig {
        steps: 4,
        lr: 1e-4,
        batch: 2,
        grad_accum: 1,
        seq_len: 64,
        warmup: 1,
        schedule: Schedule::Constant,
        adamw: AdamWConfig {
            weight_decay: 0.0,
            ..AdamWConfig::default()
        },
        seed: 3,
        eval_every: 2,
        eval_seq_len: 64,
        checkpoint_every: 0,
        keep_checkpoints: 1,
        save_model: true,
    };
    let dir = tempfile::tempdir().unwrap();
    let inputs = TrainInputs {
        data,
        eval,
        freeze: None,
    };
    let r = train::train(
        &mut model,
        &inputs,
        &cfg,
        dir.path(),
        &RunOptions::default(),
    )
    .unwrap();
    let steps: Vec<usize> = r.eval.iter().map(|p| p.step).collect();
    assert_eq!(steps, vec![0, 2, 4]);
    let (p0, p2, p4) = (r.eval[0].ppl, r.eval[1].ppl, r.eval[2].ppl);
    eprintln!(
        "PPL on the training text: {p0} -> {p2} -> {p4}; losses {:?}",
        r.losses
    );
    assert!(
        p2 < p0 && p4 < p2 && p4 < p0 * 0.9,
        "PPL on the training text should fall: {p0} -> {p2} -> {p4}"
    );
    let early = (r.losses[0] + r.losses[1]) / 2.0;
    let late = (r.losses[2] + r.losses[3]) / 2.0;
    assert!(late < early, "training loss should fall: {:?}", r.losses);
    // eval files written as training went
    let csv = std::fs::read_to_string(dir.path().join("eval.csv")).unwrap();
    assert_eq!(csv.lines().count(), 4, "{csv}");

    // the saved directory reloads with identical weights (compared by digest, so that the
    // two copies never sit in memory together)
    let digest = |m: &Model| -> Vec<(String, Vec<u8>)> {
        use sha2::{Digest, Sha256};
        m.params
            .iter()
            .map(|p| {
                let v: Vec<f32> = p
                    .var()
                    .unwrap()
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let mut h = Sha256::new();
                v.iter().for_each(|x| h.update(x.to_bits().to_le_bytes()));
                (p.name.clone(), h.finalize().to_vec())
            })
            .collect()
    };
    let trained = digest(&model);
    drop(model);
    let loaded = Model::load(dir.path()).unwrap();
    assert!(trained == digest(&loaded), "weights differ after reload");
    drop(loaded);
    // and `broca ppl` on it gives the in-memory PPL
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_broca"))
        .args(["ppl", "--model"])
        .arg(dir.path())
        .arg("--lang")
        .arg(format!("en={}", text.display()))
        .args(["--max-tokens", "256", "--seq-len", "64", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "broca ppl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ppl = v["results"][0]["ppl"].as_f64().unwrap();
    assert!(
        (ppl - p4).abs() <= 1e-9 * p4,
        "broca ppl of the saved model {ppl} != in-memory {p4}"
    );
}
