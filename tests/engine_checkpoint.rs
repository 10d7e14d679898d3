//! Sharded Hugging Face checkpoints made by the synthetic generator: they load memory-mapped
//! and run ppl/score/ablate; bad ones (a truncated shard, an index naming a missing shard, a
//! header that lies about its sizes) are refused with one clear error naming the file.

mod common;

use broca::model::{Model, Residency};
use broca::synth::{write_synthetic, Preset, SynthDtype, SynthOptions};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tiny qwen2 checkpoint in several bf16 shards, with SmolLM2's tokenizer.
fn tiny(dir: &Path) -> PathBuf {
    let out = dir.join("tiny");
    let mut config = Preset::Tiny.config();
    config.vocab_size = 49152;
    let opts = SynthOptions {
        out: out.clone(),
        config,
        tokenizer: Some(common::gguf_tokenizer(common::SMOLLM)),
        seed: 3,
        shard_size: 1 << 20,
        dtype: SynthDtype::Bf16,
    };
    write_synthetic(&opts, &mut |_| {}).unwrap();
    assert!(out.join("model.safetensors.index.json").exists());
    out
}

fn shards(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    v.sort();
    v
}

fn load_err(dir: &Path) -> String {
    match Model::load_with(dir, Residency::Mapped) {
        Ok(_) => panic!("{} should be refused", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn a_sharded_bf16_checkpoint_loads_mapped_and_equals_its_dense_load() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny(tmp.path());
    assert!(shards(&dir).len() > 2);
    let mapped = Model::load_with(&dir, Residency::Mapped).unwrap();
    let dense = Model::load_with(&dir, Residency::Dense).unwrap();
    assert!(!mapped.is_dense());
    let ids = Model::ids_tensor(&(0..40).map(|i| (i * 7) % 500).collect::<Vec<u32>>()).unwrap();
    let a = mapped
        .token_nll(&ids, false)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let b = dense
        .token_nll(&ids, false)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(a, b);
    // bf16 values decode exactly: norms are 1, matrices are bf16-representable
    let n = mapped
        .values_of("model.layers.1.post_attention_layernorm.weight")
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(n.iter().all(|&x| x == 1.0));
    let q: Vec<f32> = mapped
        .values_of("model.layers.0.self_attn.q_proj.weight")
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(q.iter().all(|&x| half::bf16::from_f32(x).to_f32() == x));
}

#[test]
fn a_truncated_shard_is_refused_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny(tmp.path());
    let victim = shards(&dir)[1].clone();
    let len = std::fs::metadata(&victim).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&victim)
        .unwrap();
    f.set_len(len - 1000).unwrap();
    let e = load_err(&dir);
    let name = victim.file_name().unwrap().to_str().unwrap();
    assert!(e.contains(name), "{e}");
    assert!(e.contains("truncated"), "{e}");
}

#[test]
fn an_index_naming_a_missing_shard_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny(tmp.path());
    let gone = shards(&dir)[2].clone();
    std::fs::remove_file(&gone).unwrap();
    let e = load_err(&dir);
    let name = gone.file_name().unwrap().to_str().unwrap();
    assert!(e.contains("model.safetensors.index.json"), "{e}");
    assert!(e.contains(name) && e.contains("missing"), "{e}");
}

#[test]
fn header_values_are_checked_before_use() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny(tmp.path());
    let cfg_path = dir.join("config.json");
    let good = std::fs::read_to_string(&cfg_path).unwrap();
    for (key, value, want) in [
        ("num_attention_heads", "0", "num_attention_heads is 0"),
        ("num_hidden_layers", "1000000000", "layers"),
        ("rms_norm_eps", "-1e-6", "epsilon"),
        ("hidden_size", "96", "shape"),
    ] {
        let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
        v[key] = serde_json::from_str(value).unwrap();
        std::fs::write(&cfg_path, v.to_string()).unwrap();
        let e = load_err(&dir);
        assert!(e.contains(want), "{key}={value}: {e}");
    }
}

#[test]
fn a_memory_limit_below_one_layer_is_refused_before_work() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny(tmp.path());
    let text = common::fixture("udhr-en.txt");
    let out = tmp.path().join("scores");
    let res = Command::new(env!("CARGO_BIN_EXE_broca"))
        .args(["score", "--model"])
        .arg(&dir)
        .args(["--text"])
        .arg(&text)
        .args([
            "--tokens",
            "64",
            "--seq-len",
            "32",
            "--mem-limit",
            "64K",
            "--out",
        ])
        .arg(&out)
        .env("BROCA_ASSETS", common::assets())
        .output()
        .unwrap();
    assert_eq!(res.status.code(), Some(1));
    let err = String::from_utf8_lossy(&res.stderr);
    let last = err.trim().lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: --mem-limit") && last.contains("too small for one layer"),
        "{err}"
    );
    assert!(!out.join("udhr-en.safetensors").exists());
}
