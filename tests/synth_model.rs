//! `broca synth`: random checkpoints with a real model's shapes. The tiny preset (with
//! SmolLM2's tokenizer, so the vocabulary is raised to 49,152) is written by the binary and
//! checked: it loads, shapes follow `Config::param_shapes`, norms are exactly 1, weights look
//! like N(0, 0.02²), shards respect --shard-size and the index, output depends only on the
//! seed (not on shard size or threads), `ppl` runs on it, the sharded `model_sha256` rule, and
//! bad flags give one error line.

mod common;

use broca::model::Model;
use broca::safetensors_writer::{self, Entry};
use common::{asset, fixture, SMOLLM};
use safetensors::Dtype;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// SmolLM2's vocabulary: the tiny preset's 512 raised to it.
const VOCAB: usize = 49152;

fn broca(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_broca"));
    c.args(args)
        .env("BROCA_ASSETS", common::assets())
        .env("RUST_BACKTRACE", "1");
    for (k, v) in envs {
        c.env(k, v);
    }
    c.output().expect("cannot run broca")
}

/// Writes the tiny preset with SmolLM2's tokenizer into `dir` (plus `extra` flags) and
/// returns the `--json` summary.
fn synth(dir: &Path, extra: &[&str], envs: &[(&str, &str)]) -> Value {
    let tok = asset(SMOLLM);
    let mut args = vec![
        "synth",
        "--preset",
        "tiny",
        "--out",
        dir.to_str().unwrap(),
        "--tokenizer",
        tok.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = broca(&args, envs);
    assert!(
        out.status.success(),
        "synth failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is one JSON object")
}

/// The header of a safetensors file (tensor name → info, `__metadata__` removed) and the
/// number of tensor bytes after it.
fn header(path: &Path) -> (serde_json::Map<String, Value>, u64) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut h: serde_json::Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    h.remove("__metadata__");
    (h, (bytes.len() - 8 - n) as u64)
}

/// Every file in `dir`, by name, with its bytes.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (
                p.file_name().unwrap().to_string_lossy().to_string(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect()
}

fn load(dir: &Path) -> Model {
    Model::load(dir).unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()))
}

