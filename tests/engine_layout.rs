//! Tensor layout: GGUF llama Q/K rows un-permuted to Hugging Face order on load, and a
//! model written as a Hugging Face checkpoint reloads to the same perplexity.

mod common;

use broca::eval::perplexity;
use broca::model::gguf::GgufFile;
use broca::model::Model;
use common::{asset, fixture, read, smollm, SMOLLM};

/// llama.cpp's converter stores row `j*hd/2 + i` of HF head `h` at row `h*hd + 2*i + j`
/// (`j` ∈ {0, 1}, `i` < hd/2). Returns the HF-ordered rows of a GGUF Q/K matrix.
fn unpermute_by_loops(gguf: &[Vec<f32>], heads: usize) -> Vec<Vec<f32>> {
    let hd = gguf.len() / heads;
    let mut hf = vec![Vec::new(); gguf.len()];
    for h in 0..heads {
        for i in 0..hd / 2 {
            for j in 0..2 {
                hf[h * hd + j * hd / 2 + i] = gguf[h * hd + 2 * i + j].clone();
            }
        }
    }
    hf
}

#[test]
fn smollm2_q_k_are_unpermuted_gguf_tensors() {
    let model = smollm();
    let c = &model.config;
    let g = GgufFile::open(&asset(SMOLLM)).unwrap();
    let mut differs_from_raw = false;
    for l in 0..c.num_layers {
        for (w, heads) in [("q", c.num_heads), ("k", c.num_kv_heads)] {
            let raw: Vec<Vec<f32>> = g
                .tensor_f32(&format!("blk.{l}.attn_{w}.weight"))
                .unwrap()
                .to_vec2()
                .unwrap();
            let name = format!("model.layers.{l}.self_attn.{w}_proj.weight");
            let loaded: Vec<Vec<f32>> = model
                .param(&name)
                .unwrap()
                .var()
                .unwrap()
                .as_tensor()
                .to_vec2()
                .unwrap();
            assert_eq!(raw.len(), heads * c.head_dim, "{name}: rows");
            assert!(
                loaded == unpermute_by_loops(&raw, heads),
                "{name} is not the un-permuted GGUF tensor"
            );
            differs_from_raw |= loaded != raw;
        }
    }
    assert!(
        differs_from_raw,
        "un-permuting changed nothing: the check would be vacuous"
    );
}

#[test]
fn saved_hf_checkpoint_reloads_to_same_ppl() {
    let model = smollm();
    let dir = tempfile::tempdir().unwrap();
    model.save_hf(dir.path()).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(dir.path().join(f).is_file(), "save_hf wrote no {f}");
    }
    let reloaded = Model::load(dir.path()).unwrap();
    assert_eq!(reloaded.config, model.config);
    let text = read(&fixture("udhr-en.txt"));
    let ids = model.tokenizer().unwrap().encode(&text).unwrap();
    let ids2 = reloaded.tokenizer().unwrap().encode(&text).unwrap();
    assert_eq!(
        ids, ids2,
        "tokenizer.json gives other ids than the GGUF tokenizer"
    );
    let a = perplexity(model, "en", &ids[..128], 128, 128, |_| {})
        .unwrap()
        .ppl;
    let b = perplexity(&reloaded, "en", &ids2[..128], 128, 128, |_| {})
        .unwrap()
        .ppl;
    // f32 weights are written bit for bit, so the forward is identical
    assert_eq!(a, b, "PPL before save {a}, after reload {b}");
}