fn values(m: &Model, name: &str) -> Vec<f32> {
    m.values_of(name)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn mean_std(xs: &[f32]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = xs.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

fn hex_sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[test]
fn tiny_checkpoint_loads_with_exact_shapes_unit_norms_and_random_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    let s = synth(&dir, &[], &[]);
    for k in ["out", "params", "bytes", "shards", "seconds"] {
        assert!(s.get(k).is_some(), "summary has no {k}: {s}");
    }
    assert_eq!(s["shards"], 1);
    let mut names: Vec<String> = files(&dir).into_keys().collect();
    names.sort();
    assert_eq!(
        names,
        ["config.json", "model.safetensors", "tokenizer.json"]
    );
    assert_eq!(
        s["bytes"].as_u64().unwrap(),
        std::fs::metadata(dir.join("model.safetensors"))
            .unwrap()
            .len()
    );

    let cfg: Value = serde_json::from_str(&common::read(&dir.join("config.json"))).unwrap();
    assert_eq!(cfg["architectures"][0], "Qwen2ForCausalLM");
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    assert_eq!(cfg["tie_word_embeddings"], false);
    assert_eq!(cfg["vocab_size"], VOCAB);

    let m = load(&dir);
    let shapes = m.config.param_shapes();
    assert_eq!(m.config.vocab_size, VOCAB);
    assert_eq!((m.config.hidden_size, m.config.num_layers), (64, 2));
    assert_eq!((m.config.num_heads, m.config.num_kv_heads), (4, 2));
    assert_eq!(m.config.head_dim, 16);
    assert!(shapes.iter().any(|(n, _)| n == "lm_head.weight"));
    assert!(shapes
        .iter()
        .any(|(n, _)| n == "model.layers.1.self_attn.v_proj.bias"));
    assert_eq!(
        s["params"].as_u64().unwrap() as usize,
        m.config.num_params()
    );
    assert_eq!(m.params.len(), shapes.len());
    for (p, (name, shape)) in m.params.iter().zip(&shapes) {
        assert_eq!(&p.name, name);
        assert_eq!(p.shape.as_slice(), shape.as_slice(), "{name}");
    }

    // stored as bf16, in the file exactly as the header says
    let (h, data) = header(&dir.join("model.safetensors"));
    assert_eq!(h.len(), shapes.len());
    for (name, shape) in &shapes {
        assert_eq!(h[name]["dtype"], "BF16", "{name}");
        assert_eq!(h[name]["shape"], serde_json::json!(shape), "{name}");
    }
    let numel: usize = shapes
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    assert_eq!(data, 2 * numel as u64);

    for (name, _) in &shapes {
        let v = values(&m, name);
        if name.ends_with("norm.weight") {
            assert!(v.iter().all(|&x| x == 1.0), "{name} is not all ones");
        } else {
            let (mean, std) = mean_std(&v);
            // mean within 4 standard errors; the std within 1% for the embeddings and lm_head
            // (3.1M values), 3% for the matrices, loosely for the biases (64 or 32 values)
            let ts = match v.len() {
                n if n >= 1 << 20 => 0.01,
                n if n >= 2048 => 0.03,
                _ => 0.5,
            };
            let tm = 4.0 * 0.02 / (v.len() as f64).sqrt();
            assert!(mean.abs() < tm, "{name}: mean {mean}");
            assert!((std / 0.02 - 1.0).abs() < ts, "{name}: std {std}");
        }
    }
    // two different tensors of the same shape are not the same draws
    assert_ne!(
        values(&m, "model.layers.0.mlp.gate_proj.weight"),
        values(&m, "model.layers.0.mlp.up_proj.weight")
    );
    assert_ne!(
        values(&m, "model.embed_tokens.weight"),
        values(&m, "lm_head.weight")
    );

    // tokenizer.json from the GGUF encodes like the GGUF's own tokenizer
    let text = common::read(&fixture("udhr-en.txt"));
    let want = common::gguf_tokenizer(SMOLLM)
        .encode(&text[..2000])
        .unwrap();
    let got = m.tokenizer.as_ref().unwrap().encode(&text[..2000]).unwrap();
    assert_eq!(got, want);

    // single-file hash: sha256 of model.safetensors
    assert_eq!(
        broca::score::model_sha256(&dir).unwrap(),
        hex_sha(&std::fs::read(dir.join("model.safetensors")).unwrap())
    );
}

#[test]
fn shards_index_determinism_and_the_sharded_hash() {
    let tmp = tempfile::tempdir().unwrap();
    let sharded = tmp.path().join("sharded");
    let limit = 40 * 1024u64;
    let s = synth(&sharded, &["--shard-size", "40K"], &[]);
    let n = s["shards"].as_u64().unwrap() as usize;
    assert!(n >= 4, "only {n} shards");

    let index: Value =
        serde_json::from_str(&common::read(&sharded.join("model.safetensors.index.json"))).unwrap();
    let wm = index["weight_map"].as_object().unwrap();
    let cfg = load(&sharded).config.clone();
    let shapes = cfg.param_shapes();
    let names: BTreeSet<&str> = shapes.iter().map(|(n, _)| n.as_str()).collect();
    let indexed: BTreeSet<&str> = wm.keys().map(|k| k.as_str()).collect();
    assert_eq!(
        indexed, names,
        "the index must name every tensor, nothing else"
    );
    assert_eq!(wm.len(), shapes.len());

    // shard files: HF names, every tensor in exactly one, the one the index says; data
    // under the limit unless a single tensor is larger; tensors assigned in model order
    let shard_files: Vec<String> = (1..=n)
        .map(|i| format!("model-{i:05}-of-{n:05}.safetensors"))
        .collect();
    let mut expected: BTreeSet<String> = shard_files.iter().cloned().collect();
    expected.extend(
        [
            "config.json",
            "tokenizer.json",
            "model.safetensors.index.json",
        ]
        .map(String::from),
    );
    assert_eq!(
        files(&sharded).into_keys().collect::<BTreeSet<_>>(),
        expected
    );
    let mut seen = BTreeMap::new();
    let mut total = 0;
    for (i, f) in shard_files.iter().enumerate() {
        let (h, data) = header(&sharded.join(f));
        assert!(!h.is_empty(), "{f} is empty");
        assert!(
            data <= limit || h.len() == 1,
            "{f}: {data} bytes in {} tensors",
            h.len()
        );
        total += data;
        for name in h.keys() {
            assert!(seen.insert(name.clone(), i).is_none(), "{name} twice");
            assert_eq!(wm[name], f.as_str(), "{name}");
        }
    }
    assert_eq!(seen.len(), shapes.len());
    assert_eq!(index["metadata"]["total_size"].as_u64().unwrap(), total);
    assert_eq!(s["tensor_bytes"].as_u64().unwrap(), total);
    let order: Vec<usize> = shapes.iter().map(|(n, _)| seen[n]).collect();
    assert!(
        order.windows(2).all(|w| w[0] <= w[1]),
        "not in model order: {order:?}"
    );
    assert!(order.windows(2).any(|w| w[0] < w[1]));

    // sharded hash: sha256 of the shards' hex sha256 strings, in index order
    let mut listed: Vec<&str> = wm.values().map(|v| v.as_str().unwrap()).collect();
    listed.sort();
    listed.dedup();
    let hexes: String = listed
        .iter()
        .map(|f| hex_sha(&std::fs::read(sharded.join(f)).unwrap()))
        .collect();
    assert_eq!(
        broca::score::model_sha256(&sharded).unwrap(),
        hex_sha(hexes.as_bytes())
    );

    // a tensor's values depend only on (seed, name): the single-file checkpoint, written on
    // one thread, holds the same values
    let single = tmp.path().join("single");
    synth(&single, &[], &[("RAYON_NUM_THREADS", "1")]);
    let (a, b) = (load(&sharded), load(&single));
    for (pa, pb) in a.params.iter().zip(&b.params) {
        assert_eq!(pa.name, pb.name);
        assert_eq!(
            values(&a, &pa.name),
            values(&b, &pb.name),
            "{} differs between shardings",
            pa.name
        );
    }

    // the same seed gives the same bytes, on any number of threads
    let again = tmp.path().join("again");
    synth(
        &again,
        &["--shard-size", "40K"],
        &[("RAYON_NUM_THREADS", "1")],
    );
    assert_eq!(files(&again), files(&sharded));

    // another seed: other random tensors, the same norms
    let other = tmp.path().join("other");
    synth(&other, &["--seed", "1"], &[]);
    let c = load(&other);
    for (pb, pc) in b.params.iter().zip(&c.params) {
        let (vb, vc) = (values(&b, &pb.name), values(&c, &pc.name));
        if pb.name.ends_with("norm.weight") {
            assert_eq!(vb, vc, "{}", pb.name);
        } else {
            assert_ne!(vb, vc, "{} is the same under seed 1", pb.name);
        }
    }
    assert_ne!(
        std::fs::read(other.join("model.safetensors")).unwrap(),
        std::fs::read(single.join("model.safetensors")).unwrap()
    );

    // rewriting a sharded folder as one file leaves no stale shard or index behind
    synth(&again, &[], &[]);
    assert_eq!(
        files(&again).into_keys().collect::<Vec<_>>(),
        ["config.json", "model.safetensors", "tokenizer.json"]
    );
    assert_eq!(files(&again), files(&single));
}

#[test]
fn ppl_on_a_random_model_is_near_the_vocabulary_size() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    synth(&dir, &["--shard-size", "1M"], &[]);
    let text = fixture("udhr-en.txt");
    let out = broca(
        &[
            "ppl",
            "--model",
            dir.to_str().unwrap(),
            "--text",
            text.to_str().unwrap(),
            "--max-tokens",
            "64",
            "--json",
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "ppl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let r = &v["results"][0];
    assert_eq!(r["tokens"], 64);
    let ppl = r["ppl"].as_f64().unwrap();
    assert!(
        ppl.is_finite() && ppl > 0.5 * VOCAB as f64 && ppl < 2.0 * VOCAB as f64,
        "ppl {ppl} of a random model with {VOCAB} tokens"
    );
}

#[test]
fn bad_flags_give_one_error_line() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("never");
    let o = out.to_str().unwrap();
    let tok = asset(SMOLLM);
    let tok = tok.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--heads", "3", "--hidden", "64"], "--heads"),
        (vec!["--hidden", "24", "--heads", "8"], "--heads"),
        (vec!["--kv-heads", "3"], "--kv-heads"),
        (vec!["--hidden", "0"], "--hidden"),
        (vec!["--layers", "0"], "--layers"),
        (vec!["--vocab", "0"], "--vocab"),
        (vec!["--shard-size", "12Q"], "--shard-size"),
        (vec!["--shard-size", "0"], "--shard-size"),
        (vec!["--vocab", "1000", "--tokenizer", tok], "--vocab"),
        (
            vec!["--tokenizer", "/nonexistent/tokenizer.json"],
            "--tokenizer",
        ),
    ];
    for (extra, flag) in cases {
        let mut args = vec!["synth", "--preset", "tiny", "--out", o];
        args.extend(&extra);
        let r = broca(&args, &[]);
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(1), "{extra:?}: {err}");
        assert!(r.stdout.is_empty(), "{extra:?}: stdout not empty");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{extra:?}: {err}");
        assert!(
            lines[0].starts_with(&format!("error: {flag}: ")),
            "{extra:?}: {err}"
        );
        assert!(!out.exists(), "{extra:?}: output written");
    }
    let r = broca(&["synth", "--preset", "tiny"], &[]);
    assert_eq!(r.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&r.stderr).starts_with("error: --out"));
}

#[test]
fn sizes_parse() {
    use broca::synth::parse_size;
    assert_eq!(parse_size("4G"), Some(4 << 30));
    assert_eq!(parse_size("500M"), Some(500 << 20));
    assert_eq!(parse_size("64k"), Some(64 << 10));
    assert_eq!(parse_size("2GiB"), Some(2 << 30));
    assert_eq!(parse_size("1.5G"), Some(3 << 29));
    assert_eq!(parse_size("123"), Some(123));
    for bad in ["", "G", "abc", "0", "-1G", "1.2.3M", "4X", "1e3"] {
        assert_eq!(parse_size(bad), None, "{bad}");
    }
}

/// The streamed variant of the safetensors writer: the same bytes as the library's own
/// serializer, and a producer that writes the wrong number of bytes leaves no file.
#[test]
fn streamed_tensors_match_safetensors_serialize() {
    let tmp = tempfile::tempdir().unwrap();
    let path: PathBuf = tmp.path().join("s.safetensors");
    let a: Vec<u8> = (0..24u8).collect(); // bf16 [3, 4]
    let b: Vec<u8> = (0..8u8).map(|x| 255 - x).collect(); // f32 [2]
    let entries = vec![
        Entry::stream("b", vec![2], Dtype::F32, |w| Ok(w.write_all(&b)?)),
        Entry::stream("a", vec![3, 4], Dtype::BF16, |w| {
            for c in a.chunks(5) {
                w.write_all(c)?;
            }
            Ok(())
        }),
    ];
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    safetensors_writer::write(&path, entries, Some(&meta)).unwrap();
    let views = vec![
        (
            "a",
            safetensors::tensor::TensorView::new(Dtype::BF16, vec![3, 4], &a).unwrap(),
        ),
        (
            "b",
            safetensors::tensor::TensorView::new(Dtype::F32, vec![2], &b).unwrap(),
        ),
    ];
    let want = safetensors::serialize(views, Some(meta.clone().into_iter().collect())).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), want);

    let bad = tmp.path().join("bad.safetensors");
    let short = vec![Entry::stream("a", vec![3, 4], Dtype::BF16, |w| {
        Ok(w.write_all(&a[..20])?)
    })];
    let e = safetensors_writer::write(&bad, short, None).unwrap_err();
    assert!(format!("{e:#}").contains("bytes written"), "{e:#}");
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
}
